"""Named presets: the tab's settings saved as the same TOML file `python -m lib_sdcustom train --config` reads."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, dumps_toml, load_config
from ..errors import ConfigError
from ..files import validate_output_name, write_text_atomically

SUFFIX = ".toml"


def _path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{validate_output_name(name)}{SUFFIX}"


def list_presets(folder: Path) -> list[str]:
    folder = Path(folder)
    return sorted(path.stem for path in folder.glob(f"*{SUFFIX}") if path.is_file()) if folder.is_dir() else []


def save_preset(folder: Path, name: str, config: RunConfig) -> Path:
    """Write (or replace: saving a preset again is how it is updated) `folder/NAME.toml`."""
    path = _path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, dumps_toml(config))


def load_preset(folder: Path, name: str) -> RunConfig:
    path = _path(folder, name)
    if not path.is_file():
        raise ConfigError(f"There is no preset named {name!r} in {folder}.", "Pick a preset from the list.")
    return load_config(path)


def delete_preset(folder: Path, name: str) -> None:
    path = _path(folder, name)
    if not path.is_file():
        raise ConfigError(f"There is no preset named {name!r} in {folder}.", "Pick a preset from the list.")
    path.unlink()
