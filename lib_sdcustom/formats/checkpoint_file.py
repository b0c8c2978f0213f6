"""Single-file LDM `.safetensors` checkpoints in the host's layout of the base's family
(docs/host-formats.md#checkpoints).

The file holds exactly the base checkpoint's keys and shapes:
- the trained components (the UNet, and each text encoder that was trained) come from the trainer, under
  the LDM names the loader read them from (open_clip towers of SD2 / SDXL with q/k/v fused again and the
  projection in open_clip's orientation), in the save precision (fp16 by default, fp32 on request);
- every other tensor (VAE, a frozen text encoder, `alphas_cumprod`, `position_ids`, SD2's unused last text
  block, `logit_scale`, any `model_ema.*`) is copied from the base file unchanged, dtype and bits. Memory is
  not a faithful source for them: the trainer casts frozen modules to its compute dtype under mixed
  precision, and the host keeps fp16 copies.
  A base that is a diffusers folder has no file to copy from; then every tensor comes from the modules, in
  the save precision.
So the host sees its usual set of keys (a missing one would silently load as zeros there), and a legacy
text encoder layout stays legacy.

`NAME.yaml` goes beside the result whenever the host's own config choice could be wrong: the base's YAML
when it had one (non-standard shapes, v-prediction), else the family's stock config for the base's
prediction type where the host would have to guess (SD2: it runs a heuristic; SDXL: it never picks
v-prediction by itself; SD1: only a v-prediction base needs one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..files import write_atomically, write_text_atomically
from ..models import ldm_keys
from ..models.bundle import ModelBundle
from ..models.checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, read_checkpoint
from ..models.bundle import ModelFamily
from ..models.model_yaml import with_absolute_folders, yaml_beside
from ..models.writer import bundle_to_ldm_state_dict, text_encoder_slot_state_dict
from ..models.stock_configs import stock_ldm_config
from .safetensors_io import load_tensors, read_header

_BASE_FILE_SUFFIXES = (SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES
#: A frozen tensor is stored in at most this many bytes per element (fp32), for estimates made before training.
_MAX_STORED_BYTES = 4


@dataclass(frozen=True)
class TrainedWeights:
    """State dicts of the trained modules; None for a component that was not trained."""

    unet: Mapping[str, torch.Tensor] | None = None  # diffusers UNet2DConditionModel layout
    text_encoder: Mapping[str, torch.Tensor] | None = None  # CLIPTextModel, either transformers layout
    text_encoder_2: Mapping[str, torch.Tensor] | None = None  # SDXL's CLIPTextModelWithProjection


def base_checkpoint_file(bundle: ModelBundle) -> Path | None:
    """The single file the bundle was loaded from, or None (a diffusers folder, or the file is gone)."""
    path = bundle.identity.path
    if path is None or not Path(path).is_file() or Path(path).suffix.lower() not in _BASE_FILE_SUFFIXES:
        return None
    return Path(path)


def _trained_ldm(bundle: ModelBundle, trained: TrainedWeights) -> dict[str, torch.Tensor]:
    """Trained tensors under full LDM keys (CLIP text encoders in the canonical `text_model.` layout)."""
    out: dict[str, torch.Tensor] = {}
    if trained.unet is not None:
        converted = ldm_keys.unet_to_ldm(trained.unet, ldm_keys.UNetLayout.from_diffusers_config(bundle.unet.config))
        if converted.unmapped:
            raise ValueError(f"UNet weights with no checkpoint name: {', '.join(sorted(converted.unmapped)[:5])}")
        out.update((ldm_keys.UNET_PREFIX + key, value) for key, value in converted.state_dict.items())
    for slot, state in zip(ldm_keys.TEXT_SLOTS[bundle.family], (trained.text_encoder, trained.text_encoder_2)):
        if state is not None:
            out.update((slot.prefix + key, value) for key, value in text_encoder_slot_state_dict(slot, state).items()
                       if key != ldm_keys.POSITION_IDS_KEY)
    return out


def _canonical_key(key: str, family: ModelFamily) -> str:
    """A base-file key as `_trained_ldm` names it (legacy `...transformer.encoder...` CLIP keys renamed)."""
    for slot in ldm_keys.TEXT_SLOTS[family]:
        if not slot.open_clip and key.startswith(slot.prefix):
            return slot.prefix + ldm_keys.canonical_text_key(key[len(slot.prefix):])
    return key


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.to("cpu", dtype) if tensor.is_floating_point() else tensor.to("cpu")).contiguous()


def checkpoint_state_dict(bundle: ModelBundle, trained: TrainedWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint to write (see the module docstring for where each comes from)."""
    replacements = {key: _stored(value, dtype) for key, value in _trained_ldm(bundle, trained).items()}
    base_file = base_checkpoint_file(bundle)
    if base_file is None:
        state = bundle_to_ldm_state_dict(bundle, unet_sd=trained.unet, text_encoder_sd=trained.text_encoder,
                                         text_encoder_2_sd=trained.text_encoder_2)
        return {key: _stored(value, dtype) for key, value in state.items()}
    family = bundle.family
    shapes, frozen = _read_base(base_file, lambda key: _canonical_key(key, family) not in replacements)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        replacement = replacements.pop(_canonical_key(key, family), None)
        if replacement is None:
            out[key] = frozen[key]
        elif tuple(replacement.shape) != shape:
            raise ValueError(f"{key}: trained shape {tuple(replacement.shape)} differs from the base's {shape}")
        else:
            out[key] = replacement
    if replacements:
        raise ValueError(f"{base_file} changed since it was loaded: it lacks {len(replacements)} trained tensors, "
                         f"e.g. {sorted(replacements)[0]}")
    return out


