"""Run folders (resumable state, latent caches, class images, the run's config) under one root: what they
hold, how much disk they take, and clearing the finished ones.

A run folder is *finished* when it holds nothing to resume from: no saved state, or only the state of its
last step (kept on request with `keep_final_state`). A cancelled or crashed run's state is what `--resume`
needs, so clearing leaves those alone, and the folder of a run in progress too.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from ..config import load_config
from ..errors import UserFacingError
from ..training.state import latest_state
from .run_id import read_run_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    path: Path
    size: int  # bytes
    finished: bool


def folder_size(path: Path) -> int:
    return sum(item.stat().st_size for item in Path(path).rglob("*") if item.is_file() and not item.is_symlink())


def _finished(folder: Path) -> bool:
    run_id = read_run_id(folder)
    state = latest_state(folder, run_id) if run_id is not None else None
    if state is None:
        return True
    try:
        step = json.loads((state / "progress.json").read_text(encoding="utf-8"))["step"]
        return int(step) >= load_config(folder / "config.toml").training.steps
    except (OSError, ValueError, KeyError, UserFacingError):  # unreadable: keep it, it may be someone's resume point
        return False


def run_folders(root: Path) -> list[RunFolder]:
    """Every run folder under `root`, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [RunFolder(path, folder_size(path), _finished(path)) for path in sorted(root.iterdir()) if path.is_dir()]


def clear_finished(root: Path, active: Collection[Path] = ()) -> list[RunFolder]:
    """Delete the finished run folders under `root` except `active` ones; return what was deleted."""
    busy = {Path(path).resolve() for path in active}
    cleared = []
    for folder in run_folders(root):
        if folder.finished and folder.path.resolve() not in busy:
            shutil.rmtree(folder.path)
            logger.info("Cleared the finished run folder %s (%d bytes)", folder.path, folder.size)
            cleared.append(folder)
    return cleared
