"""The AUTOMATIC1111 WebUI (1.10) as a `Host`: the only library module that touches `modules.*`.

Every host import happens inside a function, so the library still imports (and the hygiene test still
passes) without the WebUI. What this adapter does, and why (HOST.md sections 1, 2 and 2.5):
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
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from .config import RunConfig
from .errors import ConfigError, ModelLoadError
from .events import Event, RunFinished, RunStarted, SamplesRendered, StepDone
from .host import Host, HostFacts, OutputKind, output_kind, trained_in_place
from .models.bundle import BaseIdentity, ModelBundle, ModelFamily

logger = logging.getLogger(__name__)

TAB_TITLE = "Customize"
TAB_ID = "sdcustom"
SETTINGS_SECTION = ("sdcustom", "Customize (training)")
_SUBFOLDER_SETTINGS = {OutputKind.LORA: "sdcustom_lora_subfolder", OutputKind.EMBEDDING: "sdcustom_embedding_subfolder",
                       OutputKind.CHECKPOINT: "sdcustom_checkpoint_subfolder"}
_REFRESH_CARDS_JS = ("() => { for (const tab of ['txt2img', 'img2img']) { const root = (typeof gradioApp === 'function') ? "
                     "gradioApp() : document; root.getElementById(tab + '_lora_extra_refresh_internal')"
                     "?.dispatchEvent(new Event('click')); } }")


def _option(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default)


# ----- the loaded model -> ModelBundle -----

def _family(sd_model: Any) -> ModelFamily:
    if getattr(sd_model, "is_sdxl", False):
        return ModelFamily.SDXL
    if getattr(sd_model, "is_sd2", False):
        return ModelFamily.SD2
    return ModelFamily.SD1


def _ldm_config(sd_model: Any):
    """The YAML the host built this model from (its `used_config`), else the stock SD1 config."""
    import copy

    from .models.ldm_config import SD1_V1_INFERENCE, STOCK_CONFIG_NAME, configs_from_ldm, read_ldm_yaml

    used = getattr(sd_model, "used_config", None)
    if used and Path(used).is_file():
        ldm = read_ldm_yaml(Path(used))
        return configs_from_ldm(ldm, source=str(used), yaml_dir=Path(used).parent), ldm
    return configs_from_ldm(copy.deepcopy(SD1_V1_INFERENCE), source=STOCK_CONFIG_NAME), None


def _without_wrappers(state: Dict[str, Any]) -> Dict[str, Any]:
    """The host wraps the token embedding (`EmbeddingsWithFixes`); its weight then sits under `.wrapped.`."""
    return {key.replace(".wrapped.", "."): value for key, value in state.items()}


def _tensors(module: Any, copy: bool) -> Dict[str, Any]:
    """A module's tensors: the host's own storage, or detached clones when the method trains them."""
    state = module.state_dict()
    return {key: value.detach().clone() for key, value in state.items()} if copy else dict(state)


def _dtype_of(state: Dict[str, Any]):
    import torch

    return next((value.dtype for value in state.values() if value.is_floating_point()), torch.float32)


def restore_network_backups(sd_model: Any) -> int:
    """Undo LoRA weights the Lora extension merged into the model for the last generation.

    The host applies networks by writing them into the weights (with a backup) and restores them lazily at
    the next generation; training on top of a merged LoRA would be training on the wrong base.
    """
    networks = sys.modules.get("networks")
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    if restore is None:
        return 0
    restored = 0
    for module in sd_model.modules():
        if getattr(module, "network_current_names", ()):
            restore(module)
            module.network_current_names = ()
            restored += 1
    return restored


def bundle_from_loaded_model(sd_model: Any, *, copy: frozenset = frozenset(), clip_skip: int = 1) -> ModelBundle:
    """Diffusers/transformers modules over the host's in-memory SD1 model (see the module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import ldm_keys
    from .models.loader import build_with_weights, finish_modules, mapped_or_fail, training_scheduler  # shared with the file loader

    configs, ldm = _ldm_config(sd_model)

    def mismatch(detail: str) -> ModelLoadError:
        return ModelLoadError(f"The loaded model does not match its config {configs.source}: {detail}",
                              "Reload the checkpoint in the WebUI; if it persists, report it with the model's name.")

    unet_ldm = _tensors(sd_model.model.diffusion_model, "unet" in copy)
    vae_ldm = _tensors(sd_model.first_stage_model, "vae" in copy)
    transformer = sd_model.cond_stage_model.wrapped.transformer
    text_sd = ldm_keys.canonical_text_encoder_keys(_without_wrappers(_tensors(transformer, "text_encoder" in copy)))
    text_sd.pop(ldm_keys.POSITION_IDS_KEY, None)  # a derived buffer the new module makes itself

    unet_sd = mapped_or_fail(ldm_keys.unet_to_diffusers(unet_ldm, ldm_keys.UNetLayout.from_diffusers_config(configs.unet)),
                              ldm_keys.UNET_PREFIX, mismatch)
    vae_sd = mapped_or_fail(ldm_keys.vae_to_diffusers(vae_ldm, ldm_keys.VAELayout.from_diffusers_config(configs.vae)),
                             ldm_keys.VAE_PREFIX, mismatch)
    unet = build_with_weights("UNet", lambda: UNet2DConditionModel(**configs.unet), unet_sd, _dtype_of(unet_sd), mismatch)
    vae = build_with_weights("VAE", lambda: AutoencoderKL(**configs.vae), vae_sd, _dtype_of(vae_sd), mismatch)
    text_encoder = build_with_weights("text encoder", lambda: CLIPTextModel(transformer.config), text_sd, _dtype_of(text_sd),
                           mismatch, canonical_text=True)
    unet, vae, text_encoder = finish_modules(unet, vae, text_encoder)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    identity = BaseIdentity(name=getattr(info, "name_for_extra", None) or (Path(filename).stem if filename else "loaded model"),
                            path=Path(filename) if filename else None, sha256=getattr(info, "sha256", None),
                            legacy_hash=getattr(info, "hash", None))
    tokenizer = sd_model.cond_stage_model.wrapped.tokenizer
    return ModelBundle(
        family=_family(sd_model),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(tokenizer, own="text_encoder" in copy),
        noise_scheduler=training_scheduler(configs.scheduler),
        prediction_type="v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon",
        clip_skip=clip_skip,
        identity=identity,
        ldm_config=ldm,
        ldm_extras=_extras(sd_model),
    )


