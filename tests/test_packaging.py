"""The README's install step (`pip install .` / `-e .`) gives a package that works from any folder: the
`sdcustom` command and `python -m lib_sdcustom` run outside the clone and find their bundled data (the CLIP
tokenizer, the micro-world model and judge), which only reaches an installed copy through package-data.

The package is installed without its dependencies (they are this environment's), so nothing is downloaded and
the check costs one copy of the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What pyproject.toml builds the package from.
BUILD_INPUTS = ("pyproject.toml", "README.md", "requirements.txt", "lib_sdcustom")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A regular (non-editable) install of this clone into a folder of its own; returns that folder.

    `pip install --target` keeps the dependencies where they are (this environment) and puts the `sdcustom`
    command in `bin/`; the test processes put the folder first on their path, as a site folder would be.
    """
    source = tmp_path_factory.mktemp("source")  # setuptools builds in the source tree: a copy keeps the clone clean
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name)
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(root), str(source)],
                   check=True, cwd=root, capture_output=True, text=True)
    return root


def _run(args: list[str], cwd: Path, installed: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(installed)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_is_the_one_imported_outside_the_clone(installed: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-c", "import lib_sdcustom; print(lib_sdcustom.__file__)"], tmp_path, installed)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed), result.stdout


def test_the_command_and_the_module_run_from_any_folder(installed: Path, tmp_path: Path) -> None:
    for command in ([str(installed / "bin" / "sdcustom"), "--help"], [sys.executable, "-m", "lib_sdcustom", "--help"]):
        result = _run(command, tmp_path, installed)
        assert result.returncode == 0, result.stderr
        assert "train" in result.stdout and "inspect" in result.stdout


def test_the_bundled_model_tokenizer_and_prompts_travel_with_the_package(installed: Path, tmp_path: Path) -> None:
    script = ("from lib_sdcustom.microworld.model import shipped_checkpoint\n"
              "from lib_sdcustom.models.tokenizer import load_clip_tokenizer\n"
              "from lib_sdcustom.methods.prior import plain_prompts\n"
              "print(shipped_checkpoint())\n"
              "print(load_clip_tokenizer()('a sks shape').input_ids)\n"
              "print(len(plain_prompts()))\n")
    result = _run([sys.executable, "-c", script], tmp_path, installed)
    assert result.returncode == 0, result.stderr
    checkpoint, ids, plain = result.stdout.strip().splitlines()
    assert int(plain) >= 50, "the --plain-prompts list is package data"
    assert Path(checkpoint).is_relative_to(installed) and Path(checkpoint).stat().st_size > 1_000_000
    assert ids.startswith("[49406") and ids.endswith("49407]")
    described = _run([str(installed / "bin" / "sdcustom"), "inspect", checkpoint], tmp_path, installed)
    assert described.returncode == 0, described.stderr
    assert "SD1" in described.stdout or "sd1" in described.stdout.lower()
