"""The original LDM YAML of a checkpoint -> the configs of the diffusers / transformers modules we train.

The host builds a checkpoint from `NAME.yaml` beside it (or its stock config), so we read the same file the
same way: whatever shape the YAML declares is the shape we build, which is what makes non-standard and tiny
test models load. Without a YAML the stock SD1 `v1-inference.yaml` applies, as in the host. Nothing here
touches a model hub: the text encoder is either the built-in ViT-L/14 config or a local folder the YAML names.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

STOCK_CLIP_ID = "openai/clip-vit-large-patch14"
STOCK_CONFIG_NAME = "the built-in SD1 v1-inference config"

# The host's configs/v1-inference.yaml (A1111 1.10.1), minus training-only entries.
SD1_V1_INFERENCE: Dict[str, Any] = {
    "model": {
        "base_learning_rate": 1.0e-04,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 64,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 768,
                    "use_checkpoint": False,
                    "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        },
    }
}

# transformers CLIPTextConfig of openai/clip-vit-large-patch14's text tower (SD1's text encoder).
VIT_L14_TEXT_CONFIG: Dict[str, Any] = {
    "model_type": "clip_text_model",
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# LDM `DDPM.__init__` defaults, used when the YAML leaves them out (as the host does).
_LDM_DEFAULT_SCHEDULE = {"linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


@dataclass(frozen=True)
class ModelConfigs:
    """Everything needed to build the modules of one SD1 checkpoint, and where it came from."""

    unet: Dict[str, Any]  # UNet2DConditionModel kwargs
    vae: Dict[str, Any]  # AutoencoderKL kwargs
    text_encoder: Dict[str, Any]  # CLIPTextConfig dict
    scheduler: Dict[str, Any]  # DDPMScheduler kwargs
    prediction_type: str  # "epsilon" or "v_prediction"
    text_encoder_dir: Optional[Path]  # local folder named by cond_stage_config.params.version
    source: str  # the YAML path, or STOCK_CONFIG_NAME

    @property
    def from_yaml(self) -> bool:
        return self.source != STOCK_CONFIG_NAME


def yaml_beside(checkpoint: Path) -> Path:
    """The host's rule: `os.path.splitext(filename)[0] + ".yaml"`."""
    return Path(checkpoint).with_suffix(".yaml")


def read_ldm_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelLoadError(f"Could not read the model config {path}: {error}",
                             "Fix the YAML, or remove it to use the standard SD1 config.") from error
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelLoadError(f"{path} is not an LDM model config (it has no 'model:' section).",
                             "Use a copy of the YAML the checkpoint was published with, or remove it.")
    return data


