"""Models -> LDM-layout checkpoint files the host loads: the inverse of `loader`.

- `bundle_to_ldm_state_dict` / `ldm_state_dict`: a `ModelBundle` (or trained replacements of its parts) ->
  one LDM-layout state dict, from the same prefix tables as the loader plus the `ldm_extras` it set aside, so
  an untouched bundle gives back exactly the tensors and key set it was read from. Dtype is left as the
  modules hold it; the checkpoint writer (`formats/checkpoint_file.py`) decides what to store.
- `write_ldm_checkpoint` / `write_text_encoder_folder`: SD1 modules written as a user's custom checkpoint
  arrives: `NAME.safetensors`, `NAME.yaml` beside it, and a local text-encoder folder that the YAML names as
  the FrozenCLIPEmbedder `version`. Shared by the tiny test models (random weights) and the micro-world base
  model (pretrained weights): both are non-standard SD1 shapes that only load through their YAML, exactly as
  `loader.load_bundle` reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ..files import write_atomically, write_text_atomically
from . import ldm_keys
from .bundle import ModelBundle, ModelFamily
from .ldm_config import configs_from_ldm
from .model_yaml import yaml_beside
from .open_clip_keys import transformers_to_open_clip
from .tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel


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


def write_ldm_checkpoint(checkpoint: Path, ldm: Mapping[str, Any], unet: UNet2DConditionModel, vae: AutoencoderKL,
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
    positions = int(configs.text_encoder["max_position_embeddings"])
    extras: dict[str, torch.Tensor] = {
        "alphas_cumprod": alphas_cumprod(configs.scheduler),
        ldm_keys.TEXT_ENCODER_PREFIX + ldm_keys.POSITION_IDS_KEY: torch.arange(positions, dtype=torch.int64)[None],
    }
    state = ldm_state_dict(ModelFamily.SD1, unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config),
                           vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config),
                           [ldm_keys.text_encoder_state_dict(text_encoder)], extras)
    state = {key: (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu()).contiguous()
             for key, value in state.items()}
    write_atomically(checkpoint, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})}))
    write_text_atomically(yaml_beside(checkpoint), yaml.safe_dump(dict(ldm), sort_keys=False))
    return checkpoint


def ldm_state_dict(family: ModelFamily, unet_sd: Mapping[str, Any], unet_layout: ldm_keys.UNetLayout,
                   vae_sd: Mapping[str, Any], vae_layout: ldm_keys.VAELayout,
                   text_encoder_sds: Sequence[Mapping[str, Any]], extras: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers / transformers state dicts of one model -> its single-file checkpoint dict.

    `text_encoder_sds` are in checkpoint order (SDXL: CLIP-L, then bigG), keys in either transformers layout;
    open_clip slots (SD2, SDXL's second) are written in open_clip names with q/k/v fused again.
    """
    unet = ldm_keys.unet_to_ldm(unet_sd, unet_layout)
    vae = ldm_keys.vae_to_ldm(vae_sd, vae_layout)
    for what, result in (("UNet", unet), ("VAE", vae)):
        if result.unmapped:
            raise ValueError(f"{what} weights have keys with no checkpoint name: "
                             f"{', '.join(sorted(result.unmapped)[:5])}")
    texts = [text_encoder_slot_state_dict(slot, state)
             for slot, state in zip(ldm_keys.TEXT_SLOTS[family], text_encoder_sds)]
    return ldm_keys.join_ldm_state_dict(unet.state_dict, vae.state_dict, texts[0], extras, family=family,
                                        text_encoder_2=texts[1] if len(texts) > 1 else None)


def text_encoder_slot_state_dict(slot: ldm_keys.TextSlot, state: Mapping[str, Any]) -> dict[str, Any]:
    """One text encoder's state dict (either transformers layout) -> its keys in `slot`'s checkpoint names,
    prefix not included: canonical `text_model.*` for a transformers slot, open_clip names with q/k/v fused
    and the projection transposed back for an open_clip slot."""
    canonical = ldm_keys.canonical_text_encoder_keys(state)
    if not slot.open_clip:
        return canonical
    result = transformers_to_open_clip(canonical)
    if result.unmapped:
        raise ValueError(f"Text encoder ({slot.prefix}) weights have keys with no checkpoint name: "
                         f"{', '.join(sorted(result.unmapped)[:5])}")
    return result.state_dict


def bundle_to_ldm_state_dict(bundle: ModelBundle, *, unet_sd: Mapping[str, Any] | None = None,
                             text_encoder_sd: Mapping[str, Any] | None = None,
                             vae_sd: Mapping[str, Any] | None = None,
                             text_encoder_2_sd: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LDM keys for every module tensor plus `bundle.ldm_extras`.

    `unet_sd` / `text_encoder_sd` / `vae_sd` / `text_encoder_2_sd` replace the modules' own state dicts (for
    example weights with a LoRA merged in); text-encoder keys may come in either transformers layout.
    """
    replacements = (text_encoder_sd, text_encoder_2_sd)
    text_sds = [ldm_keys.text_encoder_state_dict(encoder) if replacement is None else replacement
                for encoder, replacement in zip(bundle.text_encoders, replacements)]
    return ldm_state_dict(bundle.family,
                          bundle.unet.state_dict() if unet_sd is None else unet_sd,
                          ldm_keys.UNetLayout.from_diffusers_config(bundle.unet.config),
                          bundle.vae.state_dict() if vae_sd is None else vae_sd,
                          ldm_keys.VAELayout.from_diffusers_config(bundle.vae.config),
                          text_sds, bundle.ldm_extras)
