"""kohya `ss_*` and `modelspec.*` metadata for a trained network file.

The host reads these keys, so their names and string forms follow kohya sd-scripts exactly
(`train_network.py`, `library/sai_model_spec.py`):
- `ss_output_name` becomes the alias the extra-networks card inserts, so it must equal the file stem;
- `ss_base_model_version` starting with `sdxl_` is the only way the host files an SDXL LoRA under SDXL
  (otherwise its card is hidden on SDXL), and `ss_v2 == "True"` marks SD2;
- `ss_tag_frequency`, `ss_dataset_dirs` and `ss_bucket_info` are JSON the card's tag button and metadata
  table decode.
All values are `str`; structured values are JSON. Unknown (None) facts are left out rather than written as
the string "None".
"""

from __future__ import annotations

import datetime
import json
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .. import __version__
from ..models.bundle import BaseIdentity, ModelFamily

KOHYA_LORA_ALGO = "lora"  # kohya's own `networks.lora` (plain LoRA, and LoCon through conv_dim)
_KOHYA_LORA_MODULE = "networks.lora"
_LYCORIS_MODULE = "lycoris.kohya"

_STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_DIFFUSERS_IMPLEMENTATION = "diffusers"


@dataclass(frozen=True)
class DatasetDir:
    """One image folder as kohya reports it in `ss_dataset_dirs`."""

    n_repeats: int
    img_count: int


@dataclass(frozen=True)
class BucketStat:
    resolution: tuple[int, int]  # (width, height)
    count: int


@dataclass
class NetworkTrainingFacts:
    """What a finished (or checkpointed) network run knows about itself, in plain Python types.

    Folder keys in `dataset_dirs` / `tag_frequency` are folder names as the user sees them
    (e.g. "10_sks dog"), the form kohya writes.
    """

    output_name: str
    family: ModelFamily
    base: BaseIdentity
    network_dim: int
    network_alpha: float
    v_prediction: bool = False
    algo: str = KOHYA_LORA_ALGO
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_dropout: float | None = None
    network_args: dict[str, str] = field(default_factory=dict)
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    optimizer: str = ""
    lr_scheduler: str = ""
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None
    steps: int = 0  # optimizer steps done when the file was written
    max_train_steps: int = 0
    epoch: int = 0  # epochs done when the file was written
    num_epochs: int = 0
    num_batches_per_epoch: int | None = None
    batch_size: int = 1  # per device
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    num_train_images: int = 0  # images x repeats, as kohya counts them
    num_reg_images: int = 0
    dataset_dirs: dict[str, DatasetDir] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, DatasetDir] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    buckets: list[BucketStat] = field(default_factory=list)
    mean_img_ar_error: float | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    seed: int | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    zero_terminal_snr: bool = False
    prior_loss_weight: float | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    cache_latents: bool = False
    vae: BaseIdentity | None = None  # a VAE chosen apart from the checkpoint's own
    training_started_at: float = field(default_factory=time.time)
    training_finished_at: float | None = None  # None: the moment the metadata is built
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32 - 1))
    comment: str = ""
    trigger_phrase: str = ""


