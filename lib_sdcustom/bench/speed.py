"""`python -m lib_sdcustom.bench speed`: this project's LoRA/LoCon training beside a plain diffusers + peft loop.

Each configuration runs twice, each time in a fresh child process: once through `train()` (the loop users
run, with its latent and text-encoder caches on and the text encoder frozen) and once through the reference
loop in `bench/reference.py`. Both read the same checkpoint, train the same layers at the same rank, batch
and resolution, in bf16 autocast with fp32 network weights on CUDA (fp32 throughout on a CPU). Figures:
steps/s and images/s (from the median time of the steps after the first; on a CPU, the process's CPU
time, which other work on a shared machine does not inflate), seconds from the child's start (before the model is
read) to the end of the first step, peak resident memory, peak GPU memory, and ours/reference. `--load`
adds the peak memory of loading the checkpoint alone, with the frozen weights in bf16 on the training
device, which is how `train()` loads it for a bf16 run.

Sizes: `tiny` (the tests' tiny models, seconds on a CPU) and `full` (SD1.5 or SDXL shapes from the stock
configs, random weights written once to `--workdir` by `full_size.write_random_checkpoint`). On a CPU the
full SD1.5 shape at 128 px is affordable and shows the per-layer overhead, which grows with the weights,
not the pixels. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files import write_text_atomically
from ..testing.sample_images import write_sample_images
from .gpu_memory import PhaseRecorder
from .runner import device_description

CHILD_COMMAND = "speed-one"
#: Network name -> (method, --dora). Only LoRA and LoCon have a diffusers + peft reference; the others (peft has
#: no hypernetwork either) are compared with our own LoRA run of the same batch ("ours / ours LoRA").
NETWORKS = {"lora": ("lora", False), "locon": ("locon", False), "dora": ("lora", True), "loha": ("loha", False),
            "lokr": ("lokr", False), "oft": ("oft", False), "boft": ("boft", False), "ia3": ("ia3", False),
            "glora": ("glora", False), "hypernetwork": ("hypernetwork", False)}
REFERENCE_NETWORKS = ("lora", "locon")
NO_REFERENCE = "the reference loop trains LoRA and LoCon only"
NATIVE_RESOLUTION = {"sd1": 512, "sdxl": 1024}
_UNET_MODULES = re.compile(r"(\d+) UNet modules")


@dataclass
class Measured:
    """One side of one configuration, as a child process measured it."""

    steps_per_second: float
    first_step_seconds: float
    peak_rss_gib: float
    peak_cuda_gib: float | None
    layers: int
    # GPU memory by phase (`bench/gpu_memory.py`): the steps after the first alone, without the one-off peaks
    # around them (loading and the VAE encoding the latent cache before; ours' final preview after).
    steady_cuda_gib: float | None = None
    first_cuda_gib: float | None = None
    after_cuda_gib: float | None = None
    resident_cuda_gib: float | None = None
    skipped: str = ""  # why this side did not run (a missing package, no reference for the network), else empty


def _peaks() -> tuple[float, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return rss, cuda


def step_clock() -> Callable[[], float]:
    """What a step's time is read from. On a CPU shared with other work, wall-clock time counts the
    neighbours too; the process's own CPU time does not (with one thread it equals the wall-clock time of
    an idle machine; with more it is their sum, the same for both sides). A GPU step is wall-clock."""
    return time.perf_counter if torch.cuda.is_available() else time.process_time


def _timed(run: Callable[[Callable[[], None]], int]) -> Measured:
    """Run `run(on_step)`. The rate is 1 / the median time of the steps after the first (warm-up, caches,
    compilation): on a shared machine the median keeps a neighbour's burst out of the figure. That time is
    wall-clock on CUDA and the process's CPU time on a CPU (`step_clock`)."""
    started = time.perf_counter()
    stamps: list[tuple[float, float]] = []
    clock = step_clock()
    gpu = PhaseRecorder(torch.cuda if torch.cuda.is_available() else None)

    def on_step() -> None:
        stamps.append((time.perf_counter(), clock()))
        gpu.step()

    layers = run(on_step)
    gpu.finish()  # ours renders its final preview after the last step
    durations = [later[1] - earlier[1] for earlier, later in zip(stamps, stamps[1:])]
    rate = 1.0 / statistics.median(durations) if durations else float("nan")
    rss, _ = _peaks()
    peaks = gpu.peaks
    return Measured(rate, stamps[0][0] - started, rss, peaks.whole_run, layers, steady_cuda_gib=peaks.later_steps,
                    first_cuda_gib=peaks.to_first_step, after_cuda_gib=peaks.after_last_step,
                    resident_cuda_gib=peaks.resident_at_last_step)


