"""A network's tensors as the host's module types read them, where that differs from LyCORIS's state dict.

GLoRA is the one case. LyCORIS 4 names its factors the other way round from the LyCORIS release the
WebUI's `network_glora.py` was written against: the host builds `b2 @ b1 + W @ a2 @ a1` from a1 `[rank, in]`,
a2 `[in, rank]`, b1 `[rank, in]`, b2 `[out, rank]`, where LyCORIS 4 holds a1 `[in, rank]`, a2 `[rank, in]`,
b1 `[out, rank]`, b2 `[rank, in]` (a file in LyCORIS 4's names fails in the host with a shape error, which it
logs at debug level and skips). The host also applies no alpha/rank scale to GLoRA. So the file swaps the
names and carries the scale inside a2 and b2, with alpha = rank, so a reader that does scale by alpha/rank
gets the same update. The trainer's resumable state uses this layout too, so there is one conversion each way.
Every other algorithm's state dict already is the host's layout (docs/host-formats.md#lora-files).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

_GLORA_SWAP = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}
_GLORA_SCALED_ON_FILE = ("a2.weight", "b2.weight")  # host names; LyCORIS's a1 and b1, the factors next to the output


def _glora_modules(modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    from lycoris.modules.glora import GLoRAModule

    return {name: module for name, module in modules.items() if isinstance(module, GLoRAModule)}


def _convert(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module], *, to_host: bool) -> dict[str, torch.Tensor]:
    glora = _glora_modules(modules)
    if not glora:
        return dict(tensors)
    converted = {}
    for key, value in tensors.items():
        module_name, _, part = key.partition(".")
        module = glora.get(module_name)
        if module is None or part not in _GLORA_SWAP and part != "alpha":
            converted[key] = value
            continue
        # LyCORIS's module attributes, read through getattr: nn.Module's __getattr__ hides their types.
        rank, alpha, scale = getattr(module, "lora_dim"), getattr(module, "alpha"), getattr(module, "scale")
        if part == "alpha":  # the file says 'no extra scale'; the trainer keeps the alpha it was built with
            converted[key] = torch.tensor(float(rank)) if to_host else alpha.detach().clone()
            continue
        new_part = _GLORA_SWAP[part]
        scaled_part = new_part if to_host else part
        if scaled_part in _GLORA_SCALED_ON_FILE:
            value = value * scale if to_host else value / scale
        converted[f"{module_name}.{new_part}"] = value
    return converted


def to_host_layout(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """LyCORIS state-dict tensors (keyed `module.part`) in the layout the host's module types read."""
    return _convert(tensors, modules, to_host=True)


def from_host_layout(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The inverse of `to_host_layout`, for the modules the trainer built (`modules`, keyed by LyCORIS name)."""
    return _convert(tensors, modules, to_host=False)
