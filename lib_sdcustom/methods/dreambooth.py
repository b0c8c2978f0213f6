"""DreamBooth: bind a rare identifier in an instance prompt ('a photo of sks dog') to a subject, with the
class-specific prior-preservation loss (Ruiz et al. 2022) against overfitting and language drift.

Two trainers share the DreamBooth batches (`_DreamBoothBatchesMixin`):
- `DreamBoothMethod` fine-tunes the whole UNet (and the text encoder for the first part of the run) and
  exports a single-file checkpoint;
- `DreamBoothLoraMethod` trains a LoRA on the same batches and exports it like any network.

The batches: each image is captioned with the instance prompt, `[filewords]` taking the image's own caption
(in style mode with the trigger put in front, as for the networks).
With prior preservation every micro-batch of n instance examples gets n class examples appended, as for
every method that trains the model (`methods/prior.py`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .. import __version__
from ..config import RunConfig
from ..data.prompt_templates import fill_template
from ..files import check_free_space
from ..formats.checkpoint_file import TrainedWeights, estimated_checkpoint_bytes, write_checkpoint
from ..models.ldm_config import PREDICTION_METADATA_KEY
from ..models.model_yaml import yaml_beside
from ..run.context import RunContext
from ..training.batches import Batch, BatchSource
from ..training.conditioning import Conditioning
from ..training.ema import ExponentialMovingAverage
from .base import SAVE_DTYPES, Method, shared_phrase
from .network import NetworkMethod
from .prior import ClassPrior, PriorMixin, style_trigger, with_class_half
from .text_conditioning import encode_captions


#: Free space kept beyond the checkpoint's estimated size.
DISK_MARGIN_BYTES = 64 * 2**20
#: `ModelBundle` attributes of the text encoders, in `bundle.text_encoders` order (the `TrainedWeights` fields).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class DreamBoothBatches:
    """Instance batches with instance-prompt captions, plus the class half when prior preservation is on."""

    def __init__(self, source: BatchSource, *, instance_prompt: str, name: str, prior: ClassPrior | None) -> None:
        self.source = source
        self.instance_prompt = instance_prompt
        self.name = name
        self.prior = prior

    def batch(self, index: int) -> Batch:
        batch = self.source.batch(index)
        captions = [fill_template(self.instance_prompt, name=self.name, filewords=caption) for caption in batch.captions]
        batch = Batch(latents=batch.latents, captions=captions, weights=batch.weights, sizes=batch.sizes,
                      masks=batch.masks)
        return batch if self.prior is None else with_class_half(batch, index, self.prior)


class _DreamBoothBatchesMixin(PriorMixin):
    """The DreamBooth data side, shared by the full fine-tune and the LoRA trainer."""

    @classmethod
    def default_caption(cls, config: RunConfig) -> str:
        """'' so that [filewords] is empty for images without a caption: the instance prompt carries the subject."""
        return config.data.default_caption

    @classmethod
    def trigger_phrase(cls, config: RunConfig, captions: Sequence[str] = ()) -> str:
        """The instance prompt; its [filewords] stand for what every caption shares ('sks shape'). In style mode
        (validated to caption with [filewords]) the networks' style trigger, put into every caption."""
        if config.prior.style:
            return style_trigger(config)
        return fill_template(config.dreambooth.instance_prompt, name=config.output.name,
                             filewords=shared_phrase(captions))

    def build_source(self, source: BatchSource) -> BatchSource:
        """Style mode's captions under the instance prompt, then the class half, as for the networks."""
        prior = self.class_prior(source)
        return DreamBoothBatches(self.style_captioned(source), instance_prompt=self.config.dreambooth.instance_prompt,
                                 name=self.config.output.name, prior=prior)

    def describe_prior(self) -> str:
        return f"instance prompt {self.config.dreambooth.instance_prompt!r}, {super().describe_prior()}"


