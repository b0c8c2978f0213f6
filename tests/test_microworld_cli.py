"""`python -m lib_sdcustom.microworld samples`: a captioned image folder, never overwritten silently."""

from PIL import Image

from lib_sdcustom.microworld.__main__ import main
from lib_sdcustom.microworld.world import caption_variants, concept_scenes


def test_samples_writes_a_captioned_folder_and_a_grid(tmp_path):
    assert main(["samples", str(tmp_path), "--n", "3", "--concept", "orange_star", "--seed", "4"]) == 0
    scenes = list(concept_scenes("orange_star", 4, 3))
    for index, scene in enumerate(scenes):
        assert (tmp_path / f"{index:04d}.txt").read_text() == caption_variants(scene)[0] + "\n"
        assert Image.open(tmp_path / f"{index:04d}.png").size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size == (16 * 64, 64)


def test_samples_refuses_to_overwrite_without_the_flag(tmp_path):
    assert main(["samples", str(tmp_path), "--n", "1"]) == 0
    before = (tmp_path / "0000.png").read_bytes()
    assert main(["samples", str(tmp_path), "--n", "1", "--seed", "9"]) == 2
    assert (tmp_path / "0000.png").read_bytes() == before
    assert main(["samples", str(tmp_path), "--n", "1", "--seed", "9", "--overwrite"]) == 0
    assert (tmp_path / "0000.png").read_bytes() != before