def _ours(settings: dict[str, Any], on_step: Callable[[], None]) -> int:
    """`train()` on the configuration; returns the number of UNet layers its network wraps."""
    with tempfile.TemporaryDirectory(prefix="sdcustom-speed-") as folder:
        return _train_ours(settings, on_step, Path(folder))


def _train_ours(settings: dict[str, Any], on_step: Callable[[], None], workdir: Path) -> int:
    from ..config import RunConfig
    from ..events import RunStarted, StepDone
    from ..run.train import train

    method, dora = NETWORKS[settings["network"]]
    config = RunConfig(method=method)
    config.network.dora = dora
    config.model.base = settings["base"]
    config.data.data = settings["images"]
    resolution = settings["resolution"]
    config.data.resolution, config.data.buckets = resolution, False
    config.data.min_bucket, config.data.max_bucket = min(resolution, config.data.min_bucket), max(resolution, config.data.max_bucket)
    config.output.name, config.output.out, config.output.run_dir = "speed", str(workdir / "out"), str(workdir / "run")
    config.network.rank, config.network.alpha = settings["rank"], float(settings["rank"])
    config.optimizer.lr = 1e-4
    training = config.training
    training.steps, training.batch_size = settings["steps"], settings["batch_size"]
    training.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    training.train_text_encoder, training.cache_text_encoder_outputs = 0.0, True
    training.gradient_checkpointing = bool(settings.get("gradient_checkpointing"))
    training.compile_unet = bool(settings.get("compile"))
    training.save_state_every, training.sample_steps = 0, 1
    layers: list[int] = []

    def listen(event: Any) -> None:
        if isinstance(event, StepDone):
            on_step()
        elif isinstance(event, RunStarted):
            layers.extend(int(n) for n in _UNET_MODULES.findall(event.description))

    train(config, callbacks=[listen])
    return layers[0] if layers else 0


def measure(settings: dict[str, Any]) -> Measured:
    """One side of one configuration, in this process (a child of `run`)."""
    if torch.cuda.is_available():  # both sides alike: TF32 for the fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if settings["side"] == "ours":
        return _timed(lambda on_step: _ours(settings, on_step))
    from .reference import PEFT_MISSING, peft_available, run_reference

    if not peft_available():
        return Measured(float("nan"), float("nan"), 0.0, None, 0, skipped=PEFT_MISSING)
    return _timed(lambda on_step: run_reference(settings, Path(settings["base"]), on_step))


