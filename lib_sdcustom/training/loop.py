"""The one training loop every method runs through.

Determinism is designed in rather than hoped for: the noise, timesteps and dropout of micro-batch `k`
come from generators seeded with (seed, k), and the batches come from a source indexed by `k`. So a run
resumed from saved weights + optimizer + scheduler continues exactly as if it had never stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig
from ..errors import TrainingStopped
from ..events import CancelToken, EventBus, FileSaved, StepDone
from ..methods.base import Method
from ..models.bundle import ModelBundle
from . import objectives
from .batches import BatchSource, uncropped_sizes
from .state import SavedState, save_state
from .text_cache import TextEncoderCache


@dataclass
class LoopHooks:
    """Periodic work the loop triggers but does not know how to do."""

    export_intermediate: Callable[[int], list[Path]] | None = None
    render_samples: Callable[[int], None] | None = None


@dataclass
class LoopResult:
    step: int
    last_loss: float
    losses: list[float] = field(default_factory=list)


def _mixed_seed(seed: int, index: int, salt: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + salt) % (2**63 - 1)


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen weights and the latents under `--mixed-precision`."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class TrainingLoop:
    """Steps `config.training.steps` optimizer steps; reads the config's `training` section (and the optimizer's
    gradient clipping) directly, so a new training option is one field in `config.py` and its use here."""

    def __init__(self, method: Method, bundle: ModelBundle, source: BatchSource, config: RunConfig, *,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 run_dir: Path, bus: EventBus, cancel: CancelToken, accelerator: Any,
                 hooks: LoopHooks | None = None) -> None:
        self.method = method
        self.bundle = bundle
        self.source = source
        self.training = config.training
        self.max_grad_norm = config.optimizer.max_grad_norm
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.run_dir = Path(run_dir)
        self.bus = bus
        self.cancel = cancel
        self.accelerator = accelerator
        self.hooks = hooks or LoopHooks()
        self.alphas_cumprod = bundle.noise_scheduler.alphas_cumprod.float().cpu()
        if self.training.zero_terminal_snr:
            self.alphas_cumprod = objectives.rescale_zero_terminal_snr(self.alphas_cumprod)
        self.num_timesteps = int(bundle.noise_scheduler.config.num_train_timesteps)
        self.step = 0
        self.last_state: Path | None = None
        cache = self.training.cache_text_encoder_outputs and method.frozen_text_conditioning()
        self.encode_captions = TextEncoderCache(method.encode_captions) if cache else method.encode_captions

    # ----- state -----
    def resume_from(self, saved: SavedState) -> None:
        self.method.load_trainable_state(saved.trainable)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        self.step = saved.step
        self.last_state = saved.folder

    def save_state(self) -> Path | None:
        """Save the resumable state (the main process writes it); the latest saved state, None before any."""
        if self.accelerator.is_main_process:
            self.last_state = save_state(self.run_dir, step=self.step, trainable=self.method.trainable_state(),
                                         optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            self.bus.emit(FileSaved(self.last_state, "state"))
        return self.last_state

    # ----- one micro-batch -----
    def _micro_batch_loss(self, index: int) -> torch.Tensor:
        training = self.training
        batch = self.source.batch(index)
        device = self.accelerator.device
        generator = torch.Generator().manual_seed(_mixed_seed(training.seed, index, 1))
        torch.manual_seed(_mixed_seed(training.seed, index, 2))  # module dropout inside the network
        latents = batch.latents.to(device, compute_dtype(training.mixed_precision))
        noise = objectives.sample_noise(latents, generator, training.noise_offset)
        timesteps = objectives.sample_timesteps(latents.shape[0], self.num_timesteps, generator,
                                                training.timestep_sampling)
        noisy = objectives.add_noise(latents, noise, timesteps, self.alphas_cumprod)
        sizes = batch.sizes if batch.sizes is not None else uncropped_sizes(latents, self.bundle)
        with self.accelerator.autocast():
            conditioning = self.encode_captions(batch.captions).to(noisy.dtype)
            prediction = self.bundle.unet(noisy, timesteps.to(device), **conditioning.unet_kwargs(sizes)).sample
        target = objectives.training_target(self.bundle.prediction_type, latents, noise, timesteps, self.alphas_cumprod)
        per_sample = objectives.per_sample_mse(prediction, target, batch.masks)
        weights = batch.weights
        if training.min_snr_gamma:
            snr_weights = objectives.min_snr_weights(timesteps, self.alphas_cumprod, training.min_snr_gamma,
                                                     self.bundle.prediction_type)
            weights = snr_weights if weights is None else weights * snr_weights
        return objectives.weighted_loss(per_sample, weights)

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _synchronise_gradients(self) -> None:
        """Average gradients across processes ourselves, so every method works under `accelerate launch`
        without having to be a single DDP-wrapped module."""
        if self.accelerator.num_processes == 1:
            return
        for param in self._trainable_params():
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def _micro_batches(self, step: int) -> list[int]:
        """The global indices of the micro-batches this process trains at `step`: under `accelerate launch`
        each process takes its own share."""
        accumulation, processes = self.training.gradient_accumulation, self.accelerator.num_processes
        return [(step * accumulation + micro) * processes + self.accelerator.process_index for micro in range(accumulation)]

    def encode_captions_ahead(self, micro_batches: int) -> None:
        """Fill the text-encoder cache now with the captions of the next `micro_batches` micro-batches, in the
        steps' own order and grouping, so they get the values the steps would have cached, and the text
        encoders can leave the device for the steps (`training/placement.py`)."""
        indices = [index for step in range(self.step, self.training.steps) for index in self._micro_batches(step)]
        with torch.no_grad(), self.accelerator.autocast():
            for index in indices[:micro_batches]:
                self.encode_captions(self.source.batch(index).captions)

    def _optimizer_step(self) -> float:
        accumulation = self.training.gradient_accumulation
        total = 0.0
        for index in self._micro_batches(self.step):
            loss = self._micro_batch_loss(index)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingStopped(
                    f"The loss became {value} at step {self.step + 1}; training stopped and nothing was exported from this point."
                    + (f" The last good state is {self.last_state}." if self.last_state else ""),
                    "Lower the learning rate, turn off fp16 (use bf16 or no mixed precision), or check the images.",
                )
            self.accelerator.backward(loss / accumulation)
            total += value
        self._synchronise_gradients()
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self._trainable_params(), self.max_grad_norm)
        self.optimizer.step()
        self.method.after_optimizer_step(self.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accumulation

    # ----- the loop -----
    def run(self) -> LoopResult:
        total_steps = self.training.steps
        losses: list[float] = []
        started, first_step = time.perf_counter(), self.step
        loss = float("nan")
        self.method.set_training(True)
        while self.step < total_steps:
            if self.cancel.cancelled:
                state = self.save_state()
                raise TrainingStopped(f"Training was cancelled at step {self.step}/{total_steps}; its state is saved"
                                      + (f" in {state}." if state else "."),
                                      f"Resume from the run folder {self.run_dir} (CLI: --resume {self.run_dir}).")
            loss = self._optimizer_step()
            self.step += 1
            losses.append(loss)
            elapsed = time.perf_counter() - started
            rate = (self.step - first_step) / elapsed if elapsed > 0 else 0.0
            self.bus.emit(StepDone(step=self.step, total_steps=total_steps, loss=loss,
                                   lr=float(self.optimizer.param_groups[-1]["lr"]), steps_per_second=rate,
                                   eta_seconds=(total_steps - self.step) / rate if rate else 0.0))
            self._periodic_work()
        return LoopResult(step=self.step, last_loss=loss, losses=losses)

    def _periodic_work(self) -> None:
        training, step = self.training, self.step
        final = step == training.steps
        if training.save_state_every and step % training.save_state_every == 0 or final:
            self.save_state()
        if training.save_every and step % training.save_every == 0 and not final and self.hooks.export_intermediate:
            if self.accelerator.is_main_process:
                for path in self.hooks.export_intermediate(step):
                    self.bus.emit(FileSaved(path, "intermediate"))
        if training.sample_every and step % training.sample_every == 0 and not final and self.hooks.render_samples:
            if self.accelerator.is_main_process:
                self.method.set_training(False)
                with self.method.as_exported():
                    self.hooks.render_samples(step)
                self.method.set_training(True)
