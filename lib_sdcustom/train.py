"""`train()`: from a validated config to a file in the output folder.

The order matters for the user: everything that can be checked cheaply (options, output name, the image
folder, free disk) is checked before the base model is loaded, so a mistake costs seconds, not a load.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .config import RunConfig, dumps_toml
from .data.captions import CaptionOptions, overlong_captions_warning
from .data.dataset import TrainingOptions, TrainingSet
from .data.scan import scan_dataset
from .errors import ConfigError, OutputError, TrainingStopped, UserFacingError
from .events import Callback, CancelToken, EventBus, FileSaved, RunFinished, RunStarted, SamplesRendered
from .family_defaults import apply_family_defaults, model_native_resolution
from .files import check_free_space, remove_stale_temporaries, write_text_atomically
from .methods.base import Method
from .methods.registry import method_class
from .models.bundle import ModelBundle
from .models.fp8 import store_frozen_base_in_fp8
from .output_checks import check_output_locations
from .run_context import RunContext
from .run_folder import require_resumable, start_fresh_run
from .training.batches import LatentBatchSource
from .training.conditioning import Conditioning
from .training.loop import LoopHooks, LoopSettings, TrainingLoop
from .training.optimizers import build_optimizer
from .training.schedules import build_scheduler
from .training.state import latest_state, load_state, state_root

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    outputs: list[Path]
    steps: int
    last_loss: float
    losses: list[float]
    run_dir: Path


def _accelerator(config: RunConfig):
    from accelerate import Accelerator

    precision = config.training.mixed_precision
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a host that trains twice (say, bf16 then no mixed
    # precision) must start from a clean one or accelerate refuses the second setting.
    AcceleratorState._reset_state()
    use_cpu = not torch.cuda.is_available()
    if use_cpu and precision == "fp16":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU, and none is available.",
                          "Use --mixed-precision no (or bf16) on the CPU.")
    return Accelerator(mixed_precision=precision, cpu=use_cpu)


def _training_set(config: RunConfig, trigger_phrase: str) -> tuple[TrainingSet, list[str]]:
    data = config.data
    scan = scan_dataset(Path(data.data), caption_extension=data.caption_extension, default_repeats=data.repeats,
                        default_caption=trigger_phrase)
    return TrainingSet(scan, _training_options(config)), list(scan.warnings)


def _training_options(config: RunConfig) -> TrainingOptions:
    data = config.data
    return TrainingOptions(
        resolution=data.resolution, buckets=data.buckets, min_bucket_side=data.bucket_bounds[0],
        max_bucket_side=data.bucket_bounds[1],
        bucket_step=data.bucket_step, no_upscale=not data.upscale, batch_size=config.training.batch_size,
        flip=data.flip, random_crop=data.random_crop, masked_loss=data.masked_loss, seed=config.training.seed,
        captions=CaptionOptions(shuffle=data.shuffle_captions, keep_tokens=data.keep_tokens,
                                caption_dropout=data.caption_dropout, tag_dropout=data.tag_dropout),
    )


def _describe_run(config: RunConfig, training_set: TrainingSet, method: Method) -> str:
    """The step arithmetic, in the 'images x repeats x epochs / batch = steps' form users know from kohya."""
    per_epoch = training_set.steps_per_epoch()
    images = len(training_set.records)
    repeats = {record.repeats for record in training_set.records}
    seen = f"{images} images x {repeats.pop()} repeats" if len(repeats) == 1 else \
        f"{images} images ({sum(r.repeats for r in training_set.records)} with repeats)"
    training = config.training
    epochs = training.steps * training.gradient_accumulation / per_epoch
    accumulation = f" x accumulation {training.gradient_accumulation}" if training.gradient_accumulation > 1 else ""
    return (f"{seen} x {epochs:.3g} epochs / batch {training.batch_size}{accumulation} = {training.steps} steps "
            f"({per_epoch} batches per epoch).\nTraining {method.describe()}.")


def _frozen_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _place_models(bundle: ModelBundle, accelerator, mixed_precision: str) -> None:
    """Frozen weights in the compute dtype to save memory; trainable weights stay fp32 (the method owns them).
    A bundle this run loaded is there already; a host's bundle is moved."""
    dtype = _frozen_dtype(mixed_precision)
    for model in (bundle.unet, *bundle.text_encoders, bundle.vae):
        model.to(accelerator.device, dtype=dtype)
    bundle.vae.to(dtype=torch.float32)  # the VAE overflows in fp16; it only encodes, once per image


def _compile_unet(unet: torch.nn.Module) -> None:
    """torch.compile the UNet in place (its class and attributes stay, so methods and hooks see the same
    module); compilation happens at the first step, after a network's layers are attached."""
    if not hasattr(unet, "compile"):
        raise ConfigError(f"--compile needs torch 2.2 or newer (this is {torch.__version__}).",
                          "Update torch, or train without --compile.")
    unet.compile()


