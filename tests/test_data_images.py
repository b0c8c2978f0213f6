"""load_rgb turns every kind of picture users drop in a folder into upright 8-bit RGB, or names the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_sdcustom.data import images
from lib_sdcustom.data.images import MIN_SIDE, load_rgb
from lib_sdcustom.errors import DatasetError


def _pixel(image: Image.Image, x: int = 0, y: int = 0):
    return image.getpixel((x, y))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (80, 96), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (80, 96)
    red, green, blue = _pixel(image, 40, 40)
    assert red > 200 and green < 60 and blue < 60


def test_16bit_png_is_scaled_not_clipped_to_white(tmp_path):
    path = tmp_path / "scan.png"
    values = np.full((70, 90), 40000, dtype=np.uint16)
    values[:, :45] = 1000  # dark half stays dark
    Image.fromarray(values).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (90, 70)
    assert _pixel(image, 60, 10) == (156, 156, 156)  # 40000 / 257 = 155.6
    assert _pixel(image, 5, 10) == (4, 4, 4)


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    path = tmp_path / "render.tiff"
    Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32)).save(path)
    assert _pixel(load_rgb(path)) == (128, 128, 128)


def test_rgba_is_composited_onto_white(tmp_path):
    path = tmp_path / "cutout.png"
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    image.putpixel((10, 10), (0, 0, 255, 255))
    image.save(path)
    loaded = load_rgb(path)
    assert _pixel(loaded) == (255, 255, 255)  # transparent red must not show as red (or black)
    assert _pixel(loaded, 10, 10) == (0, 0, 255)


def test_la_half_transparent_blends_with_white(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("LA", (64, 64), (0, 128)).save(path)
    value = _pixel(load_rgb(path))
    assert value[0] == value[1] == value[2] and 120 <= value[0] <= 135


def test_palette_png_with_transparency(tmp_path):
    path = tmp_path / "icon.png"
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0] + [0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((5, 5), 1)
    image.save(path, transparency=0)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert _pixel(loaded) == (255, 255, 255)  # index 0 is transparent black -> white
    assert _pixel(loaded, 5, 5) == (0, 255, 0)


def test_palette_without_transparency_and_bilevel(tmp_path):
    palette = tmp_path / "pal.gif"
    Image.new("RGB", (64, 64), (200, 10, 10)).convert("P").save(palette)
    assert load_rgb(palette).mode == "RGB"
    bilevel = tmp_path / "bw.bmp"
    Image.new("1", (64, 64), 1).save(bilevel)
    assert _pixel(load_rgb(bilevel)) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    red, green, blue = _pixel(load_rgb(path))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (120, 80), (10, 200, 10)).save(path, exif=exif.tobytes())
    assert load_rgb(path).size == (80, 120)


@pytest.mark.parametrize("content", [b"just some text, not a picture\n", b""])
def test_non_image_with_image_extension(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="notes.png"):
        load_rgb(path)


def test_truncated_png_names_the_file(tmp_path):
    path = tmp_path / "half.png"
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="half.png.*(damaged|truncated)"):
        load_rgb(path)
    assert path.stat().st_size == len(data) // 2  # never modified on disk


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    with pytest.raises(DatasetError, match=rf"dot.png is only 1x1.*{MIN_SIDE}"):
        load_rgb(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (300, 300)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 299)
    with pytest.raises(DatasetError, match="huge.png is 300x300 pixels.*megapixels"):
        load_rgb(path)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="gone.png"):
        load_rgb(tmp_path / "gone.png")
