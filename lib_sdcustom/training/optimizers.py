"""Optimizer factory. Optional optimizers are imported only when chosen, and a missing package is a
clear message with the install command, never a silent fallback to AdamW."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..errors import ConfigError

_OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
}


def _import_optional(optimizer: str) -> Any:
    module, package = _OPTIONAL[optimizer]
    try:
        return importlib.import_module(module)
    except Exception as error:  # bitsandbytes raises RuntimeError/OSError without a usable CUDA
        raise ConfigError(
            f"The {optimizer} optimizer needs the '{package}' package, which could not be imported ({error}).",
            f"Install it with 'pip install {package}', or choose --optimizer adamw.",
        ) from error


def _fused_adamw(param_groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW applies: one kernel for all parameters' updates instead of a Python loop
    over them (3-5x faster for a network's few hundred small tensors). CUDA has it since torch 2.0, the CPU
    since 2.4; it is documented as the fastest form where available."""
    params = [p for group in param_groups for p in group["params"]]
    devices = {p.device.type for p in params}
    if not params or not all(p.is_floating_point() for p in params) or len(devices) != 1:
        return False
    return devices == {"cuda"} or (devices == {"cpu"} and torch.torch_version.TorchVersion(torch.__version__) >= "2.4")


def build_optimizer(name: str, param_groups: list[dict[str, Any]], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`param_groups` carry their own 'lr' (e.g. UNet and text-encoder rates); `lr` is the default."""
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, 
                                 fused=_fused_adamw(param_groups) or None)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=0.9)
    optimizer: torch.optim.Optimizer  # the optional packages' classes are torch optimizers, untyped
    if name == "adamw8bit":
        optimizer = _import_optional(name).optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    elif name == "lion":
        optimizer = _import_optional(name).Lion(param_groups, lr=lr, weight_decay=weight_decay)
    elif name == "prodigy":
        # Prodigy estimates the step size itself; users pass lr=1.0 as its multiplier.
        optimizer = _import_optional(name).Prodigy(param_groups, lr=lr, weight_decay=weight_decay)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(param_groups, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False,
                              warmup_init=False)
    else:
        raise ConfigError(f"Unknown optimizer {name!r}.", "Use adamw, adamw8bit, lion, prodigy, adafactor or sgd.")
    return optimizer
