"""Config: validation names the option and the fix; presets round-trip; the CLI exposes every setting."""

from __future__ import annotations

import dataclasses

import pytest

from lib_sdcustom.cli import _config_fields, build_parser, config_from_args
from lib_sdcustom.config import RunConfig, config_from_dict, dumps_toml, load_config
from lib_sdcustom.errors import ConfigError


def _valid() -> RunConfig:
    config = RunConfig()
    config.model.base, config.data.data, config.output.name, config.output.out = "base.safetensors", "imgs", "x", "out"
    return config


def test_valid_config_passes_unchanged() -> None:
    config = _valid()
    before = dataclasses.asdict(config)
    assert config.validate() is config  # no ConfigError, and the same object back for chaining
    assert dataclasses.asdict(config) == before, "validation must not fill or change values"


@pytest.mark.parametrize("change,words", [
    (lambda c: setattr(c.network, "rank", 0), "--rank is 0"),
    (lambda c: setattr(c.optimizer, "optimizer", "adamx"), "Unknown optimizer 'adamx'"),
    (lambda c: setattr(c.training, "timestep_sampling", "sobol"), "Unknown timestep sampling 'sobol'"),
    (lambda c: setattr(c.optimizer, "lr", float("nan")), "--lr is nan"),
    (lambda c: setattr(c.data, "resolution", 500), "--resolution is 500"),
    (lambda c: setattr(c.output, "name", ""), "No output name"),
    (lambda c: setattr(c, "method", "magic"), "Unknown method 'magic'"),
    (lambda c: setattr(c.prior, "class_prompt_share", 1.5), "--class-prompt-share is 1.5"),
    (lambda c: setattr(c.prior, "class_prompt_share", float("nan")), "--class-prompt-share is nan"),
    (lambda c: setattr(c.prior, "class_prompt_share", -0.5), "--class-prompt-share is -0.5"),
])
def test_invalid_values_name_the_option_and_the_fix(change, words: str) -> None:
    config = _valid()
    change(config)
    with pytest.raises(ConfigError) as raised:
        config.validate()
    assert words in str(raised.value)
    assert raised.value.fix


def test_toml_round_trip(tmp_path) -> None:
    config = _valid()
    config.method, config.network.rank, config.data.flip, config.output.name = "loha", 16, True, 'quote"d'
    path = tmp_path / "run.toml"
    path.write_text(dumps_toml(config))
    assert load_config(path) == config


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="Unknown setting 'rnak'"):
        config_from_dict({"network": {"rnak": 4}})
    with pytest.raises(ConfigError, match="must be a int"):
        config_from_dict({"network": {"rank": "four"}})


def test_every_setting_has_a_flag_with_its_default_in_help() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for _, field, default in _config_fields():
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
    for flag in ("--method", "--base", "--data", "--name", "--out", "--steps", "--rank", "--alpha", "--lr",
                 "--resolution", "--batch-size", "--seed", "--overwrite", "--resume", "--config"):
        assert flag in help_text
    assert "(default: 'adamw')" in help_text


def test_flags_override_the_preset(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(dumps_toml(_valid()))
    args = build_parser().parse_args(["train", "--config", str(path), "--rank", "32", "--no-buckets"])
    config = config_from_args(args)
    assert config.network.rank == 32 and config.data.buckets is False
    assert config.model.base == "base.safetensors"
    assert dataclasses.asdict(config)["network"]["alpha"] == RunConfig().network.alpha
