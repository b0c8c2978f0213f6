"""Micro-batches for the loop, by global index: the training set's epochs laid end to end, as latents.

With the cache on, every latent is encoded before the first step (so the VAE is done before training
starts and an unreadable image fails early); without it (random crop), each batch is encoded on the fly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.dataset import Example, TrainingSet
from ..data.latent_cache import LatentCache
from ..events import EventBus
from ..models.bundle import ModelBundle
from .loop import Batch


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
        return (posterior.mode() * self.bundle.vae_scaling_factor).float().cpu()

    def _examples(self, epoch: int) -> list[list[Example]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.training_set.batches_for_epoch(epoch))
        return self._epoch[1]

    def batch(self, index: int) -> Batch:
        epoch, position = divmod(index, self.batches_per_epoch)
        examples = self._examples(epoch)[position]
        if self.cache is not None:
            latents = torch.stack([self._cached_latent(example) for example in examples])
        else:
            latents = self.encode(self.training_set.load_batch_pixels(examples))
        latent_scale = 2 ** (len(self.bundle.vae.config.block_out_channels) - 1)
        return Batch(latents=latents, captions=[example.caption for example in examples],
                     sizes=[self.training_set.size_conditioning(example) for example in examples],
                     masks=self.training_set.load_batch_masks(examples, latent_scale))

    def _cached_latent(self, example: Example) -> torch.Tensor:
        return self.cache.get_or_encode(self.training_set.record(example), example.bucket, example.flip, self.encode)
