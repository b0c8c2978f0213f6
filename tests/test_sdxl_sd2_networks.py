"""LoRA/LyCORIS and DreamBooth-LoRA on tiny SDXL and SD2 (v-prediction) checkpoints: a few steps each, then the
exported file is checked the way SD1's is: every key maps to a real host module under the host's rules (SDXL
in kohya's LDM layout, `lora_te1_`/`lora_te2_`; SD2's OpenCLIP attention with all of q/k/v/out per layer), the
file reloads to the trainer's own model, and independent consumers (LyCORIS; diffusers for SDXL LoRA) get
the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import write_images
from host_rules import convert_diffusers_name_to_compvis, host_target_for
from lib_sdcustom.config import RunConfig
from lib_sdcustom.formats.network_file import read_network_file
from lib_sdcustom.methods.text_conditioning import encode_prompts
from lib_sdcustom.models import ldm_keys
from lib_sdcustom.models.bundle import ModelFamily
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.testing.tiny import write_tiny_sd1
from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl
from lib_sdcustom.networks.algorithms import algorithm_for
from lib_sdcustom.networks.kohya_names import from_file_names, ldm_unet_names, to_file_names
from lib_sdcustom.networks.lycoris_backend import attach_network, kohya_targets, text_encoder_views
from lib_sdcustom.run.train import train
from lib_sdcustom.training.conditioning import SizeConditioning

METHODS = ("lora", "locon", "loha", "lokr", "dreambooth_lora")
FAMILIES = ("sdxl", "sd2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sdxl": write_tiny_sdxl(root / "sdxl"), "sd2": write_tiny_sd2(root / "sd2", v_prediction=True),
            "sd1": write_tiny_sd1(root / "sd1")}


def make_config(base: Path, images: Path, root: Path, method: str) -> RunConfig:
    config = RunConfig(method=method)
    config.model.base = str(base)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = f"net_{method}", str(root / "out"), str(root / f"run_{method}")
    config.output.save_precision = "fp32"
    config.network.rank, config.network.alpha = 4, 2.0
    config.optimizer.lr = 5e-3
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 3, 1, 0
    config.training.keep_final_state = True  # the tests read the trainer's last weights from it
    if method == "dreambooth_lora":
        config.dreambooth.instance_prompt, config.prior.class_prompt = "a photo of net_x toy", "a photo of a toy"
        config.prior.num_class_images, config.prior.class_sample_steps = 2, 1
        config.prior.class_data = str(root / "class")
    return config


def trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((run_dir / "state").glob("step-*"))[-1] / "trainable.safetensors"))


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """(family, method) -> (exported file, config, trainer's final network state)."""
    root = tmp_path_factory.mktemp("trained")
    images = write_images(root / "images")
    runs = {}
    for family in FAMILIES:
        for method in METHODS:
            config = make_config(checkpoints[family], images, root / family, method)
            result = train(config)
            runs[family, method] = (result.outputs[0], config, trained_state(Path(config.output.run_dir)))
    return runs


@torch.no_grad()
def model_outputs(bundle):
    """Context (and SDXL's pooled vector) and the UNet's output for fixed inputs."""
    conditioning = encode_prompts(bundle, ["a net_x photo", "net_x"])
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    sizes = [SizeConditioning(original=(80, 64), crop=(8, 0), target=(64, 64))] * 2
    sample = bundle.unet(latents, torch.tensor([10, 700]), **conditioning.unet_kwargs(sizes)).sample
    pooled = conditioning.pooled if conditioning.pooled is not None else torch.zeros(())
    return conditioning.context, pooled, sample


def with_network(base: Path, method: str, config: RunConfig, tensors: dict[str, torch.Tensor]):
    """A fresh base with the network attached and `tensors` (trainer names) loaded."""
    bundle = load_bundle(base)
    attached = attach_network(bundle.unet, bundle.text_encoders, algorithm_for(method), config.network,
                              train_text_encoder=True)
    attached.load_state_dict(tensors)
    bundle.unet.eval()
    return bundle


def assert_same_outputs(actual, expected):
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ----- the host's names -----

def host_layer_names(bundle) -> set[str]:
    """The host's `network_layer_mapping` for the tiny model (docs/host-formats.md#lora-files): LDM UNet paths, and per
    family the text-encoder module names of its own (open_clip) encoders."""
    return host_names_for(bundle.family, bundle.unet, *bundle.text_encoders)


def host_names_for(family: ModelFamily, unet, text_encoder, text_encoder_2=None) -> set[str]:
    names = {"diffusion_model_" + path.replace(".", "_") for path in ldm_keys.unet_module_paths(unet).values()}

    def open_clip(prefix: str, layers: int) -> set[str]:
        # The host registers every named module, the blocks' ModuleList too (its SD2 test looks for it).
        return {f"{prefix}model_transformer_resblocks"} | {
            f"{prefix}model_transformer_resblocks_{n}_{leaf}" for n in range(layers)
            for leaf in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}

    if family is ModelFamily.SDXL:
        names |= {"0_" + path.replace(".", "_") for path in ldm_keys.text_encoder_module_paths(text_encoder).values()}
        names |= open_clip("1_", text_encoder_2.config.num_hidden_layers)
    else:
        names |= open_clip("", text_encoder.config.num_hidden_layers)
    return names


SDXL_UNET_PAIRS = [  # trainer (diffusers) name -> file name, worked out by hand from the tiny SDXL layout:
    # levels (no attention, attention, attention), 2 resnets per level, so 3 LDM blocks per level.
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_output_blocks_2_2_conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "lora_unet_output_blocks_5_2_conv"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_input_blocks_3_0_op"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_down_blocks_2_resnets_0_time_emb_proj", "lora_unet_input_blocks_7_0_emb_layers_1"),
    ("lora_unet_mid_block_resnets_1_conv2", "lora_unet_middle_block_2_out_layers_3"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
     "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0"),
    ("lora_unet_up_blocks_0_attentions_2_proj_out", "lora_unet_output_blocks_2_1_proj_out"),
    ("lora_unet_up_blocks_2_resnets_2_conv_shortcut", "lora_unet_output_blocks_8_0_skip_connection"),
]

