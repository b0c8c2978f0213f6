"""The speed/memory benchmarks' plumbing (`python -m lib_sdcustom.bench lora|dreambooth|speed|gpu-check`): the
model family is a dimension, each configuration runs in its own child process, and the report puts SDXL-tiny
beside SD1-tiny with ratios, or ours beside the diffusers + peft reference. Figures are printed, never
asserted."""

from __future__ import annotations

import subprocess
from dataclasses import asdict
import sys

import pytest

from lib_sdcustom.bench import dreambooth, lora
from lib_sdcustom.bench.reference import peft_available, target_layers
from lib_sdcustom.bench.runner import run_in_children
from lib_sdcustom.config import NetworkOptions
from lib_sdcustom.models.loader import load_bundle
from lib_sdcustom.networks.algorithms import ALGORITHMS
from lib_sdcustom.networks.lycoris_backend import attach_network


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


@pytest.mark.parametrize("network", ["lora", "locon"])
def test_the_reference_wraps_the_layers_our_network_wraps(tiny_checkpoint, network):
    bundle = load_bundle(tiny_checkpoint)
    layers = target_layers(bundle.unet, network)
    attached = attach_network(bundle.unet, bundle.text_encoder, ALGORITHMS[network], NetworkOptions(rank=4),
                              train_text_encoder=False)
    ours = sorted(module.lora_name for module in attached.unet_modules)
    attached.detach()
    assert ours == sorted("lora_unet_" + name.replace(".", "_") for name in layers)


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", *arguments], capture_output=True, text=True)


def test_speed_prints_ours_beside_the_reference(tmp_path):
    child = _bench("speed", "--size", "tiny", "--steps", "3", "--batches", "1", "--networks", "lora,locon,ia3,hypernetwork",
                   "--markdown", str(tmp_path / "speed.md"))
    assert child.returncode == 0, child.stderr[-3000:]
    [row] = [line for line in child.stdout.splitlines() if line.startswith("| locon | 1 |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[5]) > 0 and cells[-1].split(" / ")[0] != "0"
    assert cells[9] == cells[10] == "- / -", "GPU memory columns read '-' on a CPU"
    if not peft_available():
        assert "reference not run: the reference loop needs peft" in child.stdout
    else:
        assert float(cells[4]) > 0 and cells[-1].split(" / ")[0] == cells[-1].split(" / ")[1]
    for network in ("ia3", "hypernetwork"):  # no reference: compared with our LoRA
        [row] = [line for line in child.stdout.splitlines() if line.startswith(f"| {network} | 1 |")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3] == "-" and float(cells[2]) > 0 and float(cells[5]) > 0, row
    assert "reference not run: the reference loop trains LoRA and LoCon only" in child.stdout
    assert (tmp_path / "speed.md").read_text().strip() == child.stdout.strip()


def test_gpu_check_dry_run_goes_through_every_plan(tmp_path):
    if not peft_available():
        child = _bench("gpu-check", "--dry-run")
        assert child.returncode == 2 and "needs peft" in child.stderr and "pip download --no-deps" in child.stderr
        return
    child = _bench("gpu-check", "--dry-run", "--markdown", str(tmp_path / "gpu.md"))
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("| lora | 1 |") == 2 and "| lora | 4 |" in child.stdout
    assert "gradient checkpointing" in child.stdout
    assert child.stdout.count("loading alone") == 2


class FakeCounters:
    """torch.cuda's memory counters over a scripted allocation history, in GiB."""

    def __init__(self) -> None:
        self.allocated = self.peak = 0

    def run(self, gib: float, keep: float) -> None:  # a phase that peaks at `gib` and leaves `keep` allocated
        self.peak = max(self.peak, int(gib * 2**30))
        self.allocated = int(keep * 2**30)

    def max_memory_allocated(self) -> int:
        return self.peak

    def memory_allocated(self) -> int:
        return self.allocated

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated


def test_gpu_memory_is_told_apart_by_phase_and_the_report_names_each():
    """The VAE encoding before the steps and the preview after them peak higher than the steps: the table's
    whole-run figure is theirs, and the note shows the steps' own peak and the resident tensors."""
    from lib_sdcustom.bench.gpu_memory import PhaseRecorder
    from lib_sdcustom.bench.speed import Measured, report

    counters = FakeCounters()
    recorder = PhaseRecorder(counters)
    counters.run(9.0, keep=6.0)  # loading, encoding the latent cache, the first step
    recorder.step()
    for peak in (7.5, 7.75, 7.5):
        counters.run(peak, keep=6.5)
        recorder.step()
    counters.run(12.0, keep=6.5)  # the final preview
    recorder.finish()
    peaks = recorder.peaks
    assert (peaks.to_first_step, peaks.later_steps, peaks.resident_at_last_step, peaks.after_last_step,
            peaks.whole_run) == (9.0, 7.75, 6.5, 12.0, 12.0)
    no_gpu = PhaseRecorder(None)
    no_gpu.step()
    no_gpu.finish()
    assert no_gpu.peaks.whole_run is None

    ours = Measured(1.0, 20.0, 2.0, peaks.whole_run, 722, steady_cuda_gib=peaks.later_steps,
                    first_cuda_gib=peaks.to_first_step, after_cuda_gib=peaks.after_last_step,
                    resident_cuda_gib=peaks.resident_at_last_step)
    reference = Measured(1.0, 10.0, 2.0, 7.5, 722, steady_cuda_gib=7.5, first_cuda_gib=7.25, after_cuda_gib=6.5,
                         resident_cuda_gib=6.75)
    plan = {"size": "full", "family": "sdxl", "resolution": 1024, "rank": 16, "steps": 4, "gradient_checkpointing": True,
            "repeats": 1, "variants": []}
    text = report({"plan": plan, "device": "CUDA test", "clock": "wall-clock", "cpu_count": 2,
                   "load_average": [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)], "loads": [],
                   "rows": [{"network": "lora", "batch_size": 1, "ours": asdict(ours), "reference": asdict(reference)}]})
    assert "| 12.00 / 7.50 | 7.75 / 7.50 |" in text
    assert ("lora batch 1, GPU GiB ours / reference: peak to the end of the first step 9.00 / 7.25; peak in the "
            "steps after it 7.75 / 7.50, of which resident at the last step 6.50 / 6.75; peak after the last step "
            "12.00 / 6.50") in text
