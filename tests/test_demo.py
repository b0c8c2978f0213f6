"""README's main-job command works offline and says where its files went."""

from __future__ import annotations

from PIL import Image

from lib_sdcustom.cli import main


def test_demo_writes_a_lora_and_a_before_after_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "demo" / "Lora" / "demo_lora.safetensors"
    grid = tmp_path / "demo" / "before_after.png"
    assert lora.is_file() and grid.is_file()
    assert str(lora) in printed and str(grid) in printed
    assert Image.open(grid).size == (512, 256)
