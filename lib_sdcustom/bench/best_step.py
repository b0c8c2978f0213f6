"""`python -m lib_sdcustom.bench best-step`: does best-step selection's self-check (`training/step_selection.py`)
pick a step the judge also rates near the best? (issue 14)

Each run trains a `bench/quality.py` recipe on one micro-world concept with `select_best_step` on and an export
every `--save-every` steps; the last step is kept beside them when an earlier one wins, so every scored step
has a file. The shipped judge then samples every step's file (`--samples` per prompt, the quality bench's
sampler and seeds) and rates it with one combined score:

    judge score = subject fidelity - max(0, class-prompt subject share - the base model's)

(the share of 'a sks <class>' samples showing the concept, less the share of bare class-prompt samples
turned into the concept beyond what the base model draws). A run agrees when the judge score of the step the
self-check chose is within `TOLERANCE` of the judge's best step in that run.

The self-check's raw errors are stored per step, so the table also shows the agreement the score would reach
with other weights of its drift and leak terms; the shipped ones are `step_selection.DRIFT_WEIGHT` and
`LEAK_WEIGHT`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserFacingError
from ..files import write_text_atomically
from ..microworld.judge import Judge, load_judge
from ..microworld.model import shipped_checkpoint
from ..microworld.teach import prompts_for, sampler, subject_hits, trained_sampler
from ..microworld.world import CONCEPTS, Concept
from ..run.best_step import SCORES_FILE
from ..training.step_selection import DRIFT_WEIGHT, LEAK_WEIGHT, ProbeErrors, StepScore, best, combine
from .quality import prepared_run, sample_groups
from .recipes import Recipe, recipes_named

logger = logging.getLogger(__name__)

TOLERANCE = 0.05
#: Done when (issue 14): the chosen step is within `TOLERANCE` of the judge's best in this share of runs.
TARGET_SHARE = 0.8
#: The network recipes the README's defaults follow, the quality table's LoRA and LoCon rows (class images of the class
#: prompt and varied plain prompts, a cosine-decayed rate; a quarter of them for LoRA's class prompt).
METHODS = ("lora_class_quarter", "locon_regularized_cosine")
#: One 'tune' concept of each kind (`world.ConceptKind`).
CONCEPT_NAMES = ("outlined_yellow_heart", "red_circle", "yellow_style")
SEEDS = (0, 1)
#: Judge samples per prompt and step: at 32, even a perfect selector agreed in only about 85% of the runs
#: (`perfect_selector_agreement`), too close to the target to tell a good proxy from luck; at 64, in about 88%.
#: At 128 (95%) LoRA's runs agreed as often as at 64, so 64 stays and halves the judging (docs/bench/best_step/judge128).
SAMPLES = 64
#: Judge sample counts at which the report states a perfect selector's agreement, and the simulations behind it.
NOISE_SAMPLES = (64, 128, 256)
NOISE_SIMULATIONS = 2000
SAVE_EVERY = 100
#: (drift, leak) weights the table also tries on the stored errors of the self-check.
WEIGHTS = tuple((drift, leak) for drift in (0.0, 0.1, 0.25, 0.5, 1.0) for leak in (0.0, 0.1, 0.25, 0.5, 1.0))


def judge_score(subject: float, class_subject: float, base_class_subject: float) -> float:
    return subject - max(0.0, class_subject - base_class_subject)


def _judge(sample: Any, judge: Judge, concept: Concept, method: str, samples: int) -> tuple[float, float]:
    """(subject fidelity, class-prompt subject share) of one model."""
    prompts = prompts_for(concept, method)
    subject, class_images = sample_groups(sample, [[prompts.subject] * samples, [prompts.class_prompt] * samples])
    return (float(np.mean(subject_hits(judge, subject, concept))),
            float(np.mean(subject_hits(judge, class_images, concept))))


def step_files(target: Path, steps: Sequence[int], kept: int) -> dict[int, Path]:
    """Every scored step's file: the exports in the steps folder, the kept step as the result itself."""
    folder = target.parent / f"{target.stem}-steps"
    return {step: target if step == kept else folder / f"{target.stem}-step{step:08d}{target.suffix}" for step in steps}