class DreamBoothMethod(_DreamBoothBatchesMixin, Method):
    """The UNet learns in full (fp32 master weights even under mixed precision: autocast computes in half
    precision, the optimizer updates fp32); the text encoder (SDXL: both) learns for the configured fraction
    of the run, in one parameter group so that the schedule stops them together."""

    name = "dreambooth"

    @classmethod
    def output_files(cls, target: Path) -> list[Path]:
        return [*super().output_files(target), yaml_beside(target)]

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        bundle, config = context.bundle, context.config
        self.train_text_encoder = config.text_encoder_fraction > 0
        for module in (bundle.vae, *bundle.text_encoders):
            module.requires_grad_(False)
        self.trained: dict[str, torch.nn.Module] = {"unet": bundle.unet}
        if self.train_text_encoder:
            self.trained.update(zip(TEXT_ENCODER_NAMES, bundle.text_encoders))
        for module in self.trained.values():
            module.to(torch.float32)
            module.requires_grad_(True)
        self.ema = (ExponentialMovingAverage(bundle.unet.named_parameters(), config.dreambooth.ema_decay)
                    if config.dreambooth.ema else None)
        if config.training.save_every:
            saves = (config.training.steps - 1) // config.training.save_every
            context.bus.warn(f"Saving a checkpoint every {config.training.save_every} steps writes {saves} intermediate "
                             f"checkpoints of about {self._checkpoint_bytes() / 2**20:.0f} MiB each beside the result.")

    # ----- training -----
    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"name": "unet", "params": list(self.bundle.unet.parameters()), "lr": self.config.unet_lr}]
        encoders = [module for name, module in self.trained.items() if name in TEXT_ENCODER_NAMES]
        if encoders:
            groups.append({"name": "text_encoder", "params": [p for module in encoders for p in module.parameters()],
                           "lr": self.config.text_encoder_lr})
        return groups

    def encode_captions(self, captions: list[str]) -> Conditioning:
        return encode_captions(self.bundle, captions, self.config.model.clip_skip, trainable=self.train_text_encoder)

    def frozen_text_conditioning(self) -> bool:
        return not self.train_text_encoder

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(step)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"{name}.{key}": param.detach() for name, module in self.trained.items()
                 for key, param in module.named_parameters()}
        if self.ema is not None:
            state.update((f"ema.{key}", value) for key, value in self.ema.state_dict().items())
        return state

    @torch.no_grad()
    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in self.trained.items():
            for key, param in module.named_parameters():
                param.copy_(tensors[f"{name}.{key}"])
        if self.ema is not None:
            self.ema.load_state_dict({key[len("ema."):]: value for key, value in tensors.items() if key.startswith("ema.")})

    @contextlib.contextmanager
    def as_exported(self) -> Iterator[None]:
        """The EMA in the UNet for the block, the raw weights back after it: the two swap storage (both fp32 on
        the same device), so nothing is copied and the raw weights return bit for bit."""
        if self.ema is None:
            yield
            return
        self.ema.swap()
        try:
            yield
        finally:
            self.ema.swap()

    # ----- export -----
    def _trained_weights(self) -> TrainedWeights:
        unet = dict(self.bundle.unet.state_dict())
        if self.ema is not None:
            unet.update(self.ema.state_dict())
        encoders = {name: module.state_dict() for name, module in self.trained.items() if name in TEXT_ENCODER_NAMES}
        return TrainedWeights(unet=unet, **encoders)

    def _checkpoint_bytes(self) -> int:
        return estimated_checkpoint_bytes(self.bundle, self._trained_weights(), SAVE_DTYPES[self.config.output.save_precision])

    def required_disk_bytes(self) -> int:
        return self._checkpoint_bytes() + DISK_MARGIN_BYTES

    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        check_free_space(target.parent, self.required_disk_bytes(), f"the checkpoint {target.name}")
        return write_checkpoint(target, self.bundle, self._trained_weights(), dtype=SAVE_DTYPES[self.config.output.save_precision],
                                metadata=checkpoint_metadata(self.context, step=step, text_encoder_trained=self.train_text_encoder),
                                preview=preview)

    def describe(self) -> str:
        params = sum(p.numel() for module in self.trained.values() for p in module.parameters())
        encoders = len(self.trained) - 1
        parts = "UNet" if not encoders else "UNet and text encoder" if encoders == 1 else "UNet and both text encoders"
        ema = ", EMA of the UNet exported" if self.ema is not None else ""
        return f"DreamBooth: {parts} ({params:,} parameters){ema}; {self.describe_prior()}"


class DreamBoothLoraMethod(_DreamBoothBatchesMixin, NetworkMethod):
    """A LoRA trained on DreamBooth batches (instance prompts, prior preservation), exported as a network."""

    def describe(self) -> str:
        return f"DreamBooth-{super().describe()}"


def checkpoint_metadata(context: RunContext, *, step: int, text_encoder_trained: bool) -> dict[str, str]:
    """What the host shows for the checkpoint (CheckpointInfo.metadata) and what recreates the run."""
    config, identity = context.config, context.bundle.identity
    db, prior = config.dreambooth, config.prior
    values = {
        "format": "pt",
        "sdcustom_version": __version__,
        "sdcustom_method": config.method,
        "sdcustom_base_model": identity.name,
        "sdcustom_base_sha256": identity.sha256 or "",
        "sdcustom_base_hash": identity.legacy_hash or "",
        "sdcustom_steps": str(step),
        "sdcustom_instance_prompt": db.instance_prompt,
        "sdcustom_class_prompt": prior.class_prompt if prior.prior_preservation else "",
        "sdcustom_prior_preservation": str(prior.prior_preservation).lower(),
        "sdcustom_prior_weight": str(config.prior_weight) if prior.prior_preservation else "",
        "sdcustom_text_encoder_trained": str(text_encoder_trained).lower(),
        # What our loader reads when the checkpoint travels without its YAML (the host reads the YAML).
        PREDICTION_METADATA_KEY: "v" if context.bundle.prediction_type == "v_prediction" else "epsilon",
        "sdcustom_ema": str(db.ema).lower(),
        "sdcustom_trained_precision": config.output.save_precision,
        "sdcustom_resolution": str(config.data.resolution),
        "sdcustom_seed": str(config.training.seed),
    }
    return {key: value for key, value in values.items() if value}
