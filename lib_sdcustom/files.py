"""Safe output paths and atomic writes.

The host caches by mtime and lists folders while we train, so a half-written file must never appear under
its final name: everything is written to a hidden temp file in the target folder and renamed into place.
Temp names carry the writer's process id, so temp files a killed process left behind can be told apart
from those of a live one and removed (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from .errors import OutputError

_FORBIDDEN_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def validate_output_name(name: str) -> str:
    """Return `name` if it is a plain file stem, else raise naming the problem.

    We refuse rather than silently rewrite: the stem is what the user types in a prompt
    (`<lora:NAME:0.8>`, the embedding's trigger word), so changing it behind their back breaks that.
    """
    stripped = name.strip()
    if not stripped:
        raise OutputError("The output name is empty.", "Give the result a name, e.g. --name my_style.")
    if stripped in {".", ".."} or "/" in stripped or "\\" in stripped or os.sep in stripped:
        raise OutputError(
            f"The output name {name!r} contains a path; it would write outside the output folder.",
            "Use a plain name without '/', '\\' or '..' and choose the folder with --out.",
        )
    bad = sorted(set(_FORBIDDEN_NAME_CHARS.findall(stripped)))
    if bad:
        raise OutputError(
            f"The output name {name!r} contains characters that cannot be used in a file name or prompt: {' '.join(bad)!s}",
            "Use letters, digits, '-', '_' or '.'.",
        )
    if stripped.lower() in _WINDOWS_RESERVED or stripped.startswith("."):
        raise OutputError(f"The output name {name!r} is reserved or hidden.", "Choose another name.")
    if len(stripped) > 120:
        raise OutputError(f"The output name is {len(stripped)} characters long.", "Use at most 120 characters.")
    return stripped


def output_path(folder: Path, name: str, suffix: str, *, overwrite: bool) -> Path:
    """The final path for an artifact, refusing to replace an existing file unless asked."""
    target = Path(folder) / f"{validate_output_name(name)}{suffix}"
    if target.exists() and not overwrite:
        raise OutputError(
            f"{target} already exists.",
            "Pick another name, or pass --overwrite to replace it.",
        )
    return target


def _nearest_existing(folder: Path) -> Path:
    probe = Path(folder).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail before training, not after, when `folder` cannot take new files: it is a file, lies under a
    file, or the folder it would be created in refuses a write (read-only disk or permissions). The
    probe writes and removes one hidden file; permission bits alone would not show a read-only mount."""
    folder = Path(folder)
    probe = _nearest_existing(folder)
    if not probe.is_dir():
        where = "is a file" if probe == folder.absolute() else f"cannot be created: {probe} is a file"
        raise OutputError(f"{what} {folder} {where}, not a folder.", f"Choose a folder for {what.lower()}.")
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix("probe"), suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        raise OutputError(f"{what} {folder} is not writable ({error.strerror or error}).",
                          f"Choose a writable folder for {what.lower()}, or fix its permissions.") from error


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before training, not after, when the result cannot fit on the disk."""
    folder = Path(folder)
    free = shutil.disk_usage(_nearest_existing(folder)).free
    if free < needed_bytes:
        raise OutputError(
            f"Not enough disk space for {what} in {folder}: needs about {needed_bytes / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free.",
            "Free some space or choose another output folder.",
        )


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target.stem), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and so do writers that replace the temp file themselves (safetensors 0.8):
        # set the mode once written, so the WebUI running as another user can read the result.
        tmp.chmod(0o666 & ~_current_umask())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # safetensors reports a full disk or a write error as its own SafetensorError, not an OSError
        if isinstance(error, (OSError, SafetensorError)):
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise OutputError(f"Could not write {target}: {why}.",
                              "Check that the folder is writable and the disk is not full.") from error
        raise


def temp_prefix(stem: str) -> str:
    """Start of a hidden temp name beside the final file; the process id lets a later run spot leftovers."""
    return f".{stem}.sdcustom-{os.getpid()}."


_TEMP_NAME = re.compile(r"^\..*\.sdcustom-(\d+)\..*\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temp files and folders (ours only, by name) whose writing process no longer runs:
    what a crash or kill -9 left behind. A live writer's temp files are left alone. Returns those removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Run `write(tmp_path)` and move the result to `target` in one rename."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_text_atomically(target: Path, text: str) -> Path:
    return write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
