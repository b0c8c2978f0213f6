"""Preview and user-metadata files beside a model, in the host editor's exact layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lib_sdcustom.formats.sidecars import sd_version_for, write_sidecars
from lib_sdcustom.models.bundle import ModelFamily

HOST_EDITOR_KEYS = {"description", "sd version", "activation text", "preferred weight", "negative text", "notes"}


def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_style.safetensors"
    path.write_bytes(b"model bytes")
    return path


def test_writes_png_and_json_with_the_host_keys(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    written = write_sidecars(model, preview=Image.new("RGB", (16, 8), (200, 10, 10)), activation_text="sks dog",
                             preferred_weight=0.8, sd_version=sd_version_for(ModelFamily.SDXL), description="a dog")
    assert written == [tmp_path / "my_style.png", tmp_path / "my_style.json"]
    data = json.loads((tmp_path / "my_style.json").read_text(encoding="utf-8"))
    assert set(data) == HOST_EDITOR_KEYS
    assert data == {"description": "a dog", "sd version": "SDXL", "activation text": "sks dog",
                    "preferred weight": 0.8, "negative text": "", "notes": ""}
    with Image.open(tmp_path / "my_style.png") as image:
        assert image.format == "PNG" and image.size == (16, 8)
    assert model.read_bytes() == b"model bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_style.json", "my_style.png", "my_style.safetensors"]


def test_existing_user_keys_survive_and_ours_are_updated(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    (tmp_path / "my_style.json").write_text(json.dumps({"vae": "my.vae.pt", "activation text": "old"}), encoding="utf-8")
    write_sidecars(model, preview=None, activation_text="new", preferred_weight=1, sd_version="SD1", notes="ü")
    data = json.loads((tmp_path / "my_style.json").read_text(encoding="utf-8"))
    assert data["vae"] == "my.vae.pt" and data["activation text"] == "new" and data["notes"] == "ü"
    assert isinstance(data["preferred weight"], float)
    assert not (tmp_path / "my_style.png").exists()
    assert "ü" in (tmp_path / "my_style.json").read_text(encoding="utf-8")  # ensure_ascii=False like the host


def test_unreadable_existing_json_is_replaced(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    (tmp_path / "my_style.json").write_text("{not json", encoding="utf-8")
    write_sidecars(model, preview=None, activation_text="", preferred_weight=0, sd_version="SD2")
    assert set(json.loads((tmp_path / "my_style.json").read_text(encoding="utf-8"))) == HOST_EDITOR_KEYS


def test_cmyk_preview_is_saved_as_rgb_png(tmp_path: Path) -> None:
    model = model_file(tmp_path)
    write_sidecars(model, preview=Image.new("CMYK", (4, 4)), activation_text="", preferred_weight=0, sd_version="SD1")
    with Image.open(tmp_path / "my_style.png") as image:
        assert image.mode == "RGB"


@pytest.mark.parametrize("name", ["model.json", "model.png"])
def test_never_overwrites_the_model(tmp_path: Path, name: str) -> None:
    model = tmp_path / name
    model.write_bytes(b"model")
    with pytest.raises(ValueError, match="overwrite"):
        write_sidecars(model, preview=Image.new("RGB", (2, 2)), activation_text="", preferred_weight=0, sd_version="SD1")
    assert model.read_bytes() == b"model"


def test_rejects_unknown_sd_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sd_version"):
        write_sidecars(model_file(tmp_path), preview=None, activation_text="", preferred_weight=0, sd_version="sd15")


@pytest.mark.parametrize("captions, expected", [
    (["a sks shape on a red background", "a sks shape on a gray background", "A sks shape on a green background"],
     "sks shape"),
    (["photo of sks dog, sitting", "a photo of sks dog on grass"], "sks dog"),
    (["a red circle", "a blue square"], ""),
    ([], ""),
])
def test_shared_phrase_is_the_subject_every_caption_names(captions, expected) -> None:
    from lib_sdcustom.methods.base import shared_phrase

    assert shared_phrase(captions) == expected


def test_activation_text_is_the_trained_phrase_not_the_file_name() -> None:
    """Captioned images and no default caption (an API run): the card must insert what the images trained."""
    from lib_sdcustom.config import RunConfig
    from lib_sdcustom.methods.registry import method_class

    config = RunConfig(method="locon")
    config.output.name = "sks_heart"
    captions = ["a sks shape on a red background", "a sks shape on a gray background"]
    assert method_class("locon").trigger_phrase(config, captions) == "sks shape"
    assert method_class("locon").trigger_phrase(config, ["a red circle", "a blue square"]) == "sks_heart"
    config.data.default_caption = "sks heart"
    assert method_class("locon").trigger_phrase(config, captions) == "sks heart"
    dreambooth_lora = RunConfig(method="dreambooth_lora")
    dreambooth_lora.dreambooth.instance_prompt = "[filewords]"
    assert method_class("dreambooth_lora").trigger_phrase(dreambooth_lora, captions) == "sks shape"
    dreambooth_lora.dreambooth.instance_prompt = "a photo of sks dog"
    assert method_class("dreambooth_lora").trigger_phrase(dreambooth_lora, captions) == "a photo of sks dog"
