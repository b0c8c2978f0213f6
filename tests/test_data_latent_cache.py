"""LatentCache: hit on the same (content, bucket, flip, VAE), miss on any change; atomic files; no random crop."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_sdcustom.data.dataset import BatchingOptions, TrainingSet
from lib_sdcustom.data.latent_cache import LatentCache
from lib_sdcustom.data.scan import scan_dataset
from lib_sdcustom.errors import ConfigError, DatasetError


class CountingEncoder:
    """Stand-in VAE: 8x average-pool of the pixels to 4 channels, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pixels):
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


@pytest.fixture
def record(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.new("RGB", (128, 96), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 64, 96))
    image.save(folder / "a.png")
    return scan_dataset(folder).records[0]


def test_disk_cache_hits_and_misses(tmp_path, record):
    encode = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "vae-sha:abc|fp32")
    first = cache.get_or_encode(record, (128, 64), False, encode)
    assert first.shape == (4, 8, 16) and first.dtype == torch.float32
    assert torch.equal(cache.get_or_encode(record, (128, 64), False, encode), first)
    assert encode.calls == 1 and (cache.hits, cache.misses) == (1, 1)

    # a new cache object over the same folder (a resumed run) still hits
    again = LatentCache(tmp_path / "cache", "vae-sha:abc|fp32")
    assert torch.equal(again.get_or_encode(record, (128, 64), False, encode), first) and encode.calls == 1

    flipped = cache.get_or_encode(record, (128, 64), True, encode)
    assert torch.equal(flipped, first.flip(-1)) and encode.calls == 2
    cache.get_or_encode(record, (64, 64), False, encode)
    assert encode.calls == 3
    LatentCache(tmp_path / "cache", "another-vae").get_or_encode(record, (128, 64), False, encode)
    assert encode.calls == 4
    files = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and all(name.endswith(".safetensors") for name in files)  # no temp files left


def test_changed_image_misses_and_stale_scan_is_refused(tmp_path, record):
    encode = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "vae")
    cache.get_or_encode(record, (128, 64), False, encode)
    Image.new("RGB", (128, 96), (9, 9, 9)).save(record.path)
    with pytest.raises(DatasetError, match="changed after the folder was scanned"):
        cache.get_or_encode(record, (64, 64), False, encode)
    rescanned = scan_dataset(record.path.parent).records[0]
    cache.get_or_encode(rescanned, (128, 64), False, encode)
    assert encode.calls == 2


def test_damaged_cache_file_is_recomputed(tmp_path, record):
    encode = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "vae")
    first = cache.get_or_encode(record, (128, 64), False, encode)
    cache.path_for(record, (128, 64), False).write_bytes(b"garbage")
    assert torch.equal(cache.get_or_encode(record, (128, 64), False, encode), first) and encode.calls == 2


def test_in_memory_cache(record):
    encode = CountingEncoder()
    cache = LatentCache(None, "vae")
    first = cache.get_or_encode(record, (128, 64), False, encode)
    first.zero_()  # the caller modifying its copy must not corrupt the cache
    second = cache.get_or_encode(record, (128, 64), False, encode)
    assert encode.calls == 1 and second.abs().sum() > 0 and cache.path_for(record, (128, 64), False) is None


def test_random_crop_is_refused():
    with pytest.raises(ConfigError, match="random crop"):
        LatentCache(None, "vae", random_crop=True)


def test_fill_encodes_both_flips_once(tmp_path, record):
    data = TrainingSet(scan_dataset(record.path.parent), BatchingOptions(resolution=128, flip=True))
    encode = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "vae")
    progress = []
    assert cache.fill(data, encode, lambda done, total: progress.append((done, total))) == 2
    assert progress == [(1, 2), (2, 2)]
    assert cache.fill(data, encode) == 0 and encode.calls == 2
