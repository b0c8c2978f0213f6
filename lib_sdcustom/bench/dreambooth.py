"""DreamBooth training speed and peak memory on the tiny models of each family: prior preservation and
gradient checkpointing, each on and off; SDXL-tiny and SD2-tiny figures also as ratios to SD1-tiny's.

Prior preservation doubles every micro-batch (instance + class examples); gradient checkpointing trades
recomputation for activation memory. Class-image generation happens before the first step and is not timed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .runner import (child_main, cuda_cell, device_description, family_label, ratio_lines, run_in_children,
                     timed_training, tiny_run_config)

CHILD_COMMAND = "dreambooth-one"
CONFIGURATIONS = [{"prior_preservation": prior, "gradient_checkpointing": checkpointing}
                  for prior in (False, True) for checkpointing in (False, True)]


def measure(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    config = tiny_run_config("dreambooth", workdir, images=4, family=settings.get("family", "sd1"))
    prior = config.prior
    config.dreambooth.instance_prompt, prior.class_prompt = "a photo of sks dog", "a photo of a dog"
    prior.prior_preservation = settings["prior_preservation"]
    prior.num_class_images, prior.class_sample_steps = 4, 2
    config.training.steps, config.training.gradient_checkpointing = settings["steps"], settings["gradient_checkpointing"]
    config.training.train_text_encoder = 0.0  # the UNet alone, as the report's figures were measured
    return {**settings, **dataclasses.asdict(timed_training(config))}


def run(steps: int = 20, families: Sequence[str] = ("sd1",)) -> list[dict[str, Any]]:
    return run_in_children(CHILD_COMMAND, CONFIGURATIONS, steps, families)


def child(arguments: str) -> None:
    child_main(arguments, measure)


def _on(value: bool) -> str:
    return "on" if value else "off"


def report(results: list[dict[str, Any]]) -> str:
    lines = [f"DreamBooth (full UNet) on the tiny models, 64x64 images, batch 1, {device_description()}",
             "| model | prior preservation | gradient checkpointing | steps/s | peak RSS MiB | peak CUDA MiB |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {family_label(r['family'])} | {_on(r['prior_preservation'])} | {_on(r['gradient_checkpointing'])} | "
                     f"{r['steps_per_second']:.2f} | {r['peak_rss_mib']:.0f} | {cuda_cell(r['peak_cuda_mib'])} |")
    lines += ratio_lines(results, ("prior_preservation", "gradient_checkpointing"),
                         lambda r: f"prior preservation {_on(r['prior_preservation'])}, gradient checkpointing "
                                   f"{_on(r['gradient_checkpointing'])}")
    return "\n".join(lines)
