"""The preview image and user-metadata JSON the host's extra-networks cards read beside a model file.

- `NAME.png` is one of the names `find_preview` tries, so the card shows it.
- `NAME.json` holds the keys of the host's own user-metadata editor (`LoraUserMetadataEditor`):
  "activation text" is appended to the inserted prompt, "preferred weight" replaces the default multiplier,
  and "sd version" overrides the host's version guess that filters cards per loaded model.
An existing `NAME.json` is updated, not replaced, as the host's editor does, so keys the user or other
extensions added (e.g. "vae") survive a retrain.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from ..files import write_atomically, write_text_atomically
from ..models.bundle import ModelFamily

logger = logging.getLogger(__name__)

SdVersion = Literal["SD1", "SD2", "SDXL", "Unknown"]
SD_VERSIONS: tuple[str, ...] = ("SD1", "SD2", "SDXL", "Unknown")
_SD_VERSION_BY_FAMILY: dict[ModelFamily, SdVersion] = {ModelFamily.SD1: "SD1", ModelFamily.SD2: "SD2", ModelFamily.SDXL: "SDXL"}


def sd_version_for(family: ModelFamily) -> SdVersion:
    """The host's "sd version" name for a model family."""
    return _SD_VERSION_BY_FAMILY[family]


def sidecar_paths(model_path: Path) -> list[Path]:
    """The preview and user-metadata files that go beside `model_path` (the host finds them by stem)."""
    return [Path(model_path).with_suffix(".png"), Path(model_path).with_suffix(".json")]


def _existing_user_metadata(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("Replacing unreadable user metadata %s (%s).", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def write_sidecars(model_path: Path, *, preview: Any | None, activation_text: str, preferred_weight: float,
                   sd_version: SdVersion, description: str = "", notes: str = "", negative_text: str = "") -> list[Path]:
    """Write `NAME.png` (when `preview`, a PIL image, is given) and `NAME.json` beside `model_path`.

    Returns the paths written. Both are written atomically; neither can be the model file itself.
    """
    model_path = Path(model_path)
    if sd_version not in SD_VERSIONS:
        raise ValueError(f"sd_version must be one of {SD_VERSIONS}, got {sd_version!r}.")
    preview_path, json_path = sidecar_paths(model_path)
    if model_path in (preview_path, json_path):
        raise ValueError(f"Model file {model_path} has a sidecar suffix; its sidecars would overwrite it.")
    written = []
    if preview is not None:
        image = preview if preview.mode in ("RGB", "RGBA", "L") else preview.convert("RGB")
        written.append(write_atomically(preview_path, lambda tmp: image.save(tmp, format="PNG")))
    user_metadata = _existing_user_metadata(json_path)
    user_metadata.update({
        "description": description,
        "sd version": sd_version,
        "activation text": activation_text,
        "preferred weight": float(preferred_weight),
        "negative text": negative_text,
        "notes": notes,
    })
    # Same layout as the host's `write_user_metadata` (indent 4, non-ASCII kept).
    written.append(write_text_atomically(json_path, json.dumps(user_metadata, indent=4, ensure_ascii=False)))
    return written
