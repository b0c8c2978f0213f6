"""The AUTOMATIC1111 WebUI (1.10) as a `Host`: the only library module that works through `modules.*`.

It never imports them: `scripts/sdcustom.py`, the entry file the WebUI executes, imports the host modules and
hands them over (`connect(WebUIModules(...))`), so the library imports, and its tests run, without the WebUI and
with the fake one in tests/fake_a1111 alike. What this adapter does, and why (docs/host-formats.md: extension loading, the loaded
model, refresh without a restart):
- trains on the checkpoint and VAE the user has loaded, converted from the weights in memory: diffusers
  modules take the host's tensors with `load_state_dict(assign=True)`, so frozen weights are shared, not
  copied; components a method changes in place (`trained_in_place`) are copied instead, so the host's
  model is left exactly as it was;
- writes into the host's own folders and refreshes its lists, so `<lora:NAME:0.8>` works at once;
- runs inside the host's GPU queue and mirrors progress in `shared.state`, so generation waits while
  training runs and the host's Interrupt button cancels it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..config import RunConfig
from ..errors import ConfigError, ModelLoadError
from ..events import Event, RunFinished, RunStarted, SamplesRendered, StepDone
from ..methods.registry import OutputKind, method_spec
from ..models.bundle import BaseIdentity, ModelBundle, ModelFamily
from .base import RUNS_FOLDER, Host, HostFacts, ModelKind, output_kind, trained_in_place

if TYPE_CHECKING:
    import torch

    from ..models.model_yaml import ModelConfigs
    from ..run.manager import RunManager

logger = logging.getLogger(__name__)

TAB_TITLE = "Customize"
TAB_ID = "sdcustom"
SETTINGS_SECTION = ("sdcustom", "Customize (training)")
_SUBFOLDER_SETTINGS = {OutputKind.LORA: "sdcustom_lora_subfolder", OutputKind.EMBEDDING: "sdcustom_embedding_subfolder",
                       OutputKind.CHECKPOINT: "sdcustom_checkpoint_subfolder"}
_REFRESH_CARDS_JS = ("() => { for (const tab of ['txt2img', 'img2img']) { const root = (typeof gradioApp === 'function') ? "
                     "gradioApp() : document; root.getElementById(tab + '_lora_extra_refresh_internal')"
                     "?.dispatchEvent(new Event('click')); } }")


@dataclass(frozen=True)
class WebUIModules:
    """The host modules the adapter works through, as `scripts/sdcustom.py` imported them. Their attributes
    (`shared.sd_model`, `shared.state`, ...) are read when used, so they are always the host's current ones."""

    shared: ModuleType
    paths: ModuleType
    sd_models: ModuleType
    sd_hijack: ModuleType
    processing: ModuleType
    call_queue: ModuleType

    def option(self, name: str, default: Any) -> Any:
        return getattr(self.shared.opts, name, default)


# ----- the loaded model -> ModelBundle -----

def _family(sd_model: Any) -> ModelFamily:
    if getattr(sd_model, "is_sdxl", False):
        return ModelFamily.SDXL
    if getattr(sd_model, "is_sd2", False):
        return ModelFamily.SD2
    return ModelFamily.SD1


def _prediction_type(sd_model: Any) -> str:
    """What the host's model predicts: its `parameterization` (ldm's YAML setting, or SDXL's VScaling denoiser)."""
    return "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"


def _ldm_config(sd_model: Any, family: ModelFamily, prediction_type: str) -> tuple[ModelConfigs, dict[str, Any] | None]:
    """The YAML the host built this model from (its `used_config`), else the family's stock config."""
    import copy

    from ..models.ldm_config import PREDICTION_METADATA_KEY, configs_from_ldm, stock_config

    from ..models.model_yaml import read_ldm_yaml

    used = getattr(sd_model, "used_config", None)
    if used and Path(used).is_file():
        ldm = read_ldm_yaml(Path(used))
        return configs_from_ldm(ldm, source=str(used), yaml_dir=Path(used).parent), ldm
    declared = {PREDICTION_METADATA_KEY: "v" if prediction_type == "v_prediction" else "epsilon"}
    filename = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None) or "loaded model"
    # SDXL's stock config is the noise-predicting one; the host's own parameterization decides below.
    stock, name = stock_config(family, Path(filename), declared if family is ModelFamily.SD2 else {})
    return configs_from_ldm(copy.deepcopy(stock), source=name), None


