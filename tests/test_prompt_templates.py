from __future__ import annotations

import pytest

from lib_sdcustom.data.prompt_templates import fill_template, load_templates
from lib_sdcustom.errors import ConfigError


def test_fill_template_replaces_and_tidies() -> None:
    assert fill_template("a photo of [name], [filewords]", name="sks dog", filewords="on grass") == "a photo of sks dog, on grass"
    assert fill_template("a photo of [name], [filewords]", name="sks dog", filewords="") == "a photo of sks dog"
    assert fill_template("[filewords], art by [name]", name="zyx", filewords="") == "art by zyx"


def test_templates_built_in_and_from_file(tmp_path) -> None:
    assert all("[name]" in line for line in load_templates("object"))
    assert load_templates("captions") == ("[filewords]",)
    path = tmp_path / "mine.txt"
    path.write_text("\ufeffa [name]\n\n[filewords] by [name]\n", encoding="utf-8")
    assert load_templates(str(path)) == ("a [name]", "[filewords] by [name]")
    with pytest.raises(ConfigError, match="neither"):
        load_templates(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="no prompts"):
        load_templates(str(tmp_path / "empty.txt"))
