"""Family detection from key sets: plain SD1, SD2 and SDXL load; every other kind of file gets a message saying
what it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.models import detect
from lib_sdcustom.models.bundle import ModelFamily

PATH = Path("models/Stable-diffusion/some.safetensors")


def meta(*shape):
    return torch.empty(shape, device="meta")


def sd1_keys(in_channels=4):
    return {
        "model.diffusion_model.input_blocks.0.0.weight": meta(320, in_channels, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": meta(320, 640, 1, 1),
        "first_stage_model.encoder.conv_in.weight": meta(128, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": meta(49408, 768),
    }


def sd2_keys():
    keys = sd1_keys()
    del keys["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = meta(3072, 1024)
    keys["cond_stage_model.model.ln_final.weight"] = meta(1024)
    return keys


def sdxl_keys(in_channels=4):
    return {
        "model.diffusion_model.input_blocks.0.0.weight": meta(320, in_channels, 3, 3),
        "first_stage_model.encoder.conv_in.weight": meta(128, 3, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": meta(49408, 768),
        "conditioner.embedders.1.model.ln_final.weight": meta(1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": meta(1280),
    }


@pytest.mark.parametrize("keys, family", [(sd1_keys(), ModelFamily.SD1), (sd2_keys(), ModelFamily.SD2),
                                          (sdxl_keys(), ModelFamily.SDXL)])
def test_plain_base_models_are_accepted(keys, family):
    assert detect.detect_family(keys, PATH) is family


@pytest.mark.parametrize("keys, kind, message", [
    (sdxl_keys(in_channels=9), detect.SDXL, "SDXL inpainting checkpoint"),
    ({**sd2_keys(), "model.diffusion_model.input_blocks.0.0.weight": meta(320, 9, 3, 3)}, detect.SD2,
     "SD2 inpainting checkpoint"),
    ({**sd2_keys(), "embedder.model.ln_final.weight": meta(1024)}, detect.UNCLIP, "unCLIP"),
    ({"conditioner.embedders.0.model.ln_final.weight": meta(1280),
      "model.diffusion_model.input_blocks.0.0.weight": meta(384, 4, 3, 3)}, detect.SDXL_REFINER, "SDXL refiner"),
    ({"conditioner.embedders.0.model.ln_final.weight": meta(1024),
      "model.diffusion_model.input_blocks.0.0.weight": meta(320, 4, 3, 3)}, detect.SD2_TURBO, "SD2-Turbo"),
    ({"model.diffusion_model.x_embedder.proj.weight": meta(1536, 16, 2, 2)}, detect.SD3, "Stable Diffusion 3"),
    (sd1_keys(in_channels=9), detect.SD1, "inpainting checkpoint (9 UNet input channels)"),
    (sd1_keys(in_channels=8), detect.SD1, "takes 8 input channels"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": meta(4, 320),
      "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": meta()}, detect.LORA, "LoRA/LyCORIS network"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": meta(4, 320)}, detect.LORA, "LoRA"),
    ({"emb_params": meta(2, 768)}, detect.EMBEDDING, "Textual Inversion embedding"),
    ({"clip_l": meta(2, 768), "clip_g": meta(2, 1280)}, detect.EMBEDDING, "Textual Inversion embedding"),
    ({"string_to_token": {"*": 265}, "string_to_param": {"*": meta(1, 768)}, "name": "x", "step": 5},
     detect.EMBEDDING, "Textual Inversion embedding"),
    ({768: [{"linear.0.weight": meta(1536, 768)}], 1024: [], "name": "h", "layer_structure": [1, 2, 1]},
     detect.HYPERNETWORK, "hypernetwork"),
    ({"encoder.conv_in.weight": meta(128, 3, 3, 3), "decoder.conv_in.weight": meta(512, 4, 3, 3),
      "quant_conv.weight": meta(8, 8, 1, 1)}, detect.VAE, "stand-alone VAE"),
    ({"backbone.layer1.weight": meta(4, 4), "head.bias": meta(4), "head.weight": meta(4, 4)},
     detect.UNKNOWN, "not a Stable Diffusion checkpoint"),
])
def test_other_files_are_named(keys, kind, message):
    assert detect.classify(keys) == kind
    with pytest.raises(ModelLoadError) as raised:
        detect.detect_family(keys, PATH)
    assert message in raised.value.problem
    assert str(PATH) in raised.value.problem
    assert raised.value.fix


def test_incomplete_sd1_names_the_missing_parts():
    keys = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": meta(49408, 768)}
    with pytest.raises(ModelLoadError, match=r"no UNet \('model.diffusion_model.\*'\) and no VAE"):
        detect.detect_family(keys, PATH)
    keys = sd1_keys()
    del keys["first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(ModelLoadError, match="incomplete SD1 checkpoint: it has no VAE"):
        detect.detect_family(keys, PATH)
    keys = sdxl_keys()
    del keys["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]
    with pytest.raises(ModelLoadError, match=r"incomplete SDXL checkpoint: it has no first text encoder "
                                             r"\('conditioner.embedders.0.transformer.\*'\)"):
        detect.detect_family(keys, PATH)


def _diffusers_folder(root: Path, *, text_act="quick_gelu", in_channels=4, linear=False, second_te=False):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    if second_te:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    for part, config in (("unet", {"in_channels": in_channels, "use_linear_projection": linear}),
                         ("text_encoder", {"hidden_act": text_act})):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_diffusers_folder_families(tmp_path):
    assert detect.detect_diffusers_family(_diffusers_folder(tmp_path / "sd1")) is ModelFamily.SD1
    assert detect.detect_diffusers_family(_diffusers_folder(tmp_path / "sdxl", second_te=True)) is ModelFamily.SDXL
    assert detect.detect_diffusers_family(_diffusers_folder(tmp_path / "sd2", text_act="gelu", linear=True)) \
        is ModelFamily.SD2
    cases = [(dict(in_channels=9), "SD1 inpainting"), (dict(second_te=True, in_channels=9), "SDXL inpainting")]
    for index, (options, message) in enumerate(cases):
        with pytest.raises(ModelLoadError, match=message):
            detect.detect_diffusers_family(_diffusers_folder(tmp_path / str(index), **options))