def _without_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """The host wraps token embeddings (`EmbeddingsWithFixes`); their weights then sit under `.wrapped.`."""
    return {key.replace(".wrapped.", "."): value for key, value in state.items()}


def _tensors(module: Any, copy: bool) -> dict[str, Any]:
    """A module's tensors: the host's own storage, or detached clones when the method trains them."""
    state = module.state_dict()
    return {key: value.detach().clone() for key, value in state.items()} if copy else dict(state)


def _dtype_of(state: dict[str, Any]) -> torch.dtype:
    import torch

    return next((value.dtype for value in state.values() if value.is_floating_point()), torch.float32)


def restore_network_backups(sd_model: Any) -> int:
    """Undo LoRA weights the Lora extension merged into the model for the last generation.

    The host applies networks by writing them into the weights (with a backup) and restores them lazily at
    the next generation; training on top of a merged LoRA would be training on the wrong base. The host
    restores with an in-place `copy_` inside its own no-grad block, and its UNet weights are leaves that
    require grad, so calling it outside no-grad fails ("a leaf Variable that requires grad ...").
    """
    import torch

    networks = sys.modules.get("networks")
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    if restore is None:
        return 0
    restored = 0
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                restore(module)
                module.network_current_names = ()
                restored += 1
    return restored


def _embedder(module: Any) -> Any:
    """The ldm/sgm embedder inside the host's `...WithCustomWords` hijack wrapper (itself when not hijacked)."""
    return getattr(module, "wrapped", module)


def _text_modules(sd_model: Any, family: ModelFamily) -> list[Any]:
    """The host's text-encoder modules in checkpoint order (docs/host-formats.md#the-loaded-model): transformers CLIP or
    open_clip."""
    if family is ModelFamily.SDXL:
        first, second = (_embedder(embedder) for embedder in sd_model.conditioner.embedders[:2])
        return [first.transformer, second.model]
    embedder = _embedder(sd_model.cond_stage_model)
    return [embedder.model if family is ModelFamily.SD2 else embedder.transformer]


def _host_ldm_state(sd_model: Any, family: ModelFamily, copy: frozenset[str]) -> dict[str, Any]:
    """The loaded model's tensors under checkpoint keys, as a file of the same model holds them.

    "text_encoder" in `copy` covers every text encoder of the family (SDXL's Textual Inversion grows both).
    """
    from ..models import ldm_keys

    state = {ldm_keys.UNET_PREFIX + key: value
             for key, value in _tensors(sd_model.model.diffusion_model, "unet" in copy).items()}
    state.update((ldm_keys.VAE_PREFIX + key, value) for key, value in _tensors(sd_model.first_stage_model, "vae" in copy).items())
    for slot, module in zip(ldm_keys.TEXT_SLOTS[family], _text_modules(sd_model, family)):
        text = _without_wrappers(_tensors(module, "text_encoder" in copy))
        state.update((slot.prefix + key, value) for key, value in text.items())
    return state