def _tokenizer(tokenizer: Any, own: bool) -> Any:
    """Textual Inversion adds tokens: it gets its own tokenizer so the host's stays as it was."""
    import copy

    return copy.deepcopy(tokenizer) if own else tokenizer


def _extras(sd_model: Any) -> Dict[str, Any]:
    """The schedule the checkpoint carried (the host may have replaced `alphas_cumprod` for a sampler option)."""
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    if alphas is None:
        alphas = getattr(sd_model, "alphas_cumprod", None)
    return {"alphas_cumprod": alphas.detach().clone().cpu()} if alphas is not None else {}


# ----- the Host -----

class A1111Host(Host):
    def __init__(self) -> None:
        self._label = ""

    def _output_dirs(self) -> Dict[OutputKind, Path]:
        from modules import paths, sd_models, shared

        opts = shared.cmd_opts
        models = Path(paths.models_path)
        return {
            OutputKind.LORA: Path(getattr(opts, "lora_dir", None) or models / "Lora"),
            OutputKind.EMBEDDING: Path(getattr(opts, "embeddings_dir", None) or Path(paths.data_path) / "embeddings"),
            OutputKind.CHECKPOINT: Path(getattr(opts, "ckpt_dir", None) or sd_models.model_path),
            OutputKind.HYPERNETWORK: Path(getattr(opts, "hypernetwork_dir", None) or models / "hypernetworks"),
        }

    def facts(self) -> HostFacts:
        from modules import paths

        from .deps import missing_runtime

        folders = self._output_dirs()
        return HostFacts(
            name="AUTOMATIC1111",
            output_dirs=folders,
            presets_dir=Path(paths.data_path) / "sdcustom" / "presets",
            default_clip_skip=int(_option("CLIP_stop_at_last_layers", 1) or 1),
            preview_every=int(_option("sdcustom_preview_every", 0) or 0),
            queue_note="Training runs in the WebUI's queue: image generation waits until it finishes or is cancelled.",
            train_js="sdcustom_start_training",
            after_train_js=_REFRESH_CARDS_JS,
            allowed_roots=[Path(paths.data_path), Path(paths.models_path), *folders.values()],
            missing_requirements=missing_runtime(),
        )

    def model_label(self) -> str:
        info = getattr(self._model(required=False), "sd_checkpoint_info", None)
        return getattr(info, "title", "") or getattr(info, "name", "") or ""

    def base_parameters(self, checkpoint: str = "") -> Optional[int]:
        model = self._model(required=False)
        return sum(parameter.numel() for parameter in model.parameters()) if model is not None else None

    def _model(self, required: bool = True) -> Any:
        """`shared.sd_model` loads a model on first access; only a run may trigger that, not the UI."""
        from modules import sd_models, shared

        if not required:
            return getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        model = shared.sd_model
        if model is None:
            raise ModelLoadError("No checkpoint is loaded in the WebUI.", "Pick an SD1 checkpoint at the top of the page and try again.")
        return model

    def prepare(self, config: RunConfig, checkpoint: str = "") -> None:
        kind = output_kind(config.method)
        info = getattr(self._model(), "sd_checkpoint_info", None)
        config.model.base = str(getattr(info, "filename", "") or "loaded model")
        if not config.output.out:
            folder = self._output_dirs()[kind]
            subfolder = str(_option(_SUBFOLDER_SETTINGS.get(kind, ""), "") or "").strip()
            if subfolder:
                if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
                    raise ConfigError(f"The settings' sub-folder {subfolder!r} leaves the {kind.value} folder.",
                                      "Use a relative folder name in Settings > Customize (training).")
                folder = folder / subfolder
            config.output.out = str(folder)

    def check_fit(self, config: RunConfig) -> None:
        from .train import SUPPORTED_FAMILIES

        model = self._model()
        family = _family(model)
        if family not in SUPPORTED_FAMILIES or getattr(model, "is_sd3", False):
            raise ModelLoadError(f"The loaded checkpoint ({self.model_label() or 'unknown'}) is an "
                                 f"{'SD3' if getattr(model, 'is_sd3', False) else family.value.upper()} model; "
                                 f"{config.method} trains SD1.x models only in this version.",
                                 "Load an SD1.x checkpoint (SD 1.5 or a model fine-tuned from it) at the top of the page.")
        if int(getattr(model, "latent_channels", 4)) != 4 or getattr(model, "is_sdxl_inpaint", False):
            raise ModelLoadError("The loaded checkpoint is not a plain text-to-image model (inpainting or edit model).",
                                 "Load a plain SD1.x checkpoint at the top of the page.")

    def bundle_for(self, config: RunConfig) -> Optional[ModelBundle]:
        model = self._model()
        restored = restore_network_backups(model)
        if restored:
            logger.info("Restored %d layers from LoRA weights merged for the last generation", restored)
        return bundle_from_loaded_model(model, copy=trained_in_place(config.method),
                                        clip_skip=int(_option("CLIP_stop_at_last_layers", 1) or 1))

    @contextlib.contextmanager
    def session(self, config: RunConfig) -> Iterator[None]:
        from modules import sd_models, shared

        self._label = config.output.name
        shared.state.job = "sdcustom-train"
        shared.state.textinfo = f"Preparing to train {config.output.name}..."
        parked = "unet" in trained_in_place(config.method) and bool(_option("sdcustom_unload_for_full", True))
        if parked:  # a full fine-tune needs the GPU memory the host's copy holds
            sd_models.unload_model_weights()
        try:
            yield
        finally:
            if parked:
                sd_models.send_model_to_device(shared.sd_model)

    def on_event(self, event: Event) -> None:
        from modules import shared

        state = shared.state
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
        from modules import shared

        return bool(shared.state.interrupted)

    def refresh(self, kind: OutputKind, outputs: Sequence[Path]) -> None:
        from modules import sd_hijack, sd_models, shared

        if kind is OutputKind.LORA:
            networks = sys.modules.get("networks")  # the built-in Lora extension's module
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()
        elif kind is OutputKind.EMBEDDING:
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
        elif kind is OutputKind.CHECKPOINT:
            sd_models.list_models()
        elif kind is OutputKind.HYPERNETWORK:
            shared.reload_hypernetworks()
            shared.loaded_hypernetworks.clear()

    def exclusive(self, work: Callable[[], Any]) -> Any:
        from modules import call_queue, shared

        with call_queue.queue_lock:
            shared.state.begin(job="sdcustom-train")
            try:
                return work()
            finally:
                shared.state.end()

    def wrap_tab_call(self, function: Callable[..., list], extra_outputs: list) -> Callable[..., list]:
        from modules.call_queue import wrap_gradio_gpu_call

        return wrap_gradio_gpu_call(function, extra_outputs=extra_outputs)


# ----- callbacks registered by scripts/sdcustom.py -----

_MANAGER = None


def manager():
    """One run manager per WebUI process, shared by the tab and the API."""
    global _MANAGER
    if _MANAGER is None:
        from .runs import RunManager

        _MANAGER = RunManager(A1111Host())
    return _MANAGER


def ui_tabs() -> list:
    from .ui import build_tab

    runs = manager()
    return [(build_tab(runs.host.facts(), runs), TAB_TITLE, TAB_ID)]


def register_settings() -> None:
    import gradio as gr
    from modules import shared

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
    from modules import shared

    from .api import parse_credentials, register_routes

    cmd_opts = shared.cmd_opts
    if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
        return
    runs = manager()
    register_routes(app, runs, roots=runs.host.facts().allowed_roots,
                    credentials=parse_credentials(getattr(cmd_opts, "api_auth", None)))
