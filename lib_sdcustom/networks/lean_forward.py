"""A lean bypass forward for LyCORIS's LoRA/LoCon modules: `W x + up(down(x))`, the scale folded into `up`.

LyCORIS 4.1 computes the same sum in bypass mode, but multiplies the full-size output by its scale and
then by a unit scalar (two extra passes over every wrapped layer's activation), and picks a kernel backend
per call (Triton, a per-op torch.compile, or eager torch) on CUDA. Folding `alpha / rank` (and the scalar)
into the rank x out up weight does that multiplication on a tensor thousands of times smaller, and two
plain torch ops behave alike on every device, the way a diffusers + peft LoRA layer does. Modules this does
not cover exactly (Tucker mid weights, DoRA, rank dropout) keep LyCORIS's own bypass forward; the tests
hold both to the merged-weight forward.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Iterable, TypeGuard, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from lycoris.modules.locon import LoConModule


def _plain_lora(module: nn.Module) -> TypeGuard[LoConModule]:
    from lycoris.modules.locon import LoConModule

    return (type(module) is LoConModule and bool(module.bypass_mode) and not module.tucker and not module.wd
            and not module.rank_dropout)


def _lean_bypass_forward_diff(self: LoConModule, x: torch.Tensor, scale: float = 1) -> torch.Tensor:
    down = self.lora_down.weight.to(x)
    up = (self.lora_up.weight * (self.scalar * (self.scale * scale))).to(x)
    if self.isconv:  # down carries the layer's kernel, stride and padding; up is 1x1
        layer = self.lora_down
        hidden = self.op(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        hidden = self.op(x, down)
    return cast(torch.Tensor, self.dropout(self.op(hidden, up)))


def use_lean_forward(modules: Iterable[nn.Module]) -> int:
    """Give every plain LoRA/LoCon module in bypass mode the lean forward; returns how many took it."""
    count = 0
    for module in modules:
        if _plain_lora(module):
            module.bypass_forward_diff = types.MethodType(_lean_bypass_forward_diff, module)
            count += 1
    return count
