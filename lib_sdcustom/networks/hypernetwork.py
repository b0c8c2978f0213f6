"""A hypernetwork as the host builds and applies it (docs/host-formats.md#hypernetworks): per width, two small
MLPs that rewrite the keys' and the values' input of every attention whose input has that width.

The host (A1111 1.10 `modules/hypernetworks/hypernetwork.py`) keys its modules by the width of the tensor the
attention computes k and v from: the text context in cross-attention (768 SD1, 1024 SD2, 2048 SDXL) and the
image features in self-attention (320/640/1280), and computes `k = to_k(x + mlp_k(x) * multiplier)`, the same
for v. Here each diffusers `Attention` gets forward pre-hooks on `to_k` and `to_v` that do exactly that, so
training sees what the host will compute from the exported file. The MLP is laid out as the host lays it out
(`build_layers`), module for module, because the file's keys (`linear.<i>.weight`) count every module of the
sequence, activations and dropouts included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, cast

import torch
from torch import nn

#: Activation names the host's `HypernetworkModule.activation_dict` resolves, and the modules it builds for them
#: ("linear" adds none; the host maps "swish" to Hardswish). The host also accepts any other lower-cased
#: `torch.nn` activation class; these are the ones its own UI offers that take no arguments.
ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish,
    "softplus": nn.Softplus, "softsign": nn.Softsign, "celu": nn.CELU, "selu": nn.SELU,
}
#: k and v: the two modules of each width, in the order the host stores them in its `(k, v)` pairs.
ROLES = ("k", "v")


@dataclass(frozen=True)
class HypernetworkShape:
    """Everything that decides the modules' layout, as the host's file names it."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    activate_output: bool = False
    weight_init: str = "Normal"

    @property
    def use_dropout(self) -> bool:
        return any(self.dropout_structure)

    @property
    def last_layer_dropout(self) -> bool:
        """What the host's writer stores: whether the last hidden layer has a dropout."""
        return self.dropout_structure[-2] != 0


def build_layers(width: int, shape: HypernetworkShape) -> nn.Sequential:
    """The host's module sequence for one width: per step Linear, the activation (after the last Linear only with
    `activate_output`), LayerNorm when asked, Dropout where `dropout_structure` is above 0."""
    structure = shape.layer_structure
    activation = ACTIVATIONS[shape.activation_func]
    layers: list[nn.Module] = []
    for index in range(len(structure) - 1):
        layers.append(nn.Linear(int(width * structure[index]), int(width * structure[index + 1])))
        last = index == len(structure) - 2
        if activation is not None and (not last or shape.activate_output):
            layers.append(activation())
        if shape.layer_norm:
            layers.append(nn.LayerNorm(int(width * structure[index + 1])))
        if shape.dropout_structure[index + 1] > 0:
            layers.append(nn.Dropout(p=shape.dropout_structure[index + 1]))
    return nn.Sequential(*layers)


def initialise(layers: nn.Sequential, shape: HypernetworkShape) -> None:
    """The host's initialisation of a new module: LayerNorms and 'Normal' draw N(0, 0.01) weights, the others
    their torch namesake; every bias starts at zero."""
    nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if shape.activation_func == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in layers:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            weight = layer.weight
            if shape.weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(weight, mean=0.0, std=0.01)
            elif shape.weight_init == "XavierUniform":
                nn.init.xavier_uniform_(weight)
            elif shape.weight_init == "XavierNormal":
                nn.init.xavier_normal_(weight)
            elif shape.weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
            elif shape.weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
            else:
                raise ValueError(f"unknown weight initialisation {shape.weight_init!r}")
            nn.init.zeros_(layer.bias)


def hypernetwork_parameters(widths: Iterable[int], layer_structure: Sequence[float]) -> int:
    """Trainable parameters of the k and v Linears of every width (LayerNorms, if any, add a few more)."""
    sizes = [[int(width * factor) for factor in layer_structure] for width in widths]
    return 2 * sum(inner * outer + outer for layers in sizes for inner, outer in zip(layers, layers[1:]))


