"""LoRA training speed and peak memory on the tiny SD1 model: batch 1 and 4, latent cache on and off."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .runner import Timing, child_main, cuda_cell, device_description, run_in_children, timed_training, tiny_run_config

CHILD_COMMAND = "lora-one"
CONFIGURATIONS = [{"batch_size": batch, "cache_latents": cache} for batch in (1, 4) for cache in (True, False)]


def measure(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    config = tiny_run_config("lora", workdir, images=8)
    config.data.cache_latents = settings["cache_latents"]
    config.network.rank = 8
    config.training.steps, config.training.batch_size = settings["steps"], settings["batch_size"]
    return {**settings, **dataclasses.asdict(timed_training(config))}


def run(steps: int = 30) -> list[dict[str, Any]]:
    return run_in_children(CHILD_COMMAND, CONFIGURATIONS, steps)


def child(arguments: str) -> None:
    child_main(arguments, measure)


def report(results: list[dict[str, Any]]) -> str:
    lines = [f"LoRA rank 8 on the tiny SD1 model, 64x64 images, {device_description()}",
             "| batch | latent cache | steps/s | images/s | peak RSS MiB | peak CUDA MiB |", "|---|---|---|---|---|---|"]
    for r in results:
        timing = Timing(r["steps_per_second"], r["peak_rss_mib"], r["peak_cuda_mib"])
        lines.append(f"| {r['batch_size']} | {'on' if r['cache_latents'] else 'off'} | {timing.steps_per_second:.2f} | "
                     f"{timing.steps_per_second * r['batch_size']:.2f} | {timing.peak_rss_mib:.0f} | {cuda_cell(timing.peak_cuda_mib)} |")
    by_key = {(r["batch_size"], r["cache_latents"]): r["steps_per_second"] for r in results}
    for batch in (1, 4):
        if (batch, True) in by_key and (batch, False) in by_key:
            lines.append(f"batch {batch}: with the latent cache {by_key[(batch, True)] / by_key[(batch, False)]:.2f}x the steps/s")
    return "\n".join(lines)
