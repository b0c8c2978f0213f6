"""What every speed/memory benchmark shares: a tiny base and images in a scratch folder, timing of the
training steps, peak memory, and one child process per configuration so each peak is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig
from ..events import StepDone
from .fixtures import write_sample_images


@dataclass
class Timing:
    steps_per_second: float
    peak_rss_mib: float
    peak_cuda_mib: float | None


def tiny_run_config(method: str, workdir: Path, *, images: int) -> RunConfig:
    """A run on a freshly written tiny SD1 checkpoint and generated 64x64 images."""
    from ..models.tiny import write_tiny_sd1

    config = RunConfig(method=method)
    config.model.base = str(write_tiny_sd1(workdir / "model"))
    config.data.data = str(write_sample_images(workdir / "images", count=images))
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "bench", str(workdir / "out"), str(workdir / "run")
    config.training.save_state_every, config.training.sample_steps = 0, 1
    return config


def timed_training(config: RunConfig) -> Timing:
    """Train in this process; time only the steps after the first (warm-up, caches, class images)."""
    from ..train import train

    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(config, callbacks=[lambda event: stamps.append(time.perf_counter()) if isinstance(event, StepDone) else None])
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return Timing(rate, peak_rss, cuda)


def run_in_children(child_command: str, configurations: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Run `python -m lib_sdcustom.bench CHILD_COMMAND '{settings}'` once per configuration."""
    results = []
    for settings in configurations:
        output = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", child_command, json.dumps({**settings, "steps": steps})],
                                check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def child_main(arguments: str, measure: Callable[[dict[str, Any], Path], dict[str, Any]]) -> None:
    """Entry of a child process: measure one configuration in a scratch folder, print it as JSON."""
    settings = json.loads(arguments)
    with tempfile.TemporaryDirectory() as folder:
        result = measure(settings, Path(folder))
    sys.stdout.write(json.dumps(result) + "\n")


def device_description() -> str:
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name()}"
    return f"CPU, {torch.get_num_threads()} threads"


def cuda_cell(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"
