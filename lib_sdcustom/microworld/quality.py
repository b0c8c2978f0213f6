"""Does a micro-world model draw what its caption says? The judge's verdict on samples and reconstructions.

Base-model quality is judged on every (shape, color, background) combination the pretraining split allows,
each with its full caption ("a red circle on a gray background") and the same number of samples, so the
average over samples is the average over caption combinations. The VAE is judged on reconstructions of
pictures from every split, held-out concepts included: a concept the VAE cannot reproduce cannot be taught.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

from .judge import EVAL_SEED, Judge, evaluation_set, images_to_tensor, load_judge
from .world import BACKGROUNDS, COLORS, IMAGE_SIZE, PRETRAINING, PRETRAINING_SHAPES, Scene, Split, caption_variants

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from ..models.bundle import ModelBundle

#: Done-when targets of the base model (judge accuracy averaged over caption combinations).
TARGETS = {"shape": 0.85, "color": 0.95, "background": 0.95}
SAMPLE_STEPS = 25
GUIDANCE = 6.0


def caption_scenes(split: Split = PRETRAINING) -> list[Scene]:
    """One centred scene per drawable (shape, color, background) combination of `split`, no outline."""
    scenes = []
    for shape in split.shapes:
        for color in split.colors:
            for background in split.backgrounds:
                scene = Scene(shape, color, background, False, 32.0, 32.0, 18.0, 0.0)
                if split.allows(scene):
                    scenes.append(scene)
    return scenes


def full_caption(scene: Scene) -> str:
    """'a red circle on a gray background': the most specific caption pretraining uses."""
    return caption_variants(scene)[0]


@dataclass
class QualityReport:
    accuracy: dict[str, float]  # per attribute and 'all', averaged over caption combinations
    per_shape: dict[str, dict[str, float]]
    combinations: int
    samples: int
    seconds: float
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def meets_targets(self) -> bool:
        return all(self.accuracy[name] >= target for name, target in TARGETS.items())

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "targets": TARGETS, "meets_targets": self.meets_targets}

    def summary(self) -> str:
        scores = ", ".join(f"{name} {self.accuracy[name]:.3f}" for name in ("shape", "color", "background", "all"))
        shapes = ", ".join(f"{shape} {scores['shape']:.2f}" for shape, scores in self.per_shape.items())
        return (f"judge accuracy over {self.combinations} caption combinations x {self.samples // self.combinations} "
                f"samples: {scores} (targets: shape >= {TARGETS['shape']}, color and background >= "
                f"{TARGETS['color']}); shape accuracy by shape: {shapes}; {self.samples / self.seconds:.1f} images/s")


def _score(judge: Judge, images: Sequence[Image.Image], scenes: Sequence[Scene]) -> dict[str, list[bool]]:
    predicted = judge.predict(images)
    return {name: [label == getattr(scene, name) for label, scene in zip(predicted[name], scenes)]
            for name in ("shape", "color", "background")}


def sample_quality(bundle: ModelBundle, judge: Judge | None = None, *, per_caption: int = 2, seed: int = 0,
                   steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE, batch_size: int = 128,
                   scenes: Sequence[Scene] | None = None) -> tuple[QualityReport, list[Image.Image]]:
    """Sample every caption combination `per_caption` times (image i of the run uses noise seed + i) and judge."""
    from ..sampling import generate

    judge = judge or load_judge()
    scenes = list(scenes) if scenes is not None else caption_scenes()
    wanted = [scene for scene in scenes for _ in range(per_caption)]
    started = time.monotonic()
    images: list[Image.Image] = []
    for start in range(0, len(wanted), batch_size):
        prompts = [full_caption(scene) for scene in wanted[start:start + batch_size]]
        images += generate(bundle, prompts, seed=seed + start, steps=steps, guidance=guidance,
                           width=IMAGE_SIZE, height=IMAGE_SIZE)
    seconds = time.monotonic() - started
    hits = _score(judge, images, wanted)
    hits["all"] = [all(parts) for parts in zip(*hits.values())]
    accuracy = {name: float(np.mean(values)) for name, values in hits.items()}
    per_shape = {}
    for shape in dict.fromkeys(scene.shape for scene in wanted):
        chosen = [index for index, scene in enumerate(wanted) if scene.shape == shape]
        per_shape[shape] = {name: float(np.mean([hits[name][i] for i in chosen])) for name in hits}
    report = QualityReport(accuracy, per_shape, len(scenes), len(wanted), seconds,
                           {"per_caption": per_caption, "seed": seed, "steps": steps, "guidance": guidance})
    return report, images


def quality_grid(images: Sequence[Image.Image], per_caption: int = 1) -> Image.Image:
    """First sample of every combination: a row per shape, a column per (color, background) pair."""
    scenes = caption_scenes()
    pairs = [(color, background) for color in COLORS for background in BACKGROUNDS if color != background]
    sheet = Image.new("RGB", (len(pairs) * IMAGE_SIZE, len(PRETRAINING_SHAPES) * IMAGE_SIZE), "white")
    for index, scene in enumerate(scenes):
        column = pairs.index((scene.color, scene.background))
        row = PRETRAINING_SHAPES.index(scene.shape)
        sheet.paste(images[index * per_caption], (column * IMAGE_SIZE, row * IMAGE_SIZE))
    return sheet


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, judge: Judge | None = None, *, n: int = 500, seed: int = EVAL_SEED,
                            batch_size: int = 100) -> dict[str, float]:
    """Judge accuracy on VAE round trips (posterior mean) of unseen pictures from every split."""
    judge = judge or load_judge()
    images, scenes = evaluation_set(seed, n)
    return judge.accuracy(round_trip(vae, images, batch_size), scenes)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: Sequence[Image.Image], batch_size: int = 100) -> torch.Tensor:
    """The pictures encoded (posterior mean) and decoded again, as a float (N, 3, H, W) tensor in [0, 1]."""
    batch = images_to_tensor(images) * 2.0 - 1.0
    parameter = next(vae.parameters())
    decoded = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size].to(parameter.device, parameter.dtype)
        decoded.append(vae.decode(vae.encode(chunk).latent_dist.mean).sample.float().cpu())
    return (torch.cat(decoded).clamp(-1, 1) + 1) / 2