def one_run(recipe: Recipe, concept: Concept, seed: int, workdir: Path, base: Path, judge: Judge, samples: int,
            save_every: int, base_class_subject: float) -> dict[str, Any]:
    """Train with selection on, then judge every scored step; the run's record."""
    from ..run.train import train

    config = prepared_run(recipe, concept, seed, workdir, base)
    config.training.save_every, config.training.select_best_step = save_every, True
    started = time.monotonic()
    result = train(config)
    seconds = time.monotonic() - started
    summary = json.loads((Path(config.output.run_dir) / SCORES_FILE).read_text(encoding="utf-8"))
    scores = [StepScore.from_dict(item) for item in summary["scores"]]
    files = step_files(result.outputs[0], [score.step for score in scores], summary["kept_step"])
    steps = []
    for score in scores:
        subject, class_subject = _judge(trained_sampler(config, files[score.step]), judge, concept, recipe.method, samples)
        steps.append({**score.to_dict(), "subject": subject, "class_subject": class_subject,
                      "judge": judge_score(subject, class_subject, base_class_subject)})
    logger.info("%s / %s / seed %d: kept step %d; judge per step %s (%.0fs training)", recipe.key, concept.name, seed,
                summary["kept_step"], ", ".join(f"{item['step']}: {item['judge']:.2f}" for item in steps), seconds)
    return {"method": recipe.key, "concept": concept.name, "seed": seed, "kept_step": summary["kept_step"],
            "reference": summary["reference"], "steps": steps, "base_class_subject": base_class_subject,
            "train_seconds": seconds}


def agrees(run: dict[str, Any], weights: Sequence[float], tolerance: float = TOLERANCE) -> tuple[bool, int]:
    """Whether the step the self-check picks with (drift, leak) `weights` scores within `tolerance` of the
    judge's best; and that step."""
    reference = ProbeErrors.from_dict(run["reference"])
    rescored = [combine(item["step"], ProbeErrors.from_dict(item["errors"]), reference, *weights)
                for item in run["steps"]]
    chosen = best(rescored).step
    judged = {item["step"]: item["judge"] for item in run["steps"]}
    return judged[chosen] >= max(judged.values()) - tolerance, chosen


def _count(runs: Sequence[dict[str, Any]], weights: Sequence[float], tolerance: float = TOLERANCE) -> int:
    return sum(agrees(run, weights, tolerance)[0] for run in runs)


def shortfalls(runs: Sequence[dict[str, Any]], weights: Sequence[float]) -> tuple[float, float, float, float]:
    """What the pick costs: the judge's best score less the chosen step's, as the mean and the largest over the
    runs, for the self-check with `weights` and for keeping the last step. Agreement counts a near miss and a
    collapse alike; this tells them apart."""
    chosen, last = [], []
    for run in runs:
        judged = {item["step"]: item["judge"] for item in run["steps"]}
        top = max(judged.values())
        chosen.append(top - judged[agrees(run, weights)[1]])
        last.append(top - run["steps"][-1]["judge"])
    return float(np.mean(chosen)), max(chosen), float(np.mean(last)), max(last)


def perfect_selector_agreement(runs: Sequence[dict[str, Any]], samples: int, simulations: int = NOISE_SIMULATIONS,
                               seed: int = 0) -> tuple[float, float]:
    """How a selector that always picks the truly best step would fare against a judge that measures every step
    from `samples` samples per prompt: the mean share of runs it agrees in, and the chance that it agrees in
    `TARGET_SHARE` of them. No selector can beat that on average. Each step's stored shares stand in for the
    truth, so the gaps between steps are overstated and the figures are optimistic."""
    generator = np.random.default_rng(seed)
    truths = [(np.array([item["subject"] for item in run["steps"]]),
               np.array([item["class_subject"] for item in run["steps"]]), run["base_class_subject"],
               int(np.argmax([item["judge"] for item in run["steps"]]))) for run in runs]
    shares = []
    for _ in range(simulations):
        agreed = 0
        for subject, class_subject, base, best_step in truths:
            judged = (generator.binomial(samples, subject) / samples
                      - np.maximum(0.0, generator.binomial(samples, class_subject) / samples - base))
            agreed += judged[best_step] >= judged.max() - TOLERANCE
        shares.append(agreed / len(truths))
    return float(np.mean(shares)), float(np.mean(np.array(shares) >= TARGET_SHARE - 1e-9))


