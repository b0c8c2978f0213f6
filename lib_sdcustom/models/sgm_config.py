"""An SDXL (sgm `DiffusionEngine`) YAML -> the configs of the diffusers / transformers modules we train.

SDXL's YAML differs from the LDM ones in where things are: the UNet under `network_config`, the text encoders
and the size/crop conditioning as a list of `conditioner_config` embedders, the noise schedule and the
prediction type in `denoiser_config`. Only the SDXL *base* layout is accepted (CLIP-L, then OpenCLIP bigG,
then the three size/crop embedders in diffusers' `time_ids` order); the refiner, inpainting and EDM variants
are refused here with the file and the entry named.
"""

from __future__ import annotations

from typing import Any, Mapping

from .bundle import ModelFamily
from .model_yaml import (ModelConfigs, YamlReader, clip_text_encoder, ddpm_scheduler, open_clip_tower, unet_config,
                         vae_config)
from .open_clip_keys import OpenClipLayout

_NETWORK = "model.params.network_config.params"
_EMBEDDERS = "model.params.conditioner_config.params.emb_models"
_DENOISER = "model.params.denoiser_config.params"
# diffusers' `time_ids` = original size + crop top-left + target size, two numbers each (SDXL base).
TIME_ID_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
_TEXT_EMBEDDERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")
_TIME_EMBEDDER = "ConcatTimestepEmbedderND"
_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}  # what the host's `extend_sdxl` tells apart
_DISCRETIZATION = "LegacyDDPMDiscretization"
# LegacyDDPMDiscretization's defaults (sgm `discretizer.py`).
_LEGACY_DDPM = {"linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps": 1000}
_SDXL_IMAGE_SIZE = 128  # latent pixels of a 1024 px image; sgm configs have no image_size


def _class_name(target: Any) -> str:
    return str(target).rpartition(".")[2]


def _time_id_width(reader: YamlReader) -> int:
    """Checks the embedders are SDXL base's, in order; returns the width of each size/crop number's embedding."""
    models = reader.get(_EMBEDDERS)
    if not isinstance(models, list) or not all(isinstance(model, Mapping) for model in models):
        raise reader.fail(f"has a '{_EMBEDDERS}' that is not a list of embedders")
    names = [_class_name(model.get("target")) for model in models]
    expected = list(_TEXT_EMBEDDERS) + [_TIME_EMBEDDER] * len(TIME_ID_KEYS)
    time_models = models[len(_TEXT_EMBEDDERS):]
    keys = [model.get("input_key") for model in time_models]
    if names != expected or keys != list(TIME_ID_KEYS):
        raise reader.fail(f"has the conditioner embedders {names} (inputs {keys}); only the SDXL base layout "
                          f"{expected} with inputs {list(TIME_ID_KEYS)} is supported (not the refiner)")
    widths = {int((model.get("params") or {}).get("outdim", 0)) for model in time_models}
    if len(widths) != 1 or min(widths) <= 0:
        raise reader.fail(f"gives the size/crop embedders different or missing outdim values ({sorted(widths)})")
    return widths.pop()


def _schedule(reader: YamlReader) -> tuple[dict[str, Any], str]:
    scaling = _class_name(reader.get(f"{_DENOISER}.scaling_config.target"))
    if scaling not in _SCALINGS:
        raise reader.fail(f"uses the denoiser scaling {scaling}; only {' and '.join(_SCALINGS)} are supported")
    discretization = _class_name(reader.get(f"{_DENOISER}.discretization_config.target"))
    if discretization != _DISCRETIZATION:
        raise reader.fail(f"uses the discretization {discretization}; only {_DISCRETIZATION} is supported")
    params = f"{_DENOISER}.discretization_config.params"
    prediction_type = _SCALINGS[scaling]
    scheduler = ddpm_scheduler(reader.get(f"{params}.num_timesteps", _LEGACY_DDPM["num_timesteps"]),
                               reader.get(f"{params}.linear_start", _LEGACY_DDPM["linear_start"]),
                               reader.get(f"{params}.linear_end", _LEGACY_DDPM["linear_end"]), prediction_type)
    return scheduler, prediction_type


def configs_from_sgm(reader: YamlReader) -> ModelConfigs:
    """Translate an SDXL base YAML (see the module docstring)."""
    time_width = _time_id_width(reader)
    text_encoder, text_encoder_dir = clip_text_encoder(reader, f"{_EMBEDDERS}.0.params")
    tower, tower_dir = open_clip_tower(reader, f"{_EMBEDDERS}.1.params")
    unet = unet_config(reader, _NETWORK, default_image_size=_SDXL_IMAGE_SIZE)
    context = int(text_encoder["hidden_size"]) + int(tower["hidden_size"])
    if unet["cross_attention_dim"] != context:
        raise reader.fail(f"sets context_dim {unet['cross_attention_dim']}, but its text encoders give "
                          f"{text_encoder['hidden_size']} + {tower['hidden_size']} = {context}")
    if reader.get(f"{_NETWORK}.num_classes", None) != "sequential":
        raise reader.fail("describes a UNet without SDXL's size/crop conditioning (num_classes: sequential)")
    adm = int(reader.get(f"{_NETWORK}.adm_in_channels"))
    pooled = int(tower["projection_dim"])
    if adm != pooled + 2 * len(TIME_ID_KEYS) * time_width:
        raise reader.fail(f"sets adm_in_channels {adm}, but the pooled text ({pooled}) and "
                          f"{2 * len(TIME_ID_KEYS)} size/crop numbers of width {time_width} make "
                          f"{pooled + 2 * len(TIME_ID_KEYS) * time_width}")
    unet.update({"addition_embed_type": "text_time", "addition_time_embed_dim": time_width,
                 "projection_class_embeddings_input_dim": adm})
    scheduler, prediction_type = _schedule(reader)
    layers = int(tower["num_hidden_layers"])
    # SDXL uses the penultimate block's states *and* the pooled output of the last: the module keeps every block.
    text_encoder_2 = {**tower, "architectures": ["CLIPTextModelWithProjection"]}
    return ModelConfigs(unet=unet, vae=vae_config(reader, default_image_size=_SDXL_IMAGE_SIZE),
                        text_encoder=text_encoder, scheduler=scheduler, prediction_type=prediction_type,
                        text_encoder_dir=text_encoder_dir, source=reader.source, family=ModelFamily.SDXL,
                        open_clip=OpenClipLayout(layers=layers, used_layers=layers, projection=True),
                        text_encoder_2=text_encoder_2, text_encoder_2_dir=tower_dir)
