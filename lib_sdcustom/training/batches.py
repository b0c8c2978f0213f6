"""Micro-batches for the loop, by global index: what a batch is, what gives one, and the source of the
training set's epochs laid end to end, as latents (methods wrap it to add class images or prompt templates).

With the cache on, every latent is encoded before the first step (so the VAE is done before training
starts and an unreadable image fails early); without it (random crop), each batch is encoded on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..data.dataset import Example, TrainingSet
from ..data.latent_cache import LatentCache
from ..events import EventBus
from ..models.bundle import ModelBundle
from .conditioning import SizeConditioning


@dataclass
class Batch:
    """One micro-batch: latents already multiplied by the VAE scaling factor, and their captions.

    `weights` scales each sample's loss (1 for ordinary images; prior-preservation images carry the
    prior weight). `sizes` is each sample's original size and crop, which SDXL is conditioned on; None
    means every sample is an uncropped picture of the latents' size. `masks` [B, 1, h, w] weights the loss
    over the latent grid (masked loss); None means every position counts the same.
    """

    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None = None
    sizes: list[SizeConditioning] | None = None
    masks: torch.Tensor | None = None


class BatchSource(Protocol):
    def batch(self, index: int) -> Batch:
        """The micro-batch at global position `index`; the same index always gives the same batch."""


def uncropped_sizes(latents: torch.Tensor, bundle: ModelBundle) -> list[SizeConditioning]:
    """Size conditioning for latents of pictures used whole at their own size (no `Batch.sizes`)."""
    scale = bundle.pixels_per_latent
    height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
    return [SizeConditioning.uncropped(height, width)] * latents.shape[0]


class LatentBatchSource:
    def __init__(self, training_set: TrainingSet, bundle: ModelBundle, cache: LatentCache | None) -> None:
        self.training_set = training_set
        self.bundle = bundle
        self.cache = cache
        self.batches_per_epoch = training_set.steps_per_epoch()
        self._epoch: tuple[int, list[list[Example]]] | None = None

    @classmethod
    def create(cls, training_set: TrainingSet, bundle: ModelBundle, *, run_dir: Path, use_cache: bool, bus: EventBus) -> "LatentBatchSource":
        if not use_cache or training_set.options.random_crop:
            if use_cache:
                bus.warn("Random crop is on, so latents are encoded every step instead of cached.")
            return cls(training_set, bundle, None)
        vae_identity = f"{bundle.identity.sha256 or bundle.identity.name}:{bundle.vae.dtype}:{bundle.vae_scaling_factor}"
        cache = LatentCache(Path(run_dir) / "cache" / "latents", vae_identity)
        source = cls(training_set, bundle, cache)
        cache.fill(training_set, source.encode)
        return source

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] to scaled latents on the CPU.

        We take the posterior mean rather than a sample: the SD VAE's posterior is nearly a point, and a
        deterministic latent keeps cached and uncached runs identical.
        """
        vae = self.bundle.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents: torch.Tensor = (posterior.mode() * self.bundle.vae_scaling_factor).float().cpu()
        return latents

    def _examples(self, epoch: int) -> list[list[Example]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.training_set.batches_for_epoch(epoch))
        return self._epoch[1]

    def batch(self, index: int) -> Batch:
        epoch, position = divmod(index, self.batches_per_epoch)
        examples = self._examples(epoch)[position]
        cache = self.cache
        if cache is not None:
            latents = torch.stack([cache.get_or_encode(self.training_set.record(example), example.bucket, example.flip,
                                                       self.encode) for example in examples])
        else:
            latents = self.encode(self.training_set.load_batch_pixels(examples))
        latent_scale = self.bundle.pixels_per_latent
        return Batch(latents=latents, captions=[example.caption for example in examples],
                     sizes=[self.training_set.size_conditioning(example) for example in examples],
                     masks=self.training_set.load_batch_masks(examples, latent_scale))
