"""LoRA training speed and peak memory on the tiny models of each family: batch 1 and 4, latent cache on
and off; SDXL-tiny and SD2-tiny figures are also given as ratios to SD1-tiny's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .runner import (child_main, cuda_cell, device_description, family_label, ratio_lines, run_in_children,
                     timed_training, tiny_run_config)

CHILD_COMMAND = "lora-one"
CONFIGURATIONS = [{"batch_size": batch, "cache_latents": cache} for batch in (1, 4) for cache in (True, False)]


def measure(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    config = tiny_run_config("lora", workdir, images=8, family=settings.get("family", "sd1"))
    config.data.cache_latents = settings["cache_latents"]
    config.network.rank = 8
    config.training.steps, config.training.batch_size = settings["steps"], settings["batch_size"]
    return {**settings, **dataclasses.asdict(timed_training(config))}


def run(steps: int = 30, families: Sequence[str] = ("sd1",)) -> list[dict[str, Any]]:
    return run_in_children(CHILD_COMMAND, CONFIGURATIONS, steps, families)


def child(arguments: str) -> None:
    child_main(arguments, measure)


def report(results: list[dict[str, Any]]) -> str:
    lines = [f"LoRA rank 8 on the tiny models, 64x64 images, {device_description()}",
             "| model | batch | latent cache | steps/s | images/s | peak RSS MiB | peak CUDA MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {family_label(r['family'])} | {r['batch_size']} | {'on' if r['cache_latents'] else 'off'} | "
                     f"{r['steps_per_second']:.2f} | {r['steps_per_second'] * r['batch_size']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {cuda_cell(r['peak_cuda_mib'])} |")
    by_key = {(r["family"], r["batch_size"], r["cache_latents"]): r["steps_per_second"] for r in results}
    for family, batch, cache in by_key:
        if cache and (family, batch, False) in by_key:
            lines.append(f"{family_label(family)} batch {batch}: with the latent cache "
                         f"{by_key[(family, batch, True)] / by_key[(family, batch, False)]:.2f}x the steps/s")
    lines += ratio_lines(results, ("batch_size", "cache_latents"),
                         lambda r: f"batch {r['batch_size']}, latent cache {'on' if r['cache_latents'] else 'off'}")
    return "\n".join(lines)
