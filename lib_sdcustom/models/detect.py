"""What a weights file is, told from its keys and a few shapes, the way the host tells.

Users point the trainer at whatever they have in `models/`; a LoRA or an SDXL file picked by mistake must
get a message that says what it is, not a stack trace from a state-dict load. The probes are the host's
(`sd_models_config.guess_model_config_from_state_dict`) and diffusers' `CHECKPOINT_KEY_NAMES`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, cast

from ..errors import ModelLoadError
from .bundle import ModelFamily
from .ldm_keys import TEXT_ENCODER_PREFIX, TEXT_SLOTS, UNET_PREFIX, VAE_PREFIX

logger = logging.getLogger(__name__)

# Kinds of file; plain (4-channel) SD1, SD2 and SDXL base models load.
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
SDXL_REFINER = "sdxl_refiner"
SD2_TURBO = "sd2_turbo"
UNCLIP = "unclip"
SD3 = "sd3"
LORA = "lora"
EMBEDDING = "embedding"
HYPERNETWORK = "hypernetwork"
VAE = "vae"
UNKNOWN = "unknown"

_SD3_KEY = UNET_PREFIX + "x_embedder.proj.weight"
_SDXL_PREFIX = "conditioner.embedders.1.model."
_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
_REFINER_LN_FINAL = _SDXL_REFINER_PREFIX + "ln_final.weight"
_SD2_PREFIX = "cond_stage_model.model."
_UNCLIP_KEY = "embedder.model.ln_final.weight"
_FAMILIES = {SD1: ModelFamily.SD1, SD2: ModelFamily.SD2, SDXL: ModelFamily.SDXL}
_PART_NAMES = {ModelFamily.SD1: ("text encoder",), ModelFamily.SD2: ("text encoder",),
               ModelFamily.SDXL: ("first text encoder", "second text encoder")}
_UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", ".oft_",
                 ".lora.down.", ".lora.up.", ".dora_scale")
_LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_EMBEDDING_KEYS = {"string_to_param", "string_to_token", "emb_params", "clip_l", "clip_g"}
_HYPERNETWORK_WIDTHS = {320, 640, 768, 1024, 1280}

_NOT_SUPPORTED_FIX = ("Pick an SD1.x, SD2.x or SDXL base checkpoint (such as v1-5-pruned-emaonly.safetensors or "
                      "sd_xl_base_1.0.safetensors).")


def _in_channels(state: Mapping[str, Any]) -> int:
    weight = state.get(_UNET_IN_KEY)
    return int(weight.shape[1]) if weight is not None and len(getattr(weight, "shape", ())) == 4 else 4


def classify(state: Mapping[str, Any]) -> str:
    """One of the kind constants above, from key names (and the UNet's input width)."""
    keys = list(state.keys())
    names = [key for key in keys if isinstance(key, str)]
    if _SD3_KEY in state:
        return SD3
    if any(key.startswith(_SDXL_PREFIX) for key in names):
        return SDXL
    if any(key.startswith(_SDXL_REFINER_PREFIX) for key in names):
        # The host loads SD2-Turbo's layout (a 1024-wide tower at embedders.0) as SD2 after renaming its keys.
        ln_final = state.get(_REFINER_LN_FINAL)
        return SD2_TURBO if tuple(getattr(ln_final, "shape", ())) == (1024,) else SDXL_REFINER
    if _UNCLIP_KEY in state:
        return UNCLIP
    if any(key.startswith(_SD2_PREFIX) for key in names):
        return SD2
    if _UNET_IN_KEY in state or any(key.startswith(TEXT_ENCODER_PREFIX) for key in names):
        return SD1
    if any(key.startswith(_LORA_PREFIXES) or any(m in key for m in _LORA_MARKERS) for key in names):
        return LORA
    if names and set(names) <= _EMBEDDING_KEYS | {"name", "step", "sd_checkpoint", "sd_checkpoint_name"}:
        return EMBEDDING
    if 0 < len(keys) <= 2 and all(len(getattr(value, "shape", ())) == 2 for value in state.values()):
        return EMBEDDING  # a .safetensors embedding: one [n, width] tensor under any name (two for SDXL)
    if keys and any(key in _HYPERNETWORK_WIDTHS for key in keys if isinstance(key, int)):  # type: ignore[comparison-overlap]
        return HYPERNETWORK
    if any(key.startswith(("encoder.conv_in.", "decoder.conv_in.", VAE_PREFIX)) for key in names):
        return VAE
    return UNKNOWN


def _describe(kind: str, in_channels: int) -> str:
    family = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL"}.get(kind)
    if family and in_channels == 9:
        return f"an {family} inpainting checkpoint (9 UNet input channels); inpainting models are not supported"
    if family:
        return (f"an {family} checkpoint whose UNet takes {in_channels} input channels (an edit or depth model), "
                "not supported")
    return {
        SDXL_REFINER: "an SDXL refiner checkpoint; only SDXL base models are supported",
        SD2_TURBO: "an SD2-Turbo checkpoint (its text encoder is stored where SDXL's refiner keeps it), "
                   "not supported yet",
        UNCLIP: "an SD2 unCLIP (image variation) checkpoint, not supported",
        SD3: "a Stable Diffusion 3 checkpoint, which is not supported",
    }[kind]


def _missing_parts(state: Mapping[str, Any], family: ModelFamily) -> list[str]:
    parts = [("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX)]
    parts += [(name, slot.prefix) for name, slot in zip(_PART_NAMES[family], TEXT_SLOTS[family])]
    return [f"{name} ('{prefix}*')" for name, prefix in parts
            if not any(isinstance(key, str) and key.startswith(prefix) for key in state)]


def detect_family(state: Mapping[str, Any], path: Path) -> ModelFamily:
    """The family of a single-file checkpoint; anything but a plain SD1, SD2 or SDXL base model raises
    ModelLoadError saying what the file is."""
    kind = classify(state)
    in_channels = _in_channels(state)
    logger.debug("%s looks like %s (UNet input channels %d)", path, kind, in_channels)
    if kind in _FAMILIES and in_channels == 4:
        family = _FAMILIES[kind]
        missing = _missing_parts(state, family)
        if missing:
            raise ModelLoadError(f"{path} is an incomplete {family.value.upper()} checkpoint: it has no "
                                 f"{' and no '.join(missing)} weights.",
                                 "Pick a full checkpoint (UNet, VAE and text encoders in one file), or bake the "
                                 "missing part in with the WebUI's checkpoint merger.")
        return family
    if kind in (SD1, SD2, SDXL, SDXL_REFINER, SD2_TURBO, UNCLIP, SD3):
        raise ModelLoadError(f"{path} is {_describe(kind, in_channels)}.", _NOT_SUPPORTED_FIX)
    what = {
        LORA: "a LoRA/LyCORIS network, not a base model",
        EMBEDDING: "a Textual Inversion embedding, not a base model",
        HYPERNETWORK: "a hypernetwork, not a base model",
        VAE: "a stand-alone VAE, not a full checkpoint",
    }.get(kind, "not a Stable Diffusion checkpoint (none of its keys is a UNet, VAE or text-encoder key)")
    raise ModelLoadError(f"{path} is {what}.",
                         "Choose a Stable Diffusion 1.x, 2.x or SDXL checkpoint (.safetensors) or a diffusers "
                         "model folder as the base model.")


def detect_diffusers_family(folder: Path) -> ModelFamily:
    """The family of a diffusers folder, from its model_index.json and component configs."""
    def read(relative: str) -> Mapping[str, Any]:
        try:
            return cast(Mapping[str, Any], json.loads((folder / relative).read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"Could not read {folder / relative}: {error}",
                                 "The folder must be a complete diffusers Stable Diffusion model.") from error

    index = read("model_index.json")
    unet = read("unet/config.json")
    text_encoder = read("text_encoder/config.json")
    if "text_encoder_2" in index:
        kind = SDXL
    elif text_encoder.get("hidden_act") == "gelu" or unet.get("use_linear_projection"):
        kind = SD2
    else:
        kind = SD1
    in_channels = int(unet.get("in_channels", 4))
    if in_channels == 4:
        return _FAMILIES[kind]
    raise ModelLoadError(f"{folder} is {_describe(kind, in_channels)}.", _NOT_SUPPORTED_FIX)
