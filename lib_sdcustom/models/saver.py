"""A `ModelBundle` (or trained replacements of its parts) -> one LDM-layout state dict the host loads.

The inverse of `loader`: the same prefix tables, plus the `ldm_extras` the loader set aside, so an untouched
bundle gives back exactly the tensors and key set it was read from. Dtype is left as the modules hold it;
the checkpoint writer decides what to store.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from . import ldm_keys
from .bundle import ModelBundle


def bundle_to_ldm_state_dict(bundle: ModelBundle, *, unet_sd: Optional[Mapping[str, Any]] = None,
                             text_encoder_sd: Optional[Mapping[str, Any]] = None,
                             vae_sd: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """LDM keys for every module tensor plus `bundle.ldm_extras`.

    `unet_sd` / `text_encoder_sd` / `vae_sd` replace the modules' own state dicts (for example weights with
    a LoRA merged in); text-encoder keys may come in either transformers layout.
    """
    unet_layout = ldm_keys.UNetLayout.from_diffusers_config(bundle.unet.config)
    vae_layout = ldm_keys.VAELayout.from_diffusers_config(bundle.vae.config)
    unet = ldm_keys.unet_to_ldm(bundle.unet.state_dict() if unet_sd is None else unet_sd, unet_layout)
    vae = ldm_keys.vae_to_ldm(bundle.vae.state_dict() if vae_sd is None else vae_sd, vae_layout)
    text = (ldm_keys.text_encoder_state_dict(bundle.text_encoder) if text_encoder_sd is None
            else ldm_keys.canonical_text_encoder_keys(text_encoder_sd))
    for what, converted in (("UNet", unet), ("VAE", vae)):
        if converted.unmapped:
            raise ValueError(f"{what} weights have keys with no checkpoint name: "
                             f"{', '.join(sorted(converted.unmapped)[:5])}")
    return ldm_keys.join_ldm_state_dict(unet.state_dict, vae.state_dict, text, bundle.ldm_extras)
