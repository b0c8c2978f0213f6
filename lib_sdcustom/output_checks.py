"""Where a run will write, checked before the base model loads: a bad output or run folder costs seconds,
not a training whose result cannot be saved.

Checked: the result's name and that it (and the card files beside it) would not replace anything without
--overwrite; the method's own checks of the names it gives the host; that the output folder and the run folder
are folders that take new files; and that a fresh run does not take over another run's resumable state
(`run_folder.py`).
"""

from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .errors import OutputError
from .files import check_writable_folder, output_path
from .methods.registry import method_class
from .run_folder import check_fresh_run_folder


def check_output_locations(config: RunConfig, *, resume: Path | None = None) -> tuple[Path, Path]:
    """(result path, run folder) of `config`; raises `UserFacingError` naming the problem and the fix."""
    method_type = method_class(config.method)
    overwrite = config.output.overwrite
    out = Path(config.output.out)
    target = output_path(out, config.output.name, method_type.result_suffix(config), overwrite=overwrite)
    method_type.check_before_load(config)
    check_writable_folder(out, "The output folder")
    for extra in method_type.output_files(target)[1:]:
        if extra.exists() and not overwrite:
            raise OutputError(f"{extra} already exists (the card or preview of an earlier {target.name}).",
                              "Pick another name, or pass --overwrite to replace the result and update its card.")
    run_dir = Path(resume) if resume else config.run_path
    check_writable_folder(run_dir, "The run folder")
    if resume is None:
        check_fresh_run_folder(run_dir, overwrite=overwrite)
    return target, run_dir
