"""The tab's behaviour over plain folders (StandaloneHost): dataset check, plan, presets, training, polling,
cancel, bad input, and the HTTP API with its path confinement. The tab's callbacks are called directly; the
browser test drives the same ones through a real page."""

from __future__ import annotations

import threading
import time

import pytest

from lib_sdcustom.config import load_config
from lib_sdcustom.host.base import OutputKind, StandaloneHost, prompt_snippet
from lib_sdcustom.run.manager import RunManager
from lib_sdcustom.ui import TabController
from lib_sdcustom.ui.render import loss_chart_svg

FAST = {"data.resolution": 64, "data.min_bucket": 64, "data.max_bucket": 128, "training.steps": 4,
        "training.sample_steps": 2, "training.save_state_every": 0, "network.rank": 4, "network.alpha": 2.0,
        "output.save_precision": "fp32", "optimizer.lr": 1e-3,
        "prior.num_class_images": 2, "prior.class_sample_steps": 2}


@pytest.fixture
def standalone(tmp_path, tiny_checkpoint, image_folder):
    import shutil

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    for item in tiny_checkpoint.parent.glob("tiny*"):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, models / "Stable-diffusion" / item.name)
    host = StandaloneHost(models, data_roots=[image_folder.parent])
    controller = TabController(host.facts(), RunManager(host))
    return controller, models, image_folder


def values(controller, folder, name, *, method="lora", token="sks", checkpoint="tiny.safetensors", **overrides):
    options = {**FAST, **{key.replace("__", "."): value for key, value in overrides.items()}}
    return [method, checkpoint, str(folder), name, token, "dog", *[options.get(f.key, f.default) for f in controller.fields]]


def test_facts_folder_check_and_plan(standalone):
    controller, models, images = standalone
    assert controller.facts.checkpoints == ["tiny.safetensors"]
    assert controller.facts.output_dirs[OutputKind.LORA] == models.resolve() / "Lora"
    (images / "img0.txt").write_text("a sks dog on grass")
    panel, thumbnails, plan, seen = controller.check_folder(*values(controller, images, "x"))
    assert "<b>4</b> images" in panel and "1 from files (25%)" in panel
    assert len(thumbnails) == 4 and max(thumbnails[0].size) <= 160
    assert seen == 4 and "4 images per epoch / batch 1 = 4 steps per epoch; 4 steps = 1.0 epochs" in plan
    assert "memory: about" in plan and str(models.resolve() / "Lora") in plan
    assert "data-family='sd1'" in plan and "model: SD1, trained at 512 px; you chose 64 px" in plan


def test_plan_follows_the_family_of_the_picked_checkpoint(standalone):
    from lib_sdcustom.testing.tiny_families import write_tiny_sdxl

    controller, models, images = standalone
    write_tiny_sdxl(models / "Stable-diffusion", name="xl")
    sd1 = controller.plan(4, *values(controller, images, "x", data__resolution=1024, data__max_bucket=1024))
    sdxl = controller.plan(4, *values(controller, images, "x", checkpoint="xl.safetensors", data__resolution=1024,
                                      data__max_bucket=1024))
    assert "data-family='sdxl'" in sdxl and "model: SDXL, trained at 1024 px" in sdxl and "you chose" not in sdxl
    assert "you chose 1024 px (set Resolution to 512" in sd1


def test_a_hypernetwork_plans_saves_as_a_preset_and_trains_into_its_folder(standalone):
    controller, models, images = standalone
    bad = controller.plan(4, *values(controller, images, "hn", method="hypernetwork", hypernetwork__layer_structure="1, x"))
    assert "sdcustom-error" in bad and "is not a comma-separated list of numbers" in bad
    assert "memory: about" in controller.plan(4, *values(controller, images, "hn", method="hypernetwork"))
    controller.save_preset("hn_preset", *values(controller, images, "hn", method="hypernetwork",
                                                hypernetwork__layer_structure="1, 1.5, 1"))
    assert load_config(controller.facts.presets_dir / "hn_preset.toml").hypernetwork.layer_structure == "1, 1.5, 1"
    [result] = controller.train("task(hn)", *values(controller, images, "hn", method="hypernetwork"))
    assert "data-state='finished'" in result and "&lt;hypernet:hn:0.8&gt;" in result, result
    assert (models / "hypernetworks" / "hn.pt").is_file()


def test_presets_are_cli_toml_and_keep_the_token_out(standalone):
    controller, models, images = standalone
    message, names = controller.save_preset("../escape", *values(controller, images, "x", training__steps=123))
    assert "sdcustom-error" in message and names == []
    message, names = controller.save_preset("small_run", *values(controller, images, "x", training__steps=123))
    assert names == ["small_run"]
    config = load_config(controller.facts.presets_dir / "small_run.toml")
    assert config.training.steps == 123 and config.data.default_caption == ""
    loaded = controller.load_preset("small_run")
    assert loaded[0] == "lora" and loaded[3 + [f.key for f in controller.fields].index("training.steps")] == 123
    assert controller.delete_preset("small_run")[1] == []
    assert "sdcustom-error" in controller.load_preset("small_run")[-1]


