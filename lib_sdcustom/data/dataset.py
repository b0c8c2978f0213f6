"""The training set: which picture, at which size, flipped or not, with which caption, in which order.

Everything random here is derived from (seed, epoch, position in the epoch) by hashing, never from a
running random state. So epoch 7 is the same whether the run got there directly or was interrupted and
resumed at epoch 5: resuming only needs the epoch and the number of batches already done.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..training.conditioning import SizeConditioning
from .buckets import BucketSet, Size, cover_size, crop_offset, image_to_tensor
from .captions import CaptionOptions, process_caption
from .images import load_rgb
from .masks import MaskSource, batch_masks, find_masks, mask_to_tensor
from .scan import DatasetScan, ImageRecord


@dataclass(frozen=True)
class BatchingOptions:
    """How pictures become batches. `flip`: each example is mirrored with probability 1/2.
    `random_crop`: the leftover pixels after resizing are cropped at a random offset instead of centred
    (incompatible with latent caching, see `latent_cache`)."""

    resolution: int = 512
    buckets: bool = True
    min_bucket_side: int | None = None
    max_bucket_side: int | None = None
    bucket_step: int = 64
    no_upscale: bool = False
    batch_size: int = 1
    flip: bool = False
    random_crop: bool = False
    masked_loss: bool = False  # weight the loss by each picture's mask (`masks.py`)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    seed: int = 0

    def __post_init__(self) -> None:
        _require_positive("batch_size", self.batch_size, "Use a batch size of 1 or more.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be a whole number, got {self.seed!r}.", "Use e.g. seed = 1234.")

    def bucket_set(self) -> BucketSet:
        return BucketSet(resolution=self.resolution, enabled=self.buckets, min_side=self.min_bucket_side,
                         max_side=self.max_bucket_side, step=self.bucket_step, no_upscale=self.no_upscale)


@dataclass(frozen=True)
class Example:
    """One image occurrence in an epoch. `crop_seed` is None for a centre crop, else the seed of its
    random crop, so loading the example twice gives the same pixels."""

    record_index: int
    bucket: Size
    flip: bool
    caption: str
    crop_seed: int | None


class TrainingSet:
    """A scanned folder plus `BatchingOptions`: deterministic batches and their pixels."""

    def __init__(self, scan: DatasetScan, options: BatchingOptions) -> None:
        self.scan = scan
        self.records = scan.records
        self.options = options
        self.bucket_set = options.bucket_set()
        self.buckets: list[Size] = [self.bucket_set.assign(*record.size) for record in self.records]
        self.masks: dict[int, MaskSource] = find_masks(scan) if options.masked_loss else {}
        self._latent_masks: dict[tuple[int, Size, bool, int], torch.Tensor] = {}

    def record(self, example: Example) -> ImageRecord:
        return self.records[example.record_index]

    def bucket_counts(self) -> dict[Size, int]:
        """Examples per epoch (repeats included) in each bucket, in bucket order."""
        counts: dict[Size, int] = {}
        for record, bucket in sorted(zip(self.records, self.buckets), key=lambda pair: pair[1]):
            counts[bucket] = counts.get(bucket, 0) + record.repeats
        return counts

    def batches_for_epoch(self, epoch: int) -> list[list[Example]]:
        """Every record `repeats` times, grouped into batches of one bucket each, in an order that
        depends only on (seed, epoch). The last batch of a bucket may be smaller than the batch size."""
        order = random.Random(_derive_seed(self.options.seed, "order", epoch))
        index_batches: list[list[int]] = []
        for bucket in self.bucket_counts():
            entries = [index for index, record in enumerate(self.records) if self.buckets[index] == bucket
                       for _ in range(record.repeats)]
            order.shuffle(entries)
            size = self.options.batch_size
            index_batches += [entries[start:start + size] for start in range(0, len(entries), size)]
        order.shuffle(index_batches)
        batches: list[list[Example]] = []
        position = 0
        for indices in index_batches:
            batches.append([self._example(index, epoch, position + offset) for offset, index in enumerate(indices)])
            position += len(indices)
        return batches

    def _example(self, index: int, epoch: int, position: int) -> Example:
        rng = random.Random(_derive_seed(self.options.seed, "example", epoch, position))
        flip = self.options.flip and rng.random() < 0.5
        caption = process_caption(self.records[index].caption, rng, self.options.captions)
        crop_seed = rng.getrandbits(63) if self.options.random_crop else None
        return Example(record_index=index, bucket=self.buckets[index], flip=flip, caption=caption,
                       crop_seed=crop_seed)

    def load_pixels(self, example: Example) -> torch.Tensor:
        """The example's pixels: float32 [3, H, W] in [-1, 1], H x W = its bucket."""
        crop_rng = None if example.crop_seed is None else random.Random(example.crop_seed)
        image = load_rgb(self.record(example).path)
        return image_to_tensor(image, example.bucket, flip=example.flip, crop_rng=crop_rng)

    def size_conditioning(self, example: Example) -> SizeConditioning:
        """SDXL's size and crop conditioning for the example, computed without opening the picture."""
        return size_conditioning(self.record(example).size, example.bucket, crop_seed=example.crop_seed, flip=example.flip)

    def load_batch_pixels(self, batch: list[Example]) -> torch.Tensor:
        """[B, 3, H, W] for a batch from `batches_for_epoch` (all one bucket)."""
        return torch.stack([self.load_pixels(example) for example in batch])

    def load_batch_masks(self, batch: list[Example], latent_scale: int) -> torch.Tensor | None:
        """Loss masks [B, 1, H/scale, W/scale] at the latents' size for a batch (ones for pictures without a
        mask), or None when none of its pictures has one."""
        return batch_masks([self._latent_mask(example, latent_scale) for example in batch])

    def _latent_mask(self, example: Example, latent_scale: int) -> torch.Tensor | None:
        """A centre-cropped mask is kept (a few hundred floats) so a picture is not decoded again every epoch."""
        source = self.masks.get(example.record_index)
        if source is None:
            return None
        key = (example.record_index, example.bucket, example.flip, latent_scale)
        if example.crop_seed is None and key in self._latent_masks:
            return self._latent_masks[key]
        crop_rng = None if example.crop_seed is None else random.Random(example.crop_seed)  # the picture's crop
        mask = mask_to_tensor(source.load(), example.bucket, flip=example.flip, crop_rng=crop_rng,
                              latent_scale=latent_scale)
        if example.crop_seed is None:
            self._latent_masks[key] = mask
        return mask

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        """Batches per epoch: each bucket fills its own batches, so this can exceed images / batch."""
        size = self.options.batch_size if batch_size is None else batch_size
        _require_positive("batch_size", size, "Use a batch size of 1 or more.")
        return sum(math.ceil(count / size) for count in self.bucket_counts().values())

    def total_steps(self, epochs: int, *, gradient_accumulation: int = 1) -> int:
        """Optimizer steps for the run: per epoch, batches / accumulation rounded up (an epoch's last
        partial accumulation still makes a step)."""
        _require_positive("epochs", epochs, "Train for at least 1 epoch.")
        _require_positive("gradient_accumulation", gradient_accumulation, "Use 1 to turn accumulation off.")
        return math.ceil(self.steps_per_epoch() / gradient_accumulation) * epochs


def size_conditioning(image_size: Size, bucket: Size, *, crop_seed: int | None = None,
                      flip: bool = False) -> SizeConditioning:
    """What SDXL is told about a picture of `image_size` (width, height) fitted to `bucket`: its original size,
    where the crop was cut from the resized picture (mirrored with the picture when flipped, as kohya does) and
    the bucket. Uses the same crop arithmetic and random draws as `load_pixels`."""
    covering = cover_size(image_size, bucket)
    crop_rng = None if crop_seed is None else random.Random(crop_seed)
    left, top = crop_offset(covering, bucket, crop_rng)
    if flip:
        left = covering[0] - bucket[0] - left
    return SizeConditioning(original=(image_size[1], image_size[0]), crop=(top, left), target=(bucket[1], bucket[0]))


def _derive_seed(*parts: object) -> int:
    """A 64-bit seed from the parts, stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big")


def _require_positive(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}.", fix)
