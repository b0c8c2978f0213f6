"""A model YAML read into module configs: the typed reader, `ModelConfigs`, and the builders LDM (`ldm_config`:
SD1, SD2) and sgm (`sgm_config`: SDXL) configs share for the UNet, the VAE, the schedule and the text towers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, cast

from ..errors import ModelLoadError
from .bundle import ModelFamily
from .open_clip_keys import OpenClipLayout
from .stock_configs import OPEN_CLIP_TOWERS, STOCK_CLIP_ID, STOCK_SOURCES, VIT_L14_TEXT_CONFIG

_DEFAULT_OPEN_CLIP_ARCH = "ViT-H-14"  # the default of ldm's and sgm's open_clip embedders


@dataclass(frozen=True)
class ModelConfigs:
    """Everything needed to build the modules of one checkpoint, and where it came from.

    `text_encoder` builds the first (or only) text encoder; for SD2 it already holds only the blocks the
    model runs (`open_clip` tells how the checkpoint's tower maps onto it). SDXL adds `text_encoder_2`, the
    OpenCLIP bigG tower as a `CLIPTextModelWithProjection` config.
    """

    unet: dict[str, Any]  # UNet2DConditionModel kwargs
    vae: dict[str, Any]  # AutoencoderKL kwargs
    text_encoder: dict[str, Any]  # CLIPTextConfig dict
    scheduler: dict[str, Any]  # DDPMScheduler kwargs
    prediction_type: str  # "epsilon" or "v_prediction"
    text_encoder_dir: Path | None  # local folder named by the YAML for the (first) text encoder
    source: str  # the YAML path, or one of STOCK_SOURCES
    family: ModelFamily = ModelFamily.SD1
    open_clip: OpenClipLayout | None = None  # the open_clip tower: SD2's text encoder, SDXL's second one
    text_encoder_2: dict[str, Any] | None = None  # SDXL: CLIPTextConfig dict of the second encoder
    text_encoder_2_dir: Path | None = None

    @property
    def from_yaml(self) -> bool:
        return self.source not in STOCK_SOURCES


def yaml_beside(checkpoint: Path) -> Path:
    """The host's rule: `os.path.splitext(filename)[0] + ".yaml"`."""
    return Path(checkpoint).with_suffix(".yaml")


def read_ldm_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelLoadError(f"Could not read the model config {path}: {error}",
                             "Fix the YAML, or remove it to use the standard config of the model's family.") from error
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelLoadError(f"{path} is not an LDM model config (it has no 'model:' section).",
                             "Use a copy of the YAML the checkpoint was published with, or remove it.")
    return data


class YamlReader:
    """Typed look-ups into the YAML that fail with the file and the dotted key in the message."""

    def __init__(self, data: Mapping[str, Any], source: str, yaml_dir: Path | None = None) -> None:
        self.data = data
        self.source = source
        self.yaml_dir = yaml_dir  # anchors relative text-encoder folders

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"The model config {self.source} {what}.",
                              "Use the YAML the checkpoint was published with (an SD1, SD2 or SDXL base config).")

    def get(self, dotted: str, default: Any = ...) -> Any:
        """The value at `dotted` (a number indexes a list, as in sgm's `emb_models.1.params`)."""
        node: Any = self.data
        for part in dotted.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, Mapping) and node.get(part) is not None:
                node = node[part]
            else:
                node = None
            if node is None:
                if default is ...:
                    raise self.fail(f"has no '{dotted}'")
                return default
        return node


