"""Bad input through the CLI: a clear message naming the problem and the fix, exit code 2, and nothing
written to the output folder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import write_images
from lib_sdcustom.cli import main


class Payload:
    """A pickled object a weights-only loader must refuse to build."""


def run_cli(capsys, tiny_checkpoint: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["train", "--base", str(tiny_checkpoint), "--data", str(data), "--name", "x", "--out", str(out),
                 "--steps", "2", "--resolution", "64", "--min-bucket", "64", "--max-bucket", "128",
                 "--sample-steps", "1", "--quiet", *extra])
    return code, capsys.readouterr().err


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _bad_data(kind: str, root: Path) -> Path:
    folder = root / "data"
    if kind == "missing":
        return folder
    folder.mkdir()
    if kind == "only_text":
        (folder / "notes.txt").write_text("hello")
    elif kind == "fake_png":
        (folder / "photo.png").write_text("this is not an image")
    elif kind == "tiny_image":
        Image.new("RGB", (1, 1)).save(folder / "dot.png")
    return folder


@pytest.mark.parametrize("kind,words", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("only_text", "no images"),
    ("fake_png", "photo.png"),
    ("tiny_image", "dot.png"),
])
def test_unusable_image_folders(capsys, tiny_checkpoint, tmp_path, kind, words):
    out = tmp_path / "out"
    code, err = run_cli(capsys, tiny_checkpoint, _bad_data(kind, tmp_path), out)
    assert code == 2
    assert words.lower() in err.lower()
    assert "Fix:" in err
    assert files_in(out) == []


@pytest.mark.parametrize("args,words", [
    (["--rank", "0"], "--rank is 0"),
    (["--optimizer", "adamx"], "invalid choice"),
    (["--name", "../x"], "outside the output folder"),
])
def test_bad_options(capsys, tiny_checkpoint, image_folder, tmp_path, args, words):
    out = tmp_path / "out"
    if args[0] == "--optimizer":  # argparse refuses unknown choices itself, with exit code 2
        with pytest.raises(SystemExit) as raised:
            run_cli(capsys, tiny_checkpoint, image_folder, out, *args)
        assert raised.value.code == 2
        assert words in capsys.readouterr().err
        return
    code, err = run_cli(capsys, tiny_checkpoint, image_folder, out, *args)
    assert code == 2 and words in err
    assert files_in(out) == []
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_not_replaced_without_consent(capsys, tiny_checkpoint, image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.safetensors").write_bytes(b"precious")
    code, err = run_cli(capsys, tiny_checkpoint, image_folder, out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "x.safetensors").read_bytes() == b"precious"


def test_a_safetensors_file_that_is_not_sd(capsys, image_folder, tmp_path):
    base = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(base))
    code, err = run_cli(capsys, base, image_folder, tmp_path / "out")
    assert code == 2 and "other.safetensors" in err and "Stable Diffusion" in err
    assert files_in(tmp_path / "out") == []


def test_a_ckpt_carrying_a_pickled_object_is_refused(capsys, image_folder, tmp_path):
    base = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Payload()}, base)
    code, err = run_cli(capsys, base, image_folder, tmp_path / "out")
    assert code == 2 and "evil.ckpt" in err and "safetensors" in err
    assert files_in(tmp_path / "out") == []


def test_truncated_png_among_good_ones_is_skipped_with_its_name(capsys, tiny_checkpoint, tmp_path):
    data = write_images(tmp_path / "data", count=3)
    good = (data / "img0.png").read_bytes()
    (data / "broken.png").write_bytes(good[: len(good) // 2])
    code, err = run_cli(capsys, tiny_checkpoint, data, tmp_path / "out")
    assert code == 0
    assert "broken.png" in err
    assert (tmp_path / "out" / "x.safetensors").is_file()


def test_odd_but_valid_images_train(capsys, tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.RandomState(0)
    rgb = Image.fromarray((rng.rand(80, 96, 3) * 255).astype("uint8"))
    rgb.convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray((rng.rand(72, 72) * 65535).astype("uint16")).save(data / "deep.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(data / "alpha.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(data / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(data / "rotated.jpg", exif=exif)
    code, err = run_cli(capsys, tiny_checkpoint, data, tmp_path / "out", "--batch-size", "2")
    assert code == 0, err
    assert (tmp_path / "out" / "x.safetensors").is_file()
