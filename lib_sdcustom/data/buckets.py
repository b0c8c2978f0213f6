"""Aspect-ratio buckets: train each picture near its own shape instead of a centre square.

Cropping every portrait to a square cuts heads and feet off, and the model learns those crops. Buckets
are sizes of about the same pixel area as the training resolution (512 -> ~512*512) in many aspect
ratios, with sides multiples of 64 (the UNet halves the 1/8 latent three times). Each image goes to the
bucket whose aspect ratio is closest to its own, is resized to cover it and cropped by the few pixels
left over. A batch holds one bucket only, because tensors in a batch must share a shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

#: (width, height) in pixels.
Size = tuple[int, int]


@dataclass(frozen=True)
class BucketSet:
    """The buckets for one training resolution.

    `enabled=False` puts every image in the single square bucket (resolution x resolution).
    `min_side`/`max_side` bound bucket sides (default: half and twice the resolution, as kohya).
    `no_upscale=True` never enlarges a picture: an image smaller than the target area gets a bucket of
    its own size rounded down to `step`, a larger one is shrunk to the target area keeping its shape.
    """

    resolution: int = 512
    enabled: bool = True
    min_side: int | None = None
    max_side: int | None = None
    step: int = 64
    no_upscale: bool = False
    sizes: tuple[Size, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("resolution", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive whole number, got {value!r}.", "Use e.g. 512 / 64.")
        if self.resolution % self.step:
            raise ConfigError(f"Resolution {self.resolution} is not a multiple of {self.step}.",
                              f"Use a multiple of {self.step}, e.g. {max(self.step, self.resolution // self.step * self.step)}.")
        half = max(self.step, self.resolution // 2 // self.step * self.step)
        low = half if self.min_side is None else self.min_side
        high = self.resolution * 2 if self.max_side is None else self.max_side
        if not (0 < low <= self.resolution <= high) or low % self.step or high % self.step:
            raise ConfigError(
                f"Bucket sides must satisfy min ({low}) <= resolution ({self.resolution}) <= max ({high}), "
                f"all multiples of {self.step}.",
                "Adjust the minimum/maximum bucket side or the resolution.")
        object.__setattr__(self, "min_side", low)
        object.__setattr__(self, "max_side", high)
        object.__setattr__(self, "sizes", self._make_sizes())

    def _side_bounds(self) -> tuple[int, int]:
        """`min_side` and `max_side`, which `__post_init__` has filled in."""
        if self.min_side is None or self.max_side is None:
            raise ValueError("BucketSpec sides are set in __post_init__")
        return self.min_side, self.max_side

    @property
    def area(self) -> int:
        return self.resolution * self.resolution

    def _make_sizes(self) -> tuple[Size, ...]:
        """The square plus, for every width from min to max side, the tallest height within the area."""
        square = (self.resolution, self.resolution)
        if not self.enabled:
            return (square,)
        sizes = {square}
        low, high = self._side_bounds()
        for width in range(low, high + 1, self.step):
            height = min(high, self.area // width // self.step * self.step)
            if height >= low:
                sizes.update({(width, height), (height, width)})
        return tuple(sorted(sizes))

    def assign(self, width: int, height: int) -> Size:
        """The bucket for an image of this size (see the class docstring)."""
        if not self.enabled:
            return (self.resolution, self.resolution)
        if self.no_upscale:
            return self._shrunk_own_size(width, height)
        target = math.log(width / height)
        return min(self.sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - target), -size[0] * size[1]))

    def _shrunk_own_size(self, width: int, height: int) -> Size:
        scale = min(1.0, math.sqrt(self.area / (width * height)))

        _, high = self._side_bounds()

        def side(length: int) -> int:
            return min(high, max(self.step, int(length * scale) // self.step * self.step))

        return side(width), side(height)


def cover_size(size: Size, bucket: Size) -> Size:
    """The (width, height) a picture of `size` is scaled to so it covers `bucket` with the least overflow."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


def crop_offset(covering: Size, bucket: Size, rng: random.Random | None = None) -> Size:
    """(left, top) of the `bucket` cut from a picture of size `covering`: centred, or drawn from `rng`."""
    spare_x, spare_y = covering[0] - bucket[0], covering[1] - bucket[1]
    if rng is None:
        return spare_x // 2, spare_y // 2
    return rng.randint(0, spare_x), rng.randint(0, spare_y)


def resize_to_cover(image: Image.Image, bucket: Size) -> Image.Image:
    """Scale keeping the aspect ratio so the image covers `bucket` with the least overflow."""
    new_size = cover_size(image.size, bucket)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS)


def crop_to(image: Image.Image, bucket: Size, rng: random.Random | None = None) -> Image.Image:
    """Cut `bucket` out of an image that covers it: centred, or at a random offset drawn from `rng`."""
    if image.size == bucket:
        return image
    left, top = crop_offset(image.size, bucket, rng)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def image_to_tensor(image: Image.Image, bucket: Size, *, flip: bool,
                    crop_rng: random.Random | None = None) -> torch.Tensor:
    """An RGB image as the VAE's input: float32 [3, H, W] in [-1, 1] at the bucket's size.

    `crop_rng` given means a random crop drawn from it; None means a centre crop.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    fitted = crop_to(resize_to_cover(rgb, bucket), bucket, crop_rng)
    if flip:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()