def bundle_from_loaded_model(sd_model: Any, *, copy: frozenset[str] = frozenset()) -> ModelBundle:
    """Diffusers/transformers modules over the host's in-memory SD1, SD2 or SDXL model (see the module docstring).

    The host's weights are arranged as a checkpoint file holds them and then take the file loader's path
    (split, open_clip translation, module building), so both give the same modules; open_clip's fused
    q/k/v and projection become views of the host's tensors unless they are copied.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models import ldm_keys
    from ..models.loader import (build_with_weights, bundle_from_modules, mapped_or_fail, text_encoder_factory,
                                text_encoder_weights)

    family = _family(sd_model)
    prediction_type = _prediction_type(sd_model)
    configs, ldm = _ldm_config(sd_model, family, prediction_type)

    def mismatch(detail: str) -> ModelLoadError:
        return ModelLoadError(f"The loaded model does not match its config {configs.source}: {detail}",
                              "Reload the checkpoint in the WebUI; if it persists, report it with the model's name.")

    if configs.family is not family:
        raise mismatch(f"the config describes an {configs.family.value.upper()} model, the WebUI loaded an "
                       f"{family.value.upper()} one")
    parts = ldm_keys.split_ldm_state_dict(_host_ldm_state(sd_model, family, copy), family)
    unet_sd = mapped_or_fail(ldm_keys.unet_to_diffusers(parts.unet, ldm_keys.UNetLayout.from_diffusers_config(configs.unet)),
                             ldm_keys.UNET_PREFIX, mismatch)
    vae_sd = mapped_or_fail(ldm_keys.vae_to_diffusers(parts.vae, ldm_keys.VAELayout.from_diffusers_config(configs.vae)),
                            ldm_keys.VAE_PREFIX, mismatch)
    text_sds = text_encoder_weights(parts, configs, mismatch, views="text_encoder" not in copy)
    unet = build_with_weights("UNet", lambda: UNet2DConditionModel(**configs.unet), unet_sd, _dtype_of(unet_sd), mismatch)
    vae = build_with_weights("VAE", lambda: AutoencoderKL(**configs.vae), vae_sd, _dtype_of(vae_sd), mismatch)
    live = _text_modules(sd_model, family)
    text_configs = [configs.text_encoder] + ([configs.text_encoder_2] if configs.text_encoder_2 is not None else [])
    text_encoders = [
        build_with_weights(f"text encoder {index + 1}",
                           text_encoder_factory(text_configs[index]) if slot.open_clip else _clip_factory(live[index]),
                           state, _dtype_of(state), mismatch, canonical_text=True)
        for index, (slot, state) in enumerate(zip(ldm_keys.TEXT_SLOTS[family], text_sds))]
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    identity = BaseIdentity(name=getattr(info, "name_for_extra", None) or (Path(filename).stem if filename else "loaded model"),
                            path=Path(filename) if filename else None, sha256=getattr(info, "sha256", None),
                            legacy_hash=getattr(info, "hash", None))
    tokenizers = _tokenizers(sd_model, family, own="text_encoder" in copy)
    return bundle_from_modules(family, unet, vae, text_encoders, tokenizers,
                               {**configs.scheduler, "prediction_type": prediction_type}, identity=identity,
                               ldm_config=ldm, ldm_extras={**parts.extras, **_extras(sd_model, family)})


def _clip_factory(live: Any) -> Callable[[], Any]:
    """A transformers CLIP text model of the host's own config (SD1's encoder, SDXL's first)."""
    from transformers import CLIPTextModel

    return lambda: CLIPTextModel(live.config)


def _tokenizers(sd_model: Any, family: ModelFamily, own: bool) -> list[Any]:
    """The host's CLIP tokenizer (copied when Textual Inversion adds tokens, so the host's stays as it was);
    open_clip slots get the bundled tokenizer of the same vocabulary that pads with id 0, as open_clip does."""
    import copy

    from ..models.tokenizer import load_open_clip_tokenizer

    if family is ModelFamily.SD2:
        return [load_open_clip_tokenizer()]
    first = _embedder(sd_model.conditioner.embedders[0] if family is ModelFamily.SDXL else sd_model.cond_stage_model).tokenizer
    first = copy.deepcopy(first) if own else first
    return [first, load_open_clip_tokenizer()] if family is ModelFamily.SDXL else [first]


def _extras(sd_model: Any, family: ModelFamily) -> dict[str, Any]:
    """The schedule an SD1/SD2 checkpoint carried (the host may have replaced `alphas_cumprod` for a sampler
    option); SDXL files hold none (sgm computes it), so none is added."""
    if family is ModelFamily.SDXL:
        return {}
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    if alphas is None:
        alphas = getattr(sd_model, "alphas_cumprod", None)
    return {"alphas_cumprod": alphas.detach().clone().cpu()} if alphas is not None else {}


