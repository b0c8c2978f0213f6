"""scan_dataset: layouts, captions, repeats, skipped files and the errors for unusable folders."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from lib_sdcustom.data.scan import parse_repeat_folder, scan_dataset
from lib_sdcustom.errors import ConfigError, DatasetError


def _image(path, size=(96, 64), color=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_flat_folder_with_captions_and_bom(tmp_path):
    _image(tmp_path / "b.png", color=(1, 2, 3))
    _image(tmp_path / "a.jpg", size=(64, 128))
    (tmp_path / "a.txt").write_bytes("\ufeff  sks dog, on grass \n".encode("utf-8"))
    scan = scan_dataset(tmp_path, default_caption="sks dog")
    assert [record.path.name for record in scan.records] == ["a.jpg", "b.png"]
    first, second = scan.records
    assert (first.caption, first.caption_source) == ("sks dog, on grass", "file")
    assert (second.caption, second.caption_source) == ("sks dog", "folder")
    assert first.size == (64, 128) and first.repeats == 1 and first.subfolder == ""
    assert second.sha256 == hashlib.sha256((tmp_path / "b.png").read_bytes()).hexdigest()
    assert scan.skipped == () and scan.images_per_epoch == 2


def test_kohya_repeat_folders(tmp_path):
    _image(tmp_path / "10_sks dog" / "one.png")
    _image(tmp_path / "10_sks dog" / "two.webp", color=(9, 9, 9))
    (tmp_path / "10_sks dog" / "two.txt").write_text("sks dog, running", encoding="utf-8")
    _image(tmp_path / "2_dog" / "three.png", color=(5, 5, 5))
    _image(tmp_path / "top.png", color=(7, 7, 7))
    _image(tmp_path / "misc" / "ignored.png")
    scan = scan_dataset(tmp_path, default_repeats=3)
    by_name = {record.path.name: record for record in scan.records}
    assert set(by_name) == {"one.png", "two.webp", "three.png", "top.png"}
    assert (by_name["one.png"].repeats, by_name["one.png"].caption) == (10, "sks dog")
    assert by_name["one.png"].subfolder == "10_sks dog"
    assert by_name["two.webp"].caption == "sks dog, running"
    assert (by_name["three.png"].repeats, by_name["three.png"].caption) == (2, "dog")
    assert (by_name["top.png"].repeats, by_name["top.png"].caption_source) == (3, "none")
    assert scan.images_per_epoch == 10 + 10 + 2 + 3
    assert any("misc" in warning and "10_sks dog" in warning for warning in scan.warnings)


def test_parse_repeat_folder():
    assert parse_repeat_folder("10_sks dog") == (10, "sks dog")
    assert parse_repeat_folder("3_a_b") == (3, "a_b")
    assert parse_repeat_folder("dogs") is None
    assert parse_repeat_folder("x_10") is None


def test_truncated_png_among_good_ones_is_skipped_by_name(tmp_path):
    _image(tmp_path / "good1.png")
    _image(tmp_path / "good2.png", color=(3, 3, 3))
    bad = _image(tmp_path / "broken.png", size=(256, 256))
    bad.write_bytes(bad.read_bytes()[:200])
    scan = scan_dataset(tmp_path)  # the caller shows scan.warnings; the scan itself logs nothing (no echo)
    assert [record.path.name for record in scan.records] == ["good1.png", "good2.png"]
    assert [item.path.name for item in scan.skipped] == ["broken.png"]
    assert "broken.png" in scan.skipped[0].reason
    assert any("broken.png" in warning for warning in scan.warnings)


def test_text_file_named_png_and_tiny_image_are_skipped(tmp_path):
    _image(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_text("hello", encoding="utf-8")
    _image(tmp_path / "dot.png", size=(1, 1))
    scan = scan_dataset(tmp_path)
    assert [record.path.name for record in scan.records] == ["ok.png"]
    reasons = {item.path.name: item.reason for item in scan.skipped}
    assert "not an image" in reasons["fake.png"]
    assert "1x1" in reasons["dot.png"]


def test_duplicates_and_hidden_files(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "copy.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    scan = scan_dataset(tmp_path)
    assert len(scan.records) == 2 and scan.skipped == ()
    assert any("Identical images" in warning for warning in scan.warnings)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path):
    path = _image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(path)


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"No images in .*It is empty") as error:
        scan_dataset(tmp_path)
    assert ".png" in error.value.fix


def test_only_caption_files(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("sks dog", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"No images in .*3 other file\(s\), e.g. a.txt"):
        scan_dataset(tmp_path)


def test_nothing_usable_left(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    _image(tmp_path / "b.png", size=(4, 4))
    with pytest.raises(DatasetError, match=r"None of the 2 images .* can be used.*a\.jpg.*b\.png") as error:
        scan_dataset(tmp_path)
    assert str(tmp_path) in error.value.problem


def test_a_caption_with_bad_bytes_stops_the_scan_naming_the_file(tmp_path):
    """Skipping the image (as before) trained without it and still exited 0: a silent loss."""
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", color=(0, 0, 0))
    (tmp_path / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError) as raised:
        scan_dataset(tmp_path)
    assert "b.txt is not valid UTF-8" in raised.value.problem and "byte 3" in raised.value.problem
    assert "UTF-8" in raised.value.fix


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_captions_with_a_byte_order_mark_are_read(tmp_path, encoding):
    _image(tmp_path / "a.png")
    data = "sks dog, red ball\n".encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    (tmp_path / "a.txt").write_bytes(data)
    assert scan_dataset(tmp_path).records[0].caption == "sks dog, red ball"


def test_bad_options(tmp_path):
    _image(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="Repeats"):
        scan_dataset(tmp_path, default_repeats=0)
    assert scan_dataset(tmp_path, caption_extension="caption").records[0].caption == ""
