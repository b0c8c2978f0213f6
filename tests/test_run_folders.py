"""Run folders: size, and which ones count as finished (nothing left to resume) and may be cleared."""

from __future__ import annotations

import json
from pathlib import Path

from lib_sdcustom.config import RunConfig, dumps_toml
from lib_sdcustom.run.run_id import RUN_FILE
from lib_sdcustom.run.folders import clear_finished, run_folders


def _run(root: Path, name: str, *, steps: int, saved_step: int | None) -> Path:
    folder = root / name
    (folder / "cache").mkdir(parents=True)
    (folder / "cache" / "latents.bin").write_bytes(b"x" * 1000)
    config = RunConfig()
    config.training.steps = steps
    (folder / "config.toml").write_text(dumps_toml(config))
    (folder / RUN_FILE).write_text(json.dumps({"run_id": name}))
    if saved_step is not None:
        state = folder / "state" / f"step-{saved_step:08d}"
        state.mkdir(parents=True)
        (state / "progress.json").write_text(json.dumps({"step": saved_step, "run_id": name}))
    return folder


def test_only_finished_runs_that_are_not_running_are_cleared(tmp_path: Path) -> None:
    done = _run(tmp_path, "done", steps=10, saved_step=None)
    kept_final = _run(tmp_path, "kept_final", steps=10, saved_step=10)
    cancelled = _run(tmp_path, "cancelled", steps=10, saved_step=4)  # its state is a resume point
    running = _run(tmp_path, "running", steps=10, saved_step=None)

    found = {folder.path.name: folder for folder in run_folders(tmp_path)}
    assert {name for name, folder in found.items() if folder.finished} == {"done", "kept_final", "running"}
    assert found["done"].size > 1000

    cleared = clear_finished(tmp_path, active=[running])

    assert {folder.path.name for folder in cleared} == {"done", "kept_final"}
    assert not done.exists() and not kept_final.exists() and cancelled.is_dir() and running.is_dir()
    assert run_folders(tmp_path / "absent") == []
