"""The tab's plan before Train: the model family it names and the memory estimate for it.

Estimates are rough by design; what must hold is their order: SDXL needs more than SD1 at the same settings,
and each memory saver lowers the figure for every family."""

from __future__ import annotations

import dataclasses

import pytest

from lib_sdcustom.config import RunConfig
from lib_sdcustom.run.family_defaults import native_resolution
from lib_sdcustom.host.base import ModelKind
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.ui.plan import estimate_memory, plan_html

METHODS = ("lora", "dreambooth", "textual_inversion")


def run_config(method: str, resolution: int = 1024, **training) -> RunConfig:
    config = RunConfig(method=method)
    config.data.resolution = resolution
    config.training = dataclasses.replace(config.training, **training)
    return config


@pytest.mark.parametrize("method", METHODS)
def test_sdxl_needs_more_memory_than_sd1_at_the_same_settings(method):
    for resolution in (512, 1024):
        config = run_config(method, resolution)
        sd1, sd2, sdxl = (estimate_memory(config, None, family).total
                          for family in (ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SDXL))
        assert sdxl > sd2 > sd1, (method, resolution)


def test_sdxl_at_its_own_resolution_needs_far_more_than_sd1_at_its_own():
    sd1 = estimate_memory(run_config("lora", native_resolution(ModelFamily.SD1, "epsilon")), None, ModelFamily.SD1)
    sdxl = estimate_memory(run_config("lora", native_resolution(ModelFamily.SDXL, "epsilon")), None, ModelFamily.SDXL)
    assert sdxl.weights > 3 * sd1.weights and sdxl.activations > 10 * sd1.activations


SAVERS = {
    "gradient checkpointing": lambda config: setattr(config.training, "gradient_checkpointing", True),
    "bf16 weights": lambda config: setattr(config.training, "mixed_precision", "bf16"),
    "8-bit optimizer": lambda config: setattr(config.optimizer, "optimizer", "adamw8bit"),
    "frozen text encoders": lambda config: setattr(config.training, "train_text_encoder", 0.0),
    "fp8 base": lambda config: setattr(config.training, "fp8_base", True),
}


@pytest.mark.parametrize("family", list(ModelFamily))
@pytest.mark.parametrize("method, saver", [(method, saver) for method in ("lora", "dreambooth") for saver in sorted(SAVERS)
                                           if (method, saver) != ("dreambooth", "fp8 base")])  # refused by the config
def test_each_memory_saver_lowers_the_estimate_and_is_named(family, saver, method):
    config = run_config(method)
    if method == "dreambooth":
        config.training.train_text_encoder = 1.0  # so that freezing it is a change
    before = estimate_memory(config, None, family)
    SAVERS[saver](config)
    after = estimate_memory(config, None, family)
    assert after.total < before.total, (family, saver, method)
    assert saver in after.savers and saver not in before.savers


def test_cached_text_encoder_outputs_are_said_to_save_time_not_memory():
    config = run_config("lora", train_text_encoder=0.0)
    uncached = estimate_memory(config, None, ModelFamily.SDXL)
    config.training.cache_text_encoder_outputs = True
    assert estimate_memory(config, None, ModelFamily.SDXL) == uncached  # the encoders stay loaded
    assert "saves time, not memory" in plan_html(config, 4, None, ModelKind(ModelFamily.SDXL))
    config.training.train_text_encoder = 1.0  # nothing to cache while they learn
    assert "saves time" not in plan_html(config, 4, None, ModelKind(ModelFamily.SDXL))


def test_the_estimate_scales_with_the_base_and_the_batch():
    config = run_config("lora")
    full = estimate_memory(config, None, ModelFamily.SDXL)
    assert estimate_memory(config, 10**8, ModelFamily.SDXL).total < full.total
    config.training.batch_size = 4
    assert estimate_memory(config, None, ModelFamily.SDXL).activations == pytest.approx(4 * full.activations, rel=1e-6)


def test_plan_names_the_family_and_the_resolution_the_run_will_use():
    left_alone = plan_html(run_config("lora", 512), 10, None, ModelKind(ModelFamily.SDXL))
    assert "data-family='sdxl'" in left_alone and "model: SDXL, trained at 1024 px" in left_alone
    assert "Resolution left at its default, so this run trains at 1024 px" in left_alone
    assert "batch 1, 1024px" in left_alone
    chosen = plan_html(run_config("lora", 576), 10, None, ModelKind(ModelFamily.SDXL))
    assert "you chose 576 px (set Resolution to 1024" in chosen and "batch 1, 576px" in chosen
    assert "model: SD2-v, trained at 768 px" in plan_html(run_config("lora", 768), 10, None,
                                                         ModelKind(ModelFamily.SD2, "v_prediction"))
    unknown_prediction = plan_html(run_config("lora", 640), 10, None, ModelKind(ModelFamily.SD2))
    assert "trained at 768 or 512 px; you chose 640 px" in unknown_prediction
    unknown = plan_html(run_config("lora", 512), 10, None, None)
    assert "model:" not in unknown and "memory:" not in unknown


def test_standalone_host_tells_family_and_prediction_type_of_a_checkpoint(tmp_path):
    from lib_sdcustom.host.base import StandaloneHost
    from lib_sdcustom.testing.tiny import write_tiny_sd1
    from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl

    folder = tmp_path / "Stable-diffusion"
    write_tiny_sd1(folder, name="one")
    write_tiny_sdxl(folder, name="xl")
    write_tiny_sd2(folder, name="two", v_prediction=True)
    write_tiny_sd2(folder, name="two_no_yaml").with_suffix(".yaml").unlink()
    (folder / "broken.safetensors").write_bytes(b"not a model")
    host = StandaloneHost(tmp_path)
    assert host.model_kind("one.safetensors") == ModelKind(ModelFamily.SD1, "epsilon")
    assert host.model_kind("xl.safetensors") == ModelKind(ModelFamily.SDXL, "epsilon")
    assert host.model_kind("two.safetensors") == ModelKind(ModelFamily.SD2, "v_prediction")
    assert host.model_kind("two_no_yaml.safetensors") == ModelKind(ModelFamily.SD2, None)
    assert host.model_kind("broken.safetensors") is None and host.model_kind("") is None


def test_a_cleared_method_is_a_message_and_the_help_line_is_prose():
    from lib_sdcustom.config import METHODS
    from lib_sdcustom.errors import ConfigError
    from lib_sdcustom.ui import form

    fields = form.option_fields()
    with pytest.raises(ConfigError, match="No method chosen"):  # was KeyError: 'None' deep in the plan
        form.config_from_form(None, "", "name", "sks", "dog", fields, [f.default for f in fields], subject=False)
    assert set(form.METHOD_LABELS) == set(METHODS)
    assert "lora: LoRA" not in form.METHOD_HELP
