"""The frozen text encoders and VAE leave the training device for the steps when the caches make them idle
(`training/placement.py`), and the run trains exactly what it trained with them in place.

The CPU is the only device here, so the tests move a parked model to float64 instead of to the CPU store:
as exact as a device copy, and visible in `parameters()` at a step. A model that came back for the steps
would show its own dtype again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cancel_at, write_images
from test_text_encoder_cache import final_state, make_config as cached_run_config
from lib_sdcustom.config import DataOptions, RunConfig
from lib_sdcustom.errors import TrainingStopped
from lib_sdcustom.events import SamplesRendered, StepDone
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.run import train as train_module
from lib_sdcustom.testing.tiny_families import write_tiny_sdxl
from lib_sdcustom.training import placement
from lib_sdcustom.training.placement import IdleModels, idle_during_steps, idle_while_encoding

PARKED = torch.float64  # what "off the device" looks like in these tests


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def park_as_float64(monkeypatch):
    """Parking on a store that is not the CPU: `_move` to it widens to float64, back restores the dtype."""
    store = torch.device("meta")
    dtypes: dict[int, torch.dtype] = {}

    def move(module: nn.Module, device: torch.device) -> None:
        if device == store:
            dtypes[id(module)] = next(module.parameters()).dtype
            module.to(PARKED)
        else:
            module.to(dtypes.pop(id(module)))

    monkeypatch.setattr(placement, "STORE", store)
    monkeypatch.setattr(placement, "_move", move)


def make_config(base: Path, images: Path, root: Path) -> RunConfig:
    """The text-encoder cache tests' LoRA run (cache on), two images a batch, a preview at step 3 of 6."""
    config = cached_run_config(base, images, root, cache=True, batch_size=2)
    config.training.sample_every = 3
    return config


def run_watching_dtypes(config: RunConfig, monkeypatch, resume: Path | None = None
                        ) -> tuple[list[dict[str, torch.dtype]], Path]:
    """Train; at every VAE encode, step and preview, the dtype of the UNet, the VAE and each text encoder."""
    bundles = []
    real_load = train_module._load_base
    seen: list[dict[str, torch.dtype]] = []

    def note(at: str) -> None:
        bundle = bundles[0]
        models = {"unet": bundle.unet, "vae": bundle.vae, **{f"te{n}": te for n, te in enumerate(bundle.text_encoders)}}
        seen.append({"at": at, **{name: next(model.parameters()).dtype for name, model in models.items()}})

    def load(*args: object) -> object:
        bundles.append(real_load(*args))
        bundles[-1].vae.encoder.register_forward_pre_hook(lambda module, inputs: note("encode"))
        return bundles[-1]

    def watch(event: object) -> None:
        if isinstance(event, (StepDone, SamplesRendered)):
            note(type(event).__name__)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_load_base", load)
        result = train_module.train(config, callbacks=[watch], resume=resume)
    return seen, result.run_dir


