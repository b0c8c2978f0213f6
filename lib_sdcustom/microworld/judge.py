"""The judge: a small CNN that names a micro-world image's shape, color, background and outline.

Customization quality is measured by asking whether generated samples show the concept, so we need an
automatic viewer. It is trained on the world's ground truth over every attribute (held-out concepts
included, since those are what it must recognise) with blur, noise, JPEG and down-up augmentation, because
it will look at VAE reconstructions and diffusion samples, not at clean renders. The trained judge ships in
the package as `judge.safetensors` (float16 weights) plus `judge.json` (label names and layer widths).
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelLoadError
from ..files import write_atomically, write_text_atomically
from .world import BACKGROUNDS, COLORS, EVERYTHING, IMAGE_SIZE, SHAPES, Scene, render, sample_scene

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "background", "outline")
Label = str | bool
Images = Sequence[Image.Image] | torch.Tensor

SHIPPED_WEIGHTS = Path(__file__).with_name("judge.safetensors")
_FORMAT = "sdcustom-microworld-judge"
_DEFAULT_WIDTHS = (24, 48, 64, 96, 112)
EVAL_SEED = 424242  # never used for training pools, so evaluation images are unseen


def world_labels() -> dict[str, list[Label]]:
    """The label list of every head, in the world's own order."""
    return {"shape": list(SHAPES), "color": list(COLORS), "background": list(BACKGROUNDS), "outline": [False, True]}


class JudgeNet(nn.Module):
    """Conv-BN-ReLU stages with 2x pooling, then mean+max pooling (the max keeps a thin outline's evidence)."""

    def __init__(self, head_sizes: Mapping[str, int], widths: Sequence[int] = _DEFAULT_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, size) for name, size in head_sizes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2.0 - 1.0)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def images_to_tensor(images: Images) -> torch.Tensor:
    """PIL images, or a float (N, 3, H, W) tensor in [0, 1], as a float (N, 3, 64, 64) tensor in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected a (N, 3, H, W) tensor in [0, 1], got shape {tuple(images.shape)}.")
        batch = images.detach().float().cpu()
    else:
        rgb = [image.convert("RGB") for image in images]
        arrays = [np.asarray(image if image.size == (IMAGE_SIZE, IMAGE_SIZE)
                             else image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)) for image in rgb]
        if not arrays:
            return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    if batch.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        batch = F.interpolate(batch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
    return batch.clamp(0.0, 1.0)


class Judge:
    """A trained `JudgeNet` with the label names of its heads."""

    def __init__(self, net: JudgeNet, labels: Mapping[str, list[Label]], widths: Sequence[int]) -> None:
        self.net = net.eval()
        self.labels = dict(labels)
        self.widths = tuple(widths)

    @torch.no_grad()
    def probabilities(self, images: Images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per head, an (N, classes) tensor of probabilities; columns follow `self.labels[head]`."""
        batch = images_to_tensor(images)
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.labels}
        for start in range(0, batch.shape[0], batch_size):
            for name, logits in self.net(batch[start:start + batch_size]).items():
                chunks[name].append(logits.softmax(dim=1))
        return {name: torch.cat(parts) if parts else torch.zeros(0, len(self.labels[name]))
                for name, parts in chunks.items()}

    def predict(self, images: Images) -> dict[str, list[Label]]:
        """Per attribute, the most likely label of every image (outline as a bool, others as names)."""
        return {name: [self.labels[name][i] for i in probs.argmax(dim=1).tolist()]
                for name, probs in self.probabilities(images).items()}

    def accuracy(self, images: Images, scenes: Sequence[Scene]) -> dict[str, float]:
        """Share of images whose predicted attribute equals the scene's; 'all' needs every head right."""
        predicted = self.predict(images)
        right = {name: [label == getattr(scene, name) for label, scene in zip(labels, scenes)]
                 for name, labels in predicted.items()}
        result = {name: float(np.mean(hits)) for name, hits in right.items()}
        result["all"] = float(np.mean([all(hits) for hits in zip(*right.values())]))
        return result

    def save(self, path: Path, info: Mapping[str, object] | None = None) -> tuple[Path, Path]:
        """Write float16 weights to `path` and label names (plus `info`, e.g. accuracy) to the `.json` beside it."""
        path = Path(path)
        tensors = {key: value.half() if value.is_floating_point() else value
                   for key, value in self.net.state_dict().items()}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": _FORMAT}))
        meta = {"format": _FORMAT, "widths": list(self.widths), "labels": self.labels, "info": dict(info or {})}
        json_path = write_text_atomically(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
        return path, json_path


def load_judge(path: Path | None = None) -> Judge:
    """Load a judge written by `Judge.save`; with no path, the one shipped in the package."""
    path = Path(path) if path is not None else SHIPPED_WEIGHTS
    json_path = path.with_suffix(".json")
    if not path.is_file() or not json_path.is_file():
        raise ModelLoadError(f"Micro-world judge files missing: need both {path} and {json_path}.",
                             "Train one with `python -m lib_sdcustom.microworld train-judge OUT.safetensors`.")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        labels, widths = meta["labels"], meta["widths"]
        net = JudgeNet({name: len(names) for name, names in labels.items()}, widths)
        state = {key: value.float() if value.is_floating_point() else value for key, value in load_file(str(path)).items()}
        net.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"{path} (with {json_path.name}) is not a micro-world judge: {error}.",
                             "Re-train it with `python -m lib_sdcustom.microworld train-judge`.") from error
    return Judge(net, labels, widths)


