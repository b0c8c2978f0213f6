"""SD2 and SDXL model layer: tiny checkpoints in the LDM layout load, run and write back bit for bit; the open_clip
towers convert exactly (fused q/k/v, transposed projection) and compute what open_clip computes; the key tables
and configs agree with diffusers' own single-file converters at full size; a v-prediction SD2 file without a YAML
is refused with the file to add."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.models import ldm_keys
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.ldm_config import configs_for_checkpoint, configs_from_ldm
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.models.open_clip_keys import (OpenClipLayout, open_clip_to_transformers,
                                                transformers_to_open_clip)
from lib_sdcustom.models.writer import bundle_to_ldm_state_dict
from lib_sdcustom.models.stock_configs import (SD2_V2_INFERENCE, SD2_V2_INFERENCE_V, SDXL_BASE,
                                               VIT_L14_TEXT_CONFIG)
from lib_sdcustom.testing.tiny_families import (TINY_OPEN_CLIP_TEXT_CONFIG, write_tiny_sd2, write_tiny_sdxl)

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
from safetensors.torch import load_file, save_file  # noqa: E402

SD2_TE = ldm_keys.SD2_TEXT_ENCODER_PREFIX
XL_TE1 = ldm_keys.SDXL_TEXT_ENCODER_PREFIX
XL_TE2 = ldm_keys.SDXL_TEXT_ENCODER_2_PREFIX
PROMPT = "a photo of a cat, wow!! !"


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return write_tiny_sd2(tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd2(tiny_sd2):
    return load_bundle(tiny_sd2)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_bundle(tiny_sdxl)


def _assert_same(written, original):
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype, key
        assert torch.equal(written[key], tensor), key


def _ids(tokenizer, text=PROMPT):
    return tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ----- open_clip's text tower, written from its definition, over the checkpoint's own tensors -----

def _open_clip_blocks(state, prefix, ids, heads, blocks):
    """The residual stream after `blocks` resblocks: nn.MultiheadAttention on the fused in_proj, causal mask."""
    x = state[prefix + "token_embedding.weight"][ids] + state[prefix + "positional_embedding"]
    width, length = x.shape[-1], ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for index in range(blocks):
        block = f"{prefix}transformer.resblocks.{index}."
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({name: state[block + "attn." + name] for name in
                                   ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        attention.eval()
        h = F.layer_norm(x, (width,), state[block + "ln_1.weight"], state[block + "ln_1.bias"])
        x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), state[block + "ln_2.weight"], state[block + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[block + "mlp.c_fc.weight"], state[block + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[block + "mlp.c_proj.weight"], state[block + "mlp.c_proj.bias"])
    return x


def _ln_final(state, prefix, x):
    return F.layer_norm(x, (x.shape[-1],), state[prefix + "ln_final.weight"], state[prefix + "ln_final.bias"])


# ----- round trips and loading -----

@pytest.mark.parametrize("which", ["sd2", "sdxl"])
def test_round_trip_is_bit_identical(which, request):
    path = request.getfixturevalue(f"tiny_{which}")
    _assert_same(bundle_to_ldm_state_dict(request.getfixturevalue(which)), load_file(str(path)))


def test_round_trip_fp16_sdxl(tmp_path):
    path = write_tiny_sdxl(tmp_path, name="half", dtype=torch.float16)
    original = load_file(str(path))
    assert original[XL_TE2 + "transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    _assert_same(bundle_to_ldm_state_dict(load_bundle(path, dtype=torch.float16)), original)
    widened = bundle_to_ldm_state_dict(load_bundle(path))  # fp32 for training: the fp16 bits survive
    _assert_same({k: v.half() if v.is_floating_point() else v for k, v in widened.items()}, original)


def test_sd2_bundle(tiny_sd2, sd2):
    tower_layers = TINY_OPEN_CLIP_TEXT_CONFIG["num_hidden_layers"]
    assert sd2.family is ModelFamily.SD2 and sd2.text_encoder_2 is None and sd2.tokenizer_2 is None
    assert sd2.prediction_type == "epsilon" and sd2.noise_scheduler.config.prediction_type == "epsilon"
    assert sd2.vae_scaling_factor == pytest.approx(0.18215)
    assert sd2.unet.config.use_linear_projection and list(sd2.unet.config.attention_head_dim) == [2, 4]
    # The module holds the blocks SD2 runs ('penultimate'); the last block, projection and logit_scale are kept aside.
    assert sd2.text_encoder.config.num_hidden_layers == tower_layers - 1
    last = f"{SD2_TE}transformer.resblocks.{tower_layers - 1}."
    assert {last + "attn.in_proj_weight", SD2_TE + "text_projection", SD2_TE + "logit_scale",
            "alphas_cumprod"} <= set(sd2.ldm_extras)
    assert not any(key.startswith(SD2_TE + "transformer.resblocks.0.") for key in sd2.ldm_extras)
    # open_clip's padding: id 0 after the end token, and '!' is text, not a pad token.
    ids = _ids(sd2.tokenizer)[0].tolist()
    end = ids.index(49407)
    assert ids[0] == 49406 and set(ids[end + 1:]) == {0} and 256 in ids[:end]
    with torch.no_grad():
        context = sd2.text_encoder(torch.tensor([ids])).last_hidden_state
        assert context.shape == (1, 77, TINY_OPEN_CLIP_TEXT_CONFIG["hidden_size"])
        latents = sd2.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.sample()
        out = sd2.unet(latents, torch.tensor([999]), encoder_hidden_states=context).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_sd2_text_encoder_computes_open_clips_penultimate_layer(tiny_sd2, sd2):
    state = load_file(str(tiny_sd2))
    ids = _ids(sd2.tokenizer)
    layers = TINY_OPEN_CLIP_TEXT_CONFIG["num_hidden_layers"]
    heads = TINY_OPEN_CLIP_TEXT_CONFIG["num_attention_heads"]
    with torch.no_grad():
        expected = _ln_final(state, SD2_TE, _open_clip_blocks(state, SD2_TE, ids, heads, layers - 1))
        got = sd2.text_encoder(ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_sdxl_second_encoder_gives_open_clips_pooled_and_penultimate_outputs(tiny_sdxl, sdxl):
    state = load_file(str(tiny_sdxl))
    ids = _ids(sdxl.tokenizer_2)
    layers = TINY_OPEN_CLIP_TEXT_CONFIG["num_hidden_layers"]
    heads = TINY_OPEN_CLIP_TEXT_CONFIG["num_attention_heads"]
    projection = state[XL_TE2 + "text_projection"]  # [width, embed_dim], used as `pooled @ text_projection`
    assert projection.shape == (64, 48)
    assert torch.equal(sdxl.text_encoder_2.text_projection.weight, projection.t())
    with torch.no_grad():
        penultimate = _open_clip_blocks(state, XL_TE2, ids, heads, layers - 1)
        last = _open_clip_blocks(state, XL_TE2, ids, heads, layers)
        pooled = _ln_final(state, XL_TE2, last)[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ projection
        out = sdxl.text_encoder_2(ids, output_hidden_states=True)
    assert torch.allclose(out.text_embeds, pooled, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.hidden_states[-2], penultimate, atol=1e-5, rtol=1e-5)


def test_sdxl_bundle_runs_with_pooled_text_and_time_ids(sdxl):
    assert sdxl.family is ModelFamily.SDXL and sdxl.prediction_type == "epsilon"
    assert sdxl.vae_scaling_factor == pytest.approx(0.13025)
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.text_encoders == (sdxl.text_encoder, sdxl.text_encoder_2)
    assert sdxl.unet.config.addition_embed_type == "text_time" and sdxl.unet.config.addition_time_embed_dim == 8
    assert list(sdxl.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert not any(p.requires_grad for encoder in sdxl.text_encoders for p in encoder.parameters())
    assert sdxl.tokenizer.pad_token_id == 49407 and sdxl.tokenizer_2.pad_token_id == 0
    with torch.no_grad():
        first = sdxl.text_encoder(_ids(sdxl.tokenizer), output_hidden_states=True)
        second = sdxl.text_encoder_2(_ids(sdxl.tokenizer_2), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        assert context.shape == (1, 77, sdxl.unet.config.cross_attention_dim)
        latents = torch.randn(1, 4, 8, 8)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out = sdxl.unet(latents, torch.tensor([500]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids}).sample
        assert out.shape == latents.shape and torch.isfinite(out).all()
        other = sdxl.unet(latents, torch.tensor([500]), encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids * 2}).sample
    assert not torch.equal(out, other)  # the size/crop conditioning reaches the UNet


# ----- prediction type and the YAML -----

def test_v_prediction_comes_from_the_yaml(tmp_path):
    sd2_v = load_bundle(write_tiny_sd2(tmp_path, name="sd2v", v_prediction=True))
    sdxl_v = load_bundle(write_tiny_sdxl(tmp_path, name="sdxlv", v_prediction=True))
    for bundle in (sd2_v, sdxl_v):
        assert bundle.prediction_type == "v_prediction"
        assert bundle.noise_scheduler.config.prediction_type == "v_prediction"


def _without_yaml(path, tmp_path, name, metadata=None):
    target = tmp_path / f"{name}.safetensors"
    save_file(load_file(str(path)), str(target), metadata=metadata)
    return target


def test_sd2_without_yaml_asks_for_one(tiny_sd2, tmp_path):
    with pytest.raises(ModelLoadError) as raised:
        load_bundle(_without_yaml(tiny_sd2, tmp_path, "bare"))
    assert "bare.safetensors" in raised.value.problem and "SD2" in raised.value.problem
    assert "bare.yaml" in raised.value.fix and "v2-inference-v.yaml" in raised.value.fix
    # Metadata saying which it is picks the stock config (which the tiny shapes then do not fit).
    with pytest.raises(ModelLoadError, match="does not fit the built-in SD2 v2-inference-v config"):
        load_bundle(_without_yaml(tiny_sd2, tmp_path, "declared", {"modelspec.prediction_type": "v"}))


def test_sdxl_without_yaml_uses_the_base_config_unless_it_says_v(tiny_sdxl, tmp_path):
    with pytest.raises(ModelLoadError, match="does not fit the built-in SDXL sd_xl_base config"):
        load_bundle(_without_yaml(tiny_sdxl, tmp_path, "bare"))
    with pytest.raises(ModelLoadError) as raised:
        load_bundle(_without_yaml(tiny_sdxl, tmp_path, "vpred", {"modelspec.prediction_type": "v"}))
    assert "VScaling" in raised.value.fix and "vpred.yaml" in raised.value.fix


def test_yaml_of_another_family_is_named(tiny_sd2, tiny_checkpoint, tmp_path):
    target = tmp_path / "mixed.safetensors"
    shutil.copyfile(tiny_sd2, target)
    shutil.copyfile(tiny_checkpoint.with_suffix(".yaml"), tmp_path / "mixed.yaml")
    with pytest.raises(ModelLoadError, match="is an SD2 checkpoint, but its model config .*mixed.yaml describes an "
                                             "SD1 model"):
        load_bundle(target)


def test_foreign_open_clip_keys_are_refused(tiny_sd2, tmp_path):
    state = load_file(str(tiny_sd2))
    state[SD2_TE + "transformer.resblocks.7.ln_1.weight"] = torch.ones(64)  # beyond the 3-block tower
    target = tmp_path / "odd.safetensors"
    save_file(state, str(target))
    shutil.copyfile(tiny_sd2.with_suffix(".yaml"), tmp_path / "odd.yaml")
    with pytest.raises(ModelLoadError, match=r"tensors the config does not describe: cond_stage_model\.model\."
                                             r"transformer\.resblocks\.7"):
        load_bundle(target)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["denoiser_config"]["params"]["scaling_config"].update(target="x.EDMScaling"), "EDMScaling"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"].pop(0), "only the SDXL base layout"),
    (lambda p: p["network_config"]["params"].update(adm_in_channels=2048), "adm_in_channels 2048"),
    (lambda p: p["network_config"]["params"].update(context_dim=1280), "context_dim 1280"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"][1]["params"].update(arch="ViT-X"), "ViT-X"),
])
def test_unsupported_sdxl_yaml_contents_are_named(edit, message):
    config = copy.deepcopy(SDXL_BASE)
    edit(config["model"]["params"])
    with pytest.raises(ModelLoadError, match=message) as raised:
        configs_from_ldm(config, source="custom.yaml")
    assert "custom.yaml" in raised.value.problem


# ----- full-size layouts against diffusers' converters -----

def _full_size(ldm):
    """Stock-config modules with meta tensors and the LDM checkpoint dict they make (costs no memory)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = configs_from_ldm(copy.deepcopy(ldm), source="stock")
    tower_config = configs.text_encoder_2 or {**configs.text_encoder, "num_hidden_layers": configs.open_clip.layers}
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel(**configs.unet)
        vae = diffusers.AutoencoderKL(**configs.vae)
        tower = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(tower_config)))
        clip_l = CLIPTextModel(CLIPTextConfig.from_dict(dict(VIT_L14_TEXT_CONFIG)))
    open_clip = {**transformers_to_open_clip(ldm_keys.text_encoder_state_dict(tower)).state_dict,
                 "logit_scale": torch.empty((), device="meta")}
    unet_ldm = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config))
    vae_ldm = ldm_keys.vae_to_ldm(vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config))
    assert unet_ldm.unmapped == [] and vae_ldm.unmapped == []
    if configs.family is ModelFamily.SDXL:
        state = ldm_keys.join_ldm_state_dict(unet_ldm.state_dict, vae_ldm.state_dict,
                                             ldm_keys.text_encoder_state_dict(clip_l), {}, family=configs.family,
                                             text_encoder_2=open_clip)
    else:
        state = ldm_keys.join_ldm_state_dict(unet_ldm.state_dict, vae_ldm.state_dict, open_clip, {},
                                             family=configs.family)
    return configs, unet, state


