"""Textual Inversion embedding files in the layouts the host reads (HOST.md 3a); the only code that names
their keys.

- `.safetensors`: one tensor `emb_params` [n, dim] - the host's 'single tensor' layout, the only non-SDXL
  layout a safetensors file can hold (no nested dicts), and what kohya's trainer writes.
- `.pt`: the host's own dict, as its built-in trainer writes it (`string_to_param {'*': tensor}`, `name`,
  `step`, `sd_checkpoint`, ...). diffusers takes the token from `name`, the host from the file stem, so
  `name` is always the stem.

The host loads `.pt` files through a restricted unpickler that also refuses zip entries other than
`data.pkl`, `data/N`, `version`, `byteorder` and `.data/serialization_id`. torch >= 2.2 adds
`.format_version` and `.storage_alignment`, which torch reads as optional, so we drop them and the host
(torch 2.1.2) accepts the file whichever torch wrote it.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ModelLoadError
from ..files import write_atomically
from ..models.bundle import BaseIdentity

EmbeddingFormat = Literal["safetensors", "pt"]
EmbeddingLayout = Literal["a1111_dict", "sdxl_dual", "single_tensor"]
SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "pt": ".pt"}
TENSOR_KEY = "emb_params"
#: What the host's own writer stores under `string_to_token`; nothing reads it, but tools compare layouts.
A1111_PLACEHOLDER_TOKEN_ID = 265
HOST_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def write_embedding(target: Path, vectors: torch.Tensor, *, name: str, step: int, base: BaseIdentity,
                    fmt: EmbeddingFormat) -> Path:
    """Write `vectors` [n, dim] atomically to `target` in `fmt`; return `target`.

    Vectors are stored in float32 whatever the run's save precision: the host loads them as float32, a
    vector is 3 KiB, and a rounded copy would no longer reproduce what the trainer previewed.
    """
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"embedding vectors must be [n, dim], got {tuple(vectors.shape)}")
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown embedding format {fmt!r}")
    plain = vectors.detach().to("cpu", torch.float32).contiguous().clone()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"name": name, "step": str(int(step)), "sd_checkpoint": base.shorthash or "",
                    "sd_checkpoint_name": base.name or ""}
        return write_atomically(Path(target), lambda tmp: save_file({TENSOR_KEY: plain}, str(tmp), metadata=metadata))
    data = {
        "string_to_token": {"*": A1111_PLACEHOLDER_TOKEN_ID},
        "string_to_param": {"*": plain},
        "name": name,
        "step": int(step),
        "sd_checkpoint": base.shorthash,
        "sd_checkpoint_name": base.name or None,
    }
    return write_atomically(Path(target), lambda tmp: _save_for_host(data, tmp))


def _save_for_host(data: dict[str, Any], path: Path) -> None:
    """`torch.save`, keeping only the zip entries the host's safe unpickler allows (see module docstring)."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dest:
        for info in source.infolist():
            if HOST_ZIP_ENTRY.match(info.filename):
                dest.writestr(info, source.read(info))


def read_embedding(path: Path) -> dict[str, Any]:
    """The raw contents of an embedding file: a safetensors dict, or a pickled dict loaded weights-only."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zipfile and the unpickler each raise their own types
        raise ModelLoadError(f"Could not read the embedding {path}: {error}.",
                             "Check that the file is a complete .safetensors or .pt embedding.") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not an embedding dict.",
                             "Use a file written by a Textual Inversion trainer.")
    return data


def classify_embedding(data: dict[str, Any]) -> EmbeddingLayout:
    """Which of the host's recognised layouts `data` is, tried in the host's order
    (`create_embedding_from_data`); raise ModelLoadError where the host would refuse it."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # the host unwraps a ParameterDict the same way
        if len(params) != 1:
            raise ModelLoadError(f"The embedding holds {len(params)} terms in string_to_param; the host needs exactly one.",
                                 "Save one embedding per file.")
        return "a1111_dict"
    if "clip_l" in data and "clip_g" in data:
        return "sdxl_dual"
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return "single_tensor"
    raise ModelLoadError(f"The embedding has keys {sorted(data)}, which the host reads as neither a textual inversion "
                         "embedding nor a diffusers concept.", "Use a file written by a Textual Inversion trainer.")


def embedding_vectors(data: dict[str, Any]) -> torch.Tensor:
    """The vectors [n, dim] the host takes from an SD1/SD2 embedding (SDXL pairs have two; read them by key)."""
    layout = classify_embedding(data)
    if layout == "sdxl_dual":
        raise ValueError("an SDXL embedding holds two tensors; read data['clip_l'] and data['clip_g']")
    if layout == "a1111_dict":
        params = data["string_to_param"]
        vectors = next(iter(getattr(params, "_parameters", params).values()))
    else:
        vectors = next(iter(data.values()))
    vectors = vectors.detach()
    return vectors[None] if vectors.ndim == 1 else vectors


def write_embedding_preview(target: Path, image: Any) -> Path:
    """`NAME.preview.png` beside the embedding: the host's card shows it, and its embedding loader skips
    `*.preview.*` images instead of probing them for embedded data."""
    path = Path(target).with_suffix(".preview.png")
    picture = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
