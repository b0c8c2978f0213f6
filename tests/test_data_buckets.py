"""Aspect-ratio buckets: sizes, assignment of portrait/landscape pictures, resize+crop+flip to tensors."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from lib_sdcustom.data.buckets import BucketSet, image_to_tensor
from lib_sdcustom.errors import ConfigError


def test_bucket_sizes_are_multiples_of_64_within_area_and_bounds():
    buckets = BucketSet(512)
    assert (512, 512) in buckets.sizes and (384, 640) in buckets.sizes and (640, 384) in buckets.sizes
    for width, height in buckets.sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 1024 and 256 <= height <= 1024
        assert width * height <= 512 * 512


def test_portrait_and_landscape_assignment():
    buckets = BucketSet(512)
    assert buckets.assign(600, 900) == (384, 640)  # 2:3 portrait -> tall bucket
    assert buckets.assign(900, 600) == (640, 384)
    assert buckets.assign(1000, 1000) == (512, 512)
    assert buckets.assign(100, 4000) == (256, 1024)  # extreme: the most extreme bucket


def test_buckets_off_is_one_square():
    buckets = BucketSet(768, enabled=False)
    assert buckets.sizes == ((768, 768),) and buckets.assign(300, 900) == (768, 768)


def test_no_upscale_keeps_small_images_small():
    buckets = BucketSet(512, no_upscale=True)
    assert buckets.assign(300, 200) == (256, 192)
    width, height = buckets.assign(3000, 2000)
    assert width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0 and width > height


@pytest.mark.parametrize("kwargs", [{"resolution": 500}, {"resolution": 512, "min_side": 600},
                                    {"resolution": 512, "max_side": 448}, {"resolution": 0}])
def test_invalid_bucket_options(kwargs):
    with pytest.raises(ConfigError):
        BucketSet(**kwargs)


def _split_image():
    """Left half black, right half white, 200x100."""
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 100, 100))
    return image


def test_image_to_tensor_shape_range_and_flip():
    tensor = image_to_tensor(_split_image(), (128, 64), flip=False)
    assert tensor.shape == (3, 64, 128) and tensor.dtype == torch.float32
    assert tensor[:, :, 0].max() == -1.0 and tensor[:, :, -1].min() == 1.0
    flipped = image_to_tensor(_split_image(), (128, 64), flip=True)
    assert torch.equal(flipped, tensor.flip(-1))


def test_center_crop_and_random_crop():
    image = Image.new("RGB", (300, 100))
    for x in range(300):
        for y in range(100):
            image.putpixel((x, y), (x * 255 // 299, 0, 0))
    center = image_to_tensor(image, (64, 64), flip=False)
    assert abs(center[0, 0, 32].item()) < 0.1  # middle of the red ramp
    crops = {image_to_tensor(image, (64, 64), flip=False, crop_rng=random.Random(seed))[0, 0, 32].item()
             for seed in range(10)}
    assert len(crops) > 3
    same = [image_to_tensor(image, (64, 64), flip=False, crop_rng=random.Random(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