def _noise_lines(runs: Sequence[dict[str, Any]], samples: int) -> list[str]:
    """How often even a perfect selector would agree at this and larger judge sample counts."""
    lines = [f"How noisy the judge is: a selector that always picked the truly best step (the stored shares taken "
             f"as the truth), scored against a judge that samples every step again ({NOISE_SIMULATIONS} simulations); "
             "the figures are optimistic, as the stored shares overstate the gaps between steps:", "",
             f"| judge samples per prompt | runs agreeing (mean) | chance of {TARGET_SHARE:.0%} of the runs agreeing |",
             "|---|---|---|"]
    for count in sorted({samples, *NOISE_SAMPLES}):
        mean, chance = perfect_selector_agreement(runs, count)
        lines.append(f"| {count}{' (this report)' if count == samples else ''} | {mean:.0%} | {chance:.0%} |")
    return lines + [""]


def _held_out_line(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    """The weights that agree most on the first seed's runs, counted on the other seeds' runs: what choosing
    the weights on some runs predicts for unseen ones."""
    fit = [run for run in runs if run["seed"] == seeds[0]]
    check = [run for run in runs if run["seed"] != seeds[0]]
    if not fit or not check:
        return []
    chosen = max(WEIGHTS, key=lambda weights: _count(fit, weights))
    return [f"Weights chosen on the seed-{seeds[0]} runs alone (drift {chosen[0]:g}, leak {chosen[1]:g}; "
            f"{_count(fit, chosen)} of {len(fit)} there) agree on {_count(check, chosen)} of {len(check)} runs of the "
            "other seeds.", ""]


def markdown(report: dict[str, Any]) -> str:
    """The table, scored with the current `DRIFT_WEIGHT` and `LEAK_WEIGHT` (the runs' own choices, recorded as
    `kept_step`, were made with `settings['weights']`)."""
    runs, settings = report["runs"], report["settings"]
    shipped = (DRIFT_WEIGHT, LEAK_WEIGHT)
    lines = ["# Best-step selection against the judge", "",
             f"Produced by `python -m lib_sdcustom.bench best-step` ({settings['threads']} CPU thread(s)): methods "
             f"{', '.join(settings['methods'])}; concepts {', '.join(settings['concepts'])}; training seeds "
             f"{', '.join(map(str, settings['seeds']))}; {settings['steps']} steps (0 = the recipe's), an export "
             f"every {settings['save_every']}; {settings['samples']} judge samples per prompt and step.", "",
             "Judge score = subject fidelity - max(0, class-prompt subject share - base model's). A run agrees "
             f"when the judge score of the chosen step is within {TOLERANCE} of the best judge score of any step.",
             "", "| method | concept | seed | judge score per step | judge best | chosen (judge) | agrees |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        judged = {item["step"]: item["judge"] for item in run["steps"]}
        top = max(judged, key=lambda step: judged[step])
        ok, chosen = agrees(run, shipped)
        per_step = ", ".join(f"{step}: {value:.2f}" for step, value in judged.items())
        lines.append(f"| {run['method']} | {run['concept']} | {run['seed']} | {per_step} | {top} ({judged[top]:.2f}) "
                     f"| {chosen} ({judged[chosen]:.2f}) | {'yes' if ok else 'no'} |")
    count = _count(runs, shipped)
    if list(settings["weights"]) != list(shipped):
        lines += ["", f"The runs kept their steps (`kept_step` in the JSON) with weights drift {settings['weights'][0]:g}, "
                  f"leak {settings['weights'][1]:g}; this table scores their stored errors with the current ones "
                  "(`--from-json`)."]
    chosen_mean, chosen_max, last_mean, last_max = shortfalls(runs, shipped)
    lines += ["", f"**Agreement with the shipped weights (drift {shipped[0]:g}, leak {shipped[1]:g}): {count} of "
              f"{len(runs)} runs ({count / len(runs):.0%}; target {TARGET_SHARE:.0%}).**", "",
              f"Judge score lost to the pick (the run's best less the kept step's): {chosen_mean:.3f} on average, at "
              f"most {chosen_max:.2f}, where keeping the last step loses {last_mean:.3f} on average, at most "
              f"{last_max:.2f}.", "",
              *_noise_lines(runs, settings["samples"]),
              *_held_out_line(runs, settings["seeds"]),
              "Other weights on the same stored errors, and always keeping the last step, for comparison (the last "
              "column with twice the tolerance; for scale, the judge's sampling error on a share near 0.2 from "
              f"{settings['samples']} samples is about {math.sqrt(0.16 / settings['samples']):.2f}):", "",
              f"| drift weight | leak weight | runs within {TOLERANCE} | within {2 * TOLERANCE:g} |", "|---|---|---|---|"]
    for weights in WEIGHTS:
        lines.append(f"| {weights[0]:g} | {weights[1]:g} | {_count(runs, weights)} of {len(runs)} | "
                     f"{_count(runs, weights, 2 * TOLERANCE)} |")
    last = [sum(run["steps"][-1]["judge"] >= max(item["judge"] for item in run["steps"]) - tolerance for run in runs)
            for tolerance in (TOLERANCE, 2 * TOLERANCE)]
    lines += [f"| (keep the last step) | | {last[0]} of {len(runs)} | {last[1]} |", ""]
    return "\n".join(lines) + "\n"


def run(workdir: Path, *, methods: Sequence[str], concepts: Sequence[str], seeds: Sequence[int], samples: int,
        steps: int, save_every: int) -> dict[str, Any]:
    import torch

    from ..models.loader import load_bundle

    base = shipped_checkpoint()
    judge = load_judge()
    base_sample = sampler(load_bundle(base))
    recipes = [replace(recipe, steps=steps or recipe.steps) for recipe in recipes_named(methods)]
    runs = []
    for name in concepts:
        concept = CONCEPTS[name]
        base_class_subject = _judge(base_sample, judge, concept, recipes[0].method, samples)[1]
        for recipe in recipes:
            for seed in seeds:
                runs.append(one_run(recipe, concept, seed, workdir, base, judge, samples, save_every, base_class_subject))
    settings = {"methods": list(methods), "concepts": list(concepts), "seeds": list(seeds), "samples": samples,
                "steps": steps, "save_every": save_every, "weights": [DRIFT_WEIGHT, LEAK_WEIGHT], "threads": torch.get_num_threads()}
    return {"settings": settings, "runs": runs}


def joined_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """One report from stored ones that split the runs by method or concept (one thread per shard uses two cores
    better than one run on both); every other setting must match."""
    reports = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    split = ("methods", "concepts")
    shared = {key: value for key, value in reports[0]["settings"].items() if key not in split}
    for path, report in zip(paths, reports):
        if {key: value for key, value in report["settings"].items() if key not in split} != shared:
            raise UserFacingError(f"{path} was made with other settings than {paths[0]}.",
                                  "Join only shards of one run split by --methods or --concepts.")
    joined = {key: list(dict.fromkeys(item for report in reports for item in report["settings"][key])) for key in split}
    return {"settings": {**reports[0]["settings"], **joined}, "runs": [run for report in reports for run in report["runs"]]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/bench/best_step"), help="folder for best_step.json/.md")
    parser.add_argument("--workdir", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="quality-bench recipe keys")
    parser.add_argument("--concepts", nargs="+", choices=sorted(CONCEPTS), default=list(CONCEPT_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="judge samples per prompt and step")
    parser.add_argument("--steps", type=int, default=0, help="override the recipes' step count (0 = the recipe's)")
    parser.add_argument("--save-every", type=int, default=SAVE_EVERY, help="export (and score) every N steps")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                        help="instead of running: the table of stored best_step.json files (several: shards split by "
                             "--methods or --concepts, joined), scored with the current weights")


def main(args: argparse.Namespace) -> int:
    """Run (or read --from-json), write best_step.json and best_step.md in --out, print the table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json:
        report = joined_reports(args.from_json)
    else:
        with tempfile.TemporaryDirectory(prefix="sdcustom-best-step-") as scratch:
            report = run(args.workdir or Path(scratch), methods=args.methods, concepts=args.concepts, seeds=args.seeds,
                         samples=args.samples, steps=args.steps, save_every=args.save_every)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out / "best_step.json", json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    write_text_atomically(args.out / "best_step.md", text)
    sys.stdout.write(text)
    return 0
