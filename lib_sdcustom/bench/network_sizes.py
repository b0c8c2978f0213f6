"""`python -m lib_sdcustom.bench sizes`: the file size of each network method on full-size SD1.5 and SDXL shapes.

The network is attached (text encoders and UNet, as a default run trains them) to models built from the
stock configs on the meta device, so nothing of the base is allocated or downloaded; the size is what the fp16 file
holds: every tensor (alpha in fp16, IA3's `on_input` as int64) plus the safetensors header of those keys,
without the `ss_*` metadata (a few KiB, growing with the caption tags). DoRA's `dora_scale` cannot be
initialised on the meta device (LyCORIS reads the base weight's norm), so DoRA is counted as its LoRA plus
one `[1, in]` row per module, which is what the file holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from ..config import NetworkOptions
from ..models.bundle import ModelFamily
from ..networks.algorithms import ALGORITHMS
from ..networks.lycoris_backend import attach_network
from .full_size import meta_models

#: (row label, algorithm, DoRA)
VARIANTS = tuple((name, name, False) for name in ALGORITHMS) + (("lora + dora", "lora", True),
                                                                 ("locon + dora", "locon", True))
FAMILIES = {"sd1": ModelFamily.SD1, "sdxl": ModelFamily.SDXL}


def file_bytes(family: ModelFamily, algorithm: str, rank: int, dora: bool) -> int:
    """Bytes of the fp16 network file (tensors and their header, no metadata)."""
    models = meta_models(family)
    unet, text_encoders = models.unet, models.text_encoders
    # LyCORIS builds its own weights on the CPU (a few MiB), then they follow the meta model.
    attached = attach_network(unet, text_encoders, ALGORITHMS[algorithm], NetworkOptions(rank=rank, alpha=rank / 2),
                              train_text_encoder=True)
    shapes = {key: (value.dtype, tuple(value.shape)) for key, value in attached.network.state_dict().items()}
    if dora:
        shapes.update({f"{module.lora_name}.dora_scale": (torch.float16, (1, module.shape[1], *[1] * (len(module.shape) - 2)))
                       for module in attached.network.loras})
    header, offset = {}, 0
    for key, (dtype, shape) in shapes.items():
        size = 8 if dtype == torch.int64 else 2
        end = offset + size * int(torch.Size(shape).numel())
        header[key] = {"dtype": "I64" if size == 8 else "F16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    return 8 + len(json.dumps(header, separators=(",", ":"))) + offset


def report(ranks: Sequence[int]) -> str:
    lines = ["| method | " + " | ".join(f"{label} rank {rank}" for label in ("SD1.5", "SDXL") for rank in ranks) + " |",
             "|---|" + "---|" * (2 * len(ranks))]
    for label, algorithm, dora in VARIANTS:
        cells = []
        for family in FAMILIES.values():
            for rank in ranks:
                facts = ALGORITHMS[algorithm]
                fits = rank >= facts.min_rank and not (facts.even_rank and rank % 2)
                cells.append(f"{file_bytes(family, algorithm, rank, dora) / 2**20:.1f} MiB" if fits else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", default="8,16", help="Comma-separated ranks (default 8,16).")


def main(args: argparse.Namespace) -> int:
    sys.stdout.write(report([int(rank) for rank in args.ranks.split(",") if rank]) + "\n")
    return 0
