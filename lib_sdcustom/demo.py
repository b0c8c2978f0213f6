"""`python -m lib_sdcustom demo`: the whole pipeline in about a minute on a CPU, with nothing to download.

It writes a small SD1-structured base checkpoint (random weights: no pretrained weights can ship or be
fetched here), a few generated training images, trains a LoRA on them through the same `train()` the
WebUI and CLI use, and writes a before/after sample grid. It shows that every stage works end to end; it
is not a quality demonstration (the base model has not learned to draw anything).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .bench.fixtures import write_sample_images
from .config import RunConfig
from .events import Callback

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    lora: Path
    grid: Path
    base: Path
    images: Path


def run_demo(folder: Path, *, steps: int = 60, callbacks: list[Callback] | None = None) -> DemoResult:
    from .models.loader import load_bundle
    from .models.tiny import write_tiny_sd1
    from .networks.algorithms import ALGORITHMS
    from .networks.lycoris_backend import attach_network
    from .sampling import generate, image_grid
    from .train import train

    folder = Path(folder)
    base = write_tiny_sd1(folder / "base", name="demo_base")
    images = write_sample_images(folder / "images", count=6)
    config = RunConfig(method="lora")
    config.model.base = str(base)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "demo_lora", str(folder / "Lora"), str(folder / "run")
    config.output.overwrite = True
    config.network.rank, config.network.alpha = 8, 8.0
    config.optimizer.lr = 2e-3
    config.training.steps, config.training.batch_size = steps, 2
    config.training.sample_steps = 10
    result = train(config, callbacks=callbacks or [])

    prompts = ["demo_lora"] * 4
    bundle = load_bundle(base)
    before = generate(bundle, prompts, seed=1, steps=10, width=64, height=64)
    from safetensors.torch import load_file

    attached = attach_network(bundle.unet, bundle.text_encoder, ALGORITHMS["lora"], config.network, train_text_encoder=True)
    attached.load_state_dict(load_file(str(result.outputs[0])))
    after = generate(bundle, prompts, seed=1, steps=10, width=64, height=64)
    grid = folder / "before_after.png"
    image_grid(before + after, columns=4).resize((4 * 128, 2 * 128)).save(grid)
    return DemoResult(lora=result.outputs[0], grid=grid, base=base, images=images)