def _enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer; older GPUs ignore it): the fp32 work left
    outside autocast runs on tensor cores. The same default as the WebUI's and PyTorch Lightning's advice."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def train(config: RunConfig, *, callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None,
          resume: Path | None = None, bundle: ModelBundle | None = None) -> TrainResult:
    """Train `config.method` and export the result. `bundle` lets a host pass the model it has loaded."""
    config.validate()
    bus = EventBus(callbacks)
    cancel = cancel or CancelToken()
    method_type = method_class(config.method)
    target, run_dir = check_output_locations(config, resume=resume)
    saved_folder = _saved_state_to_resume(run_dir) if resume else None
    for folder in (target.parent, state_root(run_dir)):
        for leftover in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by an interrupted run.", leftover)
    trigger_phrase = method_type.default_caption(config)
    training_set, warnings = _training_set(config, trigger_phrase)
    for warning in warnings:
        bus.warn(warning)

    accelerator = _accelerator(config)
    _enable_tf32(accelerator.device)
    if bundle is None:
        from .models.loader import load_bundle

        # Straight into the frozen dtype on the training device: no fp32 copy on the CPU first.
        bundle = load_bundle(Path(config.model.base), dtype=_frozen_dtype(config.training.mixed_precision),
                             device=accelerator.device)
    config, notes = apply_family_defaults(config, bundle)
    _warn_about_long_captions(training_set, bundle, bus)
    if config.data.resolution != training_set.options.resolution:
        training_set = TrainingSet(training_set.scan, _training_options(config))
    _place_models(bundle, accelerator, config.training.mixed_precision)
    if config.training.fp8_base:
        store_frozen_base_in_fp8(bundle, accelerator.device)
    if config.training.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        for encoder in bundle.text_encoders:
            encoder.gradient_checkpointing_enable()
            # transformers < 4.35 checkpoints with the re-entrant variant, which gives a block no gradients when
            # none of its inputs requires one: a text-encoder LoRA would silently stay at its initial weights.
            encoder.enable_input_require_grads()
    if config.training.compile_unet:
        _compile_unet(bundle.unet)
    bundle.unet.train(config.training.gradient_checkpointing)  # diffusers checkpoints only in train mode
    for encoder in bundle.text_encoders:
        encoder.train(config.training.gradient_checkpointing)
    bundle.vae.eval()

    source = LatentBatchSource.create(training_set, bundle, run_dir=run_dir, use_cache=config.data.cache_latents, bus=bus)
    captions = [record.caption for record in training_set.records]
    context = RunContext(config=config, bundle=bundle, training_set=training_set, data_folder=Path(config.data.data),
                         run_dir=run_dir, trigger_phrase=method_type.trigger_phrase(config, captions),
                         num_processes=accelerator.num_processes, latents_cached=source.cached, bus=bus, cancel=cancel)
    method = method_type(context)
    try:
        check_free_space(target.parent, method.required_disk_bytes(), f"the {config.method} result")
        check_free_space(run_dir, _state_bytes(method), "the resumable training state")
        if config.training.cache_text_encoder_outputs and not method.frozen_text_conditioning():
            bus.warn(f"Text-encoder outputs are not cached: {config.method} trains the text encoder or its tokens "
                     "in this run, so a caption's conditioning changes every step (train_text_encoder = 0 allows it).")
        source = method.build_source(source)
        optimizer = build_optimizer(config.optimizer.optimizer, method.param_groups(), lr=config.lr,
                                    weight_decay=config.optimizer.weight_decay)
        scheduler = build_scheduler(optimizer, config.optimizer.scheduler, config.training.steps,
                                    warmup_steps=config.optimizer.warmup_steps, restarts=config.optimizer.restarts,
                                    power=config.optimizer.power,
                                    stop_groups_at={"text_encoder": round(config.text_encoder_fraction * config.training.steps)},
                                    start_groups_at=method.late_groups())
        optimizer = accelerator.prepare(optimizer)
        settings = LoopSettings(
            total_steps=config.training.steps, gradient_accumulation=config.training.gradient_accumulation,
            max_grad_norm=config.optimizer.max_grad_norm, mixed_precision=config.training.mixed_precision,
            seed=config.training.seed, noise_offset=config.training.noise_offset, min_snr_gamma=config.training.min_snr_gamma,
            zero_terminal_snr=config.training.zero_terminal_snr,
            cache_text_encoder_outputs=config.training.cache_text_encoder_outputs,
            gradient_checkpointing=config.training.gradient_checkpointing, save_state_every=config.training.save_state_every,
            save_every=config.training.save_every, sample_every=config.training.sample_every)
        previews = PreviewRenderer(context, bus, encode=method.encode_captions)
        hooks = LoopHooks(export_intermediate=lambda step: method.export(method.intermediate_path(target, step), step=step),
                          render_samples=previews.render)
        loop = TrainingLoop(method, bundle, source, settings, optimizer=optimizer, scheduler=scheduler, run_dir=run_dir,
                            bus=bus, cancel=cancel, accelerator=accelerator, hooks=hooks)
        if saved_folder is not None:
            loop.resume_from(load_state(saved_folder))
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved_folder is None:
            start_fresh_run(run_dir)
        write_text_atomically(run_dir / "config.toml", dumps_toml(config))
        bus.emit(RunStarted(total_steps=config.training.steps, description="\n".join([_describe_run(config, training_set, method), *notes]),
                             run_dir=run_dir))
        try:
            result = loop.run()
        except TrainingStopped as stopped:
            bus.emit(RunFinished(step=loop.step, outputs=(), stopped_early=True, reason=str(stopped)))
            raise
        method.set_training(False)
        preview = previews.render(result.step) if accelerator.is_main_process else None
        outputs = _export(method, target, result.step, preview, loop.last_state, run_dir) if accelerator.is_main_process else []
        for path in outputs:
            bus.emit(FileSaved(path, "result" if path == target else "sidecar"))
        if not config.training.keep_final_state:  # the states were resume points, kept until the export succeeded
            shutil.rmtree(state_root(run_dir), ignore_errors=True)
        bus.emit(RunFinished(step=result.step, outputs=tuple(outputs)))
        return TrainResult(outputs=outputs, steps=result.step, last_loss=result.last_loss, losses=result.losses, run_dir=run_dir)
    finally:
        method.close()


