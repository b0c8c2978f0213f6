"""Open a user's picture as an 8-bit RGB image, whatever it was saved as.

Training folders come from phones, scanners, editors and scrapers: rotated JPEGs that only look upright
because of an EXIF tag, CMYK prints, palette PNGs with transparency, 16-bit or float scans, half-downloaded
files. Each of these either fails deep inside the trainer or, worse, trains on a wrong picture (sideways,
black background, all white). This module turns all of them into plain RGB the way a viewer shows them, or
raises a `DatasetError` naming the file. Files are only read, never written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

logger = logging.getLogger(__name__)

#: Shorter sides below this are refused: upscaled to a 512 px bucket such a picture is a blur the model
#: would learn as the subject's look. A 1x1 icon or a thumbnail is almost always a mistake in the folder.
MIN_SIDE = 64

#: Larger images are refused before decoding (decompression-bomb guard). Pillow's own default limit,
#: restated here because the host or another extension may switch Pillow's global check off; a real
#: training picture needs about 1 megapixel.
MAX_PIXELS = 178_956_970

# Decoder failures for corrupt or truncated data. Pillow reports these inconsistently across formats and
# versions (OSError "image file is truncated", SyntaxError from PNG chunk parsing, ValueError, EOFError...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError)

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def load_rgb(path: Path) -> Image.Image:
    """The picture at `path` as an upright, fully decoded 8-bit RGB image.

    Raises `DatasetError` naming the file when it is missing, not an image, corrupt or truncated, too
    large to decode safely, or smaller than `MIN_SIDE` pixels on a side.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"Cannot read image {path}: {error.strerror or error}.",
                           "Check that the file exists and is readable.") from error
    return decode_rgb(data, path)


def decode_rgb(data: bytes, path: Path) -> Image.Image:
    """`load_rgb` for bytes already read (the scanner hashes and decodes the same bytes); `path` names the
    file in messages only."""
    image = _open_fully(data, path)
    image = _upright(image, path)
    rgb = to_rgb(image, path)
    check_size(rgb.size, path)
    return rgb


def check_size(size: tuple[int, int], path: Path) -> None:
    """Refuse pictures too small to train on (see `MIN_SIDE`)."""
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise DatasetError(
            f"Image {path} is only {width}x{height} pixels; images with a side under {MIN_SIDE} px are refused.",
            f"Remove it from the folder or replace it with a version at least {MIN_SIDE} px on each side "
            "(ideally as large as the training resolution).",
        )


def _open_fully(data: bytes, path: Path) -> Image.Image:
    """Open and decode every pixel now, so a truncated file fails here with its name, not mid-training."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise DatasetError(f"{path} is not an image Pillow can read (unknown or damaged format).",
                           "Remove the file from the folder or re-save it as PNG or JPEG.") from error
    except Image.DecompressionBombError as error:
        raise _too_large(path, None) from error
    except _DECODE_ERRORS as error:
        raise _corrupt(path, error) from error
    if image.width * image.height > MAX_PIXELS:
        raise _too_large(path, image.size)
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise _corrupt(path, error) from error
    if getattr(image, "is_animated", False):
        logger.warning("%s has several frames (animation or multi-page); only the first is used.", path)
    return image


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """Apply the EXIF orientation, as viewers do; a broken EXIF block only loses the rotation."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - EXIF parsing of untrusted files fails in many ways
        logger.warning("Ignoring unreadable EXIF orientation in %s (%s); using the image as stored.", path, error)
        return image


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited onto white, high bit depths scaled (not
    clipped), CMYK and palettes converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise DatasetError(f"{path} uses the colour mode {mode}, which cannot be converted to RGB.",
                           "Re-save it as an RGB PNG or JPEG.") from error


def has_alpha(image: Image.Image) -> bool:
    """Whether converting straight to RGB would drop transparency (and show what was under it)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _scale_to_uint8(values: npt.NDArray[Any], mode: str) -> npt.NDArray[np.uint8]:
    """Map 16-bit, 32-bit and float samples to 0..255 keeping their brightness.

    16-bit data (Pillow gives it as mode I;16, or as I in older versions) is divided by 257 so a dark
    16-bit scan stays dark. Floats in 0..1 are scaled by 255. Anything else (HDR floats, signed 32-bit)
    has no fixed white point, so it is stretched from its own minimum to maximum.
    """
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I") and low >= 0 and high <= 65535:
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return cast(npt.NDArray[np.uint8], np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _corrupt(path: Path, error: BaseException) -> DatasetError:
    return DatasetError(f"Image {path} is damaged or truncated and cannot be decoded ({error}).",
                        "Re-download or re-export the file, or remove it from the folder.")


def _too_large(path: Path, size: tuple[int, int] | None) -> DatasetError:
    shown = f"{size[0]}x{size[1]} pixels" if size else "larger than Pillow's safety limit"
    return DatasetError(
        f"Image {path} is {shown}; images over {MAX_PIXELS / 1e6:.0f} megapixels are refused so a "
        "malformed or giant file cannot exhaust memory.",
        "Downscale it (training uses about 1 megapixel per image) or remove it from the folder.",
    )


def truncated_images_undetectable() -> bool:
    """True when something in this process told Pillow to pad truncated files instead of failing.

    Some host extensions set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`; then half-downloaded files
    decode silently with grey bands and cannot be told apart. We do not flip the process-wide flag back
    (other threads of the host rely on it); the scanner warns instead.
    """
    return bool(ImageFile.LOAD_TRUNCATED_IMAGES)
