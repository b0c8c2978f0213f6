"""`train()`: from a run plan to a file in the output folder, in the order the work happens.

Everything that can be checked cheaply (options, output name, the image folder) is checked by `plan_run`
before the base model is loaded, so a mistake costs seconds, not a load. Then: the model, the method and
its batches, the optimizer, the loop, the export.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import RunConfig, TrainingOptions, dumps_toml
from ..data.captions import overlong_captions_warning
from ..data.dataset import TrainingSet
from ..errors import ConfigError, OutputError, TrainingStopped, UserFacingError
from ..events import Callback, CancelToken, EventBus, FileSaved, RunFinished, RunStarted
from .family_defaults import apply_family_defaults
from ..files import check_free_space, remove_stale_temporaries, write_text_atomically
from ..methods.base import Method
from ..models.bundle import ModelBundle
from ..models.fp8 import store_frozen_base_in_fp8
from .best_step import BestStepSelector
from .context import RunContext
from .folder import start_fresh_run
from .plan import RunPlan, plan_run
from ..sampling import PreviewRenderer
from ..training.batches import LatentBatchSource
from ..training.loop import LoopHooks, TrainingLoop, compute_dtype
from ..training.optimizers import build_optimizer
from ..training.placement import IdleModels, idle_during_steps, idle_while_encoding
from ..training.schedules import build_scheduler
from ..training.state import load_state, state_root
from ..training.text_cache import TextEncoderCache

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    outputs: list[Path]
    steps: int
    last_loss: float
    losses: list[float]
    run_dir: Path


def train(run: RunConfig | RunPlan, *, callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None,
          resume: Path | None = None, bundle: ModelBundle | None = None) -> TrainResult:
    """Train `run`'s method and export the result. A config is planned here (`plan_run`, with `resume`, the
    run folder of a run to continue); a caller that planned already passes its plan. `bundle` lets a host
    pass the model it has loaded."""
    if isinstance(run, RunPlan):
        if resume is not None:
            raise TypeError("a RunPlan carries its own resume folder: plan_run(config, resume=...)")
        plan = run
    else:
        plan = plan_run(run, resume=resume)
    bus = EventBus(callbacks)
    cancel = cancel or CancelToken()
    for folder in (plan.target.parent, state_root(plan.run_dir)):
        for leftover in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by an interrupted run.", leftover)
    for warning in plan.warnings:
        bus.warn(warning)

    # The base model, with the family's defaults applied to the config, placed and set up for training.
    accelerator = _accelerator(plan.config)
    owned = bundle is None
    if bundle is None:
        bundle = _load_base(plan.config, accelerator.device)
    config, notes = apply_family_defaults(plan.config, bundle)
    plan = plan.with_config(config)
    training = config.training
    _warn_about_long_captions(plan.training_set, bundle, bus)
    _prepare_models(bundle, accelerator, training)

    # The method on its batches (latents encoded, or cached, here).
    run_dir = plan.run_dir
    with IdleModels(idle_while_encoding(bundle, accelerator.device, owned=owned), accelerator.device).parked():
        images = LatentBatchSource.create(plan.training_set, bundle, run_dir=run_dir, use_cache=config.data.cache_latents, bus=bus)
    captions = [record.caption for record in plan.training_set.records]
    context = RunContext(config=config, bundle=bundle, training_set=plan.training_set, data_folder=Path(config.data.data),
                         run_dir=run_dir, trigger_phrase=plan.method_type.trigger_phrase(config, captions),
                         num_processes=accelerator.num_processes, latents_cached=images.cached, bus=bus, cancel=cancel)
    method = plan.method_type(context)
    try:
        check_free_space(plan.target.parent, method.required_disk_bytes(), f"the {config.method} result")
        check_free_space(run_dir, _state_bytes(method), "the resumable training state")
        if training.cache_text_encoder_outputs and not method.frozen_text_conditioning():
            bus.warn(f"Text-encoder outputs are not cached: {config.method} trains the text encoder or its tokens "
                     "in this run, so a caption's conditioning changes every step (train_text_encoder = 0 allows it).")
        source = method.build_source(images)
        optimizer, scheduler = _optimizer_and_schedule(config, method)
        optimizer = accelerator.prepare(optimizer)

        # The loop, fresh or from the saved state; previews and intermediate results come from its hooks.
        text_cached = training.cache_text_encoder_outputs and method.frozen_text_conditioning()
        encode = TextEncoderCache(method.encode_captions) if text_cached else method.encode_captions
        previews = PreviewRenderer(context, bus, encode=encode)
        idle = IdleModels(idle_during_steps(bundle, accelerator.device, config.data, latents_cached=images.cached,
                                            text_cached=text_cached, owned=owned), accelerator.device)
        render = idle.restored_for(previews.render, ["VAE"])  # parked text encoders: previews encode ahead too
        selector: BestStepSelector | None = None

        def export_step(step: int) -> list[Path]:
            return method.export(method.intermediate_path(plan.target, step), step=step)

        def export_intermediate(step: int) -> list[Path]:
            written = export_step(step)
            if selector is not None:
                selector.score_during_training(step)
            return written

        loop = TrainingLoop(method, bundle, source, config, optimizer=optimizer, scheduler=scheduler, run_dir=run_dir,
                            bus=bus, cancel=cancel, accelerator=accelerator,
                            hooks=LoopHooks(export_intermediate=export_intermediate, render_samples=render))
        if plan.saved_state is not None:
            loop.resume_from(load_state(plan.saved_state))
        if idle.holds_text_encoders:  # each process encodes its share of the captions until they repeat
            cycle = max(images.batches_per_epoch, method.class_cycle_batches())
            loop.encode_captions_ahead(-(-cycle // accelerator.num_processes))
            previews.encode_ahead()
        _open_run_folder(run_dir, config, fresh=plan.saved_state is None)
        if training.select_best_step and accelerator.is_main_process:
            # Its probes' captions go through `encode` too, measured here before the text encoders are parked.
            selector = BestStepSelector.start(method, context, images, source, loop, encode=encode,
                                              resumed_step=loop.step)
        bus.emit(RunStarted(total_steps=training.steps, run_dir=run_dir,
                            description="\n".join([_describe_run(config, plan.training_set, method), *notes])))
        try:
            with idle.parked():  # through the final preview, which is the run's largest one-off GPU peak
                result = loop.run()
                method.set_training(False)
                kept, preview = result.step, None
                if accelerator.is_main_process:
                    if selector is not None:  # loads the best state when an earlier step wins
                        kept = selector.finish(result.step, export_step)
                    with method.as_exported():
                        preview = render(kept)
        except TrainingStopped as stopped:
            bus.emit(RunFinished(step=loop.step, outputs=(), stopped_early=True, reason=str(stopped)))
            raise

        # The export: the result, its preview and card; the resumable states go unless asked to stay.
        outputs: list[Path] = []
        if accelerator.is_main_process:
            outputs = _export(method, plan.target, kept, preview, loop.last_state, run_dir)
            if selector is not None:
                selector.record(outputs)
        for path in outputs:
            bus.emit(FileSaved(path, "result" if path == plan.target else "sidecar"))
        if not training.keep_final_state:  # the states were resume points, kept until the export succeeded
            shutil.rmtree(state_root(run_dir), ignore_errors=True)
        bus.emit(RunFinished(step=result.step, outputs=tuple(outputs)))
        return TrainResult(outputs=outputs, steps=result.step, last_loss=result.last_loss, losses=result.losses, run_dir=run_dir)
    finally:
        method.close()


def _accelerator(config: RunConfig) -> Any:
    """accelerate's Accelerator for the config's mixed precision, on the GPU when there is one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = config.training.mixed_precision
    # accelerate keeps one global state per process; a host that trains twice (say, bf16 then no mixed
    # precision) must start from a clean one or accelerate refuses the second setting.
    AcceleratorState._reset_state()
    use_cpu = not torch.cuda.is_available()
    if use_cpu and precision == "fp16":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU, and none is available.",
                          "Use --mixed-precision no (or bf16) on the CPU.")
    accelerator = Accelerator(mixed_precision=precision, cpu=use_cpu)
    _enable_tf32(accelerator.device)
    return accelerator


