"""Settings whose right value depends on the base model's family, known only once the model is read.

Each family was trained at its own size (SD1 512 px, SD2-v 768 px, SDXL 1024 px), and a model's YAML may
state another (the bundled micro-world model: 64 px); training an SDXL model at 512 px teaches it blurry,
cropped pictures, and a 64 px model at 512 px gives specks. A resolution (and bucket range) the user left at the default is
therefore moved to the family's size. A value equal to the default counts as left at the default: the
config does not record where a value came from, and a user who wants 512 px on SDXL can still say e.g. 576.
"""

from __future__ import annotations

import copy
from dataclasses import fields

from ..config import DataOptions, RunConfig
from ..errors import ConfigError
from ..models.bundle import ModelBundle, ModelFamily

_DEFAULTS = {item.name: item.default for item in fields(DataOptions)}


def native_resolution(family: ModelFamily, prediction_type: str) -> int:
    """The side of the square each family was trained at: SDXL 1024, SD2 768 (v) or 512 (base), SD1 512."""
    if family is ModelFamily.SDXL:
        return 1024
    if family is ModelFamily.SD2 and prediction_type == "v_prediction":
        return 768
    return 512


def model_native_resolution(bundle: ModelBundle) -> int:
    """The size this model was trained at: its LDM YAML's latent `image_size` times the VAE's downscale
    when the YAML states one (the bundled 64 px micro-world model does), else the family's size."""
    latent = ((bundle.ldm_config or {}).get("model", {}).get("params", {}) or {}).get("image_size")
    if isinstance(latent, int) and latent > 0:
        return int(latent * bundle.pixels_per_latent)
    return native_resolution(bundle.family, bundle.prediction_type)


#: SDXL base was trained with this noise offset (sgm's `offset_noise_level`); kohya suggests the same value.
SDXL_NOISE_OFFSET = 0.0357


def apply_family_defaults(config: RunConfig, bundle: ModelBundle) -> tuple[RunConfig, list[str]]:
    """`config` with the family's resolution where the user left the default (a copy when anything changes),
    plus notes for the run log: each change, and hints such as SDXL's noise offset."""
    check_family_options(config, bundle)
    hints = []
    if bundle.family is ModelFamily.SDXL and not config.training.noise_offset:
        hints.append(f"Hint: SDXL was trained with a noise offset of {SDXL_NOISE_OFFSET}; "
                     f"--noise-offset {SDXL_NOISE_OFFSET} keeps its range of brightness.")
    data = config.data
    native = model_native_resolution(bundle)
    if data.resolution != _DEFAULTS["resolution"] or native == data.resolution:
        return config, hints
    changed = copy.deepcopy(config)
    changed.data.resolution = native  # bucket bounds left alone follow it (`DataOptions.bucket_bounds`)
    label = bundle.family.value.upper() + ("-v" if bundle.prediction_type == "v_prediction" else "")
    low, high = changed.data.bucket_bounds
    note = (f"{bundle.identity.name} is an {label} model trained at {native} px: training at that size "
            f"(buckets {low}-{high} px). Pass --resolution to choose another size.")
    changed.validate()
    return changed, [note, *hints]


def check_family_options(config: RunConfig, bundle: ModelBundle) -> None:
    """Options that only make sense for some models, refused before training starts."""
    if config.training.zero_terminal_snr and bundle.prediction_type != "v_prediction":
        raise ConfigError(
            f"Zero terminal SNR is on, but {bundle.identity.name} predicts noise (epsilon): at the last timestep "
            "the picture is pure noise, so a noise-predicting model can learn nothing there.",
            "Turn zero_terminal_snr off, or train a v-prediction model (SD 2.x 768-v, or a model with a v YAML).")
