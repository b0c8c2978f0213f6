"""Export of a trained network: the kohya-format file, its metadata and the host's sidecar files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..formats.network_file import write_network_file
from ..formats.network_metadata import BucketStat, DatasetDir, NetworkTrainingFacts, build_network_metadata, tag_frequency
from ..formats.sidecars import sd_version_for, write_sidecars
from ..networks.algorithms import algorithm_for
from ..networks.kohya_names import to_file_names
from ..run.context import RunContext
from .base import SAVE_DTYPES

PREFERRED_WEIGHT = 0.8


def network_facts(context: RunContext, *, step: int) -> NetworkTrainingFacts:
    """What kohya tools and the host's cards show about the run, from the run's own record."""
    config, bundle, data = context.config, context.bundle, context.training_set
    records = data.records
    dirs: dict[str, DatasetDir] = {}
    captions: dict[str, list[str]] = {}
    for record in records:
        key = record.subfolder or Path(context.data_folder).name
        previous = dirs.get(key)
        dirs[key] = DatasetDir(n_repeats=record.repeats, img_count=(previous.img_count if previous else 0) + 1)
        captions.setdefault(key, []).append(record.caption)
    network = config.network
    algorithm = algorithm_for(config.method)
    conv = (network.conv_rank or network.rank) if algorithm.trains_convolutions else 0
    batches_per_epoch = data.steps_per_epoch()
    micro_batches = step * config.training.gradient_accumulation
    return NetworkTrainingFacts(
        output_name=config.output.name,
        family=bundle.family,
        base=bundle.identity,
        network_dim=network.rank,
        network_alpha=network.alpha,
        v_prediction=bundle.prediction_type == "v_prediction",
        algo=algorithm.metadata_algo(network.dora),
        conv_dim=conv or None,
        conv_alpha=(network.conv_alpha or network.alpha) if conv else None,
        network_dropout=network.dropout,
        # LyCORIS's and kohya's names; the host reads `dora_scale` as [1, in], LyCORIS's non-default orientation.
        network_args={**({"dora_wd": "True", "wd_on_output": "False"} if network.dora else {}),
                      **({"loraplus_lr_ratio": str(network.loraplus_lr_ratio)} if network.loraplus_lr_ratio != 1 else {})},
        learning_rate=config.lr,
        unet_lr=config.unet_lr,
        text_encoder_lr=config.text_encoder_lr if config.text_encoder_fraction > 0 else None,
        optimizer=config.optimizer.optimizer,
        lr_scheduler=config.scheduler,
        lr_warmup_steps=config.optimizer.warmup_steps,
        max_grad_norm=config.optimizer.max_grad_norm,
        steps=step,
        max_train_steps=config.training.steps,
        epoch=micro_batches // batches_per_epoch,
        num_epochs=math.ceil(config.training.steps * config.training.gradient_accumulation / batches_per_epoch),
        num_batches_per_epoch=batches_per_epoch,
        batch_size=config.training.batch_size,
        num_processes=context.num_processes,
        gradient_accumulation_steps=config.training.gradient_accumulation,
        gradient_checkpointing=config.training.gradient_checkpointing,
        mixed_precision=config.training.mixed_precision,
        resolution=(config.data.resolution, config.data.resolution),
        num_train_images=sum(record.repeats for record in records),
        dataset_dirs=dirs,
        tag_frequency=tag_frequency(captions),
        enable_bucket=config.data.buckets,
        bucket_no_upscale=not config.data.upscale,
        min_bucket_reso=config.data.bucket_bounds[0],
        max_bucket_reso=config.data.bucket_bounds[1],
        buckets=[BucketStat(resolution=size, count=count) for size, count in data.bucket_counts().items()],
        clip_skip=config.model.clip_skip,
        max_token_length=75,
        seed=config.training.seed,
        noise_offset=config.training.noise_offset,
        min_snr_gamma=config.training.min_snr_gamma or None,
        zero_terminal_snr=config.training.zero_terminal_snr,
        prior_loss_weight=config.prior_weight if config.prior_enabled else None,
        shuffle_caption=config.data.shuffle_captions,
        keep_tokens=config.data.keep_tokens,
        caption_dropout_rate=config.data.caption_dropout,
        caption_tag_dropout_rate=config.data.tag_dropout,
        flip_aug=config.data.flip,
        random_crop=config.data.random_crop,
        cache_latents=context.latents_cached,
        training_started_at=context.started_at,
        trigger_phrase=context.trigger_phrase,
    )


def export_network(method: Any, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
    """Write `target` (kohya format) plus `NAME.png` and `NAME.json` beside it."""
    context: RunContext = method.context
    metadata = build_network_metadata(network_facts(context, step=step))
    tensors = to_file_names(method.trainable_state(), context.bundle.unet)
    written = [write_network_file(target, tensors, metadata,
                                  dtype=SAVE_DTYPES[context.config.output.save_precision])]
    written += write_sidecars(target, preview=preview, activation_text=context.trigger_phrase,
                              preferred_weight=PREFERRED_WEIGHT, sd_version=sd_version_for(context.bundle.family),
                              description=f"Trained with SD Customize ({context.config.method}) on {context.bundle.identity.name}.")
    return written
