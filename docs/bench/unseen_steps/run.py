"""Twice the steps on the unseen-combination tune concepts (issue 14): the broadened table's recipes reach
0.45-0.67 there against a ceiling of 0.93; do they stop short of learning it?

    OMP_NUM_THREADS=1 python docs/bench/unseen_steps/run.py RECIPE OUT_FOLDER

RECIPE is a `bench quality` recipe key; it runs at twice its steps on the kind's two tune concepts with
training seeds 0 and 1 and 32 samples per prompt, and writes OUT_FOLDER/quality.json and quality.md in the
quality bench's format (shards of several recipes join with `bench quality --merge`).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lib_sdcustom.bench.quality import run, write_report
from lib_sdcustom.bench.recipes import recipes_named
from lib_sdcustom.microworld.world import BENCH_CONCEPTS, CONCEPTS, ConceptKind, Role

CONCEPTS_TUNED = tuple(name for name in BENCH_CONCEPTS
                       if CONCEPTS[name].kind is ConceptKind.UNSEEN_COMBINATION and CONCEPTS[name].role is Role.TUNE)


def main(key: str, out: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = recipes_named([key])[0]
    longer = replace(recipe, key=f"{key}_x2", steps=2 * recipe.steps)
    with tempfile.TemporaryDirectory(prefix="sdcustom-unseen-") as workdir:
        result = run(out, Path(workdir), recipes=[longer], concepts=CONCEPTS_TUNED, samples=32, check_base=False)
    write_report(result, out)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
