"""`.pt` files the host's restricted unpickler accepts (docs/host-formats.md#extension-loading).

Inside the WebUI, `torch.load` first passes every zip entry name through `modules/safe.py` and refuses any
entry other than `data.pkl`, `data/N`, `version`, `byteorder` and `.data/serialization_id`. torch >= 2.2
adds `.format_version` and `.storage_alignment`, which torch itself reads as optional, so they are dropped
and the host (torch 2.1.2 and newer) accepts the file whichever torch wrote it. What is pickled must be plain
containers, strings, numbers and tensors: the unpickler allows no other global.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

HOST_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")


def save_for_host(data: Any, path: Path) -> None:
    """`torch.save(data, path)`, keeping only the zip entries the host's safe unpickler allows."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dest:
        for info in source.infolist():
            if HOST_ZIP_ENTRY.match(info.filename):
                dest.writestr(info, source.read(info))
