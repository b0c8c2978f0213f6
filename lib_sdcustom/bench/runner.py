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
from typing import Any, Callable, Sequence

import torch

from ..config import RunConfig
from ..events import StepDone
from ..testing.sample_images import write_sample_images


@dataclass
class Timing:
    steps_per_second: float
    peak_rss_mib: float
    peak_cuda_mib: float | None


def _tiny_base(family: str, folder: Path) -> Path:
    """The tiny checkpoint of a family (SD2 as its 768-v variant, so the v-prediction objective is timed)."""
    from ..testing.tiny import write_tiny_sd1
    from ..testing.tiny_families import write_tiny_sd2, write_tiny_sdxl

    writers = {"sd1": write_tiny_sd1, "sd2": lambda where: write_tiny_sd2(where, v_prediction=True),
               "sdxl": write_tiny_sdxl}
    return writers[family](folder)


def tiny_run_config(method: str, workdir: Path, *, images: int, family: str = "sd1") -> RunConfig:
    """A run on a freshly written tiny checkpoint of `family` and generated 64x64 images."""
    config = RunConfig(method=method)
    config.model.base = str(_tiny_base(family, workdir / "model"))
    config.data.data = str(write_sample_images(workdir / "images", count=images))
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "bench", str(workdir / "out"), str(workdir / "run")
    config.training.save_state_every, config.training.sample_steps = 0, 1
    return config


def timed_training(config: RunConfig) -> Timing:
    """Train in this process; time only the steps after the first (warm-up, caches, class images)."""
    from ..run.train import train

    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(config, callbacks=[lambda event: stamps.append(time.perf_counter()) if isinstance(event, StepDone) else None])
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return Timing(rate, peak_rss, cuda)


def run_in_children(child_command: str, configurations: list[dict[str, Any]], steps: int,
                    families: Sequence[str]) -> list[dict[str, Any]]:
    """Run `python -m lib_sdcustom.bench CHILD_COMMAND '{settings}'` once per family and configuration."""
    results = []
    for settings in [{**item, "family": family, "steps": steps} for family in families for item in configurations]:
        child = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", child_command, json.dumps(settings)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"benchmark {child_command} {settings} failed:\n{child.stderr[-4000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
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


def family_label(family: str) -> str:
    return f"{family.upper()}-tiny"


def ratio_lines(results: list[dict[str, Any]], keys: tuple[str, ...], describe: Callable[[dict[str, Any]], str]) -> list[str]:
    """Each non-SD1 family against SD1 for the same settings (`keys`): steps/s and peak memory ratios."""
    by_settings = {(r["family"], *(r[key] for key in keys)): r for r in results}
    lines = []
    for r in results:
        base = by_settings.get(("sd1", *(r[key] for key in keys)))
        if r["family"] == "sd1" or base is None:
            continue
        memory = (f"{r['peak_cuda_mib'] / base['peak_cuda_mib']:.2f}x the peak CUDA memory"
                  if r["peak_cuda_mib"] and base["peak_cuda_mib"] else
                  f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x the peak RSS")
        lines.append(f"{family_label(r['family'])} vs SD1-tiny ({describe(r)}): "
                     f"{r['steps_per_second'] / base['steps_per_second']:.2f}x the steps/s, {memory}")
    return lines
