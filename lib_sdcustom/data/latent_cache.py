"""VAE latents computed once per (picture, size, flip) and reused every epoch.

Encoding an image costs more than a training step of a LoRA, and with a frozen VAE the result never
changes, so it is cached. The key holds everything the latent depends on: the image's content hash (an
edited picture misses even under the same name), the bucket size, the flip, the crop mode and the VAE's
identity (another VAE, or the same one at another precision if the caller includes that, misses).

Random crop cannot be cached: a stored latent freezes one crop, so every epoch would train the same crop
and the augmentation would silently do nothing. The cache therefore refuses to be built for a run with
random crop (kohya refuses the same combination); such a run encodes every step instead.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ConfigError, DatasetError
from ..files import write_atomically
from .buckets import Size, image_to_tensor
from .dataset import TrainingSet
from .images import decode_rgb
from .scan import ImageRecord

logger = logging.getLogger(__name__)

#: Part of every key; bump it when the pixels fed to the VAE change (resize filter, normalisation).
CACHE_FORMAT = "sdcustom-latents-1"
_CROP_MODE = "center"
_TENSOR_NAME = "latents"
_KEY_FIELD = "sdcustom_latent_key"

#: `encode` receives float32 pixels [1, 3, H, W] in [-1, 1] on the CPU and returns latents [1, C, H/8, W/8]
#: ready for the UNet (moved to its device, sampled or mean, scaled by the VAE's scaling factor).
Encoder = Callable[[torch.Tensor], torch.Tensor]


class LatentCache:
    """Latents on disk under `folder` (one safetensors file each, written atomically), or in memory
    when `folder` is None (stored and handed out as copies: callers may modify what they get in place). `vae_identity` must change whenever the latents would: e.g. the VAE file's
    hash plus the dtype and scaling factor the encoder uses."""

    def __init__(self, folder: Path | None, vae_identity: str, *, random_crop: bool = False) -> None:
        if random_crop:
            raise ConfigError(
                "Latent caching cannot be combined with random crop: a cached latent keeps one crop, so "
                "every epoch would see the same crop and the augmentation would do nothing.",
                "Turn off random crop, or turn off latent caching.")
        if not vae_identity.strip():
            raise ValueError("vae_identity must name the VAE, or stale latents of another VAE would be reused.")
        self.folder = None if folder is None else Path(folder)
        self.vae_identity = vae_identity
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, torch.Tensor] = {}

    def key(self, record: ImageRecord, bucket: Size, flip: bool) -> str:
        return "|".join([CACHE_FORMAT, record.sha256, f"{bucket[0]}x{bucket[1]}", f"flip={int(flip)}",
                         f"crop={_CROP_MODE}", f"vae={self.vae_identity}"])

    def path_for(self, record: ImageRecord, bucket: Size, flip: bool) -> Path | None:
        """Where the latent is stored on disk (None for an in-memory cache)."""
        if self.folder is None:
            return None
        digest = hashlib.sha256(self.key(record, bucket, flip).encode("utf-8")).hexdigest()[:16]
        return self.folder / f"{record.sha256[:16]}_{bucket[0]}x{bucket[1]}_{'f' if flip else 'n'}_{digest}.safetensors"

    def get_or_encode(self, record: ImageRecord, bucket: Size, flip: bool, encode: Encoder) -> torch.Tensor:
        """The latent [C, h, w] (float32, CPU) of the record's centre crop at `bucket`, flipped if asked."""
        key = self.key(record, bucket, flip)
        cached = self._read(key, self.path_for(record, bucket, flip))
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        latents = self._encode(record, bucket, flip, encode)
        self._write(key, self.path_for(record, bucket, flip), latents)
        return latents

    def fill(self, training_set: TrainingSet, encode: Encoder,
             on_progress: Callable[[int, int], None] | None = None) -> int:
        """Encode every latent the run can ask for (both flips when flip is on) before training, so the
        VAE can leave the GPU afterwards. Returns how many were encoded (the rest were cached);
        `on_progress(done, total)` is called after each."""
        flips = (False, True) if training_set.options.flip else (False,)
        wanted = [(record, bucket, flip) for record, bucket in zip(training_set.records, training_set.buckets)
                  for flip in flips]
        misses_before = self.misses
        for done, (record, bucket, flip) in enumerate(wanted, start=1):
            self.get_or_encode(record, bucket, flip, encode)
            if on_progress is not None:
                on_progress(done, len(wanted))
        return self.misses - misses_before

    def _read(self, key: str, path: Path | None) -> torch.Tensor | None:
        if path is None:
            stored = self._memory.get(key)
            return None if stored is None else stored.clone()
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get(_KEY_FIELD) != key:
                    return None
                return cast(torch.Tensor, handle.get_tensor(_TENSOR_NAME))
        except Exception as error:  # noqa: BLE001 - any damaged cache file is simply recomputed
            logger.warning("Re-encoding %s: the cached latent cannot be read (%s).", path, error)
            return None

    def _write(self, key: str, path: Path | None, latents: torch.Tensor) -> None:
        if path is None:
            self._memory[key] = latents.clone()
            return
        write_atomically(path, lambda tmp: save_file({_TENSOR_NAME: latents}, str(tmp), metadata={_KEY_FIELD: key}))

    @staticmethod
    def _encode(record: ImageRecord, bucket: Size, flip: bool, encode: Encoder) -> torch.Tensor:
        try:
            data = record.path.read_bytes()
        except OSError as error:
            raise DatasetError(f"Cannot read {record.path}: {error.strerror or error}.",
                               "Keep the image folder unchanged while training.") from error
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise DatasetError(f"{record.path} changed after the folder was scanned.",
                               "Keep the image folder unchanged while training, then start again.")
        pixels = image_to_tensor(decode_rgb(data, record.path), bucket, flip=flip)
        with torch.no_grad():
            latents = encode(pixels.unsqueeze(0))
        if latents.dim() != 4 or latents.shape[0] != 1:
            raise ValueError(f"encode must return latents shaped [1, C, h, w], got {tuple(latents.shape)}.")
        return latents[0].detach().to("cpu", torch.float32).contiguous()