def measure_load(settings: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of loading the checkpoint alone, frozen weights in bf16 on the training device."""
    from ..models.loader import load_bundle

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    bundle = load_bundle(settings["base"], dtype=torch.bfloat16, device=device)
    seconds = time.perf_counter() - started
    rss, cuda = _peaks()
    file_gib = Path(settings["base"]).stat().st_size / 2**30
    return {"family": bundle.family.value, "file_gib": file_gib, "seconds": seconds, "peak_rss_gib": rss,
            "peak_cuda_gib": cuda, "device": device}


def child(arguments: str) -> None:
    settings = json.loads(arguments)
    result = measure_load(settings) if settings["side"] == "load" else asdict(measure(settings))
    sys.stdout.write(json.dumps(result) + "\n")


def _in_child(settings: dict[str, Any]) -> dict[str, Any]:
    child_process = subprocess.run([sys.executable, "-m", "lib_sdcustom.bench", CHILD_COMMAND, json.dumps(settings)],
                                   capture_output=True, text=True)
    if child_process.returncode != 0:
        raise RuntimeError(f"speed benchmark child {settings} failed:\n{child_process.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(child_process.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class Plan:
    size: str  # "tiny" or "full"
    family: str
    resolution: int
    batches: Sequence[int]
    networks: Sequence[str]
    steps: int
    rank: int = 16
    gradient_checkpointing: bool = False
    load: bool = False
    variants: Sequence[str] = ()  # extra runs of ours: names in VARIANTS
    repeats: int = 1  # pairs of runs per configuration, ours and the reference alternating; the fastest of each


VARIANTS = {"compile": {"compile": True}}  # extra runs of ours with an opt-in option, to measure it


def checkpoint_for(plan: Plan, workdir: Path) -> Path:
    """The model both sides read: a tiny checkpoint, or a full-size random one (written once, then reused)."""
    from ..testing.tiny import write_tiny_sd1
    from ..testing.tiny_families import write_tiny_sdxl
    from .full_size import write_random_checkpoint

    if plan.size == "tiny":
        writer = write_tiny_sd1 if plan.family == "sd1" else write_tiny_sdxl
        return writer(workdir / f"tiny_{plan.family}")
    path = workdir / f"full_{plan.family}_random_fp16.safetensors"
    return path if path.is_file() else write_random_checkpoint(plan.family, path)


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most steps/s: on a shared machine the others were slowed by a neighbour."""
    return max(runs, key=lambda item: item["steps_per_second"] if item["steps_per_second"] == item["steps_per_second"]
               else -1.0)


def _reference_in_child(settings: dict[str, Any]) -> dict[str, Any]:
    if settings["network"] not in REFERENCE_NETWORKS:  # no child to start
        return asdict(Measured(float("nan"), float("nan"), 0.0, None, 0, skipped=NO_REFERENCE))
    return _in_child({**settings, "side": "reference"})


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Every configuration of `plan`, ours and the reference alternating, each in a child process."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = checkpoint_for(plan, workdir)
    images = write_sample_images(workdir / f"images_{plan.resolution}", count=8, size=plan.resolution)
    load_before = os.getloadavg()
    rows = []
    for network in plan.networks:
        for batch in plan.batches:
            settings = {"base": str(base), "images": str(images), "network": network, "batch_size": batch,
                        "resolution": plan.resolution, "steps": plan.steps, "rank": plan.rank,
                        "gradient_checkpointing": plan.gradient_checkpointing}
            pairs = [(_in_child({**settings, "side": "ours"}), _reference_in_child(settings)) for _ in range(plan.repeats)]
            row = {"network": network, "batch_size": batch,
                   "ours": _fastest([ours for ours, _ in pairs]), "reference": _fastest([ref for _, ref in pairs])}
            for name in plan.variants:
                row[name] = _in_child({**settings, **VARIANTS[name], "side": "ours"})
            rows.append(row)
    loads = [_in_child({"base": str(base), "side": "load"})] if plan.load else []
    clock = "wall-clock step times" if torch.cuda.is_available() else "step times in process CPU time"
    return {"plan": asdict(plan), "device": device_description(), "clock": clock, "cpu_count": os.cpu_count(),
            "load_average": [load_before, os.getloadavg()], "rows": rows, "loads": loads}


# ----------------------------------------------------------------------------------------------- report

def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _model_label(plan: dict[str, Any]) -> str:
    names = {"sd1": "SD1.5", "sdxl": "SDXL"}
    return f"{names[plan['family']]} {'full size, random weights' if plan['size'] == 'full' else 'tiny'}"


def _gpu_phases(row: dict[str, Any]) -> str:
    """Where each side's GPU memory peaked: which phase sets the table's whole-run figure."""
    ours, ref = row["ours"], row["reference"]

    def pair(key: str) -> str:
        return f"{_number(ours[key])} / {_number(ref[key])}"

    return (f"{row['network']} batch {row['batch_size']}, GPU GiB ours / reference: peak to the end of the first "
            f"step {pair('first_cuda_gib')}; peak in the steps after it {pair('steady_cuda_gib')}, of which "
            f"resident at the last step {pair('resident_cuda_gib')}; peak after the last step {pair('after_cuda_gib')}")


def report(result: dict[str, Any]) -> str:
    plan = result["plan"]
    (before, *_), (after, *_) = result["load_average"]
    lines = [f"{_model_label(plan)}, {plan['resolution']} px, rank {plan['rank']}, {plan['steps']} steps"
             f"{', gradient checkpointing' if plan['gradient_checkpointing'] else ''}, best of {plan['repeats']}; "
             f"{result['device']}, {result['clock']}; "
             f"load average {before:.1f} before, {after:.1f} after ({result['cpu_count']} CPUs)", "",
             "| network | batch | ours steps/s | reference steps/s | ours/reference | ours / ours LoRA | ours images/s | "
             "first step s (ours / ref) | peak RSS GiB (ours / ref) | peak GPU GiB (ours / ref) | "
             "GPU GiB in steps after the first (ours / ref) | layers (ours / ref) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    lora_rates = {row["batch_size"]: row["ours"]["steps_per_second"] for row in result["rows"] if row["network"] == "lora"}
    for row in result["rows"]:
        ours, ref = row["ours"], row["reference"]
        ratio = ours["steps_per_second"] / ref["steps_per_second"] if not ref["skipped"] else float("nan")
        to_lora = ours["steps_per_second"] / lora_rates.get(row["batch_size"], float("nan"))
        lines.append(
            f"| {row['network']} | {row['batch_size']} | {_number(ours['steps_per_second'])} | "
            f"{_number(ref['steps_per_second'])} | {_number(ratio)} | {_number(to_lora)} | "
            f"{_number(ours['steps_per_second'] * row['batch_size'])} | "
            f"{_number(ours['first_step_seconds'], 1)} / {_number(ref['first_step_seconds'], 1)} | "
            f"{_number(ours['peak_rss_gib'])} / {_number(ref['peak_rss_gib'] or None)} | "
            f"{_number(ours['peak_cuda_gib'])} / {_number(ref['peak_cuda_gib'])} | "
            f"{_number(ours['steady_cuda_gib'])} / {_number(ref['steady_cuda_gib'])} | {ours['layers']} / {ref['layers']} |")
        if ref["skipped"]:
            notes.append(f"reference not run: {ref['skipped']}")
        if ours["first_cuda_gib"] is not None:
            notes.append(_gpu_phases(row))
        for name in plan["variants"]:
            variant = row[name]
            notes.append(f"{row['network']} batch {row['batch_size']}, ours with {name}: "
                         f"{_number(variant['steps_per_second'])} steps/s "
                         f"({_number(variant['steps_per_second'] / ours['steps_per_second'])}x ours default), "
                         f"first step {_number(variant['first_step_seconds'], 1)} s, "
                         f"peak GPU {_number(variant['peak_cuda_gib'])} GiB")
    for load in result["loads"]:
        notes.append(f"loading alone ({load['family']}, {load['file_gib']:.2f} GiB fp16 file, bf16 weights on "
                     f"{load['device']}): {load['seconds']:.1f} s, peak RSS {load['peak_rss_gib']:.2f} GiB"
                     + (f", peak GPU {load['peak_cuda_gib']:.2f} GiB" if load["peak_cuda_gib"] is not None else ""))
    return "\n".join(lines + ([""] + [f"- {note}" for note in dict.fromkeys(notes)] if notes else []))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--family", choices=tuple(NATIVE_RESOLUTION), default="sd1")
    parser.add_argument("--resolution", type=int, default=0, help="Pixels (default: 64 tiny, the family's own full).")
    parser.add_argument("--batches", default="1,4", help="Comma-separated batch sizes (default 1,4).")
    parser.add_argument("--networks", default="lora,locon", help=f"Comma-separated: {', '.join(NETWORKS)} "
                                                                   "(default lora,locon; dora is LoRA with --dora).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each side per configuration, alternating; "
                                                                "the fastest counts (for shared machines).")
    parser.add_argument("--load", action="store_true", help="Also measure loading the checkpoint alone.")
    parser.add_argument("--variants", default="", help=f"Extra runs of ours: {', '.join(VARIANTS)} (comma-separated).")
    parser.add_argument("--workdir", default="", help="Where the full-size checkpoint is written and reused "
                                                       "(default: a temporary folder).")
    parser.add_argument("--markdown", default="", help="Also write the report to this file.")


def plan_from(args: argparse.Namespace) -> Plan:
    networks = [name for name in args.networks.split(",") if name]
    variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in networks if name not in NETWORKS] + [name for name in variants if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown network or variant: {', '.join(unknown)}")
    resolution = args.resolution or (64 if args.size == "tiny" else NATIVE_RESOLUTION[args.family])
    return Plan(size=args.size, family=args.family, resolution=resolution,
                batches=[int(batch) for batch in args.batches.split(",")], networks=networks, steps=args.steps,
                rank=args.rank, gradient_checkpointing=args.gradient_checkpointing, load=args.load, variants=variants,
                repeats=max(1, args.repeats))


def main(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    if args.workdir:
        result = run(plan, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as folder:
            result = run(plan, Path(folder))
    text = report(result)
    sys.stdout.write(text + "\n")
    if args.markdown:
        write_text_atomically(Path(args.markdown), text + "\n")
    return 0
