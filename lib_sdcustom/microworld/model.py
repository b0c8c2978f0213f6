"""The micro-world base model: SD1's architecture at a size a CPU pretrains in under an hour.

The same three module kinds as SD1 (an AutoencoderKL with four levels, so 64x64 images become 8x8x4
latents; a UNet2DConditionModel with cross-attention; a CLIP text encoder over the real 49,408-token CLIP
vocabulary) and the same files (an LDM single-file checkpoint, its YAML, a text-encoder folder), so every
method, exporter and loader runs on it unchanged. Widths are multiples of 32 because the host's LDM code
hard-codes GroupNorm(32). The shipped copy lives in `base/` inside the package.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..models.ldm_config import configs_from_ldm
from ..models.model_yaml import ModelConfigs
from ..models.stock_configs import SD1_V1_INFERENCE, STOCK_CLIP_ID, VIT_L14_TEXT_CONFIG

BASE_NAME = "microworld"
SHIPPED_DIR = Path(__file__).resolve().with_name("base")
LATENT_SIZE = 8  # 64x64 pixels / the VAE's 8x down-sampling

MICRO_TEXT_CONFIG: dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def text_encoder_folder_name(name: str = BASE_NAME) -> str:
    return f"{name}_text_encoder"


def micro_ldm_yaml_dict(text_encoder_version: str, scale_factor: float = 1.0) -> dict[str, Any]:
    """The host's v1-inference.yaml with the micro sizes; `scale_factor` makes scaled latents unit-variance."""
    config = copy.deepcopy(SD1_V1_INFERENCE)
    params = config["model"]["params"]
    params["image_size"] = LATENT_SIZE
    params["scale_factor"] = float(scale_factor)
    params["unet_config"]["params"].update({
        "image_size": LATENT_SIZE,
        "model_channels": 32,
        "channel_mult": [1, 2],
        "attention_resolutions": [1, 2],  # both levels attend: captions steer the 8x8 and the 4x4 grid
        "num_res_blocks": 1,
        "num_heads": 4,
        "context_dim": MICRO_TEXT_CONFIG["hidden_size"],
    })
    params["first_stage_config"]["params"]["ddconfig"].update({
        "resolution": 64,
        "ch": 32,
        "ch_mult": [1, 1, 1, 1],  # four levels: latents are images / 8, as the host assumes
        "num_res_blocks": 1,
    })
    params["cond_stage_config"]["params"] = {"version": text_encoder_version}
    return config


def micro_configs(scale_factor: float = 1.0) -> ModelConfigs:
    """Module configs of a fresh micro model (no text-encoder folder needed yet)."""
    configs = configs_from_ldm(micro_ldm_yaml_dict(STOCK_CLIP_ID, scale_factor), source="micro-world model")
    return dataclasses.replace(configs, text_encoder=dict(MICRO_TEXT_CONFIG))


def shipped_checkpoint() -> Path:
    """The pretrained micro model inside the package."""
    path = SHIPPED_DIR / f"{BASE_NAME}.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"The bundled micro-world model {path} is missing.",
                             "Reinstall the package, or pretrain one with "
                             "`python -m lib_sdcustom.microworld pretrain OUT_DIR` and pass its .safetensors as --base.")
    return path
