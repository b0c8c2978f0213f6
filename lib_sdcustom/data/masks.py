"""Loss masks: which part of each training picture the model should learn (masked loss).

A picture's mask is a same-stem `NAME.mask.png` beside it (white = learn, black = ignore, grey in between), or
else its own alpha channel; a picture with neither is learned whole. Masks are read only when masked loss is
on; `NAME.mask.png` files are never training pictures themselves (`scan.py` leaves them out).

A mask goes through exactly the image's geometry (EXIF rotation, resize to cover the bucket, the same centre or
random crop, the same flip) and is then averaged down to the latent grid, each latent cell getting the share of
its pixels that is masked in. Everything is checked when the training set is built, before the model loads:
a mask of another size than its picture, a mask (or alpha channel) with nothing masked in, and a mask file
whose picture is missing each stop the run with a message naming the file.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import DatasetError
from .buckets import Size, cover_size, crop_to
from .images import has_alpha
from .scan import MASK_SUFFIX, DatasetScan, ImageRecord, is_mask_file, parse_repeat_folder


def mask_file_for(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


@dataclass(frozen=True)
class MaskSource:
    """Where a picture's mask comes from: `path` is the mask file, or the picture itself for its alpha channel."""

    path: Path
    from_alpha: bool

    def load(self) -> Image.Image:
        """The mask as an 8-bit grey image the size of the upright picture."""
        with Image.open(io.BytesIO(self.path.read_bytes())) as opened:
            upright = ImageOps.exif_transpose(opened)  # as `images.load_rgb` turns the picture
            return upright.convert("RGBA").getchannel("A") if self.from_alpha else upright.convert("L")


def find_masks(scan: DatasetScan) -> dict[int, MaskSource]:
    """The mask of each record that has one (by record index), every mask checked; raise `DatasetError`
    naming the file for a mask without its picture, of another size, or with nothing masked in."""
    _refuse_orphans(scan)
    masks: dict[int, MaskSource] = {}
    for index, record in enumerate(scan.records):
        source = _mask_source(record)
        if source is not None:
            _check(source, record)
            masks[index] = source
    return masks


def _mask_source(record: ImageRecord) -> MaskSource | None:
    mask_file = mask_file_for(record.path)
    if mask_file.is_file():
        return MaskSource(mask_file, from_alpha=False)
    with Image.open(record.path) as image:
        return MaskSource(record.path, from_alpha=True) if has_alpha(image) else None


def _refuse_orphans(scan: DatasetScan) -> None:
    """Mask files in the folders the scan reads (the folder and its 'N_caption' subfolders) need a record."""
    folders = {scan.folder, *(path for path in scan.folder.iterdir()
                              if path.is_dir() and parse_repeat_folder(path.name) is not None)}
    pictures = {record.path.parent / record.path.stem for record in scan.records}
    for folder in sorted(folders):
        for mask in sorted(path for path in folder.iterdir() if is_mask_file(path)):
            if mask.parent / mask.name[:-len(MASK_SUFFIX)] not in pictures:
                raise DatasetError(
                    f"The mask {mask} has no training picture beside it (looked for "
                    f"{mask.name[:-len(MASK_SUFFIX)]} with an image extension; a damaged picture is skipped).",
                    "Put its picture beside it under the same name (e.g. photo.png for photo.mask.png), or remove the mask.")


def _check(source: MaskSource, record: ImageRecord) -> None:
    mask = source.load()
    what = f"The alpha channel of {source.path}" if source.from_alpha else f"The mask {source.path}"
    if mask.size != record.size:
        raise DatasetError(f"{what} is {mask.size[0]}x{mask.size[1]} pixels but its picture {record.path.name} is "
                           f"{record.size[0]}x{record.size[1]}.",
                           "Save the mask at the picture's own size (white = learn, black = ignore).")
    if mask.getextrema()[1] == 0:
        raise DatasetError(f"{what} is black everywhere, so the picture would teach nothing.",
                           "Paint the subject white in the mask (or make it opaque), or remove the picture.")


def mask_to_tensor(mask: Image.Image, bucket: Size, *, flip: bool, crop_rng: random.Random | None,
                   latent_scale: int) -> torch.Tensor:
    """The mask fitted to `bucket` as `buckets.image_to_tensor` fits its picture (a `crop_rng` seeded as the
    picture's draws the same crop), then area-averaged to the latent grid: float32 [1, H/scale, W/scale] in [0, 1]."""
    fitted = crop_to(mask.resize(cover_size(mask.size, bucket), Image.Resampling.BILINEAR), bucket, crop_rng)
    if flip:
        fitted = fitted.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None, None]
    return F.avg_pool2d(pixels, latent_scale)[0]


def batch_masks(masks: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """[B, 1, h, w] for a batch, ones for pictures without a mask; None when no picture of it has one (so an
    unmasked batch trains exactly as without masked loss)."""
    shape = next((mask.shape for mask in masks if mask is not None), None)
    if shape is None:
        return None
    return torch.stack([torch.ones(shape) if mask is None else mask for mask in masks])
