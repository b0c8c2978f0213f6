"""The original LDM YAML of a checkpoint -> the configs of the diffusers / transformers modules we train.

The host builds a checkpoint from `NAME.yaml` beside it (or its stock config), so we read the same file the
same way: whatever shape the YAML declares is the shape we build, which is what makes non-standard and tiny
test models load. SD1 and SD2 YAMLs are `ldm` configs (`unet_config`, `cond_stage_config`); SDXL's are `sgm`
configs (`network_config`, `conditioner_config`, read by `sgm_config`); the parts both share live in
`model_yaml`. Without a YAML the family's stock config applies (`configs_for_checkpoint`), as in the host.
Nothing here touches a model hub: a text encoder is either a built-in config (`stock_configs`) or a local
folder the YAML names.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelLoadError
from .bundle import ModelFamily
from .model_yaml import (ModelConfigs, YamlReader, clip_text_encoder, ddpm_scheduler, open_clip_tower, read_ldm_yaml,
                         unet_config, vae_config, yaml_beside)
from .open_clip_keys import OpenClipLayout
from .sgm_config import configs_from_sgm
from .stock_configs import (SD1_V1_INFERENCE, SD2_CONFIG_NAMES, SD2_STOCK_NAMES, SD2_V2_INFERENCE, SD2_V2_INFERENCE_V,
                            SDXL_BASE, SDXL_CONFIG_NAME, SDXL_STOCK_NAME, STOCK_CONFIG_NAME)

logger = logging.getLogger(__name__)

# sd-scripts' `sai_model_spec` metadata ("modelspec.prediction_type") -> diffusers' names.
PREDICTION_METADATA_KEY = "modelspec.prediction_type"
_METADATA_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}

# LDM `DDPM.__init__` defaults, used when the YAML leaves them out (as the host does).
_LDM_DEFAULT_SCHEDULE = {"linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
_CLIP_EMBEDDER = "FrozenCLIPEmbedder"
_OPEN_CLIP_EMBEDDER = "FrozenOpenCLIPEmbedder"


def _schedule(reader: YamlReader) -> tuple[dict[str, Any], str]:
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


def _sd2_text_encoder(reader: YamlReader, params: str) -> tuple[dict[str, Any], Path | None, OpenClipLayout]:
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


def configs_from_ldm(ldm: Mapping[str, Any], *, source: str, yaml_dir: Path | None = None) -> ModelConfigs:
    """Translate an LDM (SD1, SD2) or sgm (SDXL) config dict; `yaml_dir` anchors relative text-encoder folders."""
    reader = YamlReader(ldm, source, yaml_dir)
    if reader.get("model.params.network_config", None) is not None:
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


def stock_config(family: ModelFamily, checkpoint: Path, metadata: Mapping[str, str]) -> tuple[dict[str, Any], str]:
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
                           metadata: Mapping[str, str] | None = None
                           ) -> tuple[ModelConfigs, dict[str, Any] | None]:
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
