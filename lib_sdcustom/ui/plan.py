"""What the tab shows before Train: the image folder's contents, the step arithmetic and a memory estimate.

The estimate is deliberately rough (weights + optimizer state + activations, from the parameter count); its
job is to warn before an hour is lost to an out-of-memory error, not to predict to the megabyte.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..config import NETWORK_METHODS, RunConfig

_e = html.escape
THUMBNAILS = 12
_GB = 1024 ** 3
#: Trainable parameters of a network per unit of rank, as a share of the base's (SD1.5: rank 8 ~ 6.4M of 1.07B).
_NETWORK_SHARE_PER_RANK = 0.00075
#: Activation memory of one 512x512 SD1.5 sample in fp32, without / with gradient checkpointing.
_ACTIVATIONS_512 = (2.5 * _GB, 0.8 * _GB)
_SD15_PARAMETERS = 1.07e9


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


def summarize_dataset(config: RunConfig, default_caption: str) -> DatasetSummary:
    """Scan the folder as training will (raises DatasetError/ConfigError with the fix)."""
    from ..data.scan import scan_dataset

    data = config.data
    scan = scan_dataset(Path(data.data), caption_extension=data.caption_extension, default_repeats=data.repeats,
                        default_caption=default_caption)
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


def estimate_memory(config: RunConfig, base_parameters: int) -> int:
    """Bytes of accelerator memory a run needs, roughly."""
    training = config.training
    frozen_bytes = 4 if training.mixed_precision == "no" else 2
    if config.method == "dreambooth":
        trainable = int(base_parameters * 0.8)  # the UNet's share of an SD1 checkpoint
    elif config.method in NETWORK_METHODS or config.method == "dreambooth_lora":
        trainable = int(base_parameters * _NETWORK_SHARE_PER_RANK * config.network.rank)
    else:  # textual inversion: a few vectors, plus the gradient through the embedding table
        trainable = int(base_parameters * 0.04)
    weights_grads_adam = 16
    scale = base_parameters / _SD15_PARAMETERS
    per_sample = _ACTIVATIONS_512[1 if training.gradient_checkpointing else 0] * (config.data.resolution / 512) ** 2
    activations = per_sample * training.batch_size * scale * frozen_bytes / 4
    return int(base_parameters * frozen_bytes + trainable * weights_grads_adam + activations)


def plan_html(config: RunConfig, seen_per_epoch: Optional[int], base_parameters: Optional[int]) -> str:
    """Steps, epochs and memory for the current settings; parts that need the folder or model say so."""
    training = config.training
    lines = []
    if seen_per_epoch:
        batches = -(-seen_per_epoch // training.batch_size)
        epochs = training.steps * training.gradient_accumulation / batches
        lines.append(f"{seen_per_epoch} images per epoch / batch {training.batch_size} = {batches} steps per epoch; "
                     f"{training.steps} steps = {epochs:.1f} epochs")
    else:
        lines.append(f"{training.steps} steps; check the image folder to see the epochs.")
    if base_parameters:
        need = estimate_memory(config, base_parameters)
        amount = f"{need / _GB:.1f} GB" if need >= _GB / 2 else f"{need / 2**20:.0f} MB"
        lines.append(f"memory: about {amount} (rough estimate for {config.method}, batch {training.batch_size}, "
                     f"{config.data.resolution}px, mixed precision {training.mixed_precision})")
    return "<div class='sdcustom-panel sdcustom-plan'>" + "<br>".join(_e(line) for line in lines) + "</div>"
