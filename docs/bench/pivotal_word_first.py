"""Pivotal tuning: the new word alone for the first part of the run, then with the LoRA (`word_first`), against
both from the first step (`word_first = 0`). Trains the LoRA benchmark recipe (600 steps, lr 3e-3, text
encoder 6e-3, batch 4, rank 8) as `pivotal` on one micro-world concept per training seed and scores each file
with the quality benchmark's judge and prompts (SAMPLES samples per prompt group).

    OMP_NUM_THREADS=1 python docs/bench/pivotal_word_first.py OUT_DIR heart 0,1 0,0.33

prints one line per (seed, word_first): subject, blue-background prompt, both, the bare class prompt showing the
subject, unrelated-prompt fidelity (figures in lib_sdcustom/methods/pivotal.py's docstring).
"""

import shutil
import sys
import time
from pathlib import Path

from lib_sdcustom.bench.quality import SAMPLES, evaluate, run_config
from lib_sdcustom.bench.recipes import Recipe
from lib_sdcustom.microworld.judge import load_judge
from lib_sdcustom.microworld.model import shipped_checkpoint, text_encoder_folder_name
from lib_sdcustom.microworld.teach import prompts_for, trained_sampler
from lib_sdcustom.microworld.world import CONCEPTS
from lib_sdcustom.run.train import train

RECIPE = Recipe("pivotal", "pivotal", steps=600, lr=3e-3, text_encoder_lr=6e-3)


def main(out: Path, concept_name: str, seeds: list[int], shares: list[float]) -> None:
    concept, base, judge = CONCEPTS[concept_name], shipped_checkpoint(), load_judge()
    for seed in seeds:
        for share in shares:
            folder = out / f"word_first{share:g}" / f"seed{seed}"
            shutil.rmtree(folder, ignore_errors=True)
            config = run_config(RECIPE, concept, folder, base, out / "class", seed)
            config.textual_inversion.word_first = share
            text_folder = text_encoder_folder_name(base.stem)  # the base's YAML names it relative to itself
            shutil.copytree(base.parent / text_folder, Path(config.output.out) / text_folder)
            started = time.monotonic()
            result = train(config)
            seconds = time.monotonic() - started
            scores, _ = evaluate(trained_sampler(config, result.outputs[0]), judge, concept,
                                 prompts_for(concept, "pivotal"), SAMPLES, None, seconds)
            print(f"word_first {share:g} seed {seed}: subject {sum(scores.subject)}/{SAMPLES}, blue background "
                  f"{sum(scores.prompt)}/{SAMPLES}, both {sum(scores.prompt_and_subject)}/{SAMPLES}, class prompt shows "
                  f"subject {sum(scores.class_subject)}/{SAMPLES}, unrelated fidelity {sum(scores.unrelated_fidelity)}/"
                  f"{SAMPLES}, trained {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3].split(",")],
         [float(s) for s in sys.argv[4].split(",")])
