"""install.py: installs only what is missing, moves nothing that is installed, never fails the host's start.

The decision logic runs against this interpreter with an injected pip runner; one test runs install.py for
real in a scratch venv (packages from a local wheel folder) and compares `pip freeze` before and after.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_install():
    spec = importlib.util.spec_from_file_location("sdcustom_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakePip:
    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[list[str]] = []
        self.constraints = ""

    def __call__(self, arguments: list[str]) -> int:
        self.calls.append(list(arguments))
        self.constraints = Path(arguments[arguments.index("-c") + 1]).read_text()
        return self.code


def requirements(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("# test\n" + "\n".join(lines) + "\n")
    return path


def test_nothing_missing_makes_no_pip_call_twice(tmp_path, capsys):
    install = load_install()
    pip = FakePip()
    file = requirements(tmp_path, "torch>=1.0", "numpy", "PyYAML>=5  # comment", 'tomli>=1.1; python_version < "3.0"')
    for _ in range(2):
        assert install.main(["--requirements", str(file)], runner=pip, environ={}) == 0
    assert pip.calls == []
    assert capsys.readouterr().out == ""


def test_installs_only_the_missing_one_under_constraints_of_everything_installed(tmp_path, capsys):
    from lib_sdcustom import deps

    install = load_install()
    pip = FakePip()
    file = requirements(tmp_path, "numpy", "sdcustom-surely-absent-package>=1.2")
    install.main(["--requirements", str(file)], runner=pip, environ={})
    assert pip.calls == [["install", "-c", pip.calls[0][2], "sdcustom-surely-absent-package>=1.2"]]
    pinned = dict(line.split("==", 1) for line in pip.constraints.splitlines())
    assert pinned == deps.installed_versions()
    assert "installed sdcustom-surely-absent-package>=1.2" in capsys.readouterr().out


def test_a_failed_install_is_one_line_and_exit_zero(tmp_path, capsys):
    install = load_install()
    file = requirements(tmp_path, "sdcustom-surely-absent-package")
    assert install.main(["--requirements", str(file)], runner=FakePip(code=1), environ={}) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "could not install sdcustom-surely-absent-package" in out[0]

    def broken(arguments):
        raise OSError("no pip here")

    assert install.main(["--requirements", str(file)], runner=broken, environ={}) == 0
    assert "dependency check failed: OSError: no pip here" in capsys.readouterr().out


def test_skip_install_is_honoured(tmp_path):
    install = load_install()
    pip = FakePip()
    file = requirements(tmp_path, "sdcustom-surely-absent-package")
    install.main(["--requirements", str(file)], runner=pip, environ={"COMMANDLINE_ARGS": "--xformers --skip-install"})
    install.main(["--requirements", str(file)], runner=pip, environ={"SDCUSTOM_SKIP_INSTALL": "1"})
    assert pip.calls == []


def test_present_package_at_another_version_is_reported_not_moved(tmp_path, capsys):
    install = load_install()
    pip = FakePip()
    install.main(["--requirements", str(requirements(tmp_path, "numpy<1.0"))], runner=pip, environ={})
    assert pip.calls == []
    assert "Not changed" in capsys.readouterr().out


def test_diffusers_is_capped_beside_the_hosts_old_transformers():
    from lib_sdcustom.deps import Requirement, capped, fitted_to_host

    ours = [Requirement("diffusers", ">=0.36.0,<0.43"), Requirement("ftfy", ">=6.1")]
    old = fitted_to_host(ours, {"transformers": "4.30.2"})
    assert old[0].specifier == "==0.36.0" and old[1] == ours[1]  # one bound, not '>=0.36.0,<0.43,<=0.36.0'
    assert capped(">=0.30,<0.43", "0.36.0") == ">=0.30,<=0.36.0" and capped("", "0.36.0") == "<=0.36.0"
    assert not old[0].satisfied_by("0.37.0") and old[0].satisfied_by("0.36.0")
    assert fitted_to_host(ours, {"transformers": "4.46.0"}) == ours


def _freeze(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    return sorted(out.splitlines())


def test_real_run_in_a_scratch_venv_adds_one_package_and_moves_none(tmp_path):
    wheels = tmp_path / "wheels"
    download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                               "ftfy==6.3.1", "wcwidth==0.2.6"], capture_output=True, text=True, timeout=120)
    if download.returncode != 0:
        pytest.skip(f"no package index reachable to fetch two small wheels: {download.stderr.strip()[-200:]}")
    env_dir = tmp_path / "scratch"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    offline.pop("PYTHONPATH", None)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "wcwidth==0.2.6"], env=offline, check=True)
    file = requirements(tmp_path, "wcwidth>=0.2", "ftfy>=6.1")
    before = _freeze(python)

    def run_install(log: Path) -> str:
        result = subprocess.run([str(python), str(ROOT / "install.py"), "--requirements", str(file)],
                                env={**offline, "PIP_LOG": str(log)}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = run_install(tmp_path / "first.log")
    after = _freeze(python)
    assert "installed ftfy>=6.1" in first and (tmp_path / "first.log").exists()
    assert sorted(set(after) - set(before)) == ["ftfy==6.3.1"] and set(before) <= set(after)  # wcwidth stayed 0.2.6

    second = run_install(tmp_path / "second.log")
    assert second == "" and not (tmp_path / "second.log").exists()  # PIP_LOG is written by any pip run: none ran
    assert _freeze(python) == after