class _Reader:
    """Typed look-ups into the YAML that fail with the file and the dotted key in the message."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"The model config {self.source} {what}.",
                              "Use the YAML the checkpoint was published with (an SD1 LDM config).")

    def get(self, dotted: str, default: Any = ...) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node or node[part] is None:
                if default is ...:
                    raise self.fail(f"has no '{dotted}'")
                return default
            node = node[part]
        return node


def _single_int(value: Any, reader: _Reader, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise reader.fail(f"sets {name} per level ({value}), which is not supported")
        value = value[0]
    return int(value)


def _unet_config(reader: _Reader) -> Dict[str, Any]:
    params = "model.params.unet_config.params"
    if not reader.get(f"{params}.use_spatial_transformer", False):
        raise reader.fail("describes a UNet without cross-attention (use_spatial_transformer is not true)")
    model_channels = int(reader.get(f"{params}.model_channels"))
    channels = [model_channels * int(m) for m in reader.get(f"{params}.channel_mult")]
    attention_resolutions = {int(r) for r in reader.get(f"{params}.attention_resolutions", [])}
    attends = [2 ** level in attention_resolutions for level in range(len(channels))]
    head_channels = int(reader.get(f"{params}.num_head_channels", -1))
    if head_channels > 0:
        heads: List[int] = [c // head_channels for c in channels]
    else:
        heads = [int(reader.get(f"{params}.num_heads"))] * len(channels)
    context_dim = reader.get(f"{params}.context_dim")
    depth = reader.get(f"{params}.transformer_depth", 1)
    return {
        "sample_size": int(reader.get("model.params.image_size", 64)),
        "in_channels": int(reader.get(f"{params}.in_channels")),
        "out_channels": int(reader.get(f"{params}.out_channels")),
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "layers_per_block": _single_int(reader.get(f"{params}.num_res_blocks"), reader, "num_res_blocks"),
        "cross_attention_dim": int(context_dim[0] if isinstance(context_dim, list) else context_dim),
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": bool(reader.get(f"{params}.use_linear_in_transformer", False)),
        "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple)) else int(depth),
    }


def _vae_config(reader: _Reader) -> Dict[str, Any]:
    params = "model.params.first_stage_config.params"
    dd = f"{params}.ddconfig"
    if reader.get(f"{dd}.attn_resolutions", []):
        raise reader.fail("puts attention inside the VAE levels (attn_resolutions), which is not supported")
    if not reader.get(f"{dd}.double_z", True):
        raise reader.fail("describes a VAE without double_z, which is not supported")
    z_channels = int(reader.get(f"{dd}.z_channels"))
    if int(reader.get(f"{params}.embed_dim")) != z_channels:
        raise reader.fail("has embed_dim different from z_channels, which is not supported")
    levels = len(reader.get(f"{dd}.ch_mult"))
    return {
        "in_channels": int(reader.get(f"{dd}.in_channels")),
        "out_channels": int(reader.get(f"{dd}.out_ch")),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(reader.get(f"{dd}.ch")) * int(m) for m in reader.get(f"{dd}.ch_mult")],
        "layers_per_block": int(reader.get(f"{dd}.num_res_blocks")),
        "latent_channels": z_channels,
        "norm_num_groups": 32,  # LDM's VAE hard-codes GroupNorm(32)
        # diffusers means pixels here: the latent size of the diffusion model times the VAE's down-scaling.
        "sample_size": int(reader.get("model.params.image_size", 64)) * 2 ** (levels - 1),
        "scaling_factor": float(reader.get("model.params.scale_factor", 1.0)),
    }


def _schedule(reader: _Reader) -> Tuple[Dict[str, Any], str]:
    if reader.get("model.params.beta_schedule", "linear") != "linear":
        raise reader.fail("uses a beta_schedule other than 'linear', which is not supported")
    parameterization = reader.get("model.params.parameterization", "eps")
    if parameterization not in _PREDICTION_TYPES:
        raise reader.fail(f"sets parameterization '{parameterization}'; only 'eps' and 'v' are supported")
    prediction_type = _PREDICTION_TYPES[parameterization]
    scheduler = {
        "num_train_timesteps": int(reader.get("model.params.timesteps", _LDM_DEFAULT_SCHEDULE["timesteps"])),
        "beta_start": float(reader.get("model.params.linear_start", _LDM_DEFAULT_SCHEDULE["linear_start"])),
        "beta_end": float(reader.get("model.params.linear_end", _LDM_DEFAULT_SCHEDULE["linear_end"])),
        "beta_schedule": "scaled_linear",  # LDM's "linear" is linear in sqrt(beta)
        "prediction_type": prediction_type,
        "clip_sample": False,
        "steps_offset": 1,  # as SD's published scheduler configs; samplers built from this config inherit it
    }
    return scheduler, prediction_type


def read_text_encoder_folder(folder: Path) -> Dict[str, Any]:
    """The CLIPTextConfig dict in `folder/config.json` (a full CLIPModel config gives its text part)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not read the text-encoder config {path}: {error}",
                             "The folder must hold a transformers CLIPTextConfig config.json.") from error
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    return config


def _text_encoder(reader: _Reader, yaml_dir: Optional[Path]) -> Tuple[Dict[str, Any], Optional[Path]]:
    target = str(reader.get("model.params.cond_stage_config.target"))
    if not target.endswith("FrozenCLIPEmbedder"):
        raise reader.fail(f"uses the text encoder {target}; SD1 needs FrozenCLIPEmbedder")
    version = reader.get("model.params.cond_stage_config.params.version", None)
    if version is None or str(version) == STOCK_CLIP_ID:
        return dict(VIT_L14_TEXT_CONFIG), None
    candidates = ([yaml_dir / str(version)] if yaml_dir is not None else []) + [Path(str(version))]
    for folder in candidates:
        if folder.is_dir():
            return read_text_encoder_folder(folder), folder.resolve()
    raise ModelLoadError(
        f"The model config {reader.source} names the text encoder '{version}', which is not a local folder "
        "(models are never downloaded).",
        f"Put a folder holding its config.json (and tokenizer files) at that path, or set version to "
        f"{STOCK_CLIP_ID} for the standard SD1 text encoder.",
    )


def configs_from_ldm(ldm: Mapping[str, Any], *, source: str, yaml_dir: Optional[Path] = None) -> ModelConfigs:
    """Translate an LDM config dict; `yaml_dir` anchors a relative text-encoder folder."""
    reader = _Reader(ldm, source)
    scheduler, prediction_type = _schedule(reader)
    text_encoder, text_encoder_dir = _text_encoder(reader, yaml_dir)
    return ModelConfigs(unet=_unet_config(reader), vae=_vae_config(reader), text_encoder=text_encoder,
                        scheduler=scheduler, prediction_type=prediction_type,
                        text_encoder_dir=text_encoder_dir, source=source)


def configs_for_checkpoint(checkpoint: Path) -> Tuple[ModelConfigs, Optional[Dict[str, Any]]]:
    """The configs the host would use for `checkpoint`, and the YAML dict when one sits beside it."""
    path = yaml_beside(checkpoint)
    if path.is_file():
        ldm = read_ldm_yaml(path)
        logger.info("Using model config %s", path)
        return configs_from_ldm(ldm, source=str(path), yaml_dir=path.parent), ldm
    return configs_from_ldm(copy.deepcopy(SD1_V1_INFERENCE), source=STOCK_CONFIG_NAME), None