def _load_base(config: RunConfig, device: torch.device) -> ModelBundle:
    """The base model, straight into the frozen dtype on the training device: no fp32 copy on the CPU first."""
    from ..models.loader import load_bundle

    return load_bundle(Path(config.model.base), dtype=compute_dtype(config.training.mixed_precision), device=device)


def _optimizer_and_schedule(config: RunConfig, method: Method
                            ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over the method's parameter groups and its learning-rate schedule, in which the text
    encoder's group stops at its share of the run and the method's late groups start at their step."""
    options, steps = config.optimizer, config.training.steps
    optimizer = build_optimizer(options.optimizer, method.param_groups(), lr=config.lr, weight_decay=options.weight_decay)
    scheduler = build_scheduler(optimizer, config.scheduler, steps, warmup_steps=options.warmup_steps,
                                restarts=options.restarts, power=options.power,
                                stop_groups_at={"text_encoder": round(config.text_encoder_fraction * steps)},
                                start_groups_at=method.late_groups())
    return optimizer, scheduler


def _open_run_folder(run_dir: Path, config: RunConfig, *, fresh: bool) -> None:
    """The run folder with the config the run trains (after family defaults); a fresh run discards an earlier
    run's state there (consent was checked by the plan) and takes a new run id."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        start_fresh_run(run_dir)
    write_text_atomically(run_dir / "config.toml", dumps_toml(config))


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


def _prepare_models(bundle: ModelBundle, accelerator: Any, training: TrainingOptions) -> None:
    """Frozen weights in the compute dtype to save memory; trainable weights stay fp32 (the method owns them).
    A bundle this run loaded is there already; a host's bundle is moved. Then the memory savers the options
    turn on, and train mode where gradient checkpointing needs it."""
    dtype = compute_dtype(training.mixed_precision)
    for model in (bundle.unet, *bundle.text_encoders, bundle.vae):
        model.to(accelerator.device, dtype=dtype)
    bundle.vae.to(dtype=torch.float32)  # the VAE overflows in fp16; it only encodes, once per image
    if training.fp8_base:
        store_frozen_base_in_fp8(bundle, accelerator.device)
    if training.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
        for encoder in bundle.text_encoders:
            encoder.gradient_checkpointing_enable()
            # transformers < 4.35 checkpoints with the re-entrant variant, which gives a block no gradients when
            # none of its inputs requires one: a text-encoder LoRA would silently stay at its initial weights.
            encoder.enable_input_require_grads()
    if training.compile_unet:
        _compile_unet(bundle.unet)
    bundle.unet.train(training.gradient_checkpointing)  # diffusers checkpoints only in train mode
    for encoder in bundle.text_encoders:
        encoder.train(training.gradient_checkpointing)
    bundle.vae.eval()


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
    return 2 * 3 * 4 * int(parameters)


def _export(method: Method, target: Path, step: int, preview: Any, state: Path | None, run_dir: Path) -> list[Path]:
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
