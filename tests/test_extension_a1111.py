"""The extension inside a fake AUTOMATIC1111 1.10 (tests/fake_a1111): the entry script is loaded the way the
host loads it, the tab's Train callback runs through the host's GPU queue wrapper, the LoRA lands in the
host's folder, the host's lists are refreshed, `shared.state` shows progress, and the host's model is
bit-identical afterwards. SD2 (v-prediction) and SDXL models loaded in the host give the same modules as the
file loader, over the host's own tensors, and train through the tab."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory) -> dict:
    """Tiny SD2 (v-prediction) and SDXL checkpoints in the LDM layout, with their YAMLs."""
    from lib_sdcustom.testing.tiny_families import write_tiny_sd2, write_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny_families")
    return {"sd2": write_tiny_sd2(folder, name="tiny_sd2v", v_prediction=True), "sdxl": write_tiny_sdxl(folder)}


def _webui(tmp_path: Path, checkpoint: Path, monkeypatch):
    from lib_sdcustom.host import a1111

    _forget_fake_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    import fake_host
    from modules import call_queue, paths, processing, script_callbacks, sd_hijack, sd_models, shared

    model = fake_host.configure(tmp_path / "webui", checkpoint)
    monkeypatch.setattr(a1111, "_MANAGER", None)
    # What the entry script hands the adapter; tests that build the host directly use it too.
    modules = a1111.WebUIModules(shared=shared, paths=paths, sd_models=sd_models, sd_hijack=sd_hijack,
                                 processing=processing, call_queue=call_queue)
    monkeypatch.setattr(a1111, "_WEBUI", modules)
    return SimpleNamespace(root=tmp_path / "webui", lora=tmp_path / "webui" / "models" / "Lora", model=model,
                           fake=fake_host, shared=shared, callbacks=script_callbacks, call_queue=call_queue,
                           modules=modules, images=_images(tmp_path / "images"))


@pytest.fixture
def webui(tmp_path, tiny_checkpoint, monkeypatch):
    yield _webui(tmp_path, tiny_checkpoint, monkeypatch)
    _forget_fake_modules()


@pytest.fixture
def family_webui_for(tmp_path, tiny_families, monkeypatch):
    """`family_webui_for("sd2" | "sdxl")`: the fake WebUI with that tiny model loaded (SD2 as a 768-v model);
    `.checkpoint` is the file it came from."""
    def make(family: str) -> SimpleNamespace:
        checkpoint = tiny_families[family]
        return SimpleNamespace(**vars(_webui(tmp_path, checkpoint, monkeypatch)), checkpoint=checkpoint, family=family)

    yield make
    _forget_fake_modules()


@pytest.fixture(params=["sd2", "sdxl"])
def family_webui(request, family_webui_for):
    return family_webui_for(request.param)


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
    from lib_sdcustom.hashing import state_digest

    return state_digest(model)


FAST = {"data.resolution": 64, "data.min_bucket": 64, "data.max_bucket": 128, "training.steps": 4,
        "training.sample_steps": 2, "training.save_state_every": 0, "network.rank": 4, "network.alpha": 2.0,
        "output.save_precision": "fp32", "optimizer.lr": 1e-3,
        "prior.num_class_images": 2, "prior.class_sample_steps": 2}


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


def test_tab_trains_a_hypernetwork_into_the_hosts_hypernetwork_folder(webui):
    controller, train_call = tab_and_train_call(webui)
    before = state_hash(webui.model)

    outputs = train_call("task(hn)", *form_values(controller, webui.images, "fakehn", method="hypernetwork"))

    assert "data-state='finished'" in outputs[-1], outputs[-1]
    assert (webui.root / "models" / "hypernetworks" / "fakehn.pt").is_file()
    assert "&lt;hypernet:fakehn:0.8&gt;" in outputs[-1]
    assert [name for name, _ in webui.fake.CALLS].count("shared.reload_hypernetworks") == 1
    assert state_hash(webui.model) == before


def test_bundle_shares_the_host_tensors_and_matches_the_file_loader(webui, tiny_checkpoint):
    from lib_sdcustom.host.a1111 import bundle_from_loaded_model
    from lib_sdcustom.models.loader import load_bundle

    shared_bundle = bundle_from_loaded_model(webui.model)
    host_ptrs = {tensor.data_ptr() for tensor in webui.model.state_dict().values()}
    for module in (shared_bundle.unet, shared_bundle.vae, shared_bundle.text_encoder):
        assert all(p.data_ptr() in host_ptrs for p in module.parameters()), type(module).__name__
    copied = bundle_from_loaded_model(webui.model, copy=frozenset({"unet", "text_encoder"}))
    assert not any(p.data_ptr() in host_ptrs for p in copied.unet.parameters())
    assert not any(p.data_ptr() in host_ptrs for p in copied.text_encoder.parameters())
    assert copied.tokenizer is not webui.model.cond_stage_model.wrapped.tokenizer

    _assert_same_outputs(shared_bundle, load_bundle(tiny_checkpoint))
    assert shared_bundle.prediction_type == "epsilon" and shared_bundle.identity.name == "tiny"


def _storages(tensors) -> set:
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def _family_outputs(bundle, inputs: dict | None = None) -> dict:
    """Each module's output on fixed inputs: text encoders (hidden states, SDXL's pooled vector), UNet, VAE.

    The UNet runs on `inputs` (another bundle's text outputs) when given, so each module is compared alone.
    """
    generator = torch.Generator().manual_seed(0)
    latents, timestep = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])
    outputs = {}
    with torch.no_grad():
        for index, (encoder, tokenizer) in enumerate(zip(bundle.text_encoders, (bundle.tokenizer, bundle.tokenizer_2))):
            ids = tokenizer(["a sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            outputs[f"ids{index}"], outputs[f"last{index}"] = ids, out.last_hidden_state
            outputs[f"context{index}"] = out.hidden_states[-2] if bundle.text_encoder_2 is not None else out.last_hidden_state
            if getattr(out, "text_embeds", None) is not None:
                outputs["pooled"] = out.text_embeds
        given = inputs or outputs
        context = torch.cat([given[f"context{index}"] for index in range(len(bundle.text_encoders))], dim=-1)
        extra = {}
        if "pooled" in given:
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            extra = {"added_cond_kwargs": {"text_embeds": given["pooled"], "time_ids": time_ids}}
        outputs["unet"] = bundle.unet(latents, timestep, context, **extra).sample
        outputs["decoded"] = bundle.vae.decode(latents).sample
    return outputs


def _assert_same_outputs(bundle, reference) -> None:
    """Equal to float rounding: the same weights give the same function, but not always the same last bit.
    CPU kernels pick their summation order by the memory alignment of the weights (tensors mapped from a
    file sit at arbitrary offsets, the host's are freshly allocated), and SDXL's shared projection is a
    transposed view of the host's tensor."""
    expected = _family_outputs(reference)
    actual = _family_outputs(bundle, inputs=expected)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sd2_and_sdxl_bundles_share_the_host_tensors_and_match_the_file_loader(family_webui):
    from lib_sdcustom.host.a1111 import bundle_from_loaded_model
    from lib_sdcustom.models.bundle import ModelFamily
    from lib_sdcustom.models.loader import load_bundle

    webui = family_webui
    shared_bundle = bundle_from_loaded_model(webui.model)
    reference = load_bundle(webui.checkpoint)

    assert shared_bundle.family is reference.family is ModelFamily(webui.family)
    assert shared_bundle.prediction_type == reference.prediction_type
    assert shared_bundle.prediction_type == ("v_prediction" if webui.family == "sd2" else "epsilon")
    assert shared_bundle.noise_scheduler.config.prediction_type == shared_bundle.prediction_type
    assert len(shared_bundle.text_encoders) == len(reference.text_encoders) == (2 if webui.family == "sdxl" else 1)
    host_storage = _storages(webui.model.state_dict().values())
    for module in (shared_bundle.unet, shared_bundle.vae, *shared_bundle.text_encoders):
        assert _storages(module.parameters()) <= host_storage, type(module).__name__
    _assert_same_outputs(shared_bundle, reference)
    # position_ids is file data only where transformers keeps it as a buffer (4.x, the host's pin)
    assert {key for key in reference.ldm_extras if not key.endswith("position_ids")} <= set(shared_bundle.ldm_extras)

    copied = bundle_from_loaded_model(webui.model, copy=frozenset({"unet", "text_encoder"}))
    for module in (copied.unet, *copied.text_encoders):
        assert not _storages(module.parameters()) & host_storage, type(module).__name__
    _assert_same_outputs(copied, reference)


def test_host_parameterization_decides_the_prediction_type(family_webui):
    from lib_sdcustom.host.a1111 import bundle_from_loaded_model

    family_webui.model.parameterization = "eps" if family_webui.family == "sd2" else "v"
    bundle = bundle_from_loaded_model(family_webui.model)
    expected = "epsilon" if family_webui.family == "sd2" else "v_prediction"
    assert bundle.prediction_type == bundle.noise_scheduler.config.prediction_type == expected


def test_without_its_yaml_the_loaded_model_is_read_with_its_familys_stock_config(family_webui):
    from lib_sdcustom.errors import ModelLoadError
    from lib_sdcustom.host.a1111 import bundle_from_loaded_model

    family_webui.model.used_config = None  # the host found no YAML: it used its stock config, so do we
    with pytest.raises(ModelLoadError) as refused:
        bundle_from_loaded_model(family_webui.model)  # a tiny model does not fit the full-size stock shapes
    stock = {"sd2": "the built-in SD2 v2-inference-v config", "sdxl": "the built-in SDXL sd_xl_base config"}
    assert stock[family_webui.family] in refused.value.problem and "Reload the checkpoint" in refused.value.fix


def test_an_sdxl_refiner_is_refused_before_anything_runs(family_webui_for):
    from lib_sdcustom.config import RunConfig
    from lib_sdcustom.errors import ModelLoadError
    from lib_sdcustom.host.a1111 import A1111Host

    webui = family_webui_for("sdxl")
    embedders = webui.model.conditioner.embedders
    embedders[0] = embedders[1]  # a refiner's only text encoder is OpenCLIP bigG
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        A1111Host(webui.modules).check_fit(RunConfig(method="lora"))


def test_lora_merged_by_the_last_generation_is_undone_before_training(webui, tiny_checkpoint):
    from lib_sdcustom.host.a1111 import A1111Host
    from lib_sdcustom.models.loader import load_bundle
    from lib_sdcustom.config import RunConfig

    layer = webui.model.model.diffusion_model.input_blocks._modules["1"]._modules["1"].proj_in
    layer.network_weights_backup = layer.weight.detach().clone()
    layer.network_current_names = (("some_lora", 1.0, 1.0, 1.0),)
    with torch.no_grad():
        layer.weight += 1.0  # what the Lora extension leaves behind after generating with <lora:some_lora:1>

    bundle = A1111Host(webui.modules).bundle_for(RunConfig(method="lora"))

    reference = load_bundle(tiny_checkpoint)
    trained = dict(bundle.unet.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"]
    assert torch.equal(trained, dict(reference.unet.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"])
    assert layer.network_current_names == ()


@pytest.mark.parametrize("case", ["empty folder", "missing token", "existing name", "model does not fit", "fp8 base"])
def test_bad_input_is_a_message_and_nothing_is_written(webui, case, tmp_path):
    controller, train_call = tab_and_train_call(webui)
    folder, token, name, options = webui.images, "sks", "badcase", {}
    if case == "empty folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "missing token":
        token = ""
    elif case == "existing name":
        (webui.lora / "badcase.safetensors").write_bytes(b"keep me")
    elif case == "model does not fit":
        webui.model.is_sd3 = True
    else:
        options["training__fp8_base"] = True
    before = sorted(p.relative_to(webui.root) for p in webui.root.rglob("*"))
    before_hash = state_hash(webui.model)

    html = train_call("task(bad)", *form_values(controller, folder, name, token=token, **options))[-1]

    assert "sdcustom-error" in html and "Fix:" in html, html
    assert "Traceback" not in html
    expected = {"empty folder": "image", "missing token": "No token", "existing name": "already exists",
                "model does not fit": "SD3", "fp8 base": "an fp8 copy would add memory"}[case]
    assert expected in html
    assert sorted(p.relative_to(webui.root) for p in webui.root.rglob("*")) == before
    assert (webui.lora / "badcase.safetensors").read_bytes() == b"keep me" if case == "existing name" else True
    assert state_hash(webui.model) == before_hash


def test_an_sdxl_run_plans_for_the_loaded_sdxl_model(family_webui_for):
    from lib_sdcustom.models.bundle import ModelFamily
    from lib_sdcustom.ui.plan import estimate_memory

    webui = family_webui_for("sdxl")
    controller, _ = tab_and_train_call(webui)
    values = form_values(controller, webui.images, "xl_lora", data__resolution=1024, data__max_bucket=1024)
    _, _, html, seen = controller.check_folder(*values)

    assert seen == 4 and "data-family='sdxl'" in html and "model: SDXL, trained at 1024 px" in html, html
    assert "tiny_sdxl.safetensors" in html and "you chose" not in html
    config = controller.config(*values)
    parameters = sum(parameter.numel() for parameter in webui.model.parameters())
    estimate = estimate_memory(config, parameters, ModelFamily.SDXL)
    assert f"about {estimate.total / 2**20:.0f} MB" in html


def test_tab_trains_an_sdxl_lora_on_the_loaded_sdxl_model(family_webui_for):
    from safetensors import safe_open

    webui = family_webui_for("sdxl")
    controller, train_call = tab_and_train_call(webui)
    before = state_hash(webui.model)
    html = train_call("task(xl)", *form_values(controller, webui.images, "xl_lora"))[-1]

    assert "data-state='finished'" in html, html
    with safe_open(str(webui.lora / "xl_lora.safetensors"), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
    assert any(key.startswith("lora_te1_") for key in keys) and any(key.startswith("lora_te2_") for key in keys)
    assert state_hash(webui.model) == before


@pytest.mark.parametrize("family, method", [("sdxl", "textual_inversion"), ("sd2", "textual_inversion"),
                                            ("sd2", "dreambooth_lora"), ("sdxl", "dreambooth")])
def test_methods_that_change_base_weights_leave_the_host_model_identical(family_webui_for, family, method):
    webui = family_webui_for(family)
    controller, train_call = tab_and_train_call(webui)
    before = state_hash(webui.model)
    tokenizer = webui.model.conditioner.embedders[0].wrapped.tokenizer if family == "sdxl" else None
    vocabulary = len(tokenizer) if tokenizer is not None else None
    html = train_call("task(te)", *form_values(controller, webui.images, f"{family}emb", method=method,
                                               prior__num_class_images=2, prior__class_sample_steps=2,
                                               textual_inversion__init_text="dog"))[-1]

    assert "data-state='finished'" in html, html
    assert state_hash(webui.model) == before
    assert tokenizer is None or len(tokenizer) == vocabulary
    if method == "dreambooth":  # the checkpoint written from the host's weights has the base file's tensors
        from safetensors import safe_open

        def keys(path: Path) -> set:
            with safe_open(str(path), framework="pt") as handle:
                return {key for key in handle.keys() if not key.endswith("position_ids")}

        assert keys(webui.root / "models" / "Stable-diffusion" / f"{family}emb.safetensors") == keys(webui.checkpoint)


def test_the_hosts_interrupt_button_cancels_cleanly(webui, monkeypatch):
    from lib_sdcustom.events import StepDone
    from lib_sdcustom.host.a1111 import A1111Host

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
    from lib_sdcustom.host.base import OutputKind
    from lib_sdcustom.host.a1111 import A1111Host

    from modules import processing

    host = A1111Host(webui.modules)
    processing.StableDiffusionProcessing.cached_c = ["(prompt, steps, ...)", "conditioning without the embedding"]
    stale, other = SimpleNamespace(name="retrained"), SimpleNamespace(name="other")
    webui.shared.loaded_hypernetworks[:] = [stale, other]
    for kind in OutputKind:
        host.refresh(kind, [webui.root / "models" / "hypernetworks" / "retrained.pt"])
    assert processing.StableDiffusionProcessing.cached_c == [None, None], "a new embedding must not meet stale conds"
    assert [name for name, _ in webui.fake.CALLS] == [
        "networks.list_available_networks", "embedding_db.load_textual_inversion_embeddings", "sd_models.list_models",
        "shared.reload_hypernetworks"]
    # the host reuses a loaded hypernetwork by name, never re-reading its file: the overwritten one must go
    assert webui.shared.loaded_hypernetworks == [other]
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
    assert folders[OutputKind.HYPERNETWORK] == webui.root / "models" / "hypernetworks"


def test_micro_model_installs_in_a_form_the_webui_loads_and_once(webui, tmp_path, monkeypatch):
    """As the real WebUI needs it: the YAML names the text-encoder folder absolutely (the host resolves a
    relative one against its working directory) and the folder holds tokenizer files."""
    import yaml

    from lib_sdcustom.errors import ConfigError
    from lib_sdcustom.host.a1111 import A1111Host
    from lib_sdcustom.microworld.install import install_into_host
    from lib_sdcustom.models.loader import load_bundle
    from lib_sdcustom.models.tokenizer import TOKENIZER_FILES

    installed = install_into_host(A1111Host(webui.modules))

    folder = webui.root / "models" / "Stable-diffusion"
    assert installed.checkpoint == folder / "microworld.safetensors" and installed.checkpoint.is_file()
    version = yaml.safe_load((folder / "microworld.yaml").read_text())["model"]["params"]["cond_stage_config"]["params"]["version"]
    assert Path(version).is_absolute() and Path(version) == (folder / "microworld_text_encoder").resolve()
    assert all((Path(version) / name).is_file() for name in ("config.json", *TOKENIZER_FILES))
    assert ("sd_models.list_models", None) in webui.fake.CALLS
    monkeypatch.chdir(tmp_path)  # not beside the model: the folder must not depend on the working directory
    assert load_bundle(installed.checkpoint).family.value == "sd1"
    assert install_into_host(A1111Host(webui.modules)).written == []
    (folder / "microworld.yaml").write_text("something else")
    with pytest.raises(ConfigError, match="exists and differs"):
        install_into_host(A1111Host(webui.modules))


def test_train_while_an_api_run_is_active_says_whose_run_at_once(webui, monkeypatch):
    import threading

    from lib_sdcustom.events import StepDone
    from lib_sdcustom.host.a1111 import A1111Host, manager

    controller, train_call = tab_and_train_call(webui)
    running, release = threading.Event(), threading.Event()
    original = A1111Host.on_event

    def hold_at_step_one(self, event):
        original(self, event)
        if isinstance(event, StepDone) and event.step == 1:
            running.set()
            release.wait(60)

    monkeypatch.setattr(A1111Host, "on_event", hold_at_step_one)
    config = controller.config(*form_values(controller, webui.images, "api_run", training__steps=3))
    manager().host.prepare(config)
    status = manager().start(config)  # as the API starts a run
    try:
        assert running.wait(60)
        html = train_call("task(busy)", *form_values(controller, webui.images, "tab_run"))[-1]
        assert "already running: api_run (lora), started from the API" in html, html
        assert "data-state='error'" in html and not (webui.lora / "tab_run.safetensors").exists()
    finally:
        release.set()
        manager().wait(status.id, 60)


def test_run_folders_share_one_place_and_keep_no_state_after_a_finished_run(webui):
    from lib_sdcustom.host.a1111 import A1111Host

    controller, train_call = tab_and_train_call(webui)
    runs = webui.root / "models" / "sdcustom-runs"
    for method, name in (("lora", "placed_lora"), ("textual_inversion", "placedemb")):
        config = controller.config(*form_values(controller, webui.images, name, method=method))
        A1111Host(webui.modules).prepare(config)
        assert Path(config.output.run_dir) == runs / name
    html = train_call("task(runs)", *form_values(controller, webui.images, "placed_lora", training__save_state_every=2))[-1]

    assert "data-state='finished'" in html, html
    assert (runs / "placed_lora").is_dir() and not (runs / "placed_lora" / "state").exists()
    assert "data-folders='1'" in controller.runs_html() and "data-finished='1'" in controller.runs_html()
    message, panel = controller.clear_runs()
    assert "Cleared 1" in message and not (runs / "placed_lora").exists() and "data-folders='0'" in panel
