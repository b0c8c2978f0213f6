"""Hypernetwork `.pt` files in the host's own layout (docs/host-formats.md#hypernetworks); the only code that
names their keys.

The host's `Hypernetwork.save` writes a plain dict: one int key per width holding a `(state_k, state_v)` pair of
module state dicts (`linear.<i>.weight`/`.bias`, `i` counting every module of the sequence), then `step`,
`name`, `layer_structure`, `activation_func`, `is_layer_norm`, `weight_initialization`, `sd_checkpoint`,
`sd_checkpoint_name`, `activate_output`, `use_dropout`, `dropout_structure`, `last_layer_dropout` and
`optional_info`. We write the same keys in the same order. Two of them matter more than they look:
`dropout_structure` decides the module indices, so it is always written; a missing `activate_output` reads as
True, which adds an activation, so it is always written too. `name` is the file stem: the host caches a
loaded hypernetwork by it. The file goes through `host_pickle.save_for_host`, so the host's restricted
unpickler accepts it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import ModelLoadError
from ..files import write_atomically
from ..models.bundle import BaseIdentity
from ..models.checkpoint_io import read_pickle_weights_only
from ..networks.hypernetwork import ROLES, Hypernetwork, HypernetworkShape
from .host_pickle import save_for_host

SUFFIX = ".pt"


def hypernetwork_dict(network: Hypernetwork, *, name: str, step: int, base: BaseIdentity,
                      dtype: torch.dtype = torch.float32) -> dict[Any, Any]:
    """The dict the host's `Hypernetwork.save` would write for `network` (tensors in `dtype`, on the CPU)."""
    shape = network.shape
    data: dict[Any, Any] = {
        width: tuple(OrderedDict((key, value.to(dtype).contiguous()) for key, value in state.items()) for state in pair)
        for width, pair in network.state_by_width().items()}
    data.update({
        "step": int(step),
        "name": name,
        "layer_structure": [float(size) for size in shape.layer_structure],
        "activation_func": shape.activation_func,
        "is_layer_norm": shape.layer_norm,
        "weight_initialization": shape.weight_init,
        "sd_checkpoint": base.shorthash,
        "sd_checkpoint_name": base.name or None,
        "activate_output": shape.activate_output,
        "use_dropout": shape.use_dropout,
        "dropout_structure": [float(value) for value in shape.dropout_structure],
        "last_layer_dropout": shape.last_layer_dropout,
        "optional_info": None,
    })
    return data


def write_hypernetwork(target: Path, network: Hypernetwork, *, step: int, base: BaseIdentity,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write `network` atomically to `target` (a `.pt`), named after its stem; return `target`."""
    target = Path(target)
    data = hypernetwork_dict(network, name=target.stem, step=step, base=base, dtype=dtype)
    return write_atomically(target, lambda tmp: save_for_host(data, tmp))


def read_hypernetwork_dict(path: Path) -> dict[Any, Any]:
    """The raw dict of a hypernetwork file, read with torch's weights-only unpickler."""
    data = read_pickle_weights_only(Path(path))
    if not is_hypernetwork_dict(data):
        raise ModelLoadError(f"{path} is not a hypernetwork: it holds no width keys with (k, v) module pairs.",
                             "Use a .pt written by the WebUI's hypernetwork trainer or by SD Customize.")
    return cast(dict[Any, Any], data)


def is_hypernetwork_dict(data: Any) -> bool:
    return isinstance(data, dict) and any(isinstance(key, int) and isinstance(value, (tuple, list)) and len(value) == 2
                                          for key, value in data.items())


def shape_of(data: dict[Any, Any]) -> HypernetworkShape:
    """The layout the host builds from `data`, with the host's defaults for missing keys (`Hypernetwork.load`)."""
    structure = tuple(float(size) for size in data.get("layer_structure") or (1, 2, 1))
    dropouts = data.get("dropout_structure")
    if dropouts is None:  # the host's `parse_dropout_structure`
        if data.get("use_dropout", False):
            dropouts = [0.0] + [0.3] * (len(structure) - 3) + [0.3 if data.get("last_layer_dropout", False) else 0.0, 0.0]
        else:
            dropouts = [0.0] * len(structure)
    return HypernetworkShape(layer_structure=structure, activation_func=data.get("activation_func") or "linear",
                             layer_norm=bool(data.get("is_layer_norm", False)),
                             dropout_structure=tuple(float(value) for value in dropouts),
                             activate_output=bool(data.get("activate_output", True)),
                             weight_init=data.get("weight_initialization") or "Normal")


def widths_of(data: dict[Any, Any]) -> list[int]:
    return sorted(key for key in data if isinstance(key, int))


def hypernetwork_from_dict(data: dict[Any, Any]) -> Hypernetwork:
    """A `Hypernetwork` holding the file's weights (float32), built as the host builds it on load."""
    network = Hypernetwork(widths_of(data), shape_of(data))
    try:
        def as_float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: value.float() for key, value in state.items()}

        network.load_state_by_width({width: (as_float(data[width][0]), as_float(data[width][1]))
                                     for width in widths_of(data)})
    except (RuntimeError, ValueError) as error:  # torch's own words on missing or misshapen keys
        raise ModelLoadError(f"The hypernetwork's weights do not match its layout: {error}",
                             "The file is damaged or was written by a tool that lays its modules out differently.") from error
    return network


def flat_tensors(data: dict[Any, Any]) -> dict[str, torch.Tensor]:
    """`WIDTH.k.linear.0.weight` ...: every tensor of the file under one flat name (for `inspect`)."""
    return {f"{width}.{role}.{key}": value for width in widths_of(data)
            for role, state in zip(ROLES, data[width]) for key, value in state.items()}
