"""What the tab shows before Train: the image folder's contents, the step arithmetic and a memory estimate.

The estimate is deliberately rough (frozen weights, trainable state and activations, from the family's shape
scaled to the base's parameter count, with the memory savers the settings turn on); its job is to warn
before an hour is lost to an out-of-memory error, not to predict to the megabyte.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..config import DataOptions, RunConfig
from ..data.scan import DatasetScan
from ..run.family_defaults import native_resolution
from ..host.base import ModelKind
from ..methods.registry import OutputKind
from ..models.bundle import ModelFamily
from ..networks.hypernetwork import hypernetwork_parameters

_e = html.escape
THUMBNAILS = 12
_GB = 1024 ** 3
#: Trainable parameters of a network per unit of rank, as a share of the base's (SD1.5: rank 8 ~ 6.4M of 1.07B).
_NETWORK_SHARE_PER_RANK = 0.00075


@dataclass
class DatasetSummary:
    folder: Path
    images: int
    seen_per_epoch: int  # with repeats
    caption_files: int
    folder_captions: int
    uncaptioned: int
    thumbnails: List[Path] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def summarize_dataset(scan: DatasetScan) -> DatasetSummary:
    """What the tab shows of a scanned folder (`run_plan.scan_images`, as training will read it)."""
    sources = [record.caption_source for record in scan.records]
    return DatasetSummary(
        folder=scan.folder, images=len(scan.records), seen_per_epoch=scan.images_per_epoch,
        caption_files=sources.count("file"), folder_captions=sources.count("folder"), uncaptioned=sources.count("none"),
        thumbnails=[record.path for record in scan.records[:THUMBNAILS]],
        skipped=[f"{item.path.name}: {item.reason}" for item in scan.skipped], warnings=list(scan.warnings),
    )


def dataset_html(summary: DatasetSummary) -> str:
    coverage = 100.0 * summary.caption_files / max(summary.images, 1)
    parts = [f"<b>{summary.images}</b> images ({summary.seen_per_epoch} per epoch with repeats)",
             f"captions: {summary.caption_files} from files ({coverage:.0f}%), {summary.folder_captions} from the "
             f"folder name or the token, {summary.uncaptioned} without"]
    items = "".join(f"<li>{_e(text)}</li>" for text in (summary.skipped + summary.warnings)[:8])
    return (f"<div class='sdcustom-panel sdcustom-dataset' data-images='{summary.images}'>"
            + "<br>".join(parts) + (f"<ul>{items}</ul>" if items else "") + "</div>")


@dataclass(frozen=True)
class FamilyShape:
    """A full-size base of one family: parameters per part (from the released checkpoints' tensor counts) and
    the token-embedding tables (what Textual Inversion's gradient reaches)."""

    unet: float
    text_encoders: float
    vae: float
    embedding_tables: float

    @property
    def total(self) -> float:
        return self.unet + self.text_encoders + self.vae


FAMILY_SHAPES: Dict[ModelFamily, FamilyShape] = {
    ModelFamily.SD1: FamilyShape(unet=859.5e6, text_encoders=123.1e6, vae=83.7e6, embedding_tables=49408 * 768),
    ModelFamily.SD2: FamilyShape(unet=865.9e6, text_encoders=354.0e6, vae=83.7e6, embedding_tables=49408 * 1024),
    ModelFamily.SDXL: FamilyShape(unet=2567.5e6, text_encoders=123.1e6 + 694.7e6, vae=83.7e6,
                                  embedding_tables=49408 * (768 + 1280)),
}
#: Width of the text context the UNet's cross-attention reads (a hypernetwork's default width).
_CONTEXT_WIDTHS = {ModelFamily.SD1: 768, ModelFamily.SD2: 1024, ModelFamily.SDXL: 2048}
#: Activation bytes per UNet parameter per latent pixel in fp32 (SD1.5 at 512 px: about 2.5 GB per sample),
#: and the share gradient checkpointing keeps.
_ACTIVATION_BYTES = 2.5 * _GB / (859.5e6 * 64 * 64)
_CHECKPOINTED_SHARE = 0.32
#: Activation bytes per text-encoder parameter per sample in fp32 while a text encoder learns (77 tokens).
_TEXT_ACTIVATION_BYTES = 0.6
#: Optimizer state bytes per trainable parameter (fp32 moments; 8-bit AdamW keeps one byte per moment).
_OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16, "adafactor": 1, "sgd": 0}
#: fp32 weight and gradient of every trainable parameter.
_TRAINABLE_BYTES = 8


def native_sides(kind: ModelKind) -> Tuple[int, ...]:
    """The side(s) the family's models were trained at: one when the prediction type is known, else SD2's two."""
    if kind.prediction_type is None and kind.family is ModelFamily.SD2:
        return native_resolution(kind.family, "v_prediction"), native_resolution(kind.family, "epsilon")
    return (native_resolution(kind.family, kind.prediction_type or "epsilon"),)


def training_resolution(config: RunConfig, kind: Optional[ModelKind]) -> int:
    """The side the run will train at: `family_defaults` moves a resolution left at its default to the model's own."""
    if kind is None or config.data.resolution != DataOptions().resolution:
        return config.data.resolution
    return native_sides(kind)[0]


def text_encoders_learn(config: RunConfig) -> bool:
    """Whether gradients reach a text encoder: its LoRA, its weights (DreamBooth) or, for a method whose result
    is an embedding, the token vectors hooked into its embedding layer."""
    return config.spec.output is OutputKind.EMBEDDING or config.text_encoder_fraction > 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of a run, and the memory savers that shaped them (shown to the user)."""

    weights: int
    training: int  # trainable weights, gradients, optimizer state
    activations: int
    savers: Tuple[str, ...]

    @property
    def total(self) -> int:
        return self.weights + self.training + self.activations


def estimate_memory(config: RunConfig, base_parameters: Optional[int], family: ModelFamily = ModelFamily.SD1,
                    resolution: Optional[int] = None) -> MemoryEstimate:
    """Accelerator memory a run needs, roughly, from the family's shape scaled to the base's parameter count.

    Cached text-encoder outputs save time, not memory: the encoders stay loaded for captions not seen yet.
    """
    training = config.training
    shape = FAMILY_SHAPES[family]
    scale = (base_parameters or shape.total) / shape.total
    unet, text, vae = shape.unet * scale, shape.text_encoders * scale, shape.vae * scale
    half = training.mixed_precision != "no"
    fp8 = training.fp8_base
    frozen_bytes = 1 if fp8 else 2 if half else 4
    per_trainable = _TRAINABLE_BYTES + _OPTIMIZER_STATE.get(config.optimizer.optimizer, 8)
    text_learns = text_encoders_learn(config)
    if "unet" in config.spec.trained_in_place:  # a full fine-tune
        trainable = unet + (text if text_learns else 0)
        frozen = vae + (0 if text_learns else text)
    else:
        if config.uses_network:
            trainable = (unet + (text if text_learns else 0)) * _NETWORK_SHARE_PER_RANK * config.network.rank
        elif config.spec.output is OutputKind.HYPERNETWORK:
            options = config.hypernetwork
            trainable = hypernetwork_parameters(options.width_list or (_CONTEXT_WIDTHS[family],), options.layer_sizes)
        else:  # textual inversion: the gradient reaches the whole token-embedding tables
            trainable = shape.embedding_tables * scale
        frozen = unet + vae + text
    prior = config.prior_enabled
    samples = training.batch_size * (2 if prior else 1)
    latent_pixels = ((resolution or config.data.resolution) / 8) ** 2
    activation_scale = samples * (2 if half else 4) / 4 * (_CHECKPOINTED_SHARE if training.gradient_checkpointing else 1.0)
    activations = (_ACTIVATION_BYTES * unet * latent_pixels + (_TEXT_ACTIVATION_BYTES * text if text_learns else 0)) \
        * activation_scale
    savers = tuple(name for name, used in (
        ("fp8 base", fp8), (f"{training.mixed_precision} weights", half and not fp8),
        ("gradient checkpointing", training.gradient_checkpointing), ("8-bit optimizer", config.optimizer.optimizer == "adamw8bit"),
        ("frozen text encoders", not text_learns)) if used)
    return MemoryEstimate(weights=int(frozen * frozen_bytes), training=int(trainable * per_trainable),
                          activations=int(activations), savers=savers)


def _amount(size: int) -> str:
    return f"{size / _GB:.1f} GB" if size >= _GB / 2 else f"{size / 2**20:.0f} MB"


def _model_line(config: RunConfig, kind: ModelKind) -> str:
    label = kind.family.value.upper() + ("-v" if kind.prediction_type == "v_prediction" else "")
    sides = native_sides(kind)
    line = f"model: {label}, trained at {' or '.join(map(str, sides))} px"
    side = training_resolution(config, kind)
    if side != config.data.resolution:
        line += f"; Resolution left at its default, so this run trains at {side} px"
    elif side not in sides:
        line += f"; you chose {side} px (set Resolution to {sides[0]} for this model's own size)"
    return line


def plan_html(config: RunConfig, seen_per_epoch: Optional[int], base_parameters: Optional[int],
              kind: Optional[ModelKind] = None) -> str:
    """Steps, epochs, the model family and memory for the current settings; parts that need the folder or
    the model say so."""
    training = config.training
    lines = []
    if seen_per_epoch:
        batches = -(-seen_per_epoch // training.batch_size)
        epochs = training.steps * training.gradient_accumulation / batches
        lines.append(f"{seen_per_epoch} images per epoch / batch {training.batch_size} = {batches} steps per epoch; "
                     f"{training.steps} steps = {epochs:.1f} epochs")
    else:
        lines.append(f"{training.steps} steps; check the image folder to see the epochs.")
    if kind is not None:
        lines.append(_model_line(config, kind))
    if base_parameters or kind is not None:
        side = training_resolution(config, kind)
        estimate = estimate_memory(config, base_parameters, kind.family if kind else ModelFamily.SD1, side)
        cached = (" Text-encoder outputs are cached: that saves time, not memory (the encoders stay loaded)."
                  if training.cache_text_encoder_outputs and not text_encoders_learn(config) else "")
        lines.append(f"memory: about {_amount(estimate.total)} (rough estimate for {config.method}, batch {training.batch_size}, "
                     f"{side}px, mixed precision {training.mixed_precision}: weights {_amount(estimate.weights)}, "
                     f"training state {_amount(estimate.training)}, activations {_amount(estimate.activations)}; "
                     f"memory savers on: {', '.join(estimate.savers) or 'none'}).{cached}")
    family_attribute = f" data-family='{kind.family.value}'" if kind is not None else ""
    return (f"<div class='sdcustom-panel sdcustom-plan'{family_attribute}>" + "<br>".join(_e(line) for line in lines)
            + "</div>")
