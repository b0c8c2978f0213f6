"""The held-out experiment's figures (README.md here) from a best_step.json made with held_out_probe.patch applied.

    python docs/bench/best_step/held_out/analyse.py docs/bench/best_step/held_out/best_step.json

For each fidelity signal (the shipped one on the training pictures, their mirror images, 16 fresh pictures of
the concept): how its error ratio ranks the steps against the judge, where it is lowest, and how often the
self-check agrees with the judge when that signal replaces the fidelity term (shipped drift and leak weights,
the best of the bench's weight grid, and weights fitted on seed 0 counted on seed 1).
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

TOLERANCE = 0.05
GRID = (0.0, 0.1, 0.25, 0.5, 1.0)
SHIPPED = (0.5, 0.1)
SIGNALS = {"instance": "training pictures (shipped)", "mirror": "training pictures, mirrored",
           "heldout": "16 fresh pictures"}


def ratio(errors: list[float], reference: list[float]) -> float:
    return float(np.mean([error / start for error, start in zip(errors, reference)]))


def step_score(item: dict, reference: dict, signal: str, drift_weight: float, leak_weight: float) -> float:
    errors = item["errors"]
    drift = ratio(errors["drift"], reference["drift"]) - 1.0
    leak = 1.0 - ratio(errors["leak"], reference["leak"])
    fidelity = ratio(errors[signal], reference[signal])
    return (1.0 - fidelity) - drift_weight * max(drift, 0.0) - leak_weight * max(leak, 0.0)


def agrees(run: dict, signal: str, weights: tuple[float, float]) -> bool:
    chosen = max(run["steps"], key=lambda item: (step_score(item, run["reference"], signal, *weights), -item["step"]))
    return chosen["judge"] >= max(item["judge"] for item in run["steps"]) - TOLERANCE


def count(runs: list[dict], signal: str, weights: tuple[float, float]) -> int:
    return sum(agrees(run, signal, weights) for run in runs)


def rank_correlation(values: np.ndarray, judged: np.ndarray) -> float:
    """Spearman's rho of lower error against higher judge score (no ties in these data)."""
    return float(np.corrcoef(np.argsort(np.argsort(-values)), np.argsort(np.argsort(judged)))[0, 1])


def main(path: str) -> None:
    runs = json.load(open(path, encoding="utf-8"))["runs"]
    seed0 = [run for run in runs if run["seed"] == 0]
    others = [run for run in runs if run["seed"] != 0]
    print(f"{len(runs)} runs; the last step within {TOLERANCE} of the judge's best in "
          f"{sum(run['steps'][-1]['judge'] >= max(i['judge'] for i in run['steps']) - TOLERANCE for run in runs)}\n")
    print("| fidelity measured on | rank correlation with the judge (mean; runs above 0) | lowest at the first export "
          "| last step's error / start (mean, range) | agree, shipped weights | agree, best weights of the grid "
          "| fitted on seed 0: there / other seed |")
    print("|---|---|---|---|---|---|---|")
    for signal, label in SIGNALS.items():
        ratios = [np.array([ratio(item["errors"][signal], run["reference"][signal]) for item in run["steps"]]) for run in runs]
        rhos = np.array([rank_correlation(values, np.array([item["judge"] for item in run["steps"]]))
                         for values, run in zip(ratios, runs)])
        first = sum(int(np.argmin(values) == 0) for values in ratios)
        last = np.array([values[-1] for values in ratios])
        grid = max(itertools.product(GRID, GRID), key=lambda weights: count(runs, signal, weights))
        fitted = max(itertools.product(GRID, GRID), key=lambda weights: count(seed0, signal, weights))
        print(f"| {label} | {rhos.mean():+.2f} ({(rhos > 0).sum()} of {len(runs)}) | {first} of {len(runs)} "
              f"| {last.mean():.2f} ({last.min():.2f}-{last.max():.2f}) | {count(runs, signal, SHIPPED)} "
              f"| {count(runs, signal, grid)} (drift {grid[0]:g}, leak {grid[1]:g}) "
              f"| {count(seed0, signal, fitted)} of {len(seed0)} / {count(others, signal, fitted)} of {len(others)} |")


if __name__ == "__main__":
    main(sys.argv[1])
