"""Reading `.safetensors` headers and files without trusting them.

The header (8-byte little-endian length, then JSON) names every tensor's dtype and shape, so a report on a
multi-gigabyte checkpoint needs no tensor data at all. Parsing it ourselves also lets a file that is not
safetensors fail with a message that names the file, instead of a Rust panic string.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelLoadError

# The host refuses headers that do not start like a JSON object; 100 MB is safetensors' own header limit.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: "F16", "F32", "BF16", "I64", ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int] = (0, 0)  # begin, end within the data section


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where the tensor-data section starts (what the addnet hash covers)


def _not_safetensors(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a readable .safetensors file: {why}.",
        "Check that the download finished, or re-save the file with safetensors.",
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Parse the JSON header of `path` (no tensor data is read)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, "it is shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(path, f"the header claims {length} bytes")
        raw = handle.read(length)
    if not raw.lstrip().startswith(b"{"):
        raise _not_safetensors(path, "the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _not_safetensors(path, f"the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if not isinstance(entry, dict) or "dtype" not in entry or "shape" not in entry:
            raise _not_safetensors(path, f"entry {key!r} has no dtype/shape")
        info = TensorInfo(dtype=str(entry["dtype"]), shape=tuple(int(n) for n in entry["shape"]))
        offsets = entry.get("data_offsets")
        tensors[key] = replace(info, data_offsets=_check_extent(path, key, info, offsets, data_bytes))
    return SafetensorsHeader(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                             data_offset=8 + length)


#: Bytes per element of each safetensors dtype name.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _check_extent(path: Path, key: str, info: TensorInfo, offsets: object, data_bytes: int) -> tuple[int, int]:
    """The tensor's (begin, end) in the data section. A header that promises more data than the file holds is
    a cut-off download, not a model: say so here rather than report a healthy file and fail at load time."""
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise _not_safetensors(path, f"entry {key!r} has no valid data_offsets")
    start, end = offsets
    if not 0 <= start <= end:
        raise _not_safetensors(path, f"entry {key!r} has data_offsets {offsets}")
    if end > data_bytes:
        raise _not_safetensors(path, f"it is cut off: tensor {key!r} ends at byte {end} of the data, but the file "
                                     f"holds only {max(data_bytes, 0)} data bytes (an incomplete download or copy)")
    itemsize = _DTYPE_BYTES.get(info.dtype)
    numel = 1
    for n in info.shape:
        numel *= n
    if itemsize is not None and (end - start) != numel * itemsize:
        raise _not_safetensors(path, f"tensor {key!r} ({info.dtype} {list(info.shape)}) needs {numel * itemsize} bytes "
                                     f"but its data_offsets span {end - start}")
    return start, end


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """The exact bytes of a `.safetensors` file holding `tensors` and `metadata`."""
    return bytes(safetensors.torch.save(tensors, metadata=metadata or None))


def load_tensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load `keys` (all when None) from `path` onto the CPU."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            wanted = list(handle.keys()) if keys is None else keys
            return {key: handle.get_tensor(key) for key in wanted}
    except (OSError, SafetensorError) as error:
        raise _not_safetensors(path, str(error)) from error
