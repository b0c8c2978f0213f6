"""fp8 storage of a frozen base: UNet and text-encoder layers kept as float8_e4m3fn, widened when used.

A frozen UNet in fp16 is SDXL's largest single cost (2.6B parameters, 5 GB). Stored as 8-bit floats it takes
half that (kohya's `--fp8_base` trades the same precision for memory). Each frozen Linear/Conv2d widens its
weight to the compute dtype for its own forward, and again in the backward pass for the gradient of its
input: autograd keeps only the fp8 weight, never a widened copy, so the saving holds while training.

Left as they are: norm layers and embeddings (Textual Inversion trains token rows), and the model's first
layer, whose weight dtype is what `model.dtype` reports and what sampling casts its inputs to. A network
method must run its modules beside such layers (LyCORIS bypass mode), not merge updates into their weights.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.nn.grad import conv2d_input
import torch.nn.functional as F

from ..errors import ConfigError
from .bundle import ModelBundle

FP8_STORAGE = getattr(torch, "float8_e4m3fn", None)
_FIX = "Turn fp8_base off (fp16/bf16 mixed precision and gradient checkpointing also save memory)."


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        return F.linear(x, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)).to(ctx.input_dtype), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype, geometry: tuple[Any, ...]) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.input_dtype, ctx.input_shape, ctx.geometry = dtype, x.dtype, x.shape, geometry
        return F.conv2d(x, weight.to(dtype), bias, *geometry)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (weight,) = ctx.saved_tensors
        grad_input = conv2d_input(ctx.input_shape, weight.to(grad.dtype), grad, *ctx.geometry)
        return grad_input.to(ctx.input_dtype), None, None, None, None


def _linear_forward(module: torch.nn.Linear, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: _Fp8Linear.apply(x, module.weight, module.bias, dtype)  # type: ignore[no-untyped-call]


def _conv_forward(module: torch.nn.Conv2d, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    geometry = (module.stride, module.padding, module.dilation, module.groups)
    return lambda x: _Fp8Conv2d.apply(x, module.weight, module.bias, dtype, geometry)  # type: ignore[no-untyped-call]


def _storable(name: str, module: torch.nn.Module) -> bool:
    """Plain Linear layers and zero-padded Conv2d layers (exact types: subclasses may take other arguments)."""
    if "norm" in name.split(".")[-1].lower():
        return False
    if type(module) is torch.nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) is torch.nn.Linear


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 storage cannot work here (a torch without float8, a device that cannot cast it), or None."""
    if FP8_STORAGE is None:
        return f"this PyTorch ({torch.__version__}) has no float8_e4m3fn dtype (PyTorch 2.1 or newer has it)"
    try:
        torch.ones(2, device=device).to(FP8_STORAGE).to(torch.float32)
    except (RuntimeError, TypeError) as error:
        return f"the training device ({device}) cannot store float8 tensors ({error})"
    return None


def stored_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes the modules' parameters and buffers occupy (what fp8 storage lowers)."""
    return sum(tensor.numel() * tensor.element_size() for module in modules
               for tensor in (*module.parameters(), *module.buffers()))


def store_in_fp8(model: torch.nn.Module) -> int:
    """Store `model`'s frozen Linear/Conv2d weights in fp8, computing in their current dtype; return how many."""
    first = next(model.parameters(), None)
    count = 0
    for name, module in model.named_modules():
        if not _storable(name, module):
            continue
        weight = module.weight
        if weight is first or weight.requires_grad or not weight.is_floating_point() or weight.dtype == FP8_STORAGE:
            continue
        dtype = weight.dtype
        module.weight = torch.nn.Parameter(weight.detach().to(FP8_STORAGE), requires_grad=False)
        module.forward = (_conv_forward if isinstance(module, torch.nn.Conv2d) else _linear_forward)(module, dtype)
        count += 1
    return count


def store_frozen_base_in_fp8(bundle: ModelBundle, device: torch.device) -> None:
    """fp8 storage for the UNet and the text encoders, after they are on `device` in their compute dtype and
    before a method hooks its modules in; their own weights must stay frozen for the whole run."""
    problem = fp8_problem(device)
    if problem is not None:
        raise ConfigError(f"fp8 base storage is on, but {problem}.", _FIX)
    for model in (bundle.unet, *bundle.text_encoders):
        store_in_fp8(model)
