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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, OutputError
from ..files import temp_prefix
from ..run.run_id import read_run_id

_PREFIX = "step-"
STATE_FORMAT = 2  # 2: progress.json names the run that wrote it


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
    """Write the state of `step`; only older states of the same run are pruned, never another run's."""
    root = state_root(run_dir)
    run_id = read_run_id(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), suffix=".tmp", dir=root))
        try:
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(staging / "trainable.safetensors"))
            torch.save(optimizer, staging / "optimizer.pt")
            torch.save(scheduler, staging / "scheduler.pt")
            (staging / "progress.json").write_text(json.dumps({"format": STATE_FORMAT, "step": step, "run_id": run_id}),
                                                   encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except (OSError, SafetensorError) as error:
        raise OutputError(f"Could not save the training state in {root} at step {step}: {error}.",
                          "Free disk space in the run folder (or choose another --run-dir) and resume.") from error
    for old in _states_of(run_dir, run_id)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _states_of(run_dir: Path, run_id: str | None) -> list[Path]:
    """Complete states written by run `run_id`, oldest first."""
    found = []
    for folder in sorted(state_root(run_dir).glob(f"{_PREFIX}*")):
        try:
            progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a state cut short by a crash before its rename, or not ours
        if isinstance(progress, dict) and progress.get("run_id") == run_id:
            found.append(folder)
    return found


def latest_state(run_dir: Path, run_id: str) -> Path | None:
    """The newest state the run `run_id` saved; states another run left in the folder are never chosen."""
    folders = _states_of(run_dir, run_id)
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
