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
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "StateTree":
        root = cls()
        for key, tensor in state.items():
            *path, leaf = key.split(".")
            module = root
            for part in path:
                if part not in module._modules:
                    module.add_module(part, cls())
                module = module._modules[part]
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
        return root


class EmbeddingsWithFixes(torch.nn.Module):
    """The host's wrapper around CLIP's token embedding (modules/sd_hijack.py); the weight moves under `.wrapped`."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


def build_sd_model(checkpoint: Path) -> torch.nn.Module:
    """An SD1 `LatentDiffusion` stand-in holding the checkpoint's tensors where the host keeps them."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_sdcustom.models import ldm_keys
    from lib_sdcustom.models.ldm_config import read_text_encoder_folder
    from lib_sdcustom.models.tokenizer import load_clip_tokenizer

    state = load_file(str(checkpoint))
    parts = ldm_keys.split_ldm_state_dict(state)
    text_dir = checkpoint.parent / f"{checkpoint.stem}_text_encoder"
    transformer = CLIPTextModel(CLIPTextConfig.from_dict(read_text_encoder_folder(text_dir)))
    transformer.load_state_dict(ldm_keys.text_encoder_load_keys(transformer, parts.text_encoder), strict=False)
    transformer.requires_grad_(False)
    embeddings = ldm_keys.text_encoder_root(transformer).embeddings
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.diffusion_model = StateTree.from_state(parts.unet)
    model.first_stage_model = StateTree.from_state(parts.vae)
    model.cond_stage_model = torch.nn.Module()
    model.cond_stage_model.wrapped = torch.nn.Module()
    model.cond_stage_model.wrapped.transformer = transformer
    model.cond_stage_model.wrapped.tokenizer = load_clip_tokenizer(text_dir)
    model.register_buffer("alphas_cumprod", parts.extras["alphas_cumprod"].clone())
    model.parameterization = "eps"
    model.is_sd1, model.is_sd2, model.is_sdxl, model.is_sd3 = True, False, False, False
    model.latent_channels = 4
    model.used_config = str(checkpoint.with_suffix(".yaml"))
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
