"""The stock model configs of every family and their text towers, as Python data (no files, no hub).

Without a `NAME.yaml` beside a checkpoint the host builds it from one of these configs
(docs/host-formats.md#checkpoints), so the trainer does the same: SD1's `v1-inference.yaml` (the host's
`configs/`), `v2-inference.yaml` (SD 2.x 512-base, noise prediction) and `v2-inference-v.yaml` (SD 2.x 768-v,
v-prediction) from
Stability-AI/stablediffusion `configs/stable-diffusion/`, and `sd_xl_base.yaml` from
Stability-AI/generative-models `configs/inference/`. Training-only entries are left out; everything that
decides a module's shape is kept as published.

The text-tower dicts are transformers `CLIPTextConfig`s of the *whole* open_clip tower (all its blocks).
How many blocks the trainer's module keeps is decided by the YAML's `layer` (see `ldm_config`).
"""

from __future__ import annotations

import copy
from typing import Any

SD2_CONFIG_NAMES = {"epsilon": "v2-inference.yaml", "v_prediction": "v2-inference-v.yaml"}
SDXL_CONFIG_NAME = "sd_xl_base.yaml"
OPEN_CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


def _vae_params(**ddconfig_first: Any) -> dict[str, Any]:
    """The first-stage (VAE) params every family publishes alike; sgm's names its attention type first."""
    return {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "ddconfig": {
            **ddconfig_first,
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


# The host's configs/v1-inference.yaml (A1111 1.10.1), minus training-only entries.
SD1_V1_INFERENCE: dict[str, Any] = {
    "model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 64,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 768,
                    "use_checkpoint": False,
                    "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": _vae_params(),
            },
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }
}

# transformers CLIPTextConfig of openai/clip-vit-large-patch14's text tower (SD1's text encoder).
VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "clip_text_model",
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def _sd2(parameterization: str) -> dict[str, Any]:
    """v2-inference(-v).yaml: the SD1 layout with OpenCLIP ViT-H, linear transformer projections and 64-channel
    heads. The two files differ only in `parameterization`."""
    config = copy.deepcopy(SD1_V1_INFERENCE)
    params = config["model"]["params"]
    if parameterization == "v":
        params["parameterization"] = "v"
    unet = params["unet_config"]["params"]
    del unet["num_heads"]
    unet.update({"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024})
    params["cond_stage_config"] = {"target": OPEN_CLIP_EMBEDDER, "params": {"freeze": True, "layer": "penultimate"}}
    return config


SD2_V2_INFERENCE: dict[str, Any] = _sd2("eps")
SD2_V2_INFERENCE_V: dict[str, Any] = _sd2("v")

_SGM = "sgm.modules"
SDXL_BASE: dict[str, Any] = {
    "model": {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "scale_factor": 0.13025,
            "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": f"{_SGM}.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": 1000,
                    # The WebUI's pinned generative-models (45c443b3) requires it: without, its DiscreteDenoiser
                    # fails to build ("missing 1 required positional argument: 'weighting_config'").
                    "weighting_config": {"target": f"{_SGM}.diffusionmodules.denoiser_weighting.EpsWeighting"},
                    "scaling_config": {"target": f"{_SGM}.diffusionmodules.denoiser_scaling.EpsScaling"},
                    "discretization_config": {
                        "target": f"{_SGM}.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
                },
            },
            "network_config": {
                "target": f"{_SGM}.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "adm_in_channels": 2816,
                    "num_classes": "sequential",
                    "use_checkpoint": True,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4],
                    "num_head_channels": 64,
                    "use_spatial_transformer": True,
                    "use_linear_in_transformer": True,
                    "transformer_depth": [1, 2, 10],
                    "context_dim": 2048,
                    "spatial_transformer_attn_type": "softmax-xformers",
                    "legacy": False,
                },
            },
            "conditioner_config": {
                "target": f"{_SGM}.GeneralConditioner",
                "params": {
                    "emb_models": [
                        {"is_trainable": False, "input_key": "txt",
                         "target": f"{_SGM}.encoders.modules.FrozenCLIPEmbedder",
                         "params": {"layer": "hidden", "layer_idx": 11}},
                        {"is_trainable": False, "input_key": "txt",
                         "target": f"{_SGM}.encoders.modules.FrozenOpenCLIPEmbedder2",
                         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                                    "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                        {"is_trainable": False, "input_key": "original_size_as_tuple",
                         "target": f"{_SGM}.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                        {"is_trainable": False, "input_key": "crop_coords_top_left",
                         "target": f"{_SGM}.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                        {"is_trainable": False, "input_key": "target_size_as_tuple",
                         "target": f"{_SGM}.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}},
                    ],
                },
            },
            "first_stage_config": {
                "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                "params": _vae_params(attn_type="vanilla-xformers"),
            },
        },
    }
}

# open_clip ViT-H-14's text tower (SD2): 24 blocks of width 1024, exact GELU, projection 1024 x 1024.
VIT_H14_TEXT_CONFIG: dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
}

# open_clip ViT-bigG-14's text tower (SDXL's second encoder): 32 blocks of width 1280, projection 1280 x 1280.
VIT_BIGG14_TEXT_CONFIG: dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

OPEN_CLIP_TOWERS: dict[str, dict[str, Any]] = {"ViT-H-14": VIT_H14_TEXT_CONFIG, "ViT-bigG-14": VIT_BIGG14_TEXT_CONFIG}


def stock_ldm_config(family: str, prediction_type: str) -> dict[str, Any]:
    """A fresh copy of the stock config of `family` ("sd1", "sd2", "sdxl" or a `ModelFamily`) for
    `prediction_type` ("epsilon" or "v_prediction"): what the host needs as `NAME.yaml` to run a checkpoint
    of that kind without guessing. SD1 and SDXL have no published v config; theirs is the base config with
    v-prediction switched on the way their code reads it (ldm `parameterization`, sgm `VScaling`)."""
    family = getattr(family, "value", family)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    v = prediction_type == "v_prediction"
    if family == "sd2":
        return copy.deepcopy(SD2_V2_INFERENCE_V if v else SD2_V2_INFERENCE)
    if family == "sd1":
        config = copy.deepcopy(SD1_V1_INFERENCE)
        if v:
            config["model"]["params"]["parameterization"] = "v"
        return config
    if family == "sdxl":
        config = copy.deepcopy(SDXL_BASE)
        if v:
            denoiser = config["model"]["params"]["denoiser_config"]["params"]
            for part, eps, v_name in (("scaling_config", "EpsScaling", "VScaling"), ("weighting_config", "EpsWeighting", "VWeighting")):
                denoiser[part]["target"] = denoiser[part]["target"].replace(eps, v_name)
        return config
    raise ValueError(f"unknown model family {family!r}")


# How a stock config is named where a YAML path would be (`ModelConfigs.source`).
STOCK_CLIP_ID = "openai/clip-vit-large-patch14"
STOCK_CONFIG_NAME = "the built-in SD1 v1-inference config"
SD2_STOCK_NAMES = {prediction: f"the built-in SD2 {name[:-5]} config" for prediction, name in SD2_CONFIG_NAMES.items()}
SDXL_STOCK_NAME = f"the built-in SDXL {SDXL_CONFIG_NAME[:-5]} config"
STOCK_SOURCES = frozenset({STOCK_CONFIG_NAME, SDXL_STOCK_NAME, *SD2_STOCK_NAMES.values()})
