"""Set up the fake WebUI: folders, command-line options and an LDM-shaped `sd_model` from a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import torch

import networks  # noqa: F401 - the built-in Lora extension has imported it before any other extension loads
from modules import call_queue, paths, script_callbacks, sd_models, shared

CALLS = shared.CALLS


class StateTree(torch.nn.Module):
    """Tensors under their dotted names as nested modules: the host's key layout, without its forward code."""

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor], requires_grad: bool = False) -> "StateTree":
        root = cls()
        for key, tensor in state.items():
            *path, leaf = key.split(".")
            module = root
            for part in path:
                if part not in module._modules:
                    module.add_module(part, cls())
                module = module._modules[part]
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=requires_grad))
        return root


class EmbeddingsWithFixes(torch.nn.Module):
    """The host's wrapper around CLIP's token embedding (modules/sd_hijack.py); the weight moves under `.wrapped`."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


def _clip_transformer(text_dir: Path, state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformers CLIP text model (SD1's encoder, SDXL's first) with the host's token-embedding wrapper."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_sdcustom.models import ldm_keys
    from lib_sdcustom.models.model_yaml import read_text_encoder_folder

    transformer = CLIPTextModel(CLIPTextConfig.from_dict(read_text_encoder_folder(text_dir)))
    transformer.load_state_dict(ldm_keys.text_encoder_load_keys(transformer, state), strict=False)
    transformer.requires_grad_(False)
    embeddings = ldm_keys.text_encoder_root(transformer).embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    return transformer


def _open_clip_model(state: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """open_clip's text tower as ldm/sgm hold it (`token_embedding`, `positional_embedding`,
    `transformer.resblocks.N.attn.in_proj_weight`, `text_projection`, ...), token embedding wrapped."""
    model = StateTree.from_state(state)
    model.token_embedding = EmbeddingsWithFixes(model.token_embedding)
    return model


def _wrapper(**children) -> torch.nn.Module:
    """The host's `...WithCustomWords` object around an ldm/sgm embedder (its modules and tokenizer): the
    embedder sits at `.wrapped`."""
    wrapped = torch.nn.Module()
    for name, child in children.items():
        setattr(wrapped, name, child)
    outer = torch.nn.Module()
    outer.wrapped = wrapped
    return outer


def _v_prediction(yaml: dict, family) -> bool:
    """The host's rule: ldm reads `parameterization`; `extend_sdxl` checks for the VScaling denoiser."""
    from lib_sdcustom.models.bundle import ModelFamily

    params = yaml["model"]["params"]
    if family is ModelFamily.SDXL:
        return "VScaling" in params["denoiser_config"]["params"]["scaling_config"]["target"]
    return params.get("parameterization", "eps") == "v"


def build_sd_model(checkpoint: Path) -> torch.nn.Module:
    """An SD1/SD2 `LatentDiffusion` or SDXL `DiffusionEngine` stand-in holding the checkpoint's tensors where
    the host keeps them (docs/host-formats.md#the-loaded-model), with its type flags and `parameterization`."""
    import yaml as pyyaml
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    from lib_sdcustom.models import ldm_keys
    from lib_sdcustom.models.bundle import ModelFamily
    from lib_sdcustom.models.detect import detect_family
    from lib_sdcustom.models.ldm_config import configs_from_ldm
    from lib_sdcustom.models.tokenizer import load_clip_tokenizer

    state = load_file(str(checkpoint))
    family = detect_family(state, checkpoint)
    parts = ldm_keys.split_ldm_state_dict(state, family)
    text_dir = checkpoint.parent / f"{checkpoint.stem}_text_encoder"
    config_path = checkpoint.with_suffix(".yaml")
    yaml = pyyaml.safe_load(config_path.read_text())

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    # ldm freezes the VAE and the text encoder, not the UNet: its weights are leaves that require grad.
    model.model.diffusion_model = StateTree.from_state(parts.unet, requires_grad=True)
    model.first_stage_model = StateTree.from_state(parts.vae)
    if family is ModelFamily.SDXL:
        time_embedders = [torch.nn.Module() for _ in range(3)]  # ConcatTimestepEmbedderND: no weights
        model.conditioner = torch.nn.Module()
        model.conditioner.embedders = torch.nn.ModuleList([
            _wrapper(transformer=_clip_transformer(text_dir, parts.text_encoder), tokenizer=load_clip_tokenizer(text_dir)),
            _wrapper(model=_open_clip_model(parts.text_encoder_2)), *time_embedders])
        model.conditioner.wrapped = torch.nn.Module()  # extend_sdxl: for code that reads cond_stage_model.wrapped
        model.cond_stage_model = model.conditioner  # as sd_hijack does for several text encoders
        schedule = DDPMScheduler(**configs_from_ldm(yaml, source=str(config_path), yaml_dir=checkpoint.parent).scheduler)
        model.alphas_cumprod = schedule.alphas_cumprod.clone()  # extend_sdxl: an attribute, not a file tensor
    elif family is ModelFamily.SD2:
        model.cond_stage_model = _wrapper(model=_open_clip_model(parts.text_encoder))
        model.register_buffer("alphas_cumprod", parts.extras["alphas_cumprod"].clone())
    else:
        model.cond_stage_model = _wrapper(transformer=_clip_transformer(text_dir, parts.text_encoder),
                                          tokenizer=load_clip_tokenizer(text_dir))
        model.register_buffer("alphas_cumprod", parts.extras["alphas_cumprod"].clone())
    model.parameterization = "v" if _v_prediction(yaml, family) else "eps"
    model.is_sd1, model.is_sd2 = family is ModelFamily.SD1, family is ModelFamily.SD2
    model.is_sdxl, model.is_sd3, model.is_sdxl_inpaint = family is ModelFamily.SDXL, False, False
    model.latent_channels = 4
    model.used_config = str(config_path)
    model.sd_checkpoint_info = SimpleNamespace(filename=str(checkpoint), name=checkpoint.name, name_for_extra=checkpoint.stem,
                                               title=f"{checkpoint.name} [0123456789]", sha256="0123456789" + "ab" * 27,
                                               hash="01234567")
    return model


def configure(root: Path, checkpoint: Path, **cmd_options) -> torch.nn.Module:
    """A WebUI folder under `root` with `checkpoint` (and its YAML and text-encoder folder) loaded."""
    models = root / "models"
    ckpt_dir = models / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.parent.glob(f"{checkpoint.stem}*"):
        target = ckpt_dir / item.name
        if not target.exists():
            (shutil.copytree if item.is_dir() else shutil.copyfile)(item, target)
    for folder in ("Lora", "hypernetworks"):
        (models / folder).mkdir(exist_ok=True)
    (root / "embeddings").mkdir(exist_ok=True)
    paths.script_path = paths.data_path = str(root)
    paths.models_path = str(models)
    sd_models.model_path = str(ckpt_dir)
    shared.cmd_opts = SimpleNamespace(**{"api": False, "api_auth": None, "nowebui": False, "lora_dir": str(models / "Lora"),
                                         "embeddings_dir": str(root / "embeddings"), "ckpt_dir": None,
                                         "hypernetwork_dir": str(models / "hypernetworks"), "lowvram": False, **cmd_options})
    shared.opts = shared.Options()
    shared.state = shared.State()
    model = build_sd_model(ckpt_dir / checkpoint.name)
    shared.sd_model = sd_models.model_data.sd_model = model
    CALLS.clear()
    call_queue.WRAPPED.clear()
    script_callbacks.clear()
    return model