def test_train_writes_into_the_lora_folder_and_poll_shows_it(standalone):
    controller, models, images = standalone
    html = controller.train("", *values(controller, images, "standalone_lora"))[-1]
    assert "data-state='finished'" in html and "&lt;lora:standalone_lora:0.8&gt;" in html, html
    assert (models / "Lora" / "standalone_lora.safetensors").is_file()
    key, progress, chart, previews, result, _runs = controller.poll("")
    assert "data-state='finished'" in progress and "data-step='4'" in progress
    assert "data-points='4'" in chart and "<polyline" in chart
    assert len(previews) == 1 and "data-state='finished'" in result
    assert controller.poll(key)[1:] == controller.poll(key)[1:]  # unchanged -> all "no change" markers


def test_cancel_stops_a_run_cleanly(standalone):
    controller, models, images = standalone
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(html=controller.train(
        "", *values(controller, images, "cancelled_lora", training__steps=400))[-1]))
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (controller.status() and controller.status().step >= 1):
        time.sleep(0.05)
    assert "Cancelling" in controller.cancel()
    thread.join(60)
    assert "data-state='cancelled'" in outcome["html"], outcome
    assert not (models / "Lora" / "cancelled_lora.safetensors").exists()
    assert "Nothing is training" in controller.cancel()


@pytest.mark.parametrize("case", ["empty folder", "missing token", "existing name", "sdxl refiner", "no checkpoint"])
def test_bad_input_is_a_message_and_nothing_is_written(standalone, tmp_path, case):
    import torch
    from safetensors.torch import save_file

    controller, models, images = standalone
    folder, token, checkpoint = images, "sks", "tiny.safetensors"
    if case == "empty folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "missing token":
        token = " "
    elif case == "existing name":
        (models / "Lora").mkdir()
        (models / "Lora" / "bad.safetensors").write_bytes(b"keep")
    elif case == "sdxl refiner":
        checkpoint = "refiner.safetensors"
        save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1280),
                   "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(models / "Stable-diffusion" / checkpoint))
    else:
        checkpoint = "../../elsewhere.safetensors"
    before = sorted(models.rglob("*"))
    html = controller.train("", *values(controller, folder, "bad", token=token, checkpoint=checkpoint))[-1]
    assert "sdcustom-error" in html and "Fix:" in html, html
    assert {"empty folder": "image", "missing token": "No token", "existing name": "already exists",
            "sdxl refiner": "SDXL refiner", "no checkpoint": "not in"}[case] in html
    assert sorted(models.rglob("*")) == before


def test_api_confines_paths_and_runs_in_the_background(standalone):
    fastapi = pytest.importorskip("fastapi")
    from http_helpers import http, serve

    from lib_sdcustom.host.api import register_routes

    controller, models, images = standalone
    app = fastapi.FastAPI()
    register_routes(app, controller.manager, roots=controller.facts.allowed_roots)
    run = {"method": "lora", "checkpoint": "tiny.safetensors", "data": {"data": str(images), "resolution": 64, "min_bucket": 64,
                                                                          "max_bucket": 128, "default_caption": "sks"},
           "output": {"name": "api_lora"}, "training": {"steps": 3, "sample_steps": 2, "save_state_every": 0}}
    with serve(app) as base:
        code, body = http(f"{base}/sdcustom/v1/runs", {**run, "output": {"name": "x", "out": "/etc"}})
        assert code == 400 and "outside" in body["detail"]["problem"]
        code, body = http(f"{base}/sdcustom/v1/runs", {**run, "typo": 1})
        assert code == 400 and "Unknown setting 'typo'" in body["detail"]["problem"]
        code, started = http(f"{base}/sdcustom/v1/runs", run)
        assert code == 200 and started["state"] == "running"
        final = controller.manager.wait(started["id"], timeout=120)
        code, status = http(f"{base}/sdcustom/v1/runs/{started['id']}")
        assert status["state"] == "finished" == final.state and status["step"] == 3 and len(status["losses"]) == 3
        assert status["result"] == str(models.resolve() / "Lora" / "api_lora.safetensors")
        assert http(f"{base}/sdcustom/v1/runs")[1][0]["id"] == started["id"]
        assert http(f"{base}/sdcustom/v1/runs/{started['id']}/cancel", {})[1] == {"cancelled": False}


def test_renderers_survive_odd_values():
    svg = loss_chart_svg([(1, float("nan")), (2, 0.5), (3, 0.5)])
    assert "data-points='3'" in svg and "nan" not in svg.split("data-points")[1]
    assert loss_chart_svg([]).startswith("<svg")
    assert prompt_snippet("lora", "x") == "<lora:x:0.8>" and prompt_snippet("textual_inversion", "emb") == "emb"
