"""Which run a run folder belongs to, so a resume continues that run and no other.

A run folder is found by the output name, so two runs under one name share it. Each fresh run therefore
writes a new id to `run.json`, and every saved state carries the id of the run that wrote it
(`training/state.py`): a resume only picks states of the run whose `config.toml` the folder holds, and a
fresh run refuses a folder that holds another run's state unless `--overwrite` allows replacing it. Reading
the id is `run_id.py`'s job (the state writer needs it too, so it must not depend on this module).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text_atomically
from ..training.state import state_root
from .run_id import RUN_FILE, read_run_id


def holds_saved_state(run_dir: Path) -> bool:
    folder = state_root(run_dir)
    return folder.is_dir() and any(folder.iterdir())


def check_fresh_run_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse, before anything loads, to start a new run over another run's resumable state without consent."""
    if holds_saved_state(run_dir) and not overwrite:
        raise ConfigError(
            f"The run folder {run_dir} holds the saved state of an earlier run under this name.",
            f"Continue that run with --resume {run_dir}, pass --overwrite to discard it and start over, "
            "or choose another --name or --run-dir.",
        )


def start_fresh_run(run_dir: Path) -> str:
    """Discard an earlier run's state (the caller checked consent) and give the folder a new run id."""
    run_dir = Path(run_dir)
    shutil.rmtree(state_root(run_dir), ignore_errors=True)
    run_id = uuid.uuid4().hex
    write_text_atomically(run_dir / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")
    return run_id


def require_resumable(run_dir: Path) -> str:
    """The id of the run to continue; raises when the folder's state cannot be that run's."""
    run_id = read_run_id(run_dir)
    if run_id is None:
        raise ConfigError(f"{run_dir} has no {RUN_FILE}: it was not started by this version of SD Customize, "
                          "so its saved state cannot be matched to its config.",
                          "Start the run again without --resume.")
    return run_id
