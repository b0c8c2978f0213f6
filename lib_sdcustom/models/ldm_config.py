"""The original LDM YAML of a checkpoint -> the configs of the diffusers / transformers modules we train.

The host builds a checkpoint from `NAME.yaml` beside it (or its stock config), so we read the same file the
same way: whatever shape the YAML declares is the shape we build, which is what makes non-standard and tiny
test models load. SD1 and SD2 YAMLs are `ldm` configs (`unet_config`, `cond_stage_config`); SDXL's are `sgm`
configs (`network_config`, `conditioner_config`, read by `sgm_config`). Without a YAML the family's stock
config applies (`configs_for_checkpoint`), as in the host. Nothing here touches a model hub: a text encoder is
either a built-in config (`stock_configs`) or a local folder the YAML names.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import ModelLoadError
from .bundle import ModelFamily
from .open_clip_keys import OpenClipLayout
# SD1_V1_INFERENCE and VIT_L14_TEXT_CONFIG are also imported from here by older code: keep them importable.
from .stock_configs import (OPEN_CLIP_TOWERS, SD1_V1_INFERENCE, SD2_CONFIG_NAMES, SD2_V2_INFERENCE,  # noqa: F401
                            SD2_V2_INFERENCE_V, SDXL_BASE, SDXL_CONFIG_NAME, VIT_L14_TEXT_CONFIG)

logger = logging.getLogger(__name__)

STOCK_CLIP_ID = "openai/clip-vit-large-patch14"
STOCK_CONFIG_NAME = "the built-in SD1 v1-inference config"
SD2_STOCK_NAMES = {prediction: f"the built-in SD2 {name[:-5]} config" for prediction, name in SD2_CONFIG_NAMES.items()}
SDXL_STOCK_NAME = f"the built-in SDXL {SDXL_CONFIG_NAME[:-5]} config"
STOCK_SOURCES = frozenset({STOCK_CONFIG_NAME, SDXL_STOCK_NAME, *SD2_STOCK_NAMES.values()})
# sd-scripts' `sai_model_spec` metadata ("modelspec.prediction_type") -> diffusers' names.
PREDICTION_METADATA_KEY = "modelspec.prediction_type"
_METADATA_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}

# LDM `DDPM.__init__` defaults, used when the YAML leaves them out (as the host does).
_LDM_DEFAULT_SCHEDULE = {"linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
_CLIP_EMBEDDER = "FrozenCLIPEmbedder"
_OPEN_CLIP_EMBEDDER = "FrozenOpenCLIPEmbedder"
_DEFAULT_OPEN_CLIP_ARCH = "ViT-H-14"  # the default of ldm's and sgm's open_clip embedders


@dataclass(frozen=True)
class ModelConfigs:
    """Everything needed to build the modules of one checkpoint, and where it came from.

    `text_encoder` builds the first (or only) text encoder; for SD2 it already holds only the blocks the
    model runs (`open_clip` tells how the checkpoint's tower maps onto it). SDXL adds `text_encoder_2`, the
    OpenCLIP bigG tower as a `CLIPTextModelWithProjection` config.
    """

    unet: Dict[str, Any]  # UNet2DConditionModel kwargs
    vae: Dict[str, Any]  # AutoencoderKL kwargs
    text_encoder: Dict[str, Any]  # CLIPTextConfig dict
    scheduler: Dict[str, Any]  # DDPMScheduler kwargs
    prediction_type: str  # "epsilon" or "v_prediction"
    text_encoder_dir: Optional[Path]  # local folder named by the YAML for the (first) text encoder
    source: str  # the YAML path, or one of STOCK_SOURCES
    family: ModelFamily = ModelFamily.SD1
    open_clip: Optional[OpenClipLayout] = None  # the open_clip tower: SD2's text encoder, SDXL's second one
    text_encoder_2: Optional[Dict[str, Any]] = None  # SDXL: CLIPTextConfig dict of the second encoder
    text_encoder_2_dir: Optional[Path] = None

    @property
    def from_yaml(self) -> bool:
        return self.source not in STOCK_SOURCES


def yaml_beside(checkpoint: Path) -> Path:
    """The host's rule: `os.path.splitext(filename)[0] + ".yaml"`."""
    return Path(checkpoint).with_suffix(".yaml")


def read_ldm_yaml(path: Path) -> Dict[str, Any]:
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

    def __init__(self, data: Mapping[str, Any], source: str, yaml_dir: Optional[Path] = None) -> None:
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


def unet_config(reader: YamlReader, params: str, default_image_size: int) -> Dict[str, Any]:
    """UNet2DConditionModel kwargs from the openaimodel `UNetModel` params at the dotted path `params`."""
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


def vae_config(reader: YamlReader, default_image_size: int) -> Dict[str, Any]:
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


def ddpm_scheduler(timesteps: int, linear_start: float, linear_end: float, prediction_type: str) -> Dict[str, Any]:
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


def _schedule(reader: YamlReader) -> Tuple[Dict[str, Any], str]:
    if reader.get("model.params.beta_schedule", "linear") != "linear":
        raise reader.fail("uses a beta_schedule other than 'linear', which is not supported")
    parameterization = reader.get("model.params.parameterization", "eps")
    if parameterization not in _PREDICTION_TYPES:
        raise reader.fail(f"sets parameterization '{parameterization}'; only 'eps' and 'v' are supported")
    prediction_type = _PREDICTION_TYPES[parameterization]
    scheduler = ddpm_scheduler(reader.get("model.params.timesteps", _LDM_DEFAULT_SCHEDULE["timesteps"]),
                               reader.get("model.params.linear_start", _LDM_DEFAULT_SCHEDULE["linear_start"]),
                               reader.get("model.params.linear_end", _LDM_DEFAULT_SCHEDULE["linear_end"]),
                               prediction_type)
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


def _local_folder(reader: YamlReader, name: str) -> Optional[Path]:
    """`name` as a folder beside the YAML, or as a path of its own; None when neither exists."""
    candidates = ([reader.yaml_dir / name] if reader.yaml_dir is not None else []) + [Path(name)]
    return next((folder.resolve() for folder in candidates if folder.is_dir()), None)


def with_absolute_folders(ldm: Mapping[str, Any], yaml_dir: Path) -> Dict[str, Any]:
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

    return walk(ldm)


def clip_text_encoder(reader: YamlReader, params: str) -> Tuple[Dict[str, Any], Optional[Path]]:
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


def open_clip_tower(reader: YamlReader, params: str) -> Tuple[Dict[str, Any], Optional[Path]]:
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


def _sd2_text_encoder(reader: YamlReader, params: str) -> Tuple[Dict[str, Any], Optional[Path], OpenClipLayout]:
    """SD2's `FrozenOpenCLIPEmbedder` runs the tower up to its `layer` ('penultimate' in the stock configs,
    'last' by default) and then `ln_final`: exactly a transformers CLIPTextModel with that many blocks."""
    tower, folder = open_clip_tower(reader, params)
    layers = int(tower["num_hidden_layers"])
    layer = str(reader.get(f"{params}.layer", "last"))
    if layer not in ("last", "penultimate"):
        raise reader.fail(f"sets the text encoder's layer to '{layer}'; only 'last' and 'penultimate' exist")
    used = layers - 1 if layer == "penultimate" else layers
    config = {**tower, "num_hidden_layers": used, "architectures": ["CLIPTextModel"]}
    return config, folder, OpenClipLayout(layers=layers, used_layers=used, projection=False)


def configs_from_ldm(ldm: Mapping[str, Any], *, source: str, yaml_dir: Optional[Path] = None) -> ModelConfigs:
    """Translate an LDM (SD1, SD2) or sgm (SDXL) config dict; `yaml_dir` anchors relative text-encoder folders."""
    reader = YamlReader(ldm, source, yaml_dir)
    if reader.get("model.params.network_config", None) is not None:
        from .sgm_config import configs_from_sgm  # sgm_config builds on this module

        return configs_from_sgm(reader)
    scheduler, prediction_type = _schedule(reader)
    unet = unet_config(reader, "model.params.unet_config.params", default_image_size=64)
    vae = vae_config(reader, default_image_size=64)
    target = str(reader.get("model.params.cond_stage_config.target"))
    params = "model.params.cond_stage_config.params"
    if target.endswith("." + _CLIP_EMBEDDER) or target == _CLIP_EMBEDDER:
        text_encoder, text_encoder_dir = clip_text_encoder(reader, params)
        return ModelConfigs(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                            prediction_type=prediction_type, text_encoder_dir=text_encoder_dir, source=source)
    if target.endswith("." + _OPEN_CLIP_EMBEDDER) or target == _OPEN_CLIP_EMBEDDER:
        text_encoder, text_encoder_dir, layout = _sd2_text_encoder(reader, params)
        return ModelConfigs(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                            prediction_type=prediction_type, text_encoder_dir=text_encoder_dir, source=source,
                            family=ModelFamily.SD2, open_clip=layout)
    raise reader.fail(f"uses the text encoder {target}; supported are {_CLIP_EMBEDDER} (SD1) and "
                      f"{_OPEN_CLIP_EMBEDDER} (SD2)")


def stock_config(family: ModelFamily, checkpoint: Path, metadata: Mapping[str, str]) -> Tuple[Dict[str, Any], str]:
    """The host's config for a checkpoint without a YAML (docs/host-formats.md#checkpoints), and its name.

    SD2 files share one shape for noise- and v-prediction; the host tells them apart by running the UNet, which
    the trainer does not do: the file's `modelspec.prediction_type` metadata decides, or the user adds a YAML.
    SDXL is always the noise-predicting base config without a YAML, in the host as here.
    """
    declared = _METADATA_PREDICTION.get(str(metadata.get(PREDICTION_METADATA_KEY, "")).strip().lower())
    yaml_name = yaml_beside(checkpoint).name
    if family is ModelFamily.SD1:
        return SD1_V1_INFERENCE, STOCK_CONFIG_NAME
    if family is ModelFamily.SDXL:
        if declared == "v_prediction":
            raise ModelLoadError(
                f"{checkpoint} says it is a v-prediction SDXL model ({PREDICTION_METADATA_KEY} in its metadata), "
                "but without a YAML the WebUI runs every SDXL model as noise prediction.",
                f"Put a copy of {SDXL_CONFIG_NAME} beside it as {yaml_name}, with "
                "denoiser_config.params.scaling_config.target set to "
                "sgm.modules.diffusionmodules.denoiser_scaling.VScaling; the WebUI reads the same file.")
        return SDXL_BASE, SDXL_STOCK_NAME
    if declared is None:
        raise ModelLoadError(
            f"{checkpoint} is an SD2.x model without a YAML beside it, and whether it predicts noise (512-base "
            "models) or v (768-v models) cannot be told from its weights without running it.",
            f"Put the model's YAML beside it as {yaml_name}: a copy of {SD2_CONFIG_NAMES['v_prediction']} for a "
            f"768-v model (SD 2.0-v, 2.1-768), of {SD2_CONFIG_NAMES['epsilon']} for a 512-base model. The WebUI "
            "reads the same file instead of guessing.")
    return (SD2_V2_INFERENCE_V if declared == "v_prediction" else SD2_V2_INFERENCE), SD2_STOCK_NAMES[declared]


def configs_for_checkpoint(checkpoint: Path, family: ModelFamily = ModelFamily.SD1,
                           metadata: Optional[Mapping[str, str]] = None
                           ) -> Tuple[ModelConfigs, Optional[Dict[str, Any]]]:
    """The configs the host would use for `checkpoint` of `family`, and the YAML dict when one sits beside it.

    `metadata` is the file's safetensors metadata; it only matters without a YAML (see `stock_config`).
    """
    path = yaml_beside(checkpoint)
    if path.is_file():
        ldm = read_ldm_yaml(path)
        logger.info("Using model config %s", path)
        return configs_from_ldm(ldm, source=str(path), yaml_dir=path.parent), ldm
    stock, name = stock_config(family, Path(checkpoint), metadata or {})
    return configs_from_ldm(copy.deepcopy(stock), source=name), None
