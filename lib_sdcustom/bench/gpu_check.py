"""`python -m lib_sdcustom.bench gpu-check`: the full-size GPU comparison in one command (about 6 minutes on
one H200, within 8).

Full-size SD1.5 (512 px, LoRA rank 16, batch 1 and 4) and SDXL (1024 px, batch 1, gradient checkpointing),
30 steps each, through `train()` and through the diffusers + peft reference loop (`bench/speed.py`), and the
load-only memory peak of each model. Each row's note splits both sides' GPU memory by phase (to the first
step, the later steps and what stays resident, after the last step: `bench/gpu_memory.py`), so the steps
are compared apart from ours' one-off work around them (the latent cache's encode, the final preview). `--compile` adds, last, ours with torch.compile on SD1.5 batch 1
(compilation is in the first step, outside the rate): on an H200 that run alone outlasted 200 s, so it is
not in the 8 minutes. The random full-size checkpoints are written first (to `--workdir`, reused when
present). Measured on one H200 on 2026-12-04: docs/bench/speed.md.

The machine needs torch with CUDA, and diffusers, lycoris-lora, peft, transformers and accelerate. A GPU
machine without internet gets them as wheels carried along, e.g. on a connected machine:
    pip download --no-deps diffusers==0.42.1 lycoris-lora==4.1.3 lazy-importer toml ftfy wcwidth \
        importlib_metadata -d wheels/
and on the GPU machine: pip install --no-deps wheels/*.whl (add transformers, accelerate, safetensors,
huggingface_hub, tokenizers and peft the same way where they are missing; diffusers 0.42 wants
huggingface_hub >= 1.32, diffusers 0.36 wants it below 1.0).

`--dry-run` runs the same plans at tiny size on the CPU with a few steps, never with `--compile`
(inductor's CPU compile of even the tiny UNet takes minutes): it proves the command's code path where no
GPU is, and the test suite runs it.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..files import write_text_atomically
from .reference import peft_available
from .speed import Plan, report, run

REQUIRED = ("diffusers", "lycoris", "transformers", "accelerate", "safetensors")
WHEELS_HINT = ("carry wheels to this machine (on a connected one: pip download --no-deps diffusers==0.42.1 "
               "lycoris-lora==4.1.3 lazy-importer toml ftfy wcwidth importlib_metadata peft -d wheels/) and "
               "pip install --no-deps wheels/*.whl first")
STEPS, DRY_RUN_STEPS = 30, 3


def plans(dry_run: bool, with_compile: bool = False) -> list[Plan]:
    """What the check runs: full size on the GPU, or the same plans at tiny size for a dry run."""
    size, steps = ("tiny", DRY_RUN_STEPS) if dry_run else ("full", STEPS)
    sd1 = 64 if dry_run else 512
    checks = [
        Plan(size=size, family="sd1", resolution=sd1, batches=(1, 4), networks=("lora",), steps=steps, load=True),
        Plan(size=size, family="sdxl", resolution=64 if dry_run else 1024, batches=(1,), networks=("lora",),
             steps=steps, gradient_checkpointing=True, load=True),
    ]
    if with_compile and not dry_run:
        checks.append(Plan(size=size, family="sd1", resolution=sd1, batches=(1,), networks=("lora",), steps=steps,
                           variants=("compile",)))
    return checks


def missing_packages() -> list[str]:
    """Packages the check cannot run without (peft must also import: a peft newer than the installed
    accelerate or transformers does not)."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    return missing + ([] if peft_available() else ["peft"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="Tiny models on the CPU, a few steps: checks the "
                                                              "command's code path without a GPU.")
    parser.add_argument("--workdir", default="", help="Where the full-size checkpoints are written and reused "
                                                       "(default: a temporary folder).")
    parser.add_argument("--markdown", default="", help="Also write the tables to this file.")
    parser.add_argument("--compile", action="store_true", help="Also run ours with --compile on SD1.5 batch 1, last "
                                                              "(the compilation adds minutes beyond the 8).")


def main(args: argparse.Namespace) -> int:
    missing = missing_packages()
    if missing:
        sys.stderr.write(f"gpu-check needs {', '.join(missing)}: {WHEELS_HINT}.\n")
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        sys.stderr.write("gpu-check needs a CUDA GPU (none is visible); --dry-run runs its code path on the CPU "
                         "at tiny size.\n")
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir) if args.workdir else Path(scratch)
        sections = []
        for plan in plans(args.dry_run, args.compile):
            sections.append(report(run(plan, workdir)))
            sys.stdout.write(sections[-1] + "\n\n")
            sys.stdout.flush()
    minutes = (time.perf_counter() - started) / 60
    footer = f"gpu-check{' --dry-run' if args.dry_run else ''} took {minutes:.1f} minutes."
    sys.stdout.write(footer + "\n")
    if args.markdown:
        write_text_atomically(Path(args.markdown), "\n\n".join(sections) + f"\n\n{footer}\n")
    return 0
