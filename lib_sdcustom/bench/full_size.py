"""A full-size SD1.5 or SDXL checkpoint with random weights, for the speed and memory benchmarks.

Nothing is downloaded: the modules come from the stock configs (`models/stock_configs.py`) on the meta
device, our own writer (`models/writer.ldm_state_dict`) gives every tensor its checkpoint name, and the file
is written one tensor at a time, so writing a 6.6 GB SDXL file needs about one tensor of memory. The
values are seeded and shaped like a default initialisation (uniform within +-1/sqrt(fan_in) for weights,
ones for norm scales, zeros for biases): the loss stays finite, which is all a speed benchmark needs.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..files import write_atomically
from ..models import ldm_keys
from ..models.bundle import ModelFamily
from ..models.ldm_config import configs_from_ldm
from ..models.writer import ldm_state_dict
from ..models.stock_configs import stock_ldm_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


@dataclass
class MetaModels:
    """A family's modules from its stock config, on the meta device: shapes and dtypes, no memory."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]


def meta_models(family: ModelFamily) -> MetaModels:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.loader import text_encoder_factory

    configs = configs_from_ldm(copy.deepcopy(stock_ldm_config(family, "epsilon")), source="stock")
    text_configs = [configs.text_encoder] + ([configs.text_encoder_2] if configs.text_encoder_2 else [])
    with init_empty_weights(include_buffers=False):
        return MetaModels(UNet2DConditionModel(**configs.unet), AutoencoderKL(**configs.vae),
                          [text_encoder_factory(config)() for config in text_configs])


def _meta_state_dicts(family: ModelFamily) -> dict[str, torch.Tensor]:
    """LDM key -> a tensor of the right shape and dtype (meta for weights; real for integer buffers)."""
    models = meta_models(family)
    unet, vae = models.unet, models.vae
    return ldm_state_dict(family, unet.state_dict(), ldm_keys.UNetLayout.from_diffusers_config(unet.config),
                          vae.state_dict(), ldm_keys.VAELayout.from_diffusers_config(vae.config),
                          [ldm_keys.text_encoder_state_dict(encoder) for encoder in models.text_encoders], {})


def _random_like(key: str, like: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if not like.is_floating_point():
        return like.detach().clone()
    if like.dim() >= 2:
        bound = 1.0 / max(1, like[0].numel()) ** 0.5
        return (torch.rand(like.shape, generator=generator) * 2 - 1).mul_(bound).to(dtype)
    fill = 1.0 if key.endswith("weight") or key.endswith("scale") else 0.0
    return torch.full(like.shape, fill, dtype=dtype)


def _header(shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (dtype, shape) in shapes.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        entries[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_random_checkpoint(family: str, path: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write `path` (`.safetensors`, no YAML: the loader takes the stock config, as the host would)."""
    meta = dict(sorted(_meta_state_dicts(ModelFamily(family)).items()))
    shapes = {key: (dtype if like.is_floating_point() else like.dtype, tuple(like.shape)) for key, like in meta.items()}

    def write(tmp: Path) -> None:
        generator = torch.Generator().manual_seed(seed)
        with open(tmp, "wb") as handle:
            handle.write(_header(shapes))
            for key, like in meta.items():
                tensor = _random_like(key, like, dtype, generator)
                handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    return write_atomically(Path(path), write)
