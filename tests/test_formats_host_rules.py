"""The test port of the host's LoRA name mapping against hand-checked name pairs.

Expected names were worked out from the SD1 LDM layout (input_blocks 1,2 / 4,5 / 7,8 / 10,11 hold
resnet+attention, 3/6/9 the downsample `op`; output_blocks 0-2 have no attention, so their upsampler is
`output_blocks_2_1_conv`, later ones `..._2_conv`), not from the port itself.
"""

from __future__ import annotations

import pytest

from host_rules import convert_diffusers_name_to_compvis, host_target_for

SD1_PAIRS = [
    # attentions: down / mid / up, every targeted child
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
     "diffusion_model_input_blocks_2_1_transformer_blocks_0_attn2_to_k"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v",
     "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_v"),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_out_0",
     "diffusion_model_input_blocks_8_1_transformer_blocks_0_attn2_to_out_0"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "diffusion_model_input_blocks_1_1_proj_in"),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "diffusion_model_output_blocks_11_1_proj_out"),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "diffusion_model_output_blocks_3_1_transformer_blocks_0_ff_net_0_proj"),
    ("lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_k",
     "diffusion_model_output_blocks_9_1_transformer_blocks_0_attn1_to_k"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
     "diffusion_model_middle_block_1_transformer_blocks_0_ff_net_2"),
    # resnets
    ("lora_unet_down_blocks_0_resnets_0_conv1", "diffusion_model_input_blocks_1_0_in_layers_2"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "diffusion_model_input_blocks_11_0_out_layers_3"),
    ("lora_unet_up_blocks_0_resnets_2_time_emb_proj", "diffusion_model_output_blocks_2_0_emb_layers_1"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "diffusion_model_input_blocks_4_0_skip_connection"),
    ("lora_unet_up_blocks_2_resnets_1_norm1", "diffusion_model_output_blocks_7_0_in_layers_0"),
    ("lora_unet_mid_block_resnets_0_time_emb_proj", "diffusion_model_middle_block_0_emb_layers_1"),
    ("lora_unet_mid_block_resnets_1_conv1", "diffusion_model_middle_block_2_in_layers_2"),
    # samplers
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "diffusion_model_input_blocks_3_0_op"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "diffusion_model_input_blocks_9_0_op"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "diffusion_model_output_blocks_5_2_conv"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "diffusion_model_output_blocks_8_2_conv"),
    # time embedding, conv_in / conv_out
    ("lora_unet_time_embedding_linear_1", "diffusion_model_time_embed_0"),
    ("lora_unet_time_embedding_linear_2", "diffusion_model_time_embed_2"),
    ("lora_unet_conv_in", "diffusion_model_input_blocks_0_0"),
    ("lora_unet_conv_out", "diffusion_model_out_2"),
    # SD1 text encoder
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "transformer_text_model_encoder_layers_0_self_attn_q_proj"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "transformer_text_model_encoder_layers_11_mlp_fc2"),
    # names the converter leaves alone (kohya SDXL's LDM layout, TE1)
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
]

OPEN_CLIP_PAIRS = [  # (name, is_sd2, expected)
    ("lora_te_text_model_encoder_layers_3_mlp_fc1", True, "model_transformer_resblocks_3_mlp_c_fc"),
    ("lora_te_text_model_encoder_layers_3_mlp_fc2", True, "model_transformer_resblocks_3_mlp_c_proj"),
    ("lora_te_text_model_encoder_layers_3_self_attn_out_proj", True, "model_transformer_resblocks_3_attn_out_proj"),
    ("lora_te_text_model_encoder_layers_22_self_attn_q_proj", True, "model_transformer_resblocks_22_attn_q_proj"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", False, "1_model_transformer_resblocks_31_mlp_c_proj"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", False, "1_model_transformer_resblocks_0_attn_k_proj"),
]


@pytest.mark.parametrize("kohya_name, compvis_name", SD1_PAIRS)
def test_converter_sd1_pairs(kohya_name: str, compvis_name: str) -> None:
    assert convert_diffusers_name_to_compvis(kohya_name, False) == compvis_name


@pytest.mark.parametrize("kohya_name, is_sd2, compvis_name", OPEN_CLIP_PAIRS)
def test_converter_open_clip_pairs(kohya_name: str, is_sd2: bool, compvis_name: str) -> None:
    assert convert_diffusers_name_to_compvis(kohya_name, is_sd2) == compvis_name


def test_rule1_direct_hit() -> None:
    names = {"diffusion_model_input_blocks_1_1_proj_in", "transformer_text_model_encoder_layers_0_mlp_fc1"}
    assert host_target_for("lora_unet_down_blocks_0_attentions_0_proj_in", names) == \
        "diffusion_model_input_blocks_1_1_proj_in"
    assert host_target_for("lora_te_text_model_encoder_layers_0_mlp_fc1", names) == \
        "transformer_text_model_encoder_layers_0_mlp_fc1"
    assert host_target_for("lora_unet_down_blocks_0_attentions_0_proj_out", names) is None


def test_rule2_sd2_qkv_go_to_the_mha_parent_and_is_sd2_is_derived() -> None:
    names = {"model_transformer_resblocks", "model_transformer_resblocks_0_attn",
             "model_transformer_resblocks_0_attn_out_proj", "model_transformer_resblocks_0_mlp_c_fc"}
    for proj in ("q", "k", "v"):
        assert host_target_for(f"lora_te_text_model_encoder_layers_0_self_attn_{proj}_proj", names) == \
            "model_transformer_resblocks_0_attn"
    assert host_target_for("lora_te_text_model_encoder_layers_0_self_attn_out_proj", names) == \
        "model_transformer_resblocks_0_attn_out_proj"
    assert host_target_for("lora_te_text_model_encoder_layers_0_mlp_fc1", names) == \
        "model_transformer_resblocks_0_mlp_c_fc"


def test_sdxl_te2_qkv_and_mlp() -> None:
    names = {"1_model_transformer_resblocks_0_attn", "1_model_transformer_resblocks_0_mlp_c_fc"}
    assert host_target_for("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", names) == \
        "1_model_transformer_resblocks_0_attn"
    assert host_target_for("lora_te2_text_model_encoder_layers_0_mlp_fc1", names) == \
        "1_model_transformer_resblocks_0_mlp_c_fc"


def test_rule3_ldm_named_unet_keys() -> None:
    names = {"diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "diffusion_model_output_blocks_2_2_conv"}
    assert host_target_for("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", names) == \
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert host_target_for("lora_unet_output_blocks_2_2_conv", names) == "diffusion_model_output_blocks_2_2_conv"
    # The host mis-maps diffusers-named SDXL upsamplers (up_blocks 0 has attentions in SDXL): dropped.
    assert host_target_for("lora_unet_up_blocks_0_upsamplers_0_conv", names) is None


def test_rule4_te1_on_sdxl_and_sd1_fallback() -> None:
    sdxl = {"0_transformer_text_model_encoder_layers_0_self_attn_q_proj"}
    sd1 = {"transformer_text_model_encoder_layers_0_self_attn_q_proj"}
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert host_target_for(name, sdxl) == "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert host_target_for(name, sd1) == "transformer_text_model_encoder_layers_0_self_attn_q_proj"


def test_lora_te_is_dropped_on_sdxl() -> None:
    sdxl = {"0_transformer_text_model_encoder_layers_0_self_attn_q_proj", "1_model_transformer_resblocks_0_attn"}
    assert host_target_for("lora_te_text_model_encoder_layers_0_self_attn_q_proj", sdxl) is None