def _single_int(value: Any, reader: YamlReader, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise reader.fail(f"sets {name} per level ({value}), which is not supported")
        value = value[0]
    return int(value)


def unet_config(reader: YamlReader, params: str, default_image_size: int) -> dict[str, Any]:
    """UNet2DConditionModel kwargs from the openaimodel `UNetModel` params at the dotted path `params`."""
    if not reader.get(f"{params}.use_spatial_transformer", False):
        raise reader.fail("describes a UNet without cross-attention (use_spatial_transformer is not true)")
    model_channels = int(reader.get(f"{params}.model_channels"))
    channels = [model_channels * int(m) for m in reader.get(f"{params}.channel_mult")]
    attention_resolutions = {int(r) for r in reader.get(f"{params}.attention_resolutions", [])}
    attends = [2 ** level in attention_resolutions for level in range(len(channels))]
    head_channels = int(reader.get(f"{params}.num_head_channels", -1))
    if head_channels > 0:
        heads: list[int] = [c // head_channels for c in channels]
    else:
        heads = [int(reader.get(f"{params}.num_heads"))] * len(channels)
    context_dim = reader.get(f"{params}.context_dim")
    depth = reader.get(f"{params}.transformer_depth", 1)
    return {
        "sample_size": int(reader.get("model.params.image_size", default_image_size)),
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


def vae_config(reader: YamlReader, default_image_size: int) -> dict[str, Any]:
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
        "sample_size": int(reader.get("model.params.image_size", default_image_size)) * 2 ** (levels - 1),
        "scaling_factor": float(reader.get("model.params.scale_factor", 1.0)),
    }


def ddpm_scheduler(timesteps: int, linear_start: float, linear_end: float, prediction_type: str) -> dict[str, Any]:
    """DDPMScheduler kwargs of LDM's / sgm's 'linear' schedule (linear in sqrt(beta), diffusers' scaled_linear)."""
    return {
        "num_train_timesteps": int(timesteps),
        "beta_start": float(linear_start),
        "beta_end": float(linear_end),
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "clip_sample": False,
        "steps_offset": 1,  # as SD's published scheduler configs; samplers built from this config inherit it
    }


def read_text_encoder_folder(folder: Path) -> dict[str, Any]:
    """The CLIPTextConfig dict in `folder/config.json` (a full CLIPModel config gives its text part)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not read the text-encoder config {path}: {error}",
                             "The folder must hold a transformers CLIPTextConfig config.json.") from error
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    return cast(dict[str, Any], config)


def _local_folder(reader: YamlReader, name: str) -> Path | None:
    """`name` as a folder beside the YAML, or as a path of its own; None when neither exists."""
    candidates = ([reader.yaml_dir / name] if reader.yaml_dir is not None else []) + [Path(name)]
    return next((folder.resolve() for folder in candidates if folder.is_dir()), None)


def with_absolute_folders(ldm: Mapping[str, Any], yaml_dir: Path) -> dict[str, Any]:
    """A copy of `ldm` whose text-encoder `version` folders given relative to `yaml_dir` are absolute paths.

    The WebUI resolves such a folder against its own working directory, not the YAML's folder, so a YAML
    copied beside a new checkpoint (or installed into the WebUI) must name the folder absolutely.
    """
    def walk(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: (_absolute(item) if key == "version" else walk(item)) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    def _absolute(version: Any) -> Any:
        if isinstance(version, str) and not Path(version).is_absolute() and (Path(yaml_dir) / version).is_dir():
            return str((Path(yaml_dir) / version).resolve())
        return version

    return cast(dict[str, Any], walk(ldm))


def clip_text_encoder(reader: YamlReader, params: str) -> tuple[dict[str, Any], Path | None]:
    """A `FrozenCLIPEmbedder`'s text model (SD1, SDXL's first): stock ViT-L/14 or the local `version` folder."""
    version = reader.get(f"{params}.version", None)
    if version is None or str(version) == STOCK_CLIP_ID:
        return dict(VIT_L14_TEXT_CONFIG), None
    folder = _local_folder(reader, str(version))
    if folder is not None:
        return read_text_encoder_folder(folder), folder
    raise ModelLoadError(
        f"The model config {reader.source} names the text encoder '{version}', which is not a local folder "
        "(models are never downloaded).",
        f"Put a folder holding its config.json (and tokenizer files) at that path, or set version to "
        f"{STOCK_CLIP_ID} for the standard CLIP ViT-L/14 text encoder.",
    )


def open_clip_tower(reader: YamlReader, params: str) -> tuple[dict[str, Any], Path | None]:
    """An open_clip embedder's whole text tower: the built-in config of its `arch`, or a local folder.

    The host's open_clip only knows registered architecture names; a folder holding a CLIPTextConfig
    `config.json` of the whole tower is this trainer's way to describe other (tiny, test) towers.
    """
    arch = str(reader.get(f"{params}.arch", _DEFAULT_OPEN_CLIP_ARCH))
    if arch in OPEN_CLIP_TOWERS:
        return dict(OPEN_CLIP_TOWERS[arch]), None
    folder = _local_folder(reader, arch)
    if folder is not None:
        return read_text_encoder_folder(folder), folder
    raise ModelLoadError(
        f"The model config {reader.source} names the open_clip text model '{arch}', which is neither a built-in "
        f"tower ({', '.join(OPEN_CLIP_TOWERS)}) nor a local folder (models are never downloaded).",
        "Set arch to ViT-H-14 (SD2) or ViT-bigG-14 (SDXL), or to a folder holding the tower's transformers "
        "CLIPTextConfig config.json.",
    )
