"""Learning-rate schedules as pure functions of the step, wrapped in a LambdaLR.

Pure functions make resume trivial (the factor depends only on the step) and keep us independent of
the schedule helpers that differ between diffusers/transformers versions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(name: str, step: int, total_steps: int, *, warmup_steps: int = 0, restarts: int = 1, power: float = 1.0) -> float:
    """Multiplier of the base lr at `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((restarts * progress) % 1.0)))
    if name == "polynomial":
        return float((1.0 - progress) ** power)  # progress <= 1, so a real power, never complex
    raise ValueError(f"unknown schedule {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, *, warmup_steps: int = 0,
                    restarts: int = 1, power: float = 1.0, stop_groups_at: dict[str, int] | None = None,
                    start_groups_at: dict[str, int] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """`stop_groups_at` maps a param-group name to the step from which its lr is 0, e.g. a text encoder
    trained only for the first part of a run; `start_groups_at` to the step before which it is 0, e.g. a
    network that joins after a new word has learned alone. The optimizer leaves those weights alone meanwhile."""
    stops, starts = stop_groups_at or {}, start_groups_at or {}

    def group_factor(start: int, stop: int | None) -> Callable[[int], float]:
        return lambda step: 0.0 if step < start or (stop is not None and step >= stop) else lr_factor(
            name, step, total_steps, warmup_steps=warmup_steps, restarts=restarts, power=power)

    names = [str(group.get("name", "")) for group in optimizer.param_groups]  # unnamed groups run the whole schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_factor(starts.get(name, 0), stops.get(name)) for name in names])
