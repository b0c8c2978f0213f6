"""DreamBooth training speed and peak memory on the tiny SD1 model: prior preservation and gradient
checkpointing, each on and off.

Prior preservation doubles every micro-batch (instance + class examples); gradient checkpointing trades
recomputation for activation memory. Each configuration runs in a fresh child process, so its peak memory is
its own. Class-image generation happens before the first step and is not timed.
"""

from __future__ import annotations

import json
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
from .lora import _peak_rss_mib

CONFIGURATIONS = [
    {"prior_preservation": prior, "gradient_checkpointing": checkpointing}
    for prior in (False, True) for checkpointing in (False, True)
]


@dataclass
class Measurement:
    prior_preservation: bool
    gradient_checkpointing: bool
    steps_per_second: float
    peak_rss_mib: float
    peak_cuda_mib: float | None


def measure_one(prior_preservation: bool, gradient_checkpointing: bool, steps: int, workdir: Path) -> Measurement:
    """Train `steps` DreamBooth steps in this process; time only steps after the first."""
    from ..models.tiny import write_tiny_sd1
    from ..train import train

    config = RunConfig(method="dreambooth")
    config.model.base = str(write_tiny_sd1(workdir / "model"))
    config.data.data = str(write_sample_images(workdir / "images", count=4))
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "bench", str(workdir / "out"), str(workdir / "run")
    db = config.dreambooth
    db.instance_prompt, db.class_prompt, db.prior_preservation = "a photo of sks dog", "a photo of a dog", prior_preservation
    db.num_class_images, db.class_sample_steps = 4, 2
    config.training.steps, config.training.gradient_checkpointing = steps, gradient_checkpointing
    config.training.save_state_every, config.training.sample_steps = 0, 1
    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(config, callbacks=[lambda event: stamps.append(time.perf_counter()) if isinstance(event, StepDone) else None])
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return Measurement(prior_preservation, gradient_checkpointing, rate, _peak_rss_mib(), cuda)


def run(steps: int = 20) -> list[Measurement]:
    results = []
    for settings in CONFIGURATIONS:
        output = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", "dreambooth-one", json.dumps({**settings, "steps": steps})],
                                check=True, capture_output=True, text=True).stdout
        results.append(Measurement(**json.loads(output.strip().splitlines()[-1])))
    return results


def child_main(arguments: str) -> None:
    settings = json.loads(arguments)
    with tempfile.TemporaryDirectory() as folder:
        result = measure_one(settings["prior_preservation"], settings["gradient_checkpointing"], settings["steps"], Path(folder))
    sys.stdout.write(json.dumps(result.__dict__) + "\n")


def report(results: list[Measurement]) -> str:
    lines = [f"DreamBooth (full UNet) on the tiny SD1 model, 64x64 images, batch 1, {torch.get_num_threads()} CPU threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
             "| prior preservation | gradient checkpointing | steps/s | peak RSS MiB | peak CUDA MiB |", "|---|---|---|---|---|"]
    for r in results:
        cuda = f"{r.peak_cuda_mib:.0f}" if r.peak_cuda_mib is not None else "-"
        lines.append(f"| {'on' if r.prior_preservation else 'off'} | {'on' if r.gradient_checkpointing else 'off'} | "
                     f"{r.steps_per_second:.2f} | {r.peak_rss_mib:.0f} | {cuda} |")
    return "\n".join(lines)
