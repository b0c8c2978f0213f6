"""A `ModelBundle` (or trained replacements of its parts) -> one LDM-layout state dict the host loads.

The inverse of `loader`: the same prefix tables, plus the `ldm_extras` the loader set aside, so an untouched
bundle gives back exactly the tensors and key set it was read from. Dtype is left as the modules hold it;
the checkpoint writer decides what to store.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from . import ldm_keys
from .bundle import ModelBundle, ModelFamily
from .open_clip_keys import transformers_to_open_clip


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
