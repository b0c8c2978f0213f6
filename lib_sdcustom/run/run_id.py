"""The id of the run that last started in a run folder (`run.json`): what `folder.py` gives each fresh run
and what every saved state records (`training/state.py`)."""

from __future__ import annotations

import json
from pathlib import Path

RUN_FILE = "run.json"


def read_run_id(run_dir: Path) -> str | None:
    """The id of the run that last started in `run_dir`, or None when no run of this version started there."""
    path = Path(run_dir) / RUN_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
