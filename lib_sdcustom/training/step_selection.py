"""A score for the trainable state at an intermediate export, from the model's own denoising error (issue 14).

Real checkpoints have no judge, and the proxy may not download one, so the model grades itself:

- fidelity: its denoising error on the instance pictures with their training prompts, relative to the
  run's starting point (1 = no better than at step 0, lower is better). The pictures are the first epoch's
  batches of the training data; none is held back, because a held-out split would change what the run
  learns (and with 3 pictures there is nothing to spare), and best-step selection must leave the trained
  weights exactly as they are without it. Overfitting shows in the drift term instead. Held-out pictures
  would not help either: on fresh pictures of a micro-world concept the error was lowest at the first
  export in most runs and rose while the judge's score rose (docs/bench/best_step/held_out/), so a
  held-out fidelity term picks the earliest step.
- drift: the rise of its denoising error on base-model samples of the class prompt (made once, before the
  first step), relative to the starting point (0 = the class is drawn as before, higher is worse): a
  model that has moved the class no longer denoises the base model's own class pictures as well.
- leak: the share of the starting point's error on the instance pictures that the bare class prompt (no
  trigger) has lost (0 = unchanged, higher is worse): a class prompt that now denoises the subject well has
  learned the subject, which is what a user sees as 'a dog' drawing their dog.

The score is `(1 - fidelity) - DRIFT_WEIGHT * max(drift, 0) - LEAK_WEIGHT * max(leak, 0)`: the share of the
instance error removed, less what the class lost; higher is better. The weights were chosen on the micro-world
against the judge (`bench best-step`, docs/bench/best_step/). On nine concepts the chosen step scored within
0.05 of the judge's best in 17 of 36 runs at a constant rate and 27 of 36 with the default decaying rate, each
time as often as the last step did (80% was aimed for). The instance error falls to the last step even in runs
whose judged quality peaks earlier (judge128/), so selection stays opt-in.

Every error is measured at the same few (noise, timestep) pairs, drawn from a generator of its own, in eval
mode and without gradients: the scores are repeatable and the training's random streams are not touched, so
a run trains the same weights with or without selection, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from ..models.bundle import ModelBundle
from . import objectives
from .batches import Batch, BatchSource, uncropped_sizes
from .conditioning import Conditioning

#: Evenly spread timesteps (as fractions of the schedule) at which every picture is noised, each with
#: `NOISES_PER_TIMESTEP` fixed noises. Errors are compared timestep by timestep (an epsilon model's error is far
#: larger at low noise, where little of a subject's identity is decided), then averaged.
PROBE_TIMESTEPS = (0.125, 0.375, 0.625, 0.875)
NOISES_PER_TIMESTEP = 2
#: At most this many instance pictures are probed (twice: with their prompts and with the class prompt).
MAX_INSTANCE_PICTURES = 8
#: Base-model samples of the class prompt on which drift is measured.
CLASS_SAMPLES = 4
#: The probe's own noise seed: the same pairs at every export, and no draw from the training's generators.
PROBE_SEED = 20_141
#: What a share of added class error (drift) and of the subject learned by the class prompt (leak) cost
#: against a share of removed instance error (see module doc): the best of a grid on the first 12 micro-world
#: runs, kept unchanged since so that later runs test them (docs/bench/best_step/: 17 of 36 runs at a constant
#: rate, in constant/; the cosine-decayed default's runs beside it).
DRIFT_WEIGHT = 0.5
LEAK_WEIGHT = 0.1


@dataclass(frozen=True)
class ProbeErrors:
    """Mean denoising errors of one state per probe timestep: on the instance pictures with their prompts, on
    the class samples, and on the instance pictures with the bare class prompt."""

    instance: tuple[float, ...]
    drift: tuple[float, ...]
    leak: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"instance": list(self.instance), "drift": list(self.drift), "leak": list(self.leak)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeErrors":
        return cls(tuple(data["instance"]), tuple(data["drift"]), tuple(data["leak"]))


@dataclass(frozen=True)
class StepScore:
    step: int
    fidelity: float  # instance denoising error / the starting point's (lower is better)
    drift: float  # class denoising error / the starting point's - 1 (0 = unchanged, higher is worse)
    leak: float  # 1 - class-prompt error on the instance pictures / the starting point's (higher is worse)
    score: float  # higher is better
    errors: ProbeErrors  # the raw errors behind them

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepScore":
        return cls(**{**data, "errors": ProbeErrors.from_dict(data["errors"])})


def _ratio(errors: tuple[float, ...], reference: tuple[float, ...]) -> float:
    return sum(error / start for error, start in zip(errors, reference)) / len(reference)


def combine(step: int, errors: ProbeErrors, reference: ProbeErrors, drift_weight: float = DRIFT_WEIGHT,
            leak_weight: float = LEAK_WEIGHT) -> StepScore:
    """The step's score from its errors and the starting point's (see module doc)."""
    fidelity = _ratio(errors.instance, reference.instance)
    drift = _ratio(errors.drift, reference.drift) - 1.0
    leak = 1.0 - _ratio(errors.leak, reference.leak)
    score = (1.0 - fidelity) - drift_weight * max(drift, 0.0) - leak_weight * max(leak, 0.0)
    return StepScore(step, fidelity, drift, leak, score, errors)


def best(scores: list[StepScore]) -> StepScore:
    """The highest score; on a tie the earlier step (fewer steps, less drift to come)."""
    return max(scores, key=lambda item: (item.score, -item.step))


@dataclass
class _Probe:
    """Fixed latents, prompts, noise and timesteps: one UNet batch per entry."""

    latents: torch.Tensor
    captions: list[str]
    noise: torch.Tensor
    timesteps: torch.Tensor
    sizes: list[Any]
    masks: torch.Tensor | None


def _noised(batch: Batch, generator: torch.Generator, num_timesteps: int, bundle: ModelBundle) -> _Probe:
    """`batch` repeated for every probe (timestep, noise) pair, timestep-major."""
    count = batch.latents.shape[0]
    repeats = len(PROBE_TIMESTEPS) * NOISES_PER_TIMESTEP
    latents = batch.latents.float().repeat(repeats, 1, 1, 1)
    timesteps = torch.tensor([int(fraction * num_timesteps) for fraction in PROBE_TIMESTEPS])
    timesteps = timesteps.repeat_interleave(NOISES_PER_TIMESTEP * count)
    noise = torch.randn(latents.shape, generator=generator)
    sizes = (batch.sizes if batch.sizes is not None else uncropped_sizes(batch.latents, bundle)) * repeats
    masks = None if batch.masks is None else batch.masks.repeat(repeats, 1, 1, 1)
    return _Probe(latents, batch.captions * repeats, noise, timesteps, sizes, masks)


def instance_batches(training: BatchSource, pictures: BatchSource, batches_per_epoch: int) -> list[Batch]:
    """The first epoch's pictures (at most `MAX_INSTANCE_PICTURES`) with the prompts the method trains them on.

    `training` is the method's source (its prompts; maybe class pictures added), `pictures` the plain one it
    wraps; a method keeps the instance pictures first in its batches, and that is checked here, not assumed."""
    found: list[Batch] = []
    total = 0
    for index in range(batches_per_epoch):
        plain, trained = pictures.batch(index), training.batch(index)
        count = min(plain.latents.shape[0], MAX_INSTANCE_PICTURES - total)
        if not torch.equal(trained.latents[:count], plain.latents[:count]):
            raise ValueError("the method's batches do not start with the instance pictures of the plain source")
        found.append(Batch(latents=plain.latents[:count], captions=trained.captions[:count],
                           sizes=None if trained.sizes is None else trained.sizes[:count],
                           masks=None if trained.masks is None else trained.masks[:count]))
        total += count
        if total >= MAX_INSTANCE_PICTURES:
            break
    return found


class StepScorer:
    """Measures `ProbeErrors` of the method's current state on fixed instance and class probes."""

    def __init__(self, bundle: ModelBundle, encode: Callable[[list[str]], Conditioning], *,
                 instances: list[Batch], class_latents: torch.Tensor, class_prompt: str,
                 alphas_cumprod: torch.Tensor, num_timesteps: int, autocast: Callable[[], Any],
                 dtype: torch.dtype) -> None:
        self.bundle = bundle
        self.encode = encode
        self.alphas_cumprod = alphas_cumprod
        self.autocast = autocast
        self.dtype = dtype
        generator = torch.Generator().manual_seed(PROBE_SEED)
        self.instance_probes = [_noised(batch, generator, num_timesteps, bundle) for batch in instances]
        self.leak_probes = [replace(probe, captions=[class_prompt] * len(probe.captions)) for probe in self.instance_probes]
        class_batch = Batch(latents=class_latents, captions=[class_prompt] * class_latents.shape[0])
        self.class_probe = _noised(class_batch, generator, num_timesteps, bundle)

    @torch.no_grad()
    def _errors(self, probe: _Probe) -> torch.Tensor:
        """Per-sample errors as [timestep, noise x picture]."""
        device = self.bundle.unet.device
        latents = probe.latents.to(device)
        noise, timesteps = probe.noise.to(device), probe.timesteps
        noisy = objectives.add_noise(latents, noise, timesteps, self.alphas_cumprod).to(self.dtype)
        with self.autocast():
            conditioning = self.encode(probe.captions).to(noisy.dtype)
            prediction = self.bundle.unet(noisy, timesteps.to(device), **conditioning.unet_kwargs(probe.sizes)).sample
        target = objectives.training_target(self.bundle.prediction_type, latents, noise, timesteps, self.alphas_cumprod)
        return objectives.per_sample_mse(prediction, target, probe.masks).cpu().reshape(len(PROBE_TIMESTEPS), -1)

    def measure(self) -> ProbeErrors:
        """The current state's errors; the caller puts trainable parts in eval mode first."""
        instance, leak = (torch.cat([self._errors(probe) for probe in probes], dim=1).mean(dim=1)
                          for probes in (self.instance_probes, self.leak_probes))
        drift = self._errors(self.class_probe).mean(dim=1)
        return ProbeErrors(tuple(instance.tolist()), tuple(drift.tolist()), tuple(leak.tolist()))