def _warn_about_long_captions(training_set: TrainingSet, bundle: ModelBundle, bus: EventBus) -> None:
    tokenizer = bundle.tokenizer
    warning = overlong_captions_warning(
        [(record.path.name, record.caption) for record in training_set.records],
        lambda caption: len(tokenizer(caption, add_special_tokens=False).input_ids),
        limit=tokenizer.model_max_length - 2)  # the start and end tokens take two of the places
    if warning:
        bus.warn(warning)


def _state_bytes(method: Method) -> int:
    """Room for the two states the loop keeps: fp32 weights plus two optimizer moments (Adam) each."""
    parameters = sum(param.numel() for group in method.param_groups() for param in group["params"])
    return 2 * 3 * 4 * parameters


def _saved_state_to_resume(run_dir: Path) -> Path:
    saved = latest_state(run_dir, require_resumable(run_dir))
    if saved is None:
        raise ConfigError(f"{run_dir} holds no saved state of the run its config.toml describes (any state there "
                          "is from an earlier run under the same name).", "Start the run again without --resume.")
    return saved


def _export(method: Method, target: Path, step: int, preview, state: Path | None, run_dir: Path) -> list[Path]:
    """Export the result; when that fails the trained weights are already in the run's final state, so the
    message says where they are and how to export them once the problem is fixed."""
    try:
        return method.export(target, step=step, preview=preview)
    except (UserFacingError, OSError) as error:
        problem = error.problem if isinstance(error, UserFacingError) else f"{error.strerror or error}"
        fix = error.fix if isinstance(error, UserFacingError) else "Check the output folder and free disk space."
        if state is None:  # a run that keeps no final state (where a method does not) cannot be exported later
            raise OutputError(f"Training finished, but the result could not be written to {target}: {problem} "
                              "This run kept no saved state, so the training is lost.", fix) from error
        raise OutputError(f"Training finished, but the result could not be written to {target}: {problem} "
                          f"The trained weights are saved in {state}.",
                          f"{fix} Then export them with: python -m lib_sdcustom train --resume {run_dir}") from error


class PreviewRenderer:
    """Renders preview images with a fixed seed so successive previews are comparable, conditioned by the
    method's own `encode` (e.g. a Textual Inversion word expands to its learned vectors)."""

    def __init__(self, context: RunContext, bus: EventBus, encode: Callable[[list[str]], Conditioning]) -> None:
        self.context = context
        self.bus = bus
        self.encode = encode
        config = context.config
        self.prompt = config.training.sample_prompt or context.trigger_phrase
        self.steps = config.training.sample_steps

    def render(self, step: int):
        from .sampling import generate

        bundle = self.context.bundle  # at most the family's own size: SDXL previews at 512 px look broken
        size = min(self.context.config.data.resolution, model_native_resolution(bundle))
        image = generate(self.context.bundle, [self.prompt], seed=self.context.config.training.seed, steps=self.steps,
                         width=size, height=size, encode=self.encode,
                         zero_terminal_snr=self.context.config.training.zero_terminal_snr)[0]
        folder = self.context.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{step:08d}.png"
        image.save(path)
        self.bus.emit(SamplesRendered(step=step, prompt=self.prompt, images=[image]))
        self.bus.emit(FileSaved(path, "preview"))
        return image
