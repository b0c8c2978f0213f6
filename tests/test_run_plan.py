"""One plan per run: the image folder is decoded once for planning whether the run comes from the tab (Check
folder, then Train), the API or the CLI; the kept scan is dropped when the folder changes; a plan's checks
come before any model loads."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from test_extension_standalone import standalone, values  # noqa: F401 - the tab over plain folders

from lib_sdcustom.config import RunConfig
from lib_sdcustom.data import images, latent_cache, scan
from lib_sdcustom.data.scan import ScanCache
from lib_sdcustom.errors import ConfigError, DatasetError
from lib_sdcustom.run.plan import plan_run
from lib_sdcustom.run.train import train


class DecodeCounter:
    """Counts picture decodes per file: all of them (every path ends in `images._open_fully`), those of the
    folder scan (planning) and those of latent caching."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.all: Counter[str] = Counter()
        self.planning: Counter[str] = Counter()
        self.latent_caching: Counter[str] = Counter()
        monkeypatch.setattr(images, "_open_fully", self._counted(images._open_fully, self.all))
        monkeypatch.setattr(scan, "decode_rgb", self._counted(scan.decode_rgb, self.planning))
        monkeypatch.setattr(latent_cache, "decode_rgb", self._counted(latent_cache.decode_rgb, self.latent_caching))

    @staticmethod
    def _counted(decode, counter: Counter[str]):
        def counted(data: bytes, path: Path):
            counter[Path(path).name] += 1
            return decode(data, path)

        return counted


def _pictures(folder: Path) -> dict[str, int]:
    return {path.name: 1 for path in folder.glob("*.png")}


def _training_decodes(counter: Counter[str], folder: Path) -> Counter[str]:
    return Counter({name: count for name, count in counter.items() if (folder / name).is_file()})


def test_a_tab_run_decodes_each_image_once_for_planning(standalone, monkeypatch):  # noqa: F811
    """Check folder, then Train: the check, the run manager's check before it takes the slot, its plan when the
    run starts and `train()` share one scan. Besides it, latent caching decodes each picture once to encode it
    (flip is off, so one variant each), and nothing else decodes a training picture; the tab's thumbnails are
    small display copies opened by Pillow directly, not training decodes."""
    controller, models, folder = standalone
    decodes = DecodeCounter(monkeypatch)
    form = values(controller, folder, "counted")
    panel, *_ = controller.check_folder(*form)
    assert "<b>4</b> images" in panel
    assert decodes.planning == _pictures(folder)
    html = controller.train("", *form)[-1]
    assert "data-state='finished'" in html, html
    assert decodes.planning == _pictures(folder)
    pictures = _training_decodes(decodes.latent_caching, folder)  # the class images (prior preservation) aside
    assert pictures == _pictures(folder)
    assert _training_decodes(decodes.all, folder) == decodes.planning + pictures


def test_an_api_run_decodes_each_image_once_for_planning(standalone, monkeypatch):  # noqa: F811
    """The API's start checks the run before answering and plans it again when the thread starts it."""
    controller, models, folder = standalone
    decodes = DecodeCounter(monkeypatch)
    config = controller.config(*values(controller, folder, "api_counted"))
    controller.host.prepare(config, "tiny.safetensors")
    started = controller.manager.start(config)
    final = controller.manager.wait(started.id, timeout=300)
    assert final is not None and final.state == "finished", final
    assert decodes.planning == _pictures(folder)
    pictures = _training_decodes(decodes.latent_caching, folder)
    assert _training_decodes(decodes.all, folder) == decodes.planning + pictures == pictures + pictures


def _cli_config(tiny_checkpoint: Path, folder: Path, out: Path) -> RunConfig:
    config = RunConfig(method="lora")
    config.model.base, config.data.data = str(tiny_checkpoint), str(folder)
    config.output.name, config.output.out = "cli_counted", str(out)
    config.data.resolution, config.network.rank = 64, 4
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 1, 2, 0
    return config


def test_a_cli_run_decodes_each_image_once_for_planning(tiny_checkpoint, image_folder, tmp_path, monkeypatch):
    decodes = DecodeCounter(monkeypatch)
    result = train(_cli_config(tiny_checkpoint, image_folder, tmp_path / "out"))
    assert result.outputs and decodes.planning == _pictures(image_folder)
    assert decodes.all == decodes.planning + decodes.latent_caching


def test_the_kept_scan_is_dropped_when_the_folder_changes(image_folder, monkeypatch):
    decodes = DecodeCounter(monkeypatch)
    caption = image_folder / "img0.txt"
    caption.write_text("a sks dog on grass")
    scans = ScanCache()
    first = scans.scan(image_folder, default_caption="sks dog")
    assert scans.scan(image_folder, default_caption="sks dog") is first
    assert scans.scan(image_folder, default_caption="sks cat") is not first  # other options: a scan of their own
    caption.write_text("a sks cat on grass")  # the same size: only the modification time tells
    os.utime(caption, ns=(1, 1))  # one no earlier scan saw, however coarse the file system's clock
    assert scans.scan(image_folder, default_caption="sks dog").records[0].caption == "a sks cat on grass"
    (image_folder / "img1.png").unlink()
    assert len(scans.scan(image_folder, default_caption="sks dog").records) == len(first.records) - 1
    assert decodes.planning["img0.png"] == 4  # the first scan, the other options, each change


def test_a_missing_folder_is_reported_not_kept(tmp_path):
    scans = ScanCache()
    with pytest.raises(DatasetError, match="does not exist"):
        scans.scan(tmp_path / "nowhere")


def test_the_plan_checks_before_any_model_loads(tiny_checkpoint, image_folder, tmp_path):
    config = _cli_config(tiny_checkpoint, image_folder, tmp_path / "out")
    plan = plan_run(config)
    assert plan.target == (tmp_path / "out" / "cli_counted.safetensors") and plan.saved_state is None
    assert plan.spec.name == "lora" and plan.method_type.__name__ == "NetworkMethod"
    assert len(plan.training_set.records) == len(_pictures(image_folder)) and plan.warnings == plan.scan.warnings
    config.training.steps = 0
    with pytest.raises(ConfigError, match="--steps"):
        plan_run(config)
    with pytest.raises(TypeError, match="resume"):
        train(plan, resume=tmp_path)
