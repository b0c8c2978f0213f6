"""README's main-job command works offline on the bundled micro-world model and says where its files went."""

from __future__ import annotations

from PIL import Image

from lib_sdcustom.cli import main
from lib_sdcustom.microworld.model import shipped_checkpoint


def test_demo_writes_a_lora_and_a_before_after_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "demo" / "Lora" / "demo_lora.safetensors"
    grid = tmp_path / "demo" / "before_after.png"
    images = tmp_path / "demo" / "images"
    assert lora.is_file() and grid.is_file()
    assert len(list(images.glob("*.png"))) == len(list(images.glob("*.txt"))) == 5
    for path in (lora, grid, images, shipped_checkpoint()):
        assert str(path) in printed
    assert "The judge sees a red heart in" in printed
    assert Image.open(grid).size == (512, 256)