class HypernetworkModule(nn.Module):
    """One MLP (the k or the v of one width): `x + linear(x) * multiplier`; the host trains at multiplier 1."""

    def __init__(self, width: int, shape: HypernetworkShape) -> None:
        super().__init__()
        self.linear = build_layers(width, shape)
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        changed: torch.Tensor = x + self.linear(x) * self.multiplier
        return changed


class Hypernetwork(nn.Module):
    """The k and v modules of every width; `attach` hooks them into a diffusers UNet."""

    def __init__(self, widths: Iterable[int], shape: HypernetworkShape) -> None:
        super().__init__()
        self.shape = shape
        self.widths = tuple(sorted(set(int(width) for width in widths)))
        self.layers = nn.ModuleDict({str(width): nn.ModuleList([HypernetworkModule(width, shape) for _ in ROLES])
                                     for width in self.widths})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def initialise(self) -> None:
        for module in self._modules_of_every_width():
            initialise(module.linear, self.shape)

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule]:
        k, v = cast(nn.ModuleList, self.layers[str(width)])
        return cast(HypernetworkModule, k), cast(HypernetworkModule, v)

    def _modules_of_every_width(self) -> Iterator[HypernetworkModule]:
        for width in self.widths:
            yield from self.pair(width)

    def set_multiplier(self, multiplier: float) -> None:
        for module in self._modules_of_every_width():
            module.multiplier = multiplier

    # ----- the host's file layout: {width: (state_k, state_v)} -----
    def state_by_width(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Detached CPU copies, per width a pair of `linear.<i>.weight`/`.bias` dicts (the host's keys)."""
        def copied(module: HypernetworkModule) -> dict[str, torch.Tensor]:
            return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}

        return {width: (copied(k), copied(v)) for width, (k, v) in ((width, self.pair(width)) for width in self.widths)}

    def load_state_by_width(self, states: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> None:
        if sorted(states) != list(self.widths):
            raise ValueError(f"the state holds widths {sorted(states)}, this hypernetwork {list(self.widths)}")
        for width, pair in states.items():
            for module, state in zip(self.pair(width), pair):
                module.load_state_dict(state, strict=True)

    # ----- training state: one flat dict -----
    def flat_state(self) -> dict[str, torch.Tensor]:
        """`WIDTH.k.linear.0.weight` ... : the resumable state, one flat dict of tensors."""
        return {f"{width}.{role}.{key}": value for width, pair in self.state_by_width().items()
                for role, state in zip(ROLES, pair) for key, value in state.items()}

    def load_flat_state(self, tensors: dict[str, torch.Tensor]) -> None:
        states: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        for name, value in tensors.items():
            width, role, key = name.split(".", 2)
            states.setdefault(int(width), ({}, {}))[ROLES.index(role)][key] = value
        self.load_state_by_width(states)

    # ----- applying it to a UNet -----
    def attach(self, unet: nn.Module) -> int:
        """Hook every attention of `unet` whose k/v input width has modules; return how many were hooked."""
        self.detach()
        hooked = 0
        for to_k, to_v in key_value_projections(unet):
            width = to_k.in_features
            if width not in self.widths:
                continue
            for projection, module in zip((to_k, to_v), self.pair(width)):
                self._handles.append(projection.register_forward_pre_hook(_rewrite_input(module)))
            hooked += 1
        return hooked

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _rewrite_input(module: HypernetworkModule) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(projection: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        # The modules stay float32 (the host's are too); the projection gets its input back in its own dtype.
        return (module(x.float()).to(x.dtype), *args[1:])
    return hook


def key_value_projections(unet: nn.Module) -> Iterator[tuple[nn.Linear, nn.Linear]]:
    """The `to_k`, `to_v` of every attention of a diffusers UNet (self and cross), the modules the host's
    CrossAttention hijack covers."""
    for module in unet.modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if isinstance(to_k, nn.Linear) and isinstance(to_v, nn.Linear):
            yield to_k, to_v


def attention_widths(unet: nn.Module) -> set[int]:
    """The k/v input widths the UNet's attentions have: the widths a hypernetwork can apply to."""
    return {to_k.in_features for to_k, _ in key_value_projections(unet)}
