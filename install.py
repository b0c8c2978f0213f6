"""Run by the WebUI as a subprocess at every start and after an install from the Extensions tab.

It installs only what is missing, with pip constrained to every version already installed, so nothing the
host pinned (torch, transformers, gradio, numpy, ...) can move. When nothing is missing it makes no pip
call at all, so a normal start costs a few milliseconds. It never fails the host's start: a failure is one
line here, and the Customize tab later says what is missing and how to install it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent
PREFIX = "[SD Customize]"

PipRunner = Callable[[List[str]], int]


def _deps():
    """Our stdlib-only requirement logic, importable before any of our dependencies exist."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from lib_sdcustom import deps

    return deps


def skip_requested(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """The host's --skip-install (launch.args inside the host; COMMANDLINE_ARGS or an env var outside)."""
    try:
        import launch  # the host puts its root on PYTHONPATH for this subprocess

        if getattr(getattr(launch, "args", None), "skip_install", False):
            return True
    except Exception:  # not inside the host, or its launcher failed to import: fall back to the text
        pass
    words = list(argv) + shlex.split(environ.get("COMMANDLINE_ARGS", ""))
    return "--skip-install" in words or environ.get("SDCUSTOM_SKIP_INSTALL", "") not in ("", "0")


def run_pip(arguments: List[str]) -> int:
    """`python -m pip ...` in the host's interpreter, honouring the host's INDEX_URL like launch.run_pip."""
    command = [sys.executable, "-m", "pip", *arguments, "--prefer-binary"]
    if os.environ.get("INDEX_URL"):
        command += ["--index-url", os.environ["INDEX_URL"]]
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if completed.returncode != 0:
        tail = [line for line in completed.stdout.splitlines() if line.strip()][-1:]
        print(f"{PREFIX} pip said: {tail[0] if tail else 'nothing'}")
    return completed.returncode


def install_missing(requirements_file: Path, runner: PipRunner) -> str:
    """Install what is missing; return the one line to print."""
    deps = _deps()
    installed = deps.installed_versions()
    requirements = deps.fitted_to_host(deps.read_requirements(requirements_file), installed)
    needed = deps.missing(requirements, installed)
    odd = deps.mismatched(requirements, installed)
    note = f" Not changed (installed by the host or another extension): {'; '.join(odd)}." if odd else ""
    if not needed:
        return f"{PREFIX} requirements present.{note}" if odd else ""
    names = " ".join(r.pip_argument() for r in needed)
    with tempfile.TemporaryDirectory(prefix="sdcustom-install-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(deps.constraints_text(installed), encoding="utf-8")
        code = runner(["install", "-c", str(constraints), *[r.pip_argument() for r in needed]])
    if code != 0:
        return (f"{PREFIX} could not install {names} (pip exit {code}); the Customize tab will not train until "
                f"they are installed, e.g. with: python -m pip install {names}.{note}")
    after = deps.installed_versions()
    moved = [f"{name} {version}->{after.get(name)}" for name, version in installed.items() if after.get(name) != version]
    if moved:
        return f"{PREFIX} installed {names}, but pip changed: {', '.join(moved)}.{note}"
    return f"{PREFIX} installed {names}.{note}"


def main(argv: Optional[Sequence[str]] = None, *, runner: PipRunner = run_pip,
         environ: Optional[Mapping[str, str]] = None) -> int:
    """Always returns 0: a failed install must not stop the host from starting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    requirements_file = ROOT / "requirements.txt"
    if "--requirements" in argv:  # for tests and manual checks: another requirements file
        requirements_file = Path(argv[argv.index("--requirements") + 1])
    try:
        if skip_requested(argv, environ):
            return 0
        message = install_missing(requirements_file, runner)
    except Exception as error:  # never let the host's start fail on us
        message = f"{PREFIX} dependency check failed: {type(error).__name__}: {error}"
    if message:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