def _same_keys_and_shapes(ours, theirs, module_keys):
    assert set(ours) == set(theirs) == set(module_keys)
    for key, tensor in theirs.items():
        assert tuple(ours[key].shape) == tuple(tensor.shape), key


@pytest.mark.parametrize("stock", [SD2_V2_INFERENCE, SD2_V2_INFERENCE_V])
def test_sd2_full_size_matches_diffusers(stock):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    configs, unet, state = _full_size(stock)
    assert configs.family is ModelFamily.SD2
    assert configs.open_clip == OpenClipLayout(layers=24, used_layers=23, projection=False)
    assert configs.unet["attention_head_dim"] == [5, 10, 20, 20] and configs.unet["cross_attention_dim"] == 1024
    # v2-1_768-ema-pruned: 686 UNet, 248 VAE and 294 text-encoder tensors (24 x 12 + 6).
    assert sum(k.startswith(ldm_keys.UNET_PREFIX) for k in state) == 686
    assert sum(k.startswith(SD2_TE) for k in state) == 294
    assert tuple(state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320)  # linear
    assert tuple(state["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"].shape) \
        == (320, 1024)
    assert tuple(state[SD2_TE + "transformer.resblocks.23.attn.in_proj_weight"].shape) == (3072, 1024)

    parts = ldm_keys.split_ldm_state_dict(state, ModelFamily.SD2)
    ours_unet = ldm_keys.unet_to_diffusers(parts.unet, ldm_keys.UNetLayout.from_diffusers_config(configs.unet))
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(state, dict(configs.unet))
    _same_keys_and_shapes(ours_unet.state_dict, theirs_unet, unet.state_dict())

    with init_empty_weights():
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(configs.text_encoder)))
    ours_text = open_clip_to_transformers(parts.text_encoder, configs.open_clip)
    theirs_text = single_file_utils.convert_open_clip_checkpoint(text_encoder, state)
    module_keys = set(ldm_keys.text_encoder_state_dict(text_encoder)) - {ldm_keys.POSITION_IDS_KEY}
    _same_keys_and_shapes(ours_text.state_dict, theirs_text, module_keys)  # diffusers also drops resblocks.23
    assert set(ours_text.extras) == {f"transformer.resblocks.23.{name}" for name in (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")} | {"text_projection", "logit_scale"}

    theirs_config = single_file_utils.create_unet_diffusers_config_from_ldm(copy.deepcopy(stock), state)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                "use_linear_projection", "cross_attention_dim", "transformer_layers_per_block", "layers_per_block"):
        assert configs.unet[key] == theirs_config[key], key


def test_sdxl_full_size_matches_diffusers():
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    configs, unet, state = _full_size(SDXL_BASE)
    assert configs.family is ModelFamily.SDXL and configs.prediction_type == "epsilon"
    assert configs.vae["scaling_factor"] == pytest.approx(0.13025)
    # sd_xl_base_1.0: 1680 UNet, 248 VAE, 196 CLIP-L (+ position_ids) and 390 bigG tensors (32 x 12 + 6).
    assert sum(k.startswith(ldm_keys.UNET_PREFIX) for k in state) == 1680
    assert sum(k.startswith(ldm_keys.VAE_PREFIX) for k in state) == 248
    assert sum(k.startswith(XL_TE1) for k in state) == 196
    assert sum(k.startswith(XL_TE2) for k in state) == 390
    for key, shape in [
        ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
        ("model.diffusion_model.label_emb.0.2.bias", (1280,)),
        ("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
        ("model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight", (1280, 5120)),
        ("model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
        ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
        ("model.diffusion_model.input_blocks.6.0.op.weight", (640, 640, 3, 3)),
        (XL_TE1 + "text_model.encoder.layers.11.mlp.fc2.weight", (768, 3072)),
        (XL_TE2 + "transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
        (XL_TE2 + "text_projection", (1280, 1280)),
        (XL_TE2 + "positional_embedding", (77, 1280)),
    ]:
        assert tuple(state[key].shape) == shape, key
    assert "model.diffusion_model.input_blocks.9.0.in_layers.0.weight" not in state  # 3 levels, not 4

    parts = ldm_keys.split_ldm_state_dict(state, ModelFamily.SDXL)
    ours_unet = ldm_keys.unet_to_diffusers(parts.unet, ldm_keys.UNetLayout.from_diffusers_config(configs.unet))
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(state, dict(configs.unet))
    _same_keys_and_shapes(ours_unet.state_dict, theirs_unet, unet.state_dict())
    # what an SDXL LoRA writer will name (docs/host-formats.md#kohya-naming-and-metadata: LDM names)
    paths = ldm_keys.unet_module_paths(unet)
    assert paths["add_embedding.linear_1"] == "label_emb.0.0"
    assert paths["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"

    theirs_te1 = single_file_utils.convert_ldm_clip_checkpoint(state, remove_prefix=XL_TE1)
    assert set(parts.text_encoder) == set(ldm_keys.canonical_text_encoder_keys(theirs_te1))

    with init_empty_weights():
        tower = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(configs.text_encoder_2)))
    ours_te2 = open_clip_to_transformers(parts.text_encoder_2, configs.open_clip)
    theirs_te2 = single_file_utils.convert_open_clip_checkpoint(tower, state, prefix=XL_TE2)
    module_keys = set(ldm_keys.text_encoder_state_dict(tower)) - {ldm_keys.POSITION_IDS_KEY}
    _same_keys_and_shapes(ours_te2.state_dict, theirs_te2, module_keys)
    assert set(ours_te2.extras) == {"logit_scale"}

    theirs_config = single_file_utils.create_unet_diffusers_config_from_ldm(copy.deepcopy(SDXL_BASE), state)
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                "use_linear_projection", "cross_attention_dim", "transformer_layers_per_block", "layers_per_block",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        assert configs.unet[key] == theirs_config[key], key


def test_tiny_values_match_diffusers_converters(tiny_sd2, sd2, tiny_sdxl, sdxl):
    """diffusers' converters are an independent implementation of the q/k/v split and the projection transpose."""
    for path, bundle, encoder, prefix in ((tiny_sd2, sd2, sd2.text_encoder, SD2_TE),
                                          (tiny_sdxl, sdxl, sdxl.text_encoder_2, XL_TE2)):
        state = load_file(str(path))
        theirs = single_file_utils.convert_open_clip_checkpoint(encoder, state, prefix=prefix)
        ours = ldm_keys.text_encoder_state_dict(encoder)
        ours.pop(ldm_keys.POSITION_IDS_KEY, None)
        for key, tensor in ours.items():  # diffusers keeps a tiny SD2's last block (it drops `resblocks.23` only)
            assert torch.equal(theirs[key], tensor), key
        theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(state, dict(bundle.unet.config))
        for key, tensor in bundle.unet.state_dict().items():
            assert torch.equal(theirs_unet[key], tensor), key


# ----- pieces -----

def test_open_clip_keys_round_trip_and_refuse_strays():
    width, layers = 8, 2
    state = {"token_embedding.weight": torch.randn(10, width), "positional_embedding": torch.randn(5, width),
             "ln_final.weight": torch.randn(width), "ln_final.bias": torch.randn(width),
             "text_projection": torch.randn(width, 6), "logit_scale": torch.tensor(2.0)}
    for index in range(layers):
        block = f"transformer.resblocks.{index}."
        state.update({block + "attn.in_proj_weight": torch.randn(3 * width, width),
                      block + "attn.in_proj_bias": torch.randn(3 * width),
                      block + "attn.out_proj.weight": torch.randn(width, width),
                      block + "mlp.c_fc.weight": torch.randn(4 * width, width)})
    split = open_clip_to_transformers(state, OpenClipLayout(layers=layers, used_layers=layers, projection=True))
    assert split.unmapped == [] and set(split.extras) == {"logit_scale"}
    q, k, v = state["transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(split.state_dict["text_model.encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(split.state_dict["text_model.encoder.layers.1.self_attn.q_proj.weight"], q)
    assert split.state_dict["text_projection.weight"].shape == (6, width)
    back = transformers_to_open_clip(split.state_dict)
    assert back.unmapped == []
    _assert_same({**back.state_dict, **split.extras}, state)

    missing_v = {k: v for k, v in split.state_dict.items() if k != "text_model.encoder.layers.0.self_attn.v_proj.bias"}
    assert transformers_to_open_clip(missing_v).unmapped
    stray = open_clip_to_transformers({**state, "transformer.resblocks.5.ln_1.weight": torch.ones(width),
                                       "visual.proj": torch.ones(1)},
                                      OpenClipLayout(layers=layers, used_layers=layers, projection=True))
    assert sorted(stray.unmapped) == ["transformer.resblocks.5.ln_1.weight", "visual.proj"]


def test_sdxl_diffusers_folder_loads(sdxl, tiny_sdxl, tmp_path):
    from lib_sdcustom.models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

    folder = tmp_path / "pipe"
    sdxl.unet.save_pretrained(str(folder / "unet"))
    sdxl.vae.save_pretrained(str(folder / "vae"))
    sdxl.text_encoder.save_pretrained(str(folder / "text_encoder"))
    sdxl.text_encoder_2.save_pretrained(str(folder / "text_encoder_2"))
    for part in ("tokenizer", "tokenizer_2"):
        (folder / part).mkdir()
        for name in TOKENIZER_FILES:
            shutil.copyfile(bundled_tokenizer_dir() / name, folder / part / name)
    special = folder / "tokenizer_2" / "special_tokens_map.json"  # as diffusers' SDXL tokenizer_2 declares it
    special.write_text(json.dumps({**json.loads(special.read_text()), "pad_token": "!"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                          "text_encoder_2": ["transformers",
                                                                             "CLIPTextModelWithProjection"]}))
    loaded = load_bundle(folder)
    assert loaded.family is ModelFamily.SDXL and loaded.tokenizer_2.pad_token_id == 0
    assert _ids(loaded.tokenizer_2).tolist() == _ids(sdxl.tokenizer_2).tolist()  # '!' stays text
    original = {k: v for k, v in load_file(str(tiny_sdxl)).items() if k not in sdxl.ldm_extras}
    _assert_same(bundle_to_ldm_state_dict(loaded), original)


def test_configs_for_checkpoint_reads_the_family_yaml(tiny_sdxl):
    configs, ldm = configs_for_checkpoint(tiny_sdxl, ModelFamily.SDXL)
    assert configs.family is ModelFamily.SDXL and configs.from_yaml and ldm is not None
    assert configs.text_encoder_dir.name == "tiny_sdxl_text_encoder"
    assert configs.text_encoder_2_dir.name == "tiny_sdxl_text_encoder_2"
    assert configs.unet["projection_class_embeddings_input_dim"] == 48 + 6 * 8
