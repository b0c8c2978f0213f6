"""Write SD1 modules as a user's custom checkpoint arrives: `NAME.safetensors` (LDM layout), `NAME.yaml`
beside it, and a local text-encoder folder that the YAML names as the FrozenCLIPEmbedder `version`.

Shared by the tiny test model (random weights) and the micro-world base model (pretrained weights): both are
non-standard SD1 shapes that only load through their YAML, exactly as `loader.load_bundle` reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from ..files import write_atomically, write_text_atomically
from . import ldm_keys
from .ldm_config import configs_from_ldm, yaml_beside
from .tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir


def write_text_encoder_folder(folder: Path, text_config: Mapping[str, Any], *, tokenizer_files: bool = True) -> Path:
    """`folder/config.json` (a CLIPTextConfig), plus copies of the bundled tokenizer files when asked.

    Without tokenizer files our loader falls back to the bundled tokenizer (the same vocabulary); the host's
    FrozenCLIPEmbedder needs them in the folder, so leave them out only where size matters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "config.json", json.dumps(dict(text_config), indent=2))
    if tokenizer_files:
        for file_name in TOKENIZER_FILES:
            shutil.copyfile(bundled_tokenizer_dir() / file_name, folder / file_name)
    return folder


def alphas_cumprod(scheduler: Mapping[str, Any]) -> torch.Tensor:
    """LDM's `register_schedule` for its 'linear' schedule, as real checkpoints store it."""
    betas = torch.linspace(scheduler["beta_start"] ** 0.5, scheduler["beta_end"] ** 0.5,
                           scheduler["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def write_ldm_checkpoint(checkpoint: Path, ldm: Mapping[str, Any], unet: torch.nn.Module, vae: torch.nn.Module,
                         text_encoder: torch.nn.Module, *, dtype: torch.dtype = torch.float32,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """Write the modules to `checkpoint` in LDM layout (floats in `dtype`) and the `ldm` config beside it.

    The text-encoder folder the config names must exist already (it is read to check the config builds).
    Non-module tensors a real SD1 file holds (`alphas_cumprod`, `position_ids`) are added, so the key set is
    the one the host expects.
    """
    from safetensors.torch import save_file
    import yaml

    checkpoint = Path(checkpoint)
    configs = configs_from_ldm(ldm, source=str(yaml_beside(checkpoint)), yaml_dir=checkpoint.parent)
    unet_sd = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config))
    vae_sd = ldm_keys.vae_to_ldm(vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config))
    for what, converted in (("UNet", unet_sd), ("VAE", vae_sd)):
        if converted.unmapped:
            raise ValueError(f"{what} weights have keys with no checkpoint name: {sorted(converted.unmapped)[:5]}")
    positions = int(configs.text_encoder["max_position_embeddings"])
    extras: dict[str, torch.Tensor] = {
        "alphas_cumprod": alphas_cumprod(configs.scheduler),
        ldm_keys.TEXT_ENCODER_PREFIX + ldm_keys.POSITION_IDS_KEY: torch.arange(positions, dtype=torch.int64)[None],
    }
    state = ldm_keys.join_ldm_state_dict(unet_sd.state_dict, vae_sd.state_dict,
                                         ldm_keys.text_encoder_state_dict(text_encoder), extras)
    state = {key: (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()).contiguous()
             for key, value in state.items()}
    write_atomically(checkpoint, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})}))
    write_text_atomically(yaml_beside(checkpoint), yaml.safe_dump(dict(ldm), sort_keys=False))
    return checkpoint
