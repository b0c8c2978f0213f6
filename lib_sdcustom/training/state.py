"""Resumable training state: trainable weights, optimizer, scheduler and position, saved atomically.

Each save is a folder written under a temp name and renamed into `state/step-NNNNNNNN`, so a crash
mid-save leaves the previous state intact. All randomness in the loop is derived from (seed, position),
so weights + optimizer + scheduler + step are enough to continue to the same result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError

_PREFIX = "step-"
STATE_FORMAT = 1


@dataclass
class SavedState:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    folder: Path


def state_root(run_dir: Path) -> Path:
    return Path(run_dir) / "state"


def save_state(run_dir: Path, *, step: int, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any],
               scheduler: dict[str, Any], keep: int = 2) -> Path:
    root = state_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
        torch.save(optimizer, staging / "optimizer.pt")
        torch.save(scheduler, staging / "scheduler.pt")
        (staging / "progress.json").write_text(json.dumps({"format": STATE_FORMAT, "step": step}), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(run_dir: Path) -> Path | None:
    folders = sorted(p for p in state_root(run_dir).glob(f"{_PREFIX}*") if (p / "progress.json").is_file())
    return folders[-1] if folders else None


def load_state(folder: Path) -> SavedState:
    progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    if progress.get("format") != STATE_FORMAT:
        raise ConfigError(f"The saved state in {folder} was written by another version of SD Customize.",
                          "Start a new run instead of resuming this one.")
    return SavedState(
        step=int(progress["step"]),
        trainable=load_file(str(folder / "trainable.safetensors")),
        optimizer=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        scheduler=torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True),
        folder=folder,
    )