def _forget_cached_conditioning(processing: ModuleType) -> None:
    """Empty the host's prompt-conditioning caches, as its own `close()` does without `persistent_cond_cache`.

    Their key (prompt, steps, checkpoint, networks, ...) leaves out the loaded embeddings, so a prompt used
    before a new embedding existed would keep its old conditioning and the embedding would seem to do nothing.
    """
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


def _refresh_hypernetworks(shared: ModuleType, outputs: Sequence[Path]) -> None:
    """List new hypernetwork files, and drop loaded ones of the same names: the host reuses a loaded hypernetwork
    by name without looking at the file again, so an overwritten one would keep its old weights."""
    shared.reload_hypernetworks()
    names = {Path(path).stem for path in outputs}
    shared.loaded_hypernetworks[:] = [network for network in shared.loaded_hypernetworks if network.name not in names]


# ----- the Host -----

class A1111Host(Host):
    def __init__(self, webui: WebUIModules) -> None:
        self.webui = webui
        self._label = ""

    def _output_dirs(self) -> dict[OutputKind, Path]:
        paths, sd_models = self.webui.paths, self.webui.sd_models
        opts = self.webui.shared.cmd_opts
        models = Path(paths.models_path)
        return {
            OutputKind.LORA: Path(getattr(opts, "lora_dir", None) or models / "Lora"),
            OutputKind.EMBEDDING: Path(getattr(opts, "embeddings_dir", None) or Path(paths.data_path) / "embeddings"),
            OutputKind.CHECKPOINT: Path(getattr(opts, "ckpt_dir", None) or sd_models.model_path),
            OutputKind.HYPERNETWORK: Path(getattr(opts, "hypernetwork_dir", None) or models / "hypernetworks"),
        }

    def facts(self) -> HostFacts:
        from ..deps import missing_runtime

        paths = self.webui.paths
        folders = self._output_dirs()
        return HostFacts(
            name="AUTOMATIC1111",
            output_dirs=folders,
            presets_dir=Path(paths.data_path) / "sdcustom" / "presets",
            default_clip_skip=int(self.webui.option("CLIP_stop_at_last_layers", 1) or 1),
            preview_every=int(self.webui.option("sdcustom_preview_every", 0) or 0),
            queue_note="Training runs in the WebUI's queue: image generation waits until it finishes or is cancelled.",
            train_js="sdcustom_start_training",
            after_train_js=_REFRESH_CARDS_JS,
            allowed_roots=[Path(paths.data_path), Path(paths.models_path), *folders.values()],
            missing_requirements=missing_runtime(),
            runs_dir=self._runs_dir(),
        )

    def _runs_dir(self) -> Path:
        """Every method's run folders in one place beside the model folders (not OUT/.., which for embeddings
        is the WebUI's root)."""
        return Path(self.webui.paths.models_path) / RUNS_FOLDER

    def model_label(self) -> str:
        info = getattr(self._model(required=False), "sd_checkpoint_info", None)
        return getattr(info, "title", "") or getattr(info, "name", "") or ""

    def base_parameters(self, checkpoint: str = "") -> int | None:
        model = self._model(required=False)
        return sum(parameter.numel() for parameter in model.parameters()) if model is not None else None

    def model_kind(self, checkpoint: str = "") -> ModelKind | None:
        model = self._model(required=False)
        if model is None:
            return None
        return ModelKind(_family(model), _prediction_type(model))

    def loaded_model_digest(self) -> str | None:
        from ..hashing import state_digest

        model = self._model(required=False)
        return state_digest(model) if model is not None else None

    def _model(self, required: bool = True) -> Any:
        """`shared.sd_model` loads a model on first access; only a run may trigger that, not the UI."""
        if not required:
            return getattr(getattr(self.webui.sd_models, "model_data", None), "sd_model", None)
        model = self.webui.shared.sd_model
        if model is None:
            raise ModelLoadError("No checkpoint is loaded in the WebUI.", "Pick a checkpoint at the top of the page and try again.")
        return model

    def prepare(self, config: RunConfig, checkpoint: str = "") -> None:
        kind = output_kind(config.method)
        info = getattr(self._model(), "sd_checkpoint_info", None)
        config.model.base = str(getattr(info, "filename", "") or "loaded model")
        if not config.output.run_dir and config.output.name:
            config.output.run_dir = str(self._runs_dir() / config.output.name)
        if not config.output.out:
            folder = self._output_dirs()[kind]
            subfolder = str(self.webui.option(_SUBFOLDER_SETTINGS.get(kind, ""), "") or "").strip()
            if subfolder:
                if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
                    raise ConfigError(f"The settings' sub-folder {subfolder!r} leaves the {kind.value} folder.",
                                      "Use a relative folder name in Settings > Customize (training).")
                folder = folder / subfolder
            config.output.out = str(folder)
        if method_spec(config.method).bundles_word and not config.output.embeddings_dir:
            config.output.embeddings_dir = str(self._output_dirs()[OutputKind.EMBEDDING])

    def check_fit(self, config: RunConfig) -> None:
        model = self._model()
        label = self.model_label() or "The loaded checkpoint"
        if getattr(model, "is_sd3", False):
            raise ModelLoadError(f"{label} is an SD3 model; {config.method} trains SD1.x, SD2.x and SDXL models.",
                                 "Load an SD1.x, SD2.x or SDXL checkpoint at the top of the page.")
        if int(getattr(model, "latent_channels", 4)) != 4 or getattr(model, "is_sdxl_inpaint", False):
            raise ModelLoadError("The loaded checkpoint is not a plain text-to-image model (inpainting or edit model).",
                                 "Load a plain text-to-image checkpoint at the top of the page.")
        family = _family(model)
        if family is ModelFamily.SDXL and not hasattr(_embedder(model.conditioner.embedders[0]), "transformer"):
            raise ModelLoadError(f"{label} is an SDXL refiner (one OpenCLIP text encoder); refiners are not trained here.",
                                 "Load an SDXL base model (or a fine-tune of it) at the top of the page.")
        if config.training.fp8_base:
            raise ConfigError("fp8 base storage is on, but inside the WebUI the trainer shares the loaded model's "
                              "weights instead of holding its own copy: an fp8 copy would add memory, not save it.",
                              "Turn fp8_base off here (bf16 and gradient checkpointing save memory in the WebUI), or "
                              "use fp8 with the command line trainer.")

    def bundle_for(self, config: RunConfig) -> ModelBundle | None:
        model = self._model()
        restored = restore_network_backups(model)
        if restored:
            logger.info("Restored %d layers from LoRA weights merged for the last generation", restored)
        return bundle_from_loaded_model(model, copy=trained_in_place(config.method))

    @contextlib.contextmanager
    def session(self, config: RunConfig) -> Iterator[None]:
        shared, sd_models = self.webui.shared, self.webui.sd_models
        self._label = config.output.name
        shared.state.job = "sdcustom-train"
        shared.state.textinfo = f"Preparing to train {config.output.name}..."
        parked = "unet" in trained_in_place(config.method) and bool(self.webui.option("sdcustom_unload_for_full", True))
        if parked:  # a full fine-tune needs the GPU memory the host's copy holds
            sd_models.unload_model_weights()
        try:
            yield
        finally:
            if parked:
                sd_models.send_model_to_device(shared.sd_model)

    def on_event(self, event: Event) -> None:
        state = self.webui.shared.state
        if isinstance(event, RunStarted):
            state.job_count, state.job_no = event.total_steps, 0
            state.textinfo = f"Training {self._label}: {event.description.splitlines()[0]}"
        elif isinstance(event, StepDone):
            state.job_no, state.sampling_step = event.step, 0
            state.textinfo = (f"Training {self._label}: step {event.step}/{event.total_steps}, loss {event.loss:.4f}, "
                              f"about {event.eta_seconds:.0f}s left")
        elif isinstance(event, SamplesRendered) and event.images:
            state.assign_current_image(event.images[0])
        elif isinstance(event, RunFinished):
            state.textinfo = f"Training {self._label}: {'stopped' if event.stopped_early else 'finished'} at step {event.step}"

    def cancel_requested(self) -> bool:
        return bool(self.webui.shared.state.interrupted)

    def refresh(self, kind: OutputKind, outputs: Sequence[Path]) -> None:
        if kind is OutputKind.LORA:
            networks = sys.modules.get("networks")  # the built-in Lora extension's module
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()
        elif kind is OutputKind.EMBEDDING:
            self.webui.sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
            _forget_cached_conditioning(self.webui.processing)
        elif kind is OutputKind.CHECKPOINT:
            self.webui.sd_models.list_models()
        elif kind is OutputKind.HYPERNETWORK:
            _refresh_hypernetworks(self.webui.shared, outputs)

    def exclusive(self, work: Callable[[], Any]) -> Any:
        state = self.webui.shared.state
        with self.webui.call_queue.queue_lock:
            state.begin(job="sdcustom-train")
            try:
                return work()
            finally:
                state.end()

    def wrap_tab_call(self, function: Callable[..., list[Any]], extra_outputs: list[Any]) -> Callable[..., list[Any]]:
        wrapped: Callable[..., list[Any]] = self.webui.call_queue.wrap_gradio_gpu_call(function,
                                                                                     extra_outputs=extra_outputs)
        return wrapped


