"""Tiny, seeded SD2 and SDXL checkpoints for tests: every key family of a real one, CPU-fast (20-35 MB, nearly
all of it the 49,408-token embedding tables the shared CLIP vocabulary needs).

Written as a user's custom checkpoint arrives (see `tiny` for SD1): `NAME.safetensors` in the LDM layout of
the family, `NAME.yaml` beside it (the stock config's shape with small numbers) and local text-encoder
folders the YAML names. The open_clip towers are created whole (every block, `text_projection`,
`logit_scale`), as real SD2/SDXL files hold them, so loading must set aside what its modules do not own.

The YAMLs name the open_clip towers by folder (`arch: <folder>`), which this trainer reads but the host's
open_clip cannot (it knows registered architecture names only); the SD1 tiny model stays the one to run in
the host.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from ..files import write_atomically, write_text_atomically
from ..models import ldm_keys
from ..models.bundle import ModelFamily
from ..models.ldm_config import configs_from_ldm
from ..models.model_yaml import yaml_beside
from ..models.open_clip_keys import LOGIT_SCALE_KEY, transformers_to_open_clip
from ..models.stock_configs import VIT_BIGG14_TEXT_CONFIG, VIT_L14_TEXT_CONFIG, stock_ldm_config
from ..models.writer import alphas_cumprod, write_text_encoder_folder

# Small towers of the stock shapes. Projection widths differ from the hidden widths on purpose, so that a
# transposed `text_projection` cannot go unnoticed.
TINY_OPEN_CLIP_TEXT_CONFIG: dict[str, Any] = {
    **VIT_BIGG14_TEXT_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
}
TINY_CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    **VIT_L14_TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TINY_TIME_ID_WIDTH = 8
_OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's initial value
_VAE = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}  # four levels: latents are images / 8


def tiny_sd2_yaml_dict(tower_folder: str, *, v_prediction: bool = False) -> dict[str, Any]:
    """v2-inference(-v).yaml with tiny sizes; `tower_folder` holds the open_clip tower's config.json."""
    config = stock_ldm_config(ModelFamily.SD2, "v_prediction" if v_prediction else "epsilon")
    params = config["model"]["params"]
    params["image_size"] = 8
    params["unet_config"]["params"].update({
        "model_channels": 32,
        "channel_mult": [1, 2],
        "attention_resolutions": [1, 2],
        "num_res_blocks": 2,
        "num_head_channels": 16,  # heads per level [2, 4], as SD2's 64-channel heads give [5, 10, 20, 20]
        "context_dim": TINY_OPEN_CLIP_TEXT_CONFIG["hidden_size"],
    })
    params["first_stage_config"]["params"]["ddconfig"].update(_VAE)
    params["cond_stage_config"]["params"]["arch"] = tower_folder
    return config


def tiny_sdxl_yaml_dict(clip_l_folder: str, tower_folder: str, *, v_prediction: bool = False) -> dict[str, Any]:
    """sd_xl_base.yaml with tiny sizes (3 levels, per-level transformer depth, size/crop embedding)."""
    config = stock_ldm_config(ModelFamily.SDXL, "v_prediction" if v_prediction else "epsilon")
    params = config["model"]["params"]
    time_ids = 6 * TINY_TIME_ID_WIDTH
    params["network_config"]["params"].update({
        "adm_in_channels": TINY_OPEN_CLIP_TEXT_CONFIG["projection_dim"] + time_ids,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "attention_resolutions": [4, 2],
        "num_head_channels": 16,
        "transformer_depth": [1, 1, 2],
        "context_dim": TINY_CLIP_L_TEXT_CONFIG["hidden_size"] + TINY_OPEN_CLIP_TEXT_CONFIG["hidden_size"],
    })
    embedders: list[dict[str, Any]] = params["conditioner_config"]["params"]["emb_models"]
    embedders[0]["params"].update({"version": clip_l_folder,
                                   "layer_idx": TINY_CLIP_L_TEXT_CONFIG["num_hidden_layers"] - 1})
    embedders[1]["params"]["arch"] = tower_folder
    for embedder in embedders[2:]:
        embedder["params"]["outdim"] = TINY_TIME_ID_WIDTH
    params["first_stage_config"]["params"]["ddconfig"].update(_VAE)
    return config


