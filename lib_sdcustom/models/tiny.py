"""A tiny, seeded SD1-structured checkpoint for tests: every key family of a real one, a few MB, CPU-fast.

It is written the way a user's custom checkpoint arrives: `NAME.safetensors` in LDM layout, `NAME.yaml`
beside it (the host's v1-inference shape with small numbers) and a local text-encoder folder that the YAML
names as the FrozenCLIPEmbedder `version`. The same three files load in the stock host (HOST.md section 8),
so a tiny model exercises the loader, the exporters and the host with the real layout.

Constraints that come from the host's LDM code: UNet and VAE widths are multiples of 32 (GroupNorm(32) is
hard-coded there), and the VAE keeps four levels so latents are images / 8.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict

import torch

from ..files import write_atomically, write_text_atomically
from . import ldm_keys
from .ldm_config import SD1_V1_INFERENCE, VIT_L14_TEXT_CONFIG, configs_from_ldm
from .tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

TINY_TEXT_CONFIG: Dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def tiny_ldm_yaml_dict(text_encoder_version: str) -> Dict[str, Any]:
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


def _alphas_cumprod(scheduler: Dict[str, Any]) -> torch.Tensor:
    """LDM's `register_schedule` for its 'linear' schedule, as real checkpoints store it."""
    betas = torch.linspace(scheduler["beta_start"] ** 0.5, scheduler["beta_end"] ** 0.5,
                           scheduler["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def write_tiny_sd1(folder: Path, name: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder/NAME.safetensors`, `folder/NAME.yaml` and `folder/NAME_text_encoder/`; return the first."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    import yaml

    folder = Path(folder).resolve()
    text_dir = folder / f"{name}_text_encoder"
    text_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(text_dir / "config.json", json.dumps(TINY_TEXT_CONFIG, indent=2))
    for file_name in TOKENIZER_FILES:
        shutil.copyfile(bundled_tokenizer_dir() / file_name, text_dir / file_name)

    ldm = tiny_ldm_yaml_dict(str(text_dir))
    configs = configs_from_ldm(ldm, source="tiny", yaml_dir=folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs.unet)
        vae = AutoencoderKL(**configs.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(configs.text_encoder)))

    unet_sd = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config))
    vae_sd = ldm_keys.vae_to_ldm(vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config))
    extras = {
        "alphas_cumprod": _alphas_cumprod(configs.scheduler),
        ldm_keys.TEXT_ENCODER_PREFIX + ldm_keys.POSITION_IDS_KEY:
            torch.arange(TINY_TEXT_CONFIG["max_position_embeddings"], dtype=torch.int64)[None],
    }
    state = ldm_keys.join_ldm_state_dict(unet_sd.state_dict, vae_sd.state_dict,
                                         ldm_keys.text_encoder_state_dict(text_encoder), extras)
    state = {key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
             for key, value in state.items()}

    checkpoint = folder / f"{name}.safetensors"
    write_atomically(checkpoint, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_text_atomically(folder / f"{name}.yaml", yaml.safe_dump(ldm, sort_keys=False))
    return checkpoint
