"""LDM YAML -> diffusers configs: the stock SD1 numbers, the YAML options SD1 variants use, and a local
text-encoder folder resolved without any hub."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.models.ldm_config import configs_for_checkpoint, configs_from_ldm
from lib_sdcustom.models.model_yaml import read_ldm_yaml, yaml_beside
from lib_sdcustom.models.stock_configs import SD1_V1_INFERENCE, STOCK_CLIP_ID, VIT_L14_TEXT_CONFIG

yaml = pytest.importorskip("yaml")


def stock():
    return copy.deepcopy(SD1_V1_INFERENCE)


def test_stock_config_is_sd15():
    configs = configs_from_ldm(stock(), source="stock")
    assert configs.unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert configs.unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert configs.unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert configs.unet["attention_head_dim"] == 8 and configs.unet["cross_attention_dim"] == 768
    assert configs.unet["layers_per_block"] == 2 and configs.unet["use_linear_projection"] is False
    assert configs.vae["block_out_channels"] == [128, 256, 512, 512]
    assert configs.vae["scaling_factor"] == pytest.approx(0.18215) and configs.vae["latent_channels"] == 4
    assert configs.scheduler == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                 "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                                 "clip_sample": False, "steps_offset": 1}
    assert configs.text_encoder == VIT_L14_TEXT_CONFIG and configs.text_encoder_dir is None


def test_stock_text_encoder_id_never_touches_the_hub():
    config = stock()
    config["model"]["params"]["cond_stage_config"]["params"] = {"version": STOCK_CLIP_ID}
    assert configs_from_ldm(config, source="x").text_encoder["hidden_size"] == 768


def test_v_parameterization_and_head_channels():
    config = stock()
    config["model"]["params"]["parameterization"] = "v"
    unet = config["model"]["params"]["unet_config"]["params"]
    del unet["num_heads"]
    unet["num_head_channels"] = 64
    configs = configs_from_ldm(config, source="x")
    assert configs.prediction_type == "v_prediction"
    assert configs.scheduler["prediction_type"] == "v_prediction"
    assert configs.unet["attention_head_dim"] == [5, 10, 20, 20]


def test_relative_text_encoder_folder_is_found_beside_the_yaml(tmp_path):
    folder = tmp_path / "te"
    folder.mkdir()
    # A full CLIPModel config.json gives its text part.
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"hidden_size": 64}}))
    config = stock()
    config["model"]["params"]["cond_stage_config"]["params"] = {"version": "te"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "m.safetensors").write_bytes(b"")
    configs, ldm = configs_for_checkpoint(tmp_path / "m.safetensors")
    assert configs.text_encoder_dir == folder.resolve()
    assert configs.text_encoder == {"hidden_size": 64}
    assert configs.from_yaml and ldm == config


def test_unknown_text_encoder_is_refused(tmp_path):
    config = stock()
    config["model"]["params"]["cond_stage_config"]["params"] = {"version": "someone/clip-model"}
    with pytest.raises(ModelLoadError, match="someone/clip-model"):
        configs_from_ldm(config, source="m.yaml", yaml_dir=tmp_path)


def test_without_yaml_the_stock_config_applies(tmp_path):
    configs, ldm = configs_for_checkpoint(tmp_path / "plain.safetensors")
    assert ldm is None and not configs.from_yaml


def test_yaml_name_follows_the_host():
    assert yaml_beside(Path("a/model.v1.safetensors")) == Path("a/model.v1.yaml")
    assert yaml_beside(Path("a/model.ckpt")) == Path("a/model.yaml")


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "Could not read"),
    ("just: a string", "no 'model:' section"),
])
def test_bad_yaml_is_reported_with_its_path(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ModelLoadError, match=message) as raised:
        read_ldm_yaml(path)
    assert str(path) in raised.value.problem


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["unet_config"]["params"].pop("model_channels"), "model_channels"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_resolutions=[32]), "attn_resolutions"),
    (lambda p: p.update(parameterization="x0"), "parameterization"),
    (lambda p: p["cond_stage_config"].update(target="ldm.modules.encoders.modules.FrozenT5Embedder"),
     "FrozenCLIPEmbedder"),
])
def test_unsupported_yaml_contents_are_named(edit, message):
    config = stock()
    edit(config["model"]["params"])
    with pytest.raises(ModelLoadError, match=message) as raised:
        configs_from_ldm(config, source="custom.yaml")
    assert "custom.yaml" in raised.value.problem
