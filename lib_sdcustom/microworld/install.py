"""Install the bundled micro-world model into a WebUI's checkpoint folder, in the form the WebUI loads.

As shipped (`base/`) the model suits our own loader, which anchors the YAML's text-encoder folder at the
YAML and falls back to the bundled tokenizer. The WebUI does neither: it resolves the folder against its
working directory and reads tokenizer files from it. The installed copy therefore names the folder by its
absolute path and carries the tokenizer files beside the text encoder's config. Nothing existing is
replaced unless asked: an identical install is left as it is, a different file of the same name is an error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..files import write_atomically
from ..models.model_yaml import read_ldm_yaml, with_absolute_folders, yaml_beside
from ..models.tokenizer import TOKENIZER_FILES, bundled_tokenizer_dir
from .model import BASE_NAME, SHIPPED_DIR, shipped_checkpoint, text_encoder_folder_name

if TYPE_CHECKING:
    from ..host.base import Host


@dataclass(frozen=True)
class Installed:
    checkpoint: Path
    written: list[Path]  # empty when an identical copy was there already

    def message(self) -> str:
        if not self.written:
            return f"The micro-world model is already installed as {self.checkpoint}."
        return (f"Installed the micro-world model as {self.checkpoint} ({len(self.written)} files); pick "
                f"'{self.checkpoint.name}' as the checkpoint (refresh the list first).")


def _planned_files(folder: Path) -> dict[Path, bytes]:
    """Every file of the installed model under `folder`, with its contents."""
    import yaml

    checkpoint = folder / f"{BASE_NAME}.safetensors"
    text_dir = folder / text_encoder_folder_name()
    shipped_yaml = yaml_beside(SHIPPED_DIR / f"{BASE_NAME}.safetensors")
    ldm = with_absolute_folders(read_ldm_yaml(shipped_yaml), SHIPPED_DIR)
    ldm["model"]["params"]["cond_stage_config"]["params"]["version"] = str(text_dir.resolve())
    files = {checkpoint: shipped_checkpoint().read_bytes(),
             yaml_beside(checkpoint): yaml.safe_dump(ldm, sort_keys=False).encode("utf-8"),
             text_dir / "config.json": (SHIPPED_DIR / text_encoder_folder_name() / "config.json").read_bytes()}
    files.update((text_dir / name, (bundled_tokenizer_dir() / name).read_bytes()) for name in TOKENIZER_FILES)
    return files


def install_micro_model(folder: Path, *, overwrite: bool = False) -> Installed:
    """Write the micro-world model into the checkpoint folder `folder` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"The checkpoint folder {folder} does not exist.", "Give the WebUI's models/Stable-diffusion folder.")
    files = _planned_files(folder)
    checkpoint = folder / f"{BASE_NAME}.safetensors"
    differing = [path for path, data in files.items() if path.exists() and path.read_bytes() != data]
    if differing and not overwrite:
        raise ConfigError(f"{differing[0]} exists and differs from the micro-world model's file.",
                          "Move it away, or install with overwrite to replace it.")
    missing = [path for path in files if not path.exists() or path in differing]
    for path in missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, functools.partial(Path.write_bytes, data=files[path]))
    return Installed(checkpoint, missing)


def install_into_host(host: "Host", *, overwrite: bool = False) -> Installed:
    """Install into the host's checkpoint folder and refresh its checkpoint list, so the model can be picked."""
    from ..methods.registry import OutputKind

    installed = install_micro_model(host.facts().output_dirs[OutputKind.CHECKPOINT], overwrite=overwrite)
    if installed.written:
        host.refresh(OutputKind.CHECKPOINT, [installed.checkpoint])
    return installed
