"""LDM <-> diffusers key tables: exact both ways, computed from the model shape, and equal to diffusers' own
LDM -> diffusers converter (an independent implementation) for both the tiny and the full SD1.5 layout."""

from __future__ import annotations

import pytest
import torch

from lib_sdcustom.models import ldm_keys
from lib_sdcustom.models.ldm_config import configs_from_ldm
from lib_sdcustom.models.stock_configs import SD1_V1_INFERENCE

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SD15 = configs_from_ldm(SD1_V1_INFERENCE, source="stock")


def _meta_models(configs):
    """Full-size modules with meta tensors: their key names and shapes cost no memory."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel(**configs.unet)
        vae = diffusers.AutoencoderKL(**configs.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(configs.text_encoder)))
    return unet, vae, text_encoder


@pytest.fixture(scope="module")
def sd15_models():
    return _meta_models(SD15)


def _ldm_checkpoint(unet, vae, text_encoder):
    unet_ldm = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config))
    vae_ldm = ldm_keys.vae_to_ldm(vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config))
    assert unet_ldm.unmapped == [] and vae_ldm.unmapped == []
    return ldm_keys.join_ldm_state_dict(unet_ldm.state_dict, vae_ldm.state_dict,
                                        ldm_keys.text_encoder_state_dict(text_encoder), {})


def test_sd15_layout_has_the_well_known_ldm_keys(sd15_models):
    keys = set(_ldm_checkpoint(*sd15_models))
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.3.block.1.conv2.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
    ]:
        assert key in keys, key
    assert not any("position_ids" in key for key in keys)
    # SD1.5 (v1-5-pruned-emaonly) has 686 UNet, 248 VAE and 196 text-encoder tensors (+ position_ids).
    assert sum(k.startswith("model.diffusion_model.") for k in keys) == 686
    assert sum(k.startswith("first_stage_model.") for k in keys) == 248
    assert sum(k.startswith("cond_stage_model.") for k in keys) == 196


@pytest.mark.parametrize("configs_name", ["sd15", "tiny"])
def test_our_ldm_to_diffusers_equals_diffusers_converter(configs_name, sd15_models, tmp_path):
    if configs_name == "sd15":
        configs, models = SD15, sd15_models
    else:
        from lib_sdcustom.models.ldm_config import configs_for_checkpoint
        from lib_sdcustom.testing.tiny import write_tiny_sd1

        configs, _ = configs_for_checkpoint(write_tiny_sd1(tmp_path))
        models = _meta_models(configs)
    checkpoint = _ldm_checkpoint(*models)
    parts = ldm_keys.split_ldm_state_dict(checkpoint)
    ours_unet = ldm_keys.unet_to_diffusers(parts.unet, ldm_keys.UNetLayout.from_diffusers_config(configs.unet))
    ours_vae = ldm_keys.vae_to_diffusers(parts.vae, ldm_keys.VAELayout.from_diffusers_config(configs.vae))
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(configs.unet))
    theirs_vae = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(configs.vae))
    for ours, theirs, module in ((ours_unet, theirs_unet, models[0]), (ours_vae, theirs_vae, models[1])):
        assert ours.unmapped == []
        assert set(ours.state_dict) == set(theirs) == set(module.state_dict())
        for key, tensor in theirs.items():
            assert tuple(ours.state_dict[key].shape) == tuple(tensor.shape), key


def test_vae_mid_attention_is_reshaped_both_ways():
    layout = ldm_keys.VAELayout(levels=4, layers_per_block=1)
    conv = torch.randn(8, 8, 1, 1)
    converted = ldm_keys.vae_to_diffusers({"encoder.mid.attn_1.q.weight": conv, "encoder.mid.attn_1.q.bias":
                                           torch.zeros(8)}, layout).state_dict
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)
    assert converted["encoder.mid_block.attentions.0.to_q.bias"].shape == (8,)
    back = ldm_keys.vae_to_ldm(converted, layout).state_dict
    assert torch.equal(back["encoder.mid.attn_1.q.weight"], conv)


def test_tables_are_computed_from_the_layout():
    two_levels = ldm_keys.UNetLayout(attention_levels=(True, False), layers_per_block=2)
    table = ldm_keys.PrefixMap(ldm_keys.unet_prefix_pairs(two_levels))
    assert table.to_ldm("down_blocks.0.downsamplers.0.conv.weight") == "input_blocks.3.0.op.weight"
    assert table.to_ldm("up_blocks.0.upsamplers.0.conv.bias") == "output_blocks.2.1.conv.bias"
    assert table.to_ldm("up_blocks.1.attentions.2.proj_out.weight") == "output_blocks.5.1.proj_out.weight"
    assert table.to_ldm("down_blocks.1.downsamplers.0.conv.weight") is None  # last level has none
    assert table.to_ldm("down_blocks.0.resnets.0.unknown.weight") is None
    assert table.to_diffusers("input_blocks.4.0.emb_layers.1.weight") == "down_blocks.1.resnets.0.time_emb_proj.weight"
    three_per_level = ldm_keys.UNetLayout(attention_levels=(False, True), layers_per_block=3)
    table = ldm_keys.PrefixMap(ldm_keys.unet_prefix_pairs(three_per_level))
    assert table.to_ldm("down_blocks.1.attentions.2.norm.weight") == "input_blocks.7.1.norm.weight"
    assert table.to_ldm("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.3.2.conv.weight"


def test_module_paths_cover_every_linear_and_conv(sd15_models):
    unet, _, text_encoder = sd15_models
    unet_paths = ldm_keys.unet_module_paths(unet)
    assert unet_paths["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert unet_paths["up_blocks.1.resnets.2.conv1"] == "output_blocks.5.0.in_layers.2"
    assert unet_paths["mid_block.attentions.0.transformer_blocks.0.ff.net.2"] == \
        "middle_block.1.transformer_blocks.0.ff.net.2"
    assert unet_paths["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"] == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"
    linear_or_conv = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(unet_paths) == sorted(linear_or_conv)
    assert len(set(unet_paths.values())) == len(unet_paths)

    text_paths = ldm_keys.text_encoder_module_paths(text_encoder)
    assert text_paths["text_model.encoder.layers.0.self_attn.q_proj"] == \
        "transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert len(text_paths) == 12 * 6  # q, k, v, out, fc1, fc2 per layer


def test_position_ids_and_legacy_text_keys_are_handled():
    state = {
        "cond_stage_model.transformer.embeddings.token_embedding.weight": torch.zeros(3, 2),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "alphas_cumprod": torch.ones(3),
    }
    parts = ldm_keys.split_ldm_state_dict(state)
    assert list(parts.text_encoder) == ["text_model.embeddings.token_embedding.weight"]
    assert set(parts.extras) == {"cond_stage_model.transformer.text_model.embeddings.position_ids",
                                 "model_ema.decay", "alphas_cumprod"}
    # Both transformers layouts of a text-encoder state dict come out canonical.
    assert list(ldm_keys.canonical_text_encoder_keys({"encoder.x": 1, "text_model.y": 2})) == \
        ["text_model.encoder.x", "text_model.y"]
