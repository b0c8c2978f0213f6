"""The extension inside a fake AUTOMATIC1111 1.10 (tests/fake_a1111): the entry script is loaded the way the
host loads it, the tab's Train callback runs through the host's GPU queue wrapper, the LoRA lands in the
host's folder, the host's lists are refreshed, `shared.state` shows progress, and the host's model is
bit-identical afterwards."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake_a1111"
FAKE_MODULES = ("modules", "networks", "fake_host")


def _forget_fake_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_MODULES:
            del sys.modules[name]


@pytest.fixture
def webui(tmp_path, tiny_checkpoint, monkeypatch):
    from lib_sdcustom import host_a1111

    _forget_fake_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    import fake_host
    from modules import call_queue, script_callbacks, shared

    model = fake_host.configure(tmp_path / "webui", tiny_checkpoint)
    monkeypatch.setattr(host_a1111, "_MANAGER", None)
    yield SimpleNamespace(root=tmp_path / "webui", lora=tmp_path / "webui" / "models" / "Lora", model=model,
                          fake=fake_host, shared=shared, callbacks=script_callbacks, call_queue=call_queue,
                          images=_images(tmp_path / "images"))
    _forget_fake_modules()


def _images(folder: Path) -> Path:
    from conftest import write_images

    return write_images(folder)


def load_entry_script():
    """As modules/script_loading.py: spec_from_file_location with the extension root on sys.path meanwhile."""
    path = ROOT / "scripts" / "sdcustom.py"
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location(path.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


FAST = {"data.resolution": 64, "data.min_bucket": 64, "data.max_bucket": 128, "training.steps": 4,
        "training.sample_steps": 2, "training.save_state_every": 0, "network.rank": 4, "network.alpha": 2.0,
        "output.save_precision": "fp32", "optimizer.lr": 1e-3}


def form_values(controller, folder: Path, name: str, *, method: str = "lora", token: str = "sks",
                subject_class: str = "dog", **overrides) -> list:
    options = {**FAST, **{key.replace("__", "."): value for key, value in overrides.items()}}
    return [method, "", str(folder), name, token, subject_class, *[options.get(f.key, f.default) for f in controller.fields]]


def tab_and_train_call(webui):
    """Load the extension, take the one tab, and find the Train callback the tab registered."""
    pytest.importorskip("gradio")
    load_entry_script()
    tabs = webui.callbacks.ui_tabs_callback()
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("Customize", "sdcustom")]
    blocks = tabs[0][0]
    functions = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    wrapped = [f.fn for f in functions if getattr(f.fn, "sdcustom_fake_wrapped", None) is not None]
    assert len(wrapped) == 1, "the Train button must go through wrap_gradio_gpu_call"
    return blocks.sdcustom_controller, wrapped[0]


def test_tab_trains_a_lora_into_the_host_folder_and_leaves_the_host_model_identical(webui):
    controller, train_call = tab_and_train_call(webui)
    before = state_hash(webui.model)

    outputs = train_call("task(abc)", *form_values(controller, webui.images, "fakelora"))

    assert "data-state='finished'" in outputs[-1], outputs[-1]
    assert (webui.lora / "fakelora.safetensors").is_file()
    assert "&lt;lora:fakelora:0.8&gt;" in outputs[-1]
    assert state_hash(webui.model) == before
    calls = [name for name, _ in webui.fake.CALLS]
    assert calls.count("networks.list_available_networks") == 1
    assert ("wrap_gradio_gpu_call", "task(abc)") in webui.fake.CALLS
    log = webui.shared.state.log
    assert ("job_count", 4) in log and ("job_no", 4) in log
    assert any(name == "textinfo" and value and "step 4/4" in value for name, value in log)
    assert any(name == "current_image" and value is not None for name, value in log)  # the final preview


def test_bundle_shares_the_host_tensors_and_matches_the_file_loader(webui, tiny_checkpoint):
    from lib_sdcustom.host_a1111 import bundle_from_loaded_model
    from lib_sdcustom.models.loader import load_bundle

    shared_bundle = bundle_from_loaded_model(webui.model)
    host_ptrs = {tensor.data_ptr() for tensor in webui.model.state_dict().values()}
    for module in (shared_bundle.unet, shared_bundle.vae, shared_bundle.text_encoder):
        assert all(p.data_ptr() in host_ptrs for p in module.parameters()), type(module).__name__
    copied = bundle_from_loaded_model(webui.model, copy=frozenset({"unet", "text_encoder"}))
    assert not any(p.data_ptr() in host_ptrs for p in copied.unet.parameters())
    assert not any(p.data_ptr() in host_ptrs for p in copied.text_encoder.parameters())
    assert copied.tokenizer is not webui.model.cond_stage_model.wrapped.tokenizer

    reference = load_bundle(tiny_checkpoint)
    ids = reference.tokenizer(["a sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, timestep = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        for bundle in (shared_bundle, reference):
            bundle.hidden = bundle.text_encoder(ids)[0]
            bundle.noise = bundle.unet(latents, timestep, bundle.hidden).sample
            bundle.decoded = bundle.vae.decode(latents).sample
    assert torch.equal(shared_bundle.hidden, reference.hidden)
    assert torch.equal(shared_bundle.noise, reference.noise)
    assert torch.equal(shared_bundle.decoded, reference.decoded)
    assert shared_bundle.prediction_type == "epsilon" and shared_bundle.identity.name == "tiny"


def test_lora_merged_by_the_last_generation_is_undone_before_training(webui, tiny_checkpoint):
    from lib_sdcustom.host_a1111 import A1111Host
    from lib_sdcustom.models.loader import load_bundle
    from lib_sdcustom.config import RunConfig

    layer = webui.model.model.diffusion_model.input_blocks._modules["1"]._modules["1"].proj_in
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_current_names = (("some_lora", 1.0, 1.0, 1.0),)
    with torch.no_grad():
        layer.weight += 1.0  # what the Lora extension leaves behind after generating with <lora:some_lora:1>

    bundle = A1111Host().bundle_for(RunConfig(method="lora"))

    reference = load_bundle(tiny_checkpoint)
    trained = dict(bundle.unet.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"]
    assert torch.equal(trained, dict(reference.unet.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"])
    assert layer.network_current_names == ()


@pytest.mark.parametrize("case", ["empty folder", "missing token", "existing name", "model does not fit"])
def test_bad_input_is_a_message_and_nothing_is_written(webui, case, tmp_path):
    controller, train_call = tab_and_train_call(webui)
    folder, token, name = webui.images, "sks", "badcase"
    if case == "empty folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "missing token":
        token = ""
    elif case == "existing name":
        (webui.lora / "badcase.safetensors").write_bytes(b"keep me")
    else:
        webui.model.is_sd1, webui.model.is_sdxl = False, True
    before = sorted(p.relative_to(webui.root) for p in webui.root.rglob("*"))
    before_hash = state_hash(webui.model)

    html = train_call("task(bad)", *form_values(controller, folder, name, token=token))[-1]

    assert "sdcustom-error" in html and "Fix:" in html, html
    assert "Traceback" not in html
    expected = {"empty folder": "image", "missing token": "No token", "existing name": "already exists",
                "model does not fit": "SDXL"}[case]
    assert expected in html
    assert sorted(p.relative_to(webui.root) for p in webui.root.rglob("*")) == before
    assert (webui.lora / "badcase.safetensors").read_bytes() == b"keep me" if case == "existing name" else True
    assert state_hash(webui.model) == before_hash


def test_the_hosts_interrupt_button_cancels_cleanly(webui, monkeypatch):
    from lib_sdcustom.events import StepDone
    from lib_sdcustom.host_a1111 import A1111Host

    controller, train_call = tab_and_train_call(webui)
    original = A1111Host.on_event

    def interrupt_at_step_two(self, event):
        original(self, event)
        if isinstance(event, StepDone) and event.step == 2:
            webui.shared.state.interrupt()  # what the WebUI's Interrupt button does

    monkeypatch.setattr(A1111Host, "on_event", interrupt_at_step_two)
    before = state_hash(webui.model)

    html = train_call("task(int)", *form_values(controller, webui.images, "stopped", training__steps=20))[-1]

    assert "data-state='cancelled'" in html and "cancelled at step 2/20" in html, html
    assert not (webui.lora / "stopped.safetensors").exists()
    assert controller.status().state == "cancelled"
    assert state_hash(webui.model) == before


def test_settings_section_and_output_subfolder(webui):
    controller, train_call = tab_and_train_call(webui)
    webui.callbacks.ui_settings_callback()
    labels = webui.shared.opts.data_labels
    assert {"sdcustom_lora_subfolder", "sdcustom_preview_every", "sdcustom_unload_for_full"} <= set(labels)
    assert all(info.section == ("sdcustom", "Customize (training)") for info in labels.values())
    webui.shared.opts.sdcustom_lora_subfolder = "mine"

    html = train_call("task(sub)", *form_values(controller, webui.images, "inmine"))[-1]

    assert "data-state='finished'" in html, html
    assert (webui.lora / "mine" / "inmine.safetensors").is_file()


def test_api_routes_need_api_flag_and_honour_api_auth(webui):
    fastapi = pytest.importorskip("fastapi")
    from http_helpers import http, serve

    load_entry_script()
    plain = fastapi.FastAPI()
    webui.callbacks.app_started_callback(None, plain)
    assert not [route for route in plain.routes if "/sdcustom/" in getattr(route, "path", "")]

    webui.shared.cmd_opts.api, webui.shared.cmd_opts.api_auth = True, "alice:secret"
    app = fastapi.FastAPI()
    webui.callbacks.app_started_callback(None, app)
    with serve(app) as base:
        assert http(f"{base}/sdcustom/v1/runs")[0] == 401
        assert http(f"{base}/sdcustom/v1/runs", auth=("alice", "wrong"))[0] == 401
        assert http(f"{base}/sdcustom/v1/runs", auth=("alice", "secret")) == (200, [])
        outside = {"method": "lora", "data": {"data": str(webui.images)}, "output": {"name": "api_lora"}}
        code, body = http(f"{base}/sdcustom/v1/runs", outside, auth=("alice", "secret"))
        assert code == 400 and "outside" in body["detail"]["problem"]
        assert http(f"{base}/sdcustom/v1/runs/nope", auth=("alice", "secret"))[0] == 404


def test_refresh_per_output_kind_and_parking_for_full_fine_tunes(webui):
    from lib_sdcustom.config import RunConfig
    from lib_sdcustom.host import OutputKind
    from lib_sdcustom.host_a1111 import A1111Host

    host = A1111Host()
    for kind in OutputKind:
        host.refresh(kind, [])
    assert [name for name, _ in webui.fake.CALLS] == [
        "networks.list_available_networks", "embedding_db.load_textual_inversion_embeddings", "sd_models.list_models",
        "shared.reload_hypernetworks"]
    assert webui.fake.CALLS[1][1] is True  # force_reload

    def parking(method: str) -> tuple:
        """(host calls while the run is inside the session, host calls once it has left)."""
        webui.fake.CALLS.clear()
        with host.session(RunConfig(method=method)):
            during = [name for name, _ in webui.fake.CALLS]
        return during, [name for name, _ in webui.fake.CALLS]

    unload, back = "sd_models.unload_model_weights", "sd_models.send_model_to_device"
    assert parking("dreambooth") == ([unload], [unload, back])
    assert parking("lora") == ([], []) and parking("textual_inversion") == ([], [])
    webui.shared.opts.sdcustom_unload_for_full = False
    assert parking("dreambooth") == ([], [])
    folders = host.facts().output_dirs
    assert folders[OutputKind.CHECKPOINT] == webui.root / "models" / "Stable-diffusion"
    assert folders[OutputKind.EMBEDDING] == webui.root / "embeddings"
