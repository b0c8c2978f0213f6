"""Does the tab's way of saving (fp16, seed 42) cost the demo's LoCon quality against the benchmark's (fp32,
seed 0)? Trains the demo recipe once per seed, saves fp32, rounds a copy to fp16, and counts the judge's
red-heart hits among SAMPLES samples of 'a sks shape' from each file with the benchmark's sampler.

    OMP_NUM_THREADS=1 python docs/bench/locon_seeds_precision.py OUT_DIR 64 0,1,42

prints one JSON line per seed (figures in README.md, "Tab and benchmark quality").
"""

import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from lib_sdcustom.demo import DEMO_CONCEPT, demo_config
from lib_sdcustom.microworld.judge import load_judge
from lib_sdcustom.microworld.teach import prompts_for, subject_hits, trained_sampler
from lib_sdcustom.microworld.world import CONCEPTS
from lib_sdcustom.run.train import train

SAMPLE_SEED = 1000


def main(out: Path, samples: int, seeds: list) -> None:
    judge, concept = load_judge(), CONCEPTS[DEMO_CONCEPT]
    prompt = prompts_for(concept, "locon").subject
    for seed in seeds:
        config = demo_config(out / f"seed{seed}")
        config.training.seed, config.output.save_precision, config.output.name = seed, "fp32", f"locon_seed{seed}"
        started = time.time()
        fp32 = train(config).outputs[0]
        seconds = time.time() - started
        fp16 = fp32.with_name(f"{fp32.stem}_fp16.safetensors")
        save_file({key: value.half() for key, value in load_file(str(fp32)).items()}, str(fp16))
        row = {"seed": seed, "train_s": round(seconds, 1), "samples": samples}
        for label, path in (("fp32", fp32), ("fp16", fp16)):
            images = trained_sampler(config, path)([prompt] * samples, SAMPLE_SEED)
            row[label] = sum(subject_hits(judge, images, concept))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), [int(seed) for seed in sys.argv[3].split(",")])
