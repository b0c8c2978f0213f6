"""TrainingSet: repeats, one bucket per batch, order fixed by (seed, epoch), step arithmetic."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from lib_sdcustom.data.captions import CaptionOptions
from lib_sdcustom.data.dataset import BatchingOptions, TrainingSet
from lib_sdcustom.data.scan import scan_dataset
from lib_sdcustom.errors import ConfigError


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """4 landscape + 3 portrait images in '3_sks dog', 2 squares at the top level with captions."""
    root = tmp_path_factory.mktemp("set")
    folder = root / "3_sks dog"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (150, 100), (index * 40, 0, 0)).save(folder / f"land{index}.png")
    for index in range(3):
        Image.new("RGB", (100, 150), (0, index * 40, 0)).save(folder / f"port{index}.png")
    for index in range(2):
        Image.new("RGB", (120, 120), (0, 0, index * 40)).save(root / f"sq{index}.png")
        (root / f"sq{index}.txt").write_text("sks dog, a, b, c, d", encoding="utf-8")
    return scan_dataset(root)


def _options(**kwargs):
    return BatchingOptions(resolution=256, batch_size=2, seed=5, **kwargs)


def _flatten(batches):
    return [example for batch in batches for example in batch]


def test_each_record_appears_repeats_times_and_batches_never_mix_buckets(scan):
    data = TrainingSet(scan, _options())
    batches = data.batches_for_epoch(0)
    counts = Counter(example.record_index for example in _flatten(batches))
    assert counts == {index: record.repeats for index, record in enumerate(scan.records)}
    for batch in batches:
        assert 1 <= len(batch) <= 2 and len({example.bucket for example in batch}) == 1
    assert data.bucket_counts() == {(192, 320): 9, (256, 256): 2, (320, 192): 12}


def test_order_is_a_function_of_seed_and_epoch(scan):
    options = _options(flip=True, captions=CaptionOptions(shuffle=True, keep_tokens=1))
    first = TrainingSet(scan, options).batches_for_epoch(3)
    assert TrainingSet(scan, options).batches_for_epoch(3) == first  # a resumed run sees the same epoch
    assert TrainingSet(scan, options).batches_for_epoch(4) != first
    other_seed = BatchingOptions(resolution=256, batch_size=2, seed=6, flip=True, captions=options.captions)
    assert TrainingSet(scan, other_seed).batches_for_epoch(3) != first


def test_examples_carry_flip_and_processed_caption(scan):
    examples = _flatten(TrainingSet(scan, _options(flip=True, captions=CaptionOptions(shuffle=True, keep_tokens=1)))
                        .batches_for_epoch(0))
    assert {example.flip for example in examples} == {True, False}
    square = [example for example in examples if scan.records[example.record_index].subfolder == ""]
    assert all(example.caption.startswith("sks dog, ") for example in square)
    assert len({example.caption for example in square}) > 1
    assert all(example.crop_seed is None for example in examples)


def test_load_pixels_matches_bucket_and_flip(scan):
    data = TrainingSet(scan, _options(flip=True, random_crop=True))
    batch = data.batches_for_epoch(0)[0]
    pixels = data.load_batch_pixels(batch)
    width, height = batch[0].bucket
    assert pixels.shape == (len(batch), 3, height, width)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(data.load_pixels(batch[0]), pixels[0])  # random crop replays from its seed


def test_step_arithmetic(scan):
    data = TrainingSet(scan, _options())
    # buckets: 12 landscape, 9 portrait, 2 square examples -> 6 + 5 + 1 batches of 2
    assert data.steps_per_epoch() == 12
    assert data.steps_per_epoch(4) == 3 + 3 + 1
    assert data.total_steps(2) == 24 and data.total_steps(2, gradient_accumulation=5) == 6


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"seed": "x"}])
def test_invalid_options(kwargs):
    with pytest.raises(ConfigError):
        BatchingOptions(**kwargs)