# ----- callbacks registered by scripts/sdcustom.py -----

_WEBUI: WebUIModules | None = None
_MANAGER: RunManager | None = None


def connect(webui: WebUIModules) -> None:
    """Hand the adapter the host's modules; the entry script does this before it registers the callbacks."""
    global _WEBUI
    _WEBUI = webui


def _connected() -> WebUIModules:
    if _WEBUI is None:
        raise RuntimeError("lib_sdcustom.host.a1111.connect() was not called: scripts/sdcustom.py hands over the "
                           "WebUI's modules before registering its callbacks.")
    return _WEBUI


def manager() -> RunManager:
    """One run manager per WebUI process, shared by the tab and the API."""
    global _MANAGER
    if _MANAGER is None:
        from ..run.manager import RunManager

        _MANAGER = RunManager(A1111Host(_connected()))
    return _MANAGER


def ui_tabs() -> list[Any]:
    from ..ui import build_tab

    runs = manager()
    return [(build_tab(runs.host.facts(), runs), TAB_TITLE, TAB_ID)]


def register_settings() -> None:
    import gradio as gr

    shared = _connected().shared
    options = {
        "sdcustom_lora_subfolder": shared.OptionInfo("", "Sub-folder of the Lora folder for new LoRA/LyCORIS files"),
        "sdcustom_embedding_subfolder": shared.OptionInfo("", "Sub-folder of the embeddings folder for new embeddings"),
        "sdcustom_checkpoint_subfolder": shared.OptionInfo("", "Sub-folder of the checkpoint folder for DreamBooth results"),
        "sdcustom_preview_every": shared.OptionInfo(
            200, "Render a preview image every N training steps (0 = only at the end)", gr.Slider,
            {"minimum": 0, "maximum": 2000, "step": 50}),
        "sdcustom_unload_for_full": shared.OptionInfo(
            True, "Move the loaded checkpoint to RAM during full fine-tunes (DreamBooth) to free GPU memory"),
    }
    for key, info in options.items():
        info.section = SETTINGS_SECTION
        shared.opts.add_option(key, info)


def app_started(demo: Any, app: Any) -> None:
    """API routes, only when the host serves its API (--api, or --nowebui), behind --api-auth like its own."""
    from .access import parse_credentials
    from .api import register_routes

    cmd_opts = _connected().shared.cmd_opts
    if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
        return
    runs = manager()
    register_routes(app, runs, roots=runs.host.facts().allowed_roots,
                    credentials=parse_credentials(getattr(cmd_opts, "api_auth", None)))
