"""LoRA training speed and peak memory on the tiny SD1 model: batch 1 and 4, latent cache on and off.

Each configuration runs in a fresh child process, so its peak resident memory is its own and not the
high-water mark of the ones before it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..events import StepDone
from .fixtures import write_sample_images

CONFIGURATIONS = [
    {"batch_size": 1, "cache_latents": True},
    {"batch_size": 1, "cache_latents": False},
    {"batch_size": 4, "cache_latents": True},
    {"batch_size": 4, "cache_latents": False},
]


@dataclass
class Measurement:
    batch_size: int
    cache_latents: bool
    steps_per_second: float
    images_per_second: float
    peak_rss_mib: float
    peak_cuda_mib: float | None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_one(batch_size: int, cache_latents: bool, steps: int, workdir: Path) -> Measurement:
    """Train `steps` steps in this process; time only steps after the first (warm-up, cache filling)."""
    from ..models.tiny import write_tiny_sd1
    from ..train import train

    checkpoint = write_tiny_sd1(workdir / "model")
    config = RunConfig(method="lora")
    config.model.base = str(checkpoint)
    config.data.data = str(write_sample_images(workdir / "images", count=8))
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.data.cache_latents = cache_latents
    config.output.name, config.output.out, config.output.run_dir = "bench", str(workdir / "out"), str(workdir / "run")
    config.network.rank = 8
    config.training.steps, config.training.batch_size = steps, batch_size
    config.training.save_state_every, config.training.sample_steps = 0, 1
    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(config, callbacks=[lambda event: stamps.append(time.perf_counter()) if isinstance(event, StepDone) else None])
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return Measurement(batch_size, cache_latents, rate, rate * batch_size, _peak_rss_mib(), cuda)


def run(steps: int = 30) -> list[Measurement]:
    results = []
    for settings in CONFIGURATIONS:
        output = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", "lora-one", json.dumps({**settings, "steps": steps})],
                                check=True, capture_output=True, text=True).stdout
        results.append(Measurement(**json.loads(output.strip().splitlines()[-1])))
    return results


def child_main(arguments: str) -> None:
    settings = json.loads(arguments)
    with tempfile.TemporaryDirectory() as folder:
        result = measure_one(settings["batch_size"], settings["cache_latents"], settings["steps"], Path(folder))
    sys.stdout.write(json.dumps(result.__dict__) + "\n")


def report(results: list[Measurement]) -> str:
    lines = [f"LoRA rank 8 on the tiny SD1 model, 64x64 images, {torch.get_num_threads()} CPU threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
             "| batch | latent cache | steps/s | images/s | peak RSS MiB | peak CUDA MiB |", "|---|---|---|---|---|---|"]
    for r in results:
        cuda = f"{r.peak_cuda_mib:.0f}" if r.peak_cuda_mib is not None else "-"
        lines.append(f"| {r.batch_size} | {'on' if r.cache_latents else 'off'} | {r.steps_per_second:.2f} | "
                     f"{r.images_per_second:.2f} | {r.peak_rss_mib:.0f} | {cuda} |")
    by_key = {(r.batch_size, r.cache_latents): r for r in results}
    for batch in (1, 4):
        on, off = by_key.get((batch, True)), by_key.get((batch, False))
        if on and off:
            lines.append(f"batch {batch}: the latent cache gives {on.steps_per_second / off.steps_per_second:.2f}x the steps/s")
    return "\n".join(lines)
