"""Text-encoder output caching: with frozen encoders a cached run trains exactly what an uncached run trains,
encoding each caption once; a run that trains the text encoder is not cached and says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_images
from lib_sdcustom.config import RunConfig
from lib_sdcustom.events import Warning_
from lib_sdcustom.methods import text_conditioning
from lib_sdcustom.testing.tiny_families import write_tiny_sdxl
from lib_sdcustom.run.train import train
from lib_sdcustom.training.conditioning import Conditioning
from lib_sdcustom.training.text_cache import TextEncoderCache


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def make_config(base: Path, images: Path, root: Path, *, cache: bool, batch_size: int = 1) -> RunConfig:
    config = RunConfig(method="lora")
    config.model.base, config.data.data = str(base), str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "cached", str(root / "out"), str(root / "run")
    config.network.rank, config.network.alpha = 4, 4.0
    config.optimizer.lr = 1e-3
    config.training.steps, config.training.batch_size, config.training.sample_steps = 6, batch_size, 1
    config.training.train_text_encoder = 0.0
    config.training.cache_text_encoder_outputs = cache
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    return config


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((run_dir / "state").glob("step-*"))[-1] / "trainable.safetensors"))


def count_encoded(monkeypatch) -> list[int]:
    counts: list[int] = []
    real = text_conditioning.encode_prompts

    def counting(bundle, captions, *args, **kwargs):
        counts.append(len(captions))
        return real(bundle, captions, *args, **kwargs)

    monkeypatch.setattr(text_conditioning, "encode_prompts", counting)
    return counts


def test_cached_run_equals_the_uncached_run(sdxl, tmp_path, monkeypatch):
    images = write_images(tmp_path / "images")
    counts = count_encoded(monkeypatch)
    train(make_config(sdxl, images, tmp_path / "plain", cache=False))
    uncached_encodes = sum(counts)
    counts.clear()
    train(make_config(sdxl, images, tmp_path / "cached", cache=True))
    plain, cached = final_state(tmp_path / "plain" / "run"), final_state(tmp_path / "cached" / "run")
    assert plain.keys() == cached.keys()
    for key in plain:
        assert torch.equal(cached[key], plain[key]), key
    assert sum(counts) < uncached_encodes, "captions must be encoded once, not every step"


@torch.no_grad()
def test_batched_captions_get_their_own_rows(sdxl):
    """In a batch a caption is encoded beside other captions than in an uncached run; batched matmuls round
    by batch shape, so rows agree to float rounding (one caption per batch, as above, is bit-identical)."""
    from lib_sdcustom.models.loader import load_bundle

    bundle = load_bundle(sdxl)
    cache = TextEncoderCache(lambda captions: text_conditioning.encode_prompts(bundle, captions))
    cache(["a red toy", "x"])
    direct = text_conditioning.encode_prompts(bundle, ["x", "a red toy", "x"])
    cached = cache(["x", "a red toy", "x"])
    torch.testing.assert_close(cached.context, direct.context, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.pooled, direct.pooled, atol=1e-6, rtol=0)
    assert cache.hits == 3 and cache.misses == 2


def test_cache_is_not_used_while_the_text_encoder_trains(sdxl, tmp_path, monkeypatch):
    counts = count_encoded(monkeypatch)
    config = make_config(sdxl, write_images(tmp_path / "images"), tmp_path, cache=True)
    config.training.train_text_encoder = 1.0
    warnings = []
    train(config, callbacks=[lambda event: warnings.append(event) if isinstance(event, Warning_) else None])
    assert any("not cached" in event.message for event in warnings)
    assert len(counts) >= config.training.steps  # every training step encodes


def test_cache_hands_out_the_rows_it_encoded():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        values = torch.tensor([[float(len(caption))] for caption in captions])
        return Conditioning(values[:, None, :].repeat(1, 2, 1), values)

    cache = TextEncoderCache(encode)
    first = cache(["ab", "abc", "ab"])
    second = cache(["abc", "abcd"])
    assert calls == [["ab", "abc"], ["abcd"]]
    assert first.pooled.flatten().tolist() == [2.0, 3.0, 2.0] and second.context[:, 0, 0].tolist() == [3.0, 4.0]
    assert (cache.hits, cache.misses) == (2, 3)