# ----------------------------------------------------------------------------------------------- training

def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _training_pool(seed: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`size` rendered scenes from every split (a quarter JPEG-compressed) as uint8 images and label ids."""
    rng = random.Random(seed)
    labels = world_labels()
    images = np.empty((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    targets = {name: torch.empty(size, dtype=torch.long) for name in ATTRIBUTES}
    for index in range(size):
        scene = sample_scene(rng, allowed=EVERYTHING)
        image = render(scene)
        if rng.random() < 0.25:
            image = _jpeg(image, rng.randint(20, 75))
        images[index] = np.asarray(image)
        for name in ATTRIBUTES:
            targets[name][index] = labels[name].index(getattr(scene, name))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), targets


def _blur(batch: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a different sigma per image (one grouped separable convolution)."""
    n, c, h, w = batch.shape
    taps = torch.arange(-3, 4, dtype=batch.dtype)
    kernel = torch.exp(-taps[None, :] ** 2 / (2.0 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, 7)
    flat = batch.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a VAE or a sampler does to a picture: softening, noise, slight color drift; plus mirror images."""
    n = batch.shape[0]

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p)[:, None, None, None]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    batch = torch.where(chosen(0.5), batch.flip(3), batch)
    batch = torch.where(chosen(0.5), _blur(batch, uniform(0.3, 1.6)), batch)
    halved = F.interpolate(batch, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    batch = torch.where(chosen(0.25), F.interpolate(halved, size=batch.shape[-2:], mode="bilinear",
                                                    align_corners=False), batch)
    drift = uniform(0.92, 1.08, 3, 1, 1) * batch + uniform(-0.04, 0.04, 3, 1, 1)
    batch = torch.where(chosen(0.5), drift, batch)
    noise = torch.randn(batch.shape, generator=generator) * uniform(0.0, 0.07, 1, 1, 1)
    batch = torch.where(chosen(0.5), batch + noise, batch)
    return batch.clamp(0.0, 1.0)


def train_judge(seed: int = 0, steps: int = 1000, *, batch_size: int = 64, pool_size: int = 16000,
                learning_rate: float = 3e-3, widths: Sequence[int] = _DEFAULT_WIDTHS,
                log_every: int = 100) -> Judge:
    """Train a judge from scratch on seeded renders; deterministic for a given seed and thread count."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    pool, targets = _training_pool(seed, pool_size)
    logger.info("judge: %d training images rendered in %.1fs", pool_size, time.monotonic() - started)
    labels = world_labels()
    net = JudgeNet({name: len(names) for name, names in labels.items()}, widths).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(steps, 1),
                                                   pct_start=0.15)
    for step in range(1, steps + 1):
        index = torch.randint(0, pool_size, (batch_size,), generator=generator)
        batch = _augment(pool[index].float() / 255.0, generator)
        outputs = net(batch)
        loss = cast(torch.Tensor, sum(F.cross_entropy(outputs[name], targets[name][index]) for name in ATTRIBUTES))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps):
            logger.info("judge: step %d/%d loss %.4f (%.0fs)", step, steps, loss.item(), time.monotonic() - started)
    return Judge(net, labels, widths)


# ----------------------------------------------------------------------------------------------- evaluation

def evaluation_set(seed: int = EVAL_SEED, n: int = 1000) -> tuple[list[Image.Image], list[Scene]]:
    """`n` clean renders over every attribute (held-out concepts included) with their scenes."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, allowed=EVERYTHING) for _ in range(n)]
    return [render(scene) for scene in scenes], scenes


def _with_noise(images: Sequence[Image.Image], std: float, seed: int) -> torch.Tensor:
    batch = images_to_tensor(images)
    noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (batch + noise).clamp(0.0, 1.0)


CORRUPTIONS: dict[str, Callable[[Sequence[Image.Image]], Images]] = {
    "clean": lambda images: list(images),
    "blur_r1": lambda images: [image.filter(ImageFilter.GaussianBlur(1)) for image in images],
    "blur_r2": lambda images: [image.filter(ImageFilter.GaussianBlur(2)) for image in images],
    "noise_0.05": lambda images: _with_noise(images, 0.05, seed=0),
    "noise_0.10": lambda images: _with_noise(images, 0.10, seed=0),
    "jpeg_q30": lambda images: [_jpeg(image, 30) for image in images],
}


def robustness_report(judge: Judge, seed: int = EVAL_SEED, n: int = 1000) -> dict[str, dict[str, float]]:
    """Accuracy per attribute on unseen images, clean and under each corruption in `CORRUPTIONS`."""
    images, scenes = evaluation_set(seed, n)
    return {name: judge.accuracy(corrupt(images), scenes) for name, corrupt in CORRUPTIONS.items()}
