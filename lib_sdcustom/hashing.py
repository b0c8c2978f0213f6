"""The hashes the host and kohya tools show for models, computed the way they compute them.

- checkpoint `sha256`: the whole file; A1111 shows its first 10 hex as the short hash.
- `legacy_model_hash`: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (A1111's old `model_hash`,
  kohya's `ss_sd_model_hash`).
- `addnet_hash`: sha256 of a safetensors file's data section (everything after the 8-byte length and the
  JSON header), so it does not change when only metadata changes (`sshs_model_hash`, LoRA short hash).
- `addnet_legacy_hash`: the legacy window applied to the serialized bytes (`sshs_legacy_hash`).
- `state_digest`: sha256 over a loaded module's state dict (names and bytes), to show that training left a
  host's model exactly as it was.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def legacy_model_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(_LEGACY_OFFSET)
        return hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]


def _safetensors_data_offset(blob: bytes) -> int:
    (header_length,) = struct.unpack("<Q", blob[:8])
    return 8 + int(header_length)


def addnet_hash(serialized: bytes) -> str:
    """sha256 of the tensor-data section of serialized safetensors bytes."""
    return hashlib.sha256(serialized[_safetensors_data_offset(serialized):]).hexdigest()


def addnet_legacy_hash(serialized: bytes) -> str:
    return hashlib.sha256(serialized[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def addnet_hash_file(path: Path) -> str:
    """The host's `addnet_hash_safetensors` of a file on disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_length)
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def state_digest(module: Any) -> str:
    """sha256 of a torch module's state dict: every key and its tensor's bytes (as raw bytes, so bf16 works too),
    in key order."""
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
