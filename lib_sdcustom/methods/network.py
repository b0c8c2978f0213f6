"""The network method: LoRA and the LyCORIS algorithms (`networks/algorithms.py`) trained on a frozen base,
exported in kohya format, with prior preservation and style mode (`methods/prior.py`) when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import RunConfig
from ..networks.algorithms import algorithm_for
from ..networks.lycoris_backend import attach_network
from ..run.context import RunContext
from ..training.batches import BatchSource
from ..training.conditioning import Conditioning
from .base import Method
from .network_export import export_network
from .prior import PriorBatches, PriorMixin, style_trigger
from .text_conditioning import encode_captions


class NetworkMethod(PriorMixin, Method):
    """Only the network's modules learn; the UNet, VAE and text encoders stay bit-identical. On SDXL both
    text encoders get modules (`lora_te1_`, `lora_te2_`)."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        bundle, config = context.bundle, context.config
        self.name = config.method
        self.algorithm = algorithm_for(config.method)
        self.train_text_encoder = config.text_encoder_fraction > 0
        for model in (bundle.unet, *bundle.text_encoders, bundle.vae):
            model.requires_grad_(False)
        # The initial weights come from the run's seed, not from whatever the process drew before (a host
        # that trains twice, or a test suite), so the same seed and data give the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            self.attached = attach_network(bundle.unet, bundle.text_encoders, self.algorithm, config.network,
                                           train_text_encoder=self.train_text_encoder)

    @classmethod
    def trigger_phrase(cls, config: RunConfig, captions: Sequence[str] = ()) -> str:
        """In style mode `style_trigger`, else the base's choice."""
        return style_trigger(config) if config.prior.style else super().trigger_phrase(config, captions)

    def build_source(self, source: BatchSource) -> BatchSource:
        """The method's captions, then the class half of each batch when prior preservation has class images."""
        prior = self.class_prior(source)
        batches = self.captioned(source)
        return batches if prior is None else PriorBatches(batches, prior)

    def captioned(self, source: BatchSource) -> BatchSource:
        """The training captions: style mode's (the trigger in each) when it is on, else the data's own."""
        return self.style_captioned(source)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.attached.param_groups(unet_lr=self.config.unet_lr, text_encoder_lr=self.config.text_encoder_lr,
                                          up_lr_ratio=self.config.network.loraplus_lr_ratio)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.attached.state_dict()

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.attached.load_state_dict(tensors)

    def encode_captions(self, captions: list[str]) -> Conditioning:
        return encode_captions(self.bundle, captions, self.config.model.clip_skip, trainable=self.train_text_encoder)

    def frozen_text_conditioning(self) -> bool:
        return not self.train_text_encoder

    def set_training(self, training: bool) -> None:
        self.attached.network.train(training)

    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        return export_network(self, target, step=step, preview=preview)

    def describe(self) -> str:
        te = len(self.attached.text_encoder_modules)
        unet = len(self.attached.unet_modules)
        params = sum(p.numel() for group in self.param_groups() for p in group["params"])
        dora = " with DoRA" if self.config.network.dora else ""
        return (f"{self.algorithm.name}{dora} ({self.algorithm.summary}), rank {self.config.network.rank}, "
                f"alpha {self.config.network.alpha}: "
                f"{unet} UNet modules, {te} text-encoder modules, {params:,} trainable parameters; "
                f"{self.describe_prior()}")

    def close(self) -> None:
        self.attached.detach()