HOST_PAIRS = {  # file name -> the host module it patches (docs/host-formats.md#lora-files, key parsing steps 1-4)
    "sdxl": [
        ("lora_unet_output_blocks_2_2_conv", "diffusion_model_output_blocks_2_2_conv"),
        ("lora_unet_output_blocks_5_2_conv", "diffusion_model_output_blocks_5_2_conv"),
        ("lora_unet_input_blocks_3_0_op", "diffusion_model_input_blocks_3_0_op"),
        ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "0_transformer_text_model_encoder_layers_1_self_attn_q_proj"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc2", "0_transformer_text_model_encoder_layers_0_mlp_fc2"),
        ("lora_te2_text_model_encoder_layers_2_self_attn_v_proj", "1_model_transformer_resblocks_2_attn"),
        ("lora_te2_text_model_encoder_layers_2_self_attn_out_proj", "1_model_transformer_resblocks_2_attn_out_proj"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "1_model_transformer_resblocks_0_mlp_c_fc"),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "1_model_transformer_resblocks_1_mlp_c_proj"),
    ],
    "sd2": [  # the tiny SD2's first up block has attention, which the host's diffusers-name converter
        # does not expect (it would give output_blocks_2_1_conv), so this file too carries LDM names.
        ("lora_unet_output_blocks_2_2_conv", "diffusion_model_output_blocks_2_2_conv"),
        ("lora_unet_input_blocks_5_1_proj_in", "diffusion_model_input_blocks_5_1_proj_in"),
        ("lora_te_text_model_encoder_layers_1_self_attn_q_proj", "model_transformer_resblocks_1_attn"),
        ("lora_te_text_model_encoder_layers_1_self_attn_out_proj", "model_transformer_resblocks_1_attn_out_proj"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "model_transformer_resblocks_0_mlp_c_fc"),
    ],
}


def test_ldm_unet_names_are_kohyas_ldm_layout(checkpoints):
    bundle = load_bundle(checkpoints["sdxl"])
    names = ldm_unet_names(bundle.unet)
    for trainer_name, file_name in SDXL_UNET_PAIRS:
        assert names[trainer_name] == file_name
    # The host's own diffusers-name converter misplaces SDXL's up-samplers: the reason for the LDM names.
    assert convert_diffusers_name_to_compvis("lora_unet_up_blocks_0_upsamplers_0_conv", False) != \
        "diffusion_model_output_blocks_2_2_conv"
    tensors = {f"{trainer_name}.alpha": torch.tensor(1.0) for trainer_name, _ in SDXL_UNET_PAIRS}
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(2.0)
    on_file = to_file_names(tensors, bundle.unet)
    assert "lora_unet_output_blocks_2_2_conv.alpha" in on_file and "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha" in on_file
    assert from_file_names(on_file, bundle.unet) == tensors
    sd1 = load_bundle(checkpoints["sd1"])  # SD1's layout keeps kohya's diffusers names
    sd1_tensors = {"lora_unet_up_blocks_1_upsamplers_0_conv.alpha": torch.tensor(1.0)}
    assert to_file_names(sd1_tensors, sd1.unet) == sd1_tensors


