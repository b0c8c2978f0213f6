"""Atomic outputs: nothing half-written under the final name, ordinary permissions, safe names."""

from __future__ import annotations

import os
import stat

import pytest

from lib_sdcustom.errors import OutputError
from lib_sdcustom.files import output_path, write_atomically, write_text_atomically


def test_written_files_get_ordinary_permissions(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = write_text_atomically(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_leaves_nothing(tmp_path) -> None:
    def explode(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "x.safetensors", explode)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "con", ".hidden", "a<b"])
def test_unsafe_names_are_refused(tmp_path, name) -> None:
    with pytest.raises(OutputError):
        output_path(tmp_path, name, ".safetensors", overwrite=False)