def tag_frequency(captions_by_dir: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """Count comma-separated tags per folder the way kohya does (stripped, lower-cased, every occurrence)."""
    result: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_dir.items():
        counts = result.setdefault(folder, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return result


def base_model_version(family: ModelFamily, v_prediction: bool) -> str:
    """kohya's `ss_base_model_version`; the host only checks the `sdxl_` prefix."""
    if family is ModelFamily.SDXL:
        return "sdxl_base_v1-0"
    return ("sd_v2" if family is ModelFamily.SD2 else "sd_v1") + ("_v" if v_prediction else "")


def network_module(algo: str) -> str:
    return _KOHYA_LORA_MODULE if algo == KOHYA_LORA_ALGO else _LYCORIS_MODULE


def modelspec_architecture(family: ModelFamily, v_prediction: bool, adapter: str = "lora") -> str:
    if family is ModelFamily.SDXL:
        base = "stable-diffusion-xl-v1-base"
    elif family is ModelFamily.SD2:
        base = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    else:
        base = "stable-diffusion-v1"
    return f"{base}/{adapter}"


def _network_args(facts: NetworkTrainingFacts) -> dict[str, str]:
    args: dict[str, str] = {}
    if facts.conv_dim:
        args["conv_dim"] = str(facts.conv_dim)
        args["conv_alpha"] = str(facts.conv_alpha if facts.conv_alpha is not None else facts.conv_dim)
    if network_module(facts.algo) == _LYCORIS_MODULE:
        args["algo"] = facts.algo
    args.update({str(k): str(v) for k, v in facts.network_args.items()})
    return args


def _dirs_json(dirs: Mapping[str, DatasetDir]) -> str:
    return json.dumps({name: {"n_repeats": d.n_repeats, "img_count": d.img_count} for name, d in dirs.items()})


def _bucket_json(facts: NetworkTrainingFacts) -> str:
    info: dict[str, object] = {
        "buckets": {str(i): {"resolution": list(b.resolution), "count": b.count} for i, b in enumerate(facts.buckets)}
    }
    if facts.mean_img_ar_error is not None:
        info["mean_img_ar_error"] = facts.mean_img_ar_error
    return json.dumps(info)


def _ss_values(facts: NetworkTrainingFacts, finished_at: float) -> dict[str, object]:
    """kohya's ss_* keys as Python values (None = unknown, left out)."""
    base = facts.base
    network_args = _network_args(facts)
    values: dict[str, object] = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_training_finished_at": finished_at,
        "ss_output_name": facts.output_name,
        "ss_learning_rate": facts.learning_rate,
        "ss_unet_lr": facts.unet_lr,
        "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_epoch": facts.epoch,
        "ss_steps": facts.steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_gradient_checkpointing": facts.gradient_checkpointing,
        "ss_gradient_accumulation_steps": facts.gradient_accumulation_steps,
        "ss_lr_warmup_steps": facts.lr_warmup_steps,
        "ss_lr_scheduler": facts.lr_scheduler or None,
        "ss_optimizer": facts.optimizer or None,
        "ss_max_grad_norm": facts.max_grad_norm,
        "ss_network_module": network_module(facts.algo),
        "ss_network_dim": facts.network_dim,
        "ss_network_alpha": facts.network_alpha,
        "ss_network_dropout": facts.network_dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_v2": facts.family is ModelFamily.SD2,
        "ss_base_model_version": base_model_version(facts.family, facts.v_prediction),
        "ss_clip_skip": facts.clip_skip,
        "ss_max_token_length": facts.max_token_length,
        "ss_cache_latents": facts.cache_latents,
        "ss_seed": facts.seed,
        "ss_noise_offset": facts.noise_offset,
        "ss_min_snr_gamma": facts.min_snr_gamma,
        "ss_zero_terminal_snr": facts.zero_terminal_snr,
        "ss_prior_loss_weight": facts.prior_loss_weight,
        "ss_training_comment": facts.comment or None,
        "ss_caption_dropout_rate": facts.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": facts.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": facts.caption_tag_dropout_rate,
        "ss_batch_size_per_device": facts.batch_size,
        "ss_total_batch_size": facts.batch_size * facts.num_processes * facts.gradient_accumulation_steps,
        "ss_resolution": str(tuple(facts.resolution)),  # kohya writes the tuple's repr: "(512, 512)"
        "ss_flip_aug": facts.flip_aug,
        "ss_random_crop": facts.random_crop,
        "ss_shuffle_caption": facts.shuffle_caption,
        "ss_keep_tokens": facts.keep_tokens,
        "ss_enable_bucket": facts.enable_bucket,
        "ss_bucket_no_upscale": facts.bucket_no_upscale,
        "ss_min_bucket_reso": facts.min_bucket_reso,
        "ss_max_bucket_reso": facts.max_bucket_reso,
        "ss_dataset_dirs": _dirs_json(facts.dataset_dirs),
        "ss_reg_dataset_dirs": _dirs_json(facts.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": _bucket_json(facts) if facts.buckets else None,
        "ss_sd_model_name": base.path.name if base.path is not None else base.name,
        "ss_sd_model_hash": base.legacy_hash,
        "ss_new_sd_model_hash": base.sha256,
    }
    if facts.vae is not None:
        values["ss_vae_name"] = facts.vae.path.name if facts.vae.path is not None else facts.vae.name
        values["ss_vae_hash"] = facts.vae.legacy_hash
        values["ss_new_vae_hash"] = facts.vae.sha256
    return values


def _modelspec_values(facts: NetworkTrainingFacts, finished_at: float) -> dict[str, object]:
    width, height = facts.resolution
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(facts.family, facts.v_prediction),
        "modelspec.implementation": (
            _STABILITY_IMPLEMENTATION if facts.family is ModelFamily.SDXL else _DIFFUSERS_IMPLEMENTATION
        ),
        "modelspec.implementation_version": f"sd-customize/{__version__}",
        "modelspec.title": facts.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at)).isoformat(),
        "modelspec.prediction_type": "v" if facts.v_prediction else "epsilon",
        "modelspec.encoder_layer": facts.clip_skip,
        "modelspec.description": facts.comment or None,
        "modelspec.trigger_phrase": facts.trigger_phrase or None,
    }


def build_network_metadata(facts: NetworkTrainingFacts) -> dict[str, str]:
    """All `ss_*` and `modelspec.*` keys for `facts`, every value a `str`.

    `sshs_model_hash` / `sshs_legacy_hash` are not here: they depend on the tensors and are added by
    `network_file.write_network_file`.
    """
    finished_at = facts.training_finished_at if facts.training_finished_at is not None else time.time()
    merged = {**_ss_values(facts, finished_at), **_modelspec_values(facts, finished_at)}
    return {key: str(value) for key, value in merged.items() if value is not None}
