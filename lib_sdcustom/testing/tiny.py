"""A tiny, seeded SD1-structured checkpoint for tests: every key family of a real one, a few MB, CPU-fast.

It is written the way a user's custom checkpoint arrives: `NAME.safetensors` in LDM layout, `NAME.yaml`
beside it (the host's v1-inference shape with small numbers) and a local text-encoder folder that the YAML
names as the FrozenCLIPEmbedder `version`. The same three files load in the stock host
(docs/host-formats.md#a-tiny-model-in-the-stock-host), so a tiny model exercises the loader, the exporters and the host
with the real layout.

Constraints that come from the host's LDM code: UNet and VAE widths are multiples of 32 (GroupNorm(32) is
hard-coded there), and the VAE keeps four levels so latents are images / 8.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..models.ldm_config import configs_from_ldm

from ..models.stock_configs import SD1_V1_INFERENCE, VIT_L14_TEXT_CONFIG
from ..models.writer import write_ldm_checkpoint, write_text_encoder_folder

TINY_TEXT_CONFIG: dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def tiny_ldm_yaml_dict(text_encoder_version: str) -> dict[str, Any]:
    """The host's v1-inference.yaml with tiny sizes; `text_encoder_version` is the local text-encoder folder."""
    config = copy.deepcopy(SD1_V1_INFERENCE)
    params = config["model"]["params"]
    params["image_size"] = 8
    params["unet_config"]["params"].update({
        "model_channels": 32,
        "channel_mult": [1, 2],
        "attention_resolutions": [1],
        "num_res_blocks": 2,
        "num_heads": 4,
        "context_dim": TINY_TEXT_CONFIG["hidden_size"],
    })
    params["first_stage_config"]["params"]["ddconfig"].update({
        "ch": 32,
        "ch_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
    })
    params["cond_stage_config"]["params"] = {"version": text_encoder_version}
    return config


def write_tiny_sd1(folder: Path, name: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder/NAME.safetensors`, `folder/NAME.yaml` and `folder/NAME_text_encoder/`; return the first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder).resolve()
    text_dir = write_text_encoder_folder(folder / f"{name}_text_encoder", TINY_TEXT_CONFIG)
    ldm = tiny_ldm_yaml_dict(str(text_dir))
    configs = configs_from_ldm(ldm, source="tiny", yaml_dir=folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs.unet)
        vae = AutoencoderKL(**configs.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(configs.text_encoder)))
    return write_ldm_checkpoint(folder / f"{name}.safetensors", ldm, unet, vae, text_encoder, dtype=dtype)