def test_full_size_sdxl_lora_has_kohyas_module_count_and_every_name_maps():
    """docs/host-formats.md#kohya-naming-and-metadata: kohya's SDXL LoRA has 722 UNet and 72 + 192 text-encoder modules
    (meta tensors: no memory)."""
    import copy

    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lib_sdcustom.config import NetworkOptions
    from lib_sdcustom.models.ldm_config import configs_from_ldm
    from lib_sdcustom.models.stock_configs import SDXL_BASE, VIT_L14_TEXT_CONFIG

    configs = configs_from_ldm(copy.deepcopy(SDXL_BASE), source="stock")
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel(**configs.unet)
        clip_l = CLIPTextModel(CLIPTextConfig.from_dict(dict(VIT_L14_TEXT_CONFIG)))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(configs.text_encoder_2)))
    with torch.device("meta"):
        attached = attach_network(unet, (clip_l, big_g), algorithm_for("lora"), NetworkOptions(rank=4, alpha=1.0),
                                  train_text_encoder=True)
    modules = {module.lora_name for module in attached.network.loras}
    on_file = {key.split(".")[0] for key in to_file_names({f"{m}.alpha": torch.zeros(()) for m in modules}, unet)}
    assert len(attached.unet_modules) == 722
    assert sum(m.startswith("lora_te1_") for m in on_file) == 72 and sum(m.startswith("lora_te2_") for m in on_file) == 192
    names = host_names_for(ModelFamily.SDXL, unet, clip_l, big_g)
    assert not sorted(m for m in on_file if host_target_for(m, names) is None)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_checked_names_reach_the_hosts_modules(checkpoints, family):
    names = host_layer_names(load_bundle(checkpoints[family]))
    for file_name, host_name in HOST_PAIRS[family]:
        assert host_target_for(file_name, names) == host_name, file_name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_written_module_maps_to_a_host_module(trained, checkpoints, family, method):
    path, _, _ = trained[family, method]
    bundle = load_bundle(checkpoints[family])
    names = host_layer_names(bundle)
    with safe_open(str(path), "pt") as handle:
        modules = {key.split(".")[0] for key in handle.keys()}
        metadata = handle.metadata()
    assert not sorted(m for m in modules if host_target_for(m, names) is None)
    trains_convolutions = algorithm_for(method).trains_convolutions
    assert not any(m.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for m in modules)
    assert ("lora_unet_output_blocks_2_2_conv" in modules) == trains_convolutions
    if family == "sdxl":
        assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
        te2 = [m for m in modules if m.startswith("lora_te2_")]
        assert len(te2) == 6 * bundle.text_encoder_2.config.num_hidden_layers  # q, k, v, out, fc1, fc2 per layer
    else:
        assert {m.split("_")[1] for m in modules} == {"unet", "te"}
    # The host patches an OpenCLIP attention only when q, k, v and out are all there (docs/host-formats.md#lora-files).
    open_clip_prefix = "lora_te2_" if family == "sdxl" else "lora_te_"
    layers = {m.split("_layers_")[1].split("_")[0] for m in modules if m.startswith(open_clip_prefix)}
    for layer in layers:
        stem = f"{open_clip_prefix}text_model_encoder_layers_{layer}_self_attn_"
        assert {stem + leaf for leaf in ("q_proj", "k_proj", "v_proj", "out_proj")} <= modules
    expected = {"sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
                "sd2": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora")}[family]
    assert (metadata["ss_base_model_version"], metadata["ss_v2"], metadata["modelspec.architecture"]) == expected
    assert metadata["ss_network_module"] == ("networks.lora" if algorithm_for(method).name == "lora" else "lycoris.kohya")
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_file_reloads_to_the_trainers_model(trained, checkpoints, family, method):
    path, config, trainable = trained[family, method]
    base = checkpoints[family]
    expected = model_outputs(with_network(base, method, config, trainable))
    tensors, _ = read_network_file(path)
    bundle = load_bundle(base)
    reloaded = model_outputs(with_network(base, method, config, tensors))  # the file's own names
    assert_same_outputs(reloaded, expected)
    assert not torch.allclose(expected[2], model_outputs(bundle)[2]), "the network must change the UNet output"


@pytest.mark.parametrize("method", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lycoris_loader_reproduces_the_trainers_model(trained, checkpoints, family, method):
    from lycoris.kohya import create_network_from_weights

    path, config, trainable = trained[family, method]
    base = load_bundle(checkpoints[family])
    tensors, _ = read_network_file(path)
    views = text_encoder_views(base.text_encoders)
    # LyCORIS names modules from the diffusers UNet it is given; kohya's SDXL file names are LDM paths.
    weights = from_file_names(tensors, base.unet)
    with kohya_targets(algorithm_for(method)):
        network, _ = create_network_from_weights(1.0, None, base.vae, views, base.unet, weights_sd=weights)
    network.apply_to(views, base.unet, True, True)
    network.load_state_dict(weights)
    base.unet.eval()
    assert_same_outputs(model_outputs(base), model_outputs(with_network(checkpoints[family], method, config, trainable)))


def test_sdxl_lora_loads_in_diffusers_with_the_trainers_outputs(trained, checkpoints):
    pytest.importorskip("peft")
    try:
        from diffusers import StableDiffusionXLPipeline
    except Exception as error:  # pipelines do not import beside transformers 4.30.2
        pytest.skip(f"diffusers pipelines unavailable here: {error}")
    path, config, trainable = trained["sdxl", "lora"]
    base = load_bundle(checkpoints["sdxl"])
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                     scheduler=base.noise_scheduler)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    from peft.tuners.lora import LoraLayer

    with safe_open(str(path), "pt") as handle:
        modules_in_file = {key.split(".")[0] for key in handle.keys()}
    injected = [m for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in model.modules()
                if isinstance(m, LoraLayer)]
    assert len(injected) == len(modules_in_file), "diffusers must consume every module of the file"
    base.unet.eval()
    assert_same_outputs(model_outputs(base), model_outputs(with_network(checkpoints["sdxl"], "lora", config, trainable)))