def _read_base(path: Path, wanted: Callable[[str], bool]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Every tensor key of the base file with its shape, and the `wanted` tensors (a .safetensors base is
    read selectively, so the base's copy of the trained weights never enters memory)."""
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        header = read_header(path)
        return ({key: info.shape for key, info in header.tensors.items()},
                load_tensors(path, [key for key in header.tensors if wanted(key)]))
    # A .ckpt may hold non-tensor entries (e.g. 'global_step'); safetensors holds tensors only.
    tensors = {key: value for key, value in read_checkpoint(path).items() if torch.is_tensor(value)}
    return ({key: tuple(value.shape) for key, value in tensors.items()},
            {key: value.contiguous() for key, value in tensors.items() if wanted(key)})


def estimated_checkpoint_bytes(bundle: ModelBundle, trained: TrainedWeights, dtype: torch.dtype) -> int:
    """An upper bound of the file size, known before training: trained tensors in `dtype`, frozen module
    tensors at fp32 (the widest a base stores them), extra tensors at their stored size."""
    trained_keys = set(_trained_ldm(bundle, trained))
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key, value in bundle_to_ldm_state_dict(bundle).items():
        if _canonical_key(key, bundle.family) in trained_keys:
            total += value.numel() * item
        elif key in bundle.ldm_extras or not value.is_floating_point():
            total += value.numel() * value.element_size()
        else:
            total += value.numel() * max(value.element_size(), _MAX_STORED_BYTES)
    return total + 2**20  # the JSON header: ~100 bytes per key plus metadata


def config_beside(bundle: ModelBundle) -> dict[str, Any] | None:
    """The LDM config to write as `NAME.yaml` beside a checkpoint of `bundle` (see the module docstring), or
    None where the host's default is right (SD1 and SDXL noise prediction)."""
    if bundle.ldm_config is not None:
        base = bundle.identity.path
        return with_absolute_folders(bundle.ldm_config, base.parent) if base is not None else bundle.ldm_config
    if bundle.family is ModelFamily.SD2 or bundle.prediction_type != "epsilon":
        return stock_ldm_config(bundle.family, bundle.prediction_type)
    return None


def write_checkpoint(target: Path, bundle: ModelBundle, trained: TrainedWeights, *, dtype: torch.dtype,
                     metadata: Mapping[str, str], preview: Any | None = None) -> list[Path]:
    """Write `target` atomically, plus `NAME.yaml` beside it when the host needs one to run it right
    (`config_beside`) and `NAME.png` when a preview image is given. Returns the paths."""
    from safetensors.torch import save_file

    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; not: {', '.join(map(str, bad))}")
    state = checkpoint_state_dict(bundle, trained, dtype)
    written = [write_atomically(Path(target), lambda tmp: save_file(state, str(tmp), metadata=dict(metadata)))]
    config = config_beside(bundle)
    if config is not None:
        import yaml

        written.append(write_text_atomically(yaml_beside(target), yaml.safe_dump(config, sort_keys=False)))
    if preview is not None:
        written.append(write_atomically(Path(target).with_suffix(".png"), lambda tmp: preview.save(tmp, format="PNG")))
    return written
