"""`python -m lib_sdcustom.bench resident`: every large tensor that stays on the GPU while a LoRA run's steps
run, for `train()` and for the reference loop (`bench/reference.py`), at full SD1.5 or SDXL size.

Counted, not measured: the models come from the stock configs on the meta device (`full_size.meta_models`),
our LoRA is attached to them the way a run attaches it, and each tensor's bytes follow from its shape and
the dtype the run keeps it in (bf16 mixed precision, as on a GPU). Activations are left out: they come and
go within a step, and the speed benchmark's "GPU GiB in steps after the first" column measures them with
the rest. "Before" is `train()` without `training/placement.py`, "now" with it, for a run whose caches
cover every image and caption (the benchmark's: fixed captions, latent and text-encoder caches on).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import NetworkOptions
from ..models.bundle import ModelFamily
from ..networks.algorithms import ALGORITHMS
from ..networks.lycoris_backend import attach_network
from .full_size import meta_models
from .reference import target_layers

GIB = 2**30
COMPUTE = torch.bfloat16
TOKENS = 77  # one caption's context rows


@dataclass
class Row:
    """Bytes of one kind of tensor on the training device during the steps; None where it is elsewhere."""

    what: str
    ours_before: int | None
    ours_now: int | None
    reference: int | None


def _bytes(count: int, dtype: torch.dtype) -> int:
    return count * torch.empty((), dtype=dtype).element_size()


def _parameters(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def _lora_parameters(unet: nn.Module, text_encoders: list[nn.Module], rank: int) -> tuple[int, int]:
    """(ours, the reference's) LoRA parameter counts: ours as attached, the reference's from its layer list."""
    layers = dict(unet.named_modules())
    reference = 0
    for name in target_layers(unet, "lora"):
        layer = layers[name]
        inputs, outputs = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else \
            (layer.in_channels, layer.out_channels)
        reference += rank * (inputs + outputs)
    attached = attach_network(unet, text_encoders, ALGORITHMS["lora"], NetworkOptions(rank=rank, alpha=float(rank)),
                              train_text_encoder=False)
    ours = sum(param.numel() for group in attached.param_groups(unet_lr=1.0, text_encoder_lr=1.0)
               for param in group["params"])
    return ours, reference


def rows(family: ModelFamily, *, rank: int, captions: int, batch: int, resolution: int) -> list[Row]:
    models = meta_models(family)
    rows = [Row("UNet, frozen, bf16", *[_bytes(_parameters(models.unet), COMPUTE)] * 3)]
    for number, encoder in enumerate(models.text_encoders, start=1):
        size = _bytes(_parameters(encoder), COMPUTE)
        rows.append(Row(f"text encoder {number} ({type(encoder).__name__}), frozen, bf16", size, None, size))
    vae = _parameters(models.vae)
    rows.append(Row("VAE (ours fp32: it overflows in fp16; the reference's bf16)", _bytes(vae, torch.float32), None,
                    _bytes(vae, COMPUTE)))
    ours, reference = _lora_parameters(models.unet, models.text_encoders, rank)
    rows += [Row(f"LoRA weights, fp32 ({ours:,} / {reference:,} parameters)", _bytes(ours, torch.float32),
                 _bytes(ours, torch.float32), _bytes(reference, torch.float32)),
             Row("their gradients, fp32 (from the backward pass to zero_grad)", _bytes(ours, torch.float32),
                 _bytes(ours, torch.float32), _bytes(reference, torch.float32)),
             Row("AdamW moments, 2 x fp32", _bytes(2 * ours, torch.float32), _bytes(2 * ours, torch.float32),
                 _bytes(2 * reference, torch.float32))]
    text_configs: list[Any] = [encoder.config for encoder in models.text_encoders]
    width = sum(int(config.hidden_size) for config in text_configs)  # the context: every encoder's last states
    pooled = int(text_configs[-1].projection_dim) if family is ModelFamily.SDXL else 0
    caption = _bytes(TOKENS * width + pooled, COMPUTE)
    rows.append(Row(f"text-encoder cache, bf16 (ours: {captions} captions; the reference: one batch)",
                    captions * caption, captions * caption, batch * caption))
    side = resolution // 8
    latents = _bytes(batch * models.unet.config.in_channels * side * side, COMPUTE)
    rows.append(Row("latents (ours: cached on the CPU, one batch moved per step; the reference: one batch)",
                    None, None, latents))
    return rows


def _gib(value: int | None) -> str:
    if value is None:
        return "CPU"
    return f"{value / GIB:.3f}" if value >= GIB / 1000 else f"{value / 2**20:.2f} MiB"


def report(family: ModelFamily, *, rank: int, captions: int, batch: int, resolution: int) -> str:
    table = rows(family, rank=rank, captions=captions, batch=batch, resolution=resolution)
    lines = [f"{family.value.upper()} full size, LoRA rank {rank}, batch {batch}, {resolution} px, {captions} captions, "
             "bf16 mixed precision: GiB on the GPU during the steps (activations not counted)", "",
             "| tensor | ours before | ours now | reference |", "|---|---|---|---|"]
    lines += [f"| {row.what} | {_gib(row.ours_before)} | {_gib(row.ours_now)} | {_gib(row.reference)} |" for row in table]
    totals = [sum(getattr(row, side) or 0 for row in table) for side in ("ours_before", "ours_now", "reference")]
    lines.append("| **total** | " + " | ".join(f"**{total / GIB:.2f}**" for total in totals) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sdxl")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--captions", type=int, default=8, help="Distinct captions in the text-encoder cache (default 8, "
                                                                "the speed benchmark's images).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=0, help="Pixels (default: the family's own, 512 or 1024).")


def main(args: argparse.Namespace) -> int:
    family = ModelFamily(args.family)
    resolution = args.resolution or (1024 if family is ModelFamily.SDXL else 512)
    sys.stdout.write(report(family, rank=args.rank, captions=args.captions, batch=args.batch, resolution=resolution) + "\n")
    return 0
