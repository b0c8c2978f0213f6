"""Constant against cosine-decayed learning rate for the regularized LoRA and LoCon recipes (issue 14).

Reads the best-step reports of both (every export judged from 64 samples per prompt) on the concepts both
ran, and prints a Markdown table: the judge's score at the last step and at the best export, how far it moves
between exports, how far the two training seeds end apart, and how often the self-check and the last step
come within 0.05 of the best. Usage: python compare.py CONSTANT_JSON... -- COSINE_JSON...
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from lib_sdcustom.bench.best_step import DRIFT_WEIGHT, LEAK_WEIGHT, TOLERANCE, agrees, joined_reports, shortfalls


def figures(runs: Sequence[dict[str, Any]]) -> list[str]:
    def moves(start: int) -> float:
        return float(np.mean([abs(a["judge"] - b["judge"]) for run in runs
                              for a, b in zip(run["steps"][start:], run["steps"][start + 1:])]))

    finals: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        finals.setdefault((run["method"], run["concept"]), {})[run["seed"]] = run["steps"][-1]["subject"]
    gaps = [abs(seeds[0] - seeds[1]) for seeds in finals.values() if len(seeds) == 2]
    weights = (DRIFT_WEIGHT, LEAK_WEIGHT)
    last = sum(run["steps"][-1]["judge"] >= max(item["judge"] for item in run["steps"]) - TOLERANCE for run in runs)
    picked, _, last_lost, _ = shortfalls(runs, weights)
    return [f"{np.mean([run['steps'][-1]['judge'] for run in runs]):.2f}",
            f"{np.mean([run['steps'][-1]['subject'] for run in runs]):.2f}",
            f"{np.mean([max(item['judge'] for item in run['steps']) for run in runs]):.2f}",
            f"{moves(0):.2f}", f"{moves(len(runs[0]['steps']) - 2):.2f}", f"{np.mean(gaps):.2f} (at most {max(gaps):.2f})",
            f"{sum(agrees(run, weights)[0] for run in runs)} / {last} of {len(runs)}", f"{picked:.2f} / {last_lost:.2f}"]


def main(argv: Sequence[str]) -> None:
    split = list(argv).index("--")
    constant, cosine = joined_reports(argv[:split])["runs"], joined_reports(argv[split + 1:])["runs"]
    shared = {run["concept"] for run in cosine}
    constant = [run for run in constant if run["concept"] in shared]
    header = ["schedule", "judge score, last step", "subject fidelity, last step", "judge score, best export",
              "move between exports", "move, last two", "seeds apart (subject, last step)",
              "self-check / last step within 0.05", "score lost: self-check / last step"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, runs in (("constant", constant), ("cosine", cosine)):
        print(f"| {name} | " + " | ".join(figures(runs)) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