def _open_clip_tower() -> dict[str, torch.Tensor]:
    """The whole tiny open_clip text tower in open_clip names, built through transformers with a projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(TINY_OPEN_CLIP_TEXT_CONFIG)))
    converted = transformers_to_open_clip(ldm_keys.text_encoder_state_dict(model))
    return {**converted.state_dict, LOGIT_SCALE_KEY: torch.tensor(_OPEN_CLIP_LOGIT_SCALE)}


def _write(folder: Path, name: str, ldm: Mapping[str, Any], dtype: torch.dtype) -> Path:
    """Build the YAML's modules with random weights and write checkpoint and YAML (seeded by the caller)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    import yaml

    checkpoint = folder / f"{name}.safetensors"
    configs = configs_from_ldm(ldm, source=str(yaml_beside(checkpoint)), yaml_dir=folder)
    unet = UNet2DConditionModel(**configs.unet)
    vae = AutoencoderKL(**configs.vae)
    unet_sd = ldm_keys.unet_to_ldm(unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config))
    vae_sd = ldm_keys.vae_to_ldm(vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config))
    if configs.family is ModelFamily.SDXL:
        # What sd_xl_base_1.0 holds besides the modules: CLIP-L's position_ids (sgm sets the schedule itself).
        clip_l = CLIPTextModel(CLIPTextConfig.from_dict(dict(configs.text_encoder)))
        positions = torch.arange(int(configs.text_encoder["max_position_embeddings"]), dtype=torch.int64)[None]
        state = ldm_keys.join_ldm_state_dict(
            unet_sd.state_dict, vae_sd.state_dict, ldm_keys.text_encoder_state_dict(clip_l),
            {ldm_keys.SDXL_TEXT_ENCODER_PREFIX + ldm_keys.POSITION_IDS_KEY: positions},
            family=ModelFamily.SDXL, text_encoder_2=_open_clip_tower())
    else:
        state = ldm_keys.join_ldm_state_dict(unet_sd.state_dict, vae_sd.state_dict, _open_clip_tower(),
                                             {"alphas_cumprod": alphas_cumprod(configs.scheduler)},
                                             family=ModelFamily.SD2)
    state = {key: (value.detach().to(dtype) if value.is_floating_point() else value.detach()).contiguous()
             for key, value in state.items()}
    write_atomically(checkpoint, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_text_atomically(yaml_beside(checkpoint), yaml.safe_dump(dict(ldm), sort_keys=False))
    return checkpoint


def write_tiny_sd2(folder: Path, name: str = "tiny_sd2", seed: int = 0, *, v_prediction: bool = False,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder/NAME.safetensors`, `NAME.yaml` and `NAME_text_encoder/` (the open_clip tower's config and
    the tokenizer files); return the checkpoint path."""
    folder = Path(folder).resolve()
    tower_dir = write_text_encoder_folder(folder / f"{name}_text_encoder", TINY_OPEN_CLIP_TEXT_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _write(folder, name, tiny_sd2_yaml_dict(str(tower_dir), v_prediction=v_prediction), dtype)


def write_tiny_sdxl(folder: Path, name: str = "tiny_sdxl", seed: int = 0, *, v_prediction: bool = False,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder/NAME.safetensors`, `NAME.yaml`, `NAME_text_encoder/` (CLIP-L) and `NAME_text_encoder_2/`
    (the OpenCLIP tower); return the checkpoint path."""
    folder = Path(folder).resolve()
    clip_l_dir = write_text_encoder_folder(folder / f"{name}_text_encoder", TINY_CLIP_L_TEXT_CONFIG)
    tower_dir = write_text_encoder_folder(folder / f"{name}_text_encoder_2", TINY_OPEN_CLIP_TEXT_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _write(folder, name, tiny_sdxl_yaml_dict(str(clip_l_dir), str(tower_dir), v_prediction=v_prediction),
                      dtype)