def test_idle_models_are_parked_for_the_steps_and_the_result_is_the_same(sdxl, tmp_path, monkeypatch, caplog,
                                                                         park_as_float64):
    images = write_images(tmp_path / "images")
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "idle_during_steps", lambda *args, **kwargs: {})
        _, in_place = run_watching_dtypes(make_config(sdxl, images, tmp_path / "in_place"), monkeypatch)
    with caplog.at_level(logging.INFO, logger=placement.__name__):
        seen, parked = run_watching_dtypes(make_config(sdxl, images, tmp_path / "parked"), monkeypatch)

    at = [dtypes.pop("at") for dtypes in seen]
    steps = [dtypes for dtypes, when in zip(seen, at) if when == "StepDone"]
    previews = [dtypes for dtypes, when in zip(seen, at) if when == "SamplesRendered"]
    encodes = [dtypes for dtypes, when in zip(seen, at) if when == "encode"]
    assert len(steps) == 6 and len(previews) == 2 and encodes
    for encode in encodes:  # filling the latent cache, before the steps: only the text encoders are away
        assert encode == {"unet": torch.float32, "vae": torch.float32, "te0": PARKED, "te1": PARKED}
    for step in steps:  # every step, after the mid-run preview too: parked; the UNet never
        assert step == {"unet": torch.float32, "vae": PARKED, "te0": PARKED, "te1": PARKED}
    for preview in previews:  # the VAE decodes; the text encoders' outputs for the preview were encoded ahead
        assert preview == {"unet": torch.float32, "vae": torch.float32, "te0": PARKED, "te1": PARKED}
    assert not [record for record in caplog.records if "is needed" in record.getMessage()]
    states = [final_state(run) for run in (in_place, parked)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    for preview in ("step00000003.png", "step00000006.png"):  # rendered with the models back in place
        assert (in_place / "samples" / preview).read_bytes() == (parked / "samples" / preview).read_bytes()


def test_best_step_scoring_keeps_the_text_encoders_parked(sdxl, tmp_path, monkeypatch, caplog, park_as_float64):
    """The self-check's probes encode their captions through the run's text-encoder cache (measured before
    the steps), so scoring every saved step never calls the parked text encoders back."""
    config = make_config(sdxl, write_images(tmp_path / "images"), tmp_path / "run")
    config.training.save_every, config.training.select_best_step = 3, True
    config.prior.class_prompt = "a photo"
    with caplog.at_level(logging.INFO, logger=placement.__name__):
        seen, _ = run_watching_dtypes(config, monkeypatch)
    steps = [dtypes for dtypes in seen if dtypes["at"] == "StepDone"]
    assert len(steps) == 6 and all(step["te0"] == step["te1"] == PARKED for step in steps)
    assert not [record for record in caplog.records if "is needed" in record.getMessage()]


def test_a_resumed_run_with_accumulation_fills_the_cache_from_where_it_stands(sdxl, tmp_path, monkeypatch,
                                                                               park_as_float64):
    """Resumed at step 2 with two micro-batches a step: the cache is filled from step 2's micro-batches on,
    and the run ends with the weights the same interrupted run trains with everything in place."""
    images = write_images(tmp_path / "images")
    finals = []
    for name, idle in (("in_place", lambda *args, **kwargs: {}), ("parked", idle_during_steps)):
        config = make_config(sdxl, images, tmp_path / name)
        config.training.gradient_accumulation, config.training.batch_size, config.training.sample_every = 2, 1, 0
        with monkeypatch.context() as patch:
            patch.setattr(train_module, "idle_during_steps", idle)
            cancel, stop = cancel_at(2)
            with pytest.raises(TrainingStopped):
                train_module.train(config, cancel=cancel, callbacks=[stop])
            seen, run_dir = run_watching_dtypes(config, monkeypatch, resume=Path(config.output.run_dir))
        finals.append(final_state(run_dir))
    assert [seen_at["at"] for seen_at in seen] == ["StepDone"] * 4 + ["SamplesRendered"]  # the cache was filled
    assert all(seen_at["te1"] == PARKED for seen_at in seen)
    assert [seen_at["vae"] for seen_at in seen] == [PARKED] * 4 + [torch.float32]
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_the_policy_parks_only_what_the_caches_make_idle(sdxl, park_as_float64):
    bundle, cpu = load_bundle(sdxl), torch.device("cpu")
    fixed, shuffled = DataOptions(), DataOptions(shuffle_captions=True)
    every = idle_during_steps(bundle, cpu, fixed, latents_cached=True, text_cached=True, owned=True)
    assert every == {"VAE": bundle.vae, "text encoder 1": bundle.text_encoders[0],
                     "text encoder 2": bundle.text_encoders[1]}
    assert list(idle_during_steps(bundle, cpu, fixed, latents_cached=True, text_cached=False, owned=True)) == ["VAE"]
    assert not idle_during_steps(bundle, cpu, fixed, latents_cached=False, text_cached=True, owned=True)
    for data in (shuffled, DataOptions(caption_dropout=0.1), DataOptions(tag_dropout=0.1)):  # new captions every epoch
        assert list(idle_during_steps(bundle, cpu, data, latents_cached=True, text_cached=True, owned=True)) == ["VAE"]
    assert not idle_during_steps(bundle, cpu, fixed, latents_cached=True, text_cached=True, owned=False)  # a host's
    assert not idle_during_steps(bundle, placement.STORE, fixed, latents_cached=True, text_cached=True, owned=True)
    assert list(idle_while_encoding(bundle, cpu, owned=True)) == ["text encoder 1", "text encoder 2"]
    assert not idle_while_encoding(bundle, cpu, owned=False) and not idle_while_encoding(bundle, placement.STORE, owned=True)


def test_a_parked_model_that_is_called_comes_back_and_stays(park_as_float64, caplog):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    inputs = torch.randn(4, 3)
    expected = encoder(inputs)
    idle = IdleModels({"VAE": encoder}, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger=placement.__name__), idle.parked():
        assert next(encoder.parameters()).dtype == PARKED
        assert torch.equal(encoder(inputs), expected)  # back in its own dtype before it ran
        assert not idle.parked_names and next(encoder.parameters()).dtype == torch.float32
        assert torch.equal(encoder(inputs), expected)
    assert any("The VAE was parked" in record.getMessage() for record in caplog.records)
    assert next(encoder.parameters()).dtype == torch.float32


def test_work_between_steps_runs_with_the_models_in_place_then_parks_them_again(park_as_float64):
    encoder, vae = nn.Linear(3, 2), nn.Linear(2, 2)
    idle = IdleModels({"text encoder 1": encoder, "VAE": vae}, torch.device("cpu"))
    render = idle.restored_for(lambda step: (step, next(encoder.parameters()).dtype, next(vae.parameters()).dtype))
    with idle.parked():
        vae(torch.zeros(1, 2))  # a cache miss: the VAE comes back for the rest of the steps
        assert render(5) == (5, torch.float32, torch.float32)
        assert next(encoder.parameters()).dtype == PARKED and next(vae.parameters()).dtype == torch.float32
    assert render(6) == (6, torch.float32, torch.float32) and next(encoder.parameters()).dtype == torch.float32


def test_a_bf16_run_decodes_its_previews_in_bf16(tiny_checkpoint):
    """The preview's decode, the largest one-off GPU peak of an SDXL run, runs on a bf16 copy of the VAE for
    a bf16 run (not fp16: the SDXL VAE overflows there): the decoder's convolutions produce bf16, the pixels
    stay within a few levels of fp32's, and the VAE itself stays fp32 (it encodes the training images)."""
    from types import SimpleNamespace

    import numpy as np

    from lib_sdcustom.events import EventBus
    from lib_sdcustom.sampling import PreviewRenderer, latents_to_images

    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", None), ("no", None)):
        config = RunConfig(method="lora")
        config.training.mixed_precision = precision
        context = SimpleNamespace(config=config, trigger_phrase="sks")
        assert PreviewRenderer(context, EventBus(()), encode=lambda captions: None).decode_dtype == dtype

    bundle = load_bundle(tiny_checkpoint)
    outputs: list[torch.dtype] = []
    bundle.vae.decoder.conv_out.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, bf16 = latents_to_images(bundle, latents), latents_to_images(bundle, latents, torch.bfloat16)
    assert outputs == [torch.float32, torch.bfloat16]  # the copy carries the hook along
    assert {param.dtype for param in bundle.vae.parameters()} == {torch.float32}
    for exact, approximate in zip(plain, bf16):
        difference = np.abs(np.asarray(exact, dtype=np.int16) - np.asarray(approximate, dtype=np.int16))
        assert difference.mean() < 2 and difference.max() <= 16
