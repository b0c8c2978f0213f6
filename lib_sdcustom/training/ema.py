"""Exponential moving average of trained weights, exported instead of the raw weights when asked for.

The decay ramps up as min(decay, (1 + t) / (10 + t)) after t updates (the rule diffusers' EMAModel uses by
default): with a fixed 0.9999 a DreamBooth run of a few hundred steps would export an average still ~95% made
of the base model, while the ramp lets the average follow early and only smooths once there is history.
The shadow copies are fp32 on the weights' device, so an update is one in-place lerp per tensor.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def ema_decay(step: int, decay: float) -> float:
    """Decay of the update that follows `step` earlier updates."""
    return min(decay, (1 + step) / (10 + step))


class ExponentialMovingAverage:
    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float) -> None:
        self.parameters = dict(parameters)
        self.decay = decay
        self.shadow = {name: param.detach().to(torch.float32, copy=True) for name, param in self.parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend in the current weights after optimizer step `step` (1 for the first)."""
        weight = 1.0 - ema_decay(step - 1, self.decay)
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(param.detach().to(torch.float32), weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the weights' storage with the average's; a second call undoes the first."""
        for name, param in self.parameters.items():
            param.data, self.shadow[name] = self.shadow[name], param.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[name])
