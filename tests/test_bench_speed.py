"""The speed/memory benchmarks' plumbing (`python -m lib_sdcustom.bench lora|dreambooth`): the model family is
a dimension, each configuration runs in its own child process, and the report puts SDXL-tiny beside SD1-tiny
with ratios. Figures are printed, never asserted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib_sdcustom.bench import dreambooth, lora
from lib_sdcustom.bench.runner import run_in_children


def _result(family: str, rate: float, rss: float, **settings) -> dict:
    return {"family": family, "steps": 2, "steps_per_second": rate, "peak_rss_mib": rss, "peak_cuda_mib": None, **settings}


def test_reports_put_each_family_beside_sd1_with_ratios():
    results = [_result("sd1", 4.0, 1000, batch_size=1, cache_latents=True),
               _result("sd1", 2.0, 1100, batch_size=1, cache_latents=False),
               _result("sdxl", 1.0, 1500, batch_size=1, cache_latents=True)]
    text = lora.report(results)
    assert "| SD1-tiny | 1 | on | 4.00 |" in text and "| SDXL-tiny | 1 | on | 1.00 |" in text
    assert "SDXL-tiny vs SD1-tiny (batch 1, latent cache on): 0.25x the steps/s, 1.50x the peak RSS" in text
    assert "SD1-tiny batch 1: with the latent cache 2.00x the steps/s" in text

    runs = [_result(family, rate, 800, prior_preservation=True, gradient_checkpointing=False)
            for family, rate in (("sd1", 3.0), ("sdxl", 1.5))]
    assert ("SDXL-tiny vs SD1-tiny (prior preservation on, gradient checkpointing off): 0.50x the steps/s"
            in dreambooth.report(runs))


def test_unknown_family_is_a_usage_error():
    child = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", "lora", "--families", "sd1,sd3"],
                           capture_output=True, text=True)
    assert child.returncode == 2 and "unknown model family: sd3" in child.stderr


@pytest.mark.parametrize("scenario, settings, family", [
    (lora, {"batch_size": 1, "cache_latents": True}, "sd1"),
    (lora, {"batch_size": 1, "cache_latents": True}, "sdxl"),
    (dreambooth, {"prior_preservation": True, "gradient_checkpointing": True}, "sdxl"),
])
def test_a_short_run_in_a_child_process_gives_figures(scenario, settings, family):
    [result] = run_in_children(scenario.CHILD_COMMAND, [settings], 3, [family])
    assert result["family"] == family and result["steps"] == 3 and settings.items() <= result.items()
    assert result["steps_per_second"] > 0 and result["peak_rss_mib"] > 0
    assert f"| {family.upper()}-tiny | " in scenario.report([result])
