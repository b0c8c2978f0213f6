"""Would a self-check that samples the model pick the judge's best step? (issue 14; probe, not shipped)

Reads the pictures the patched `bench best-step` stored per run and step (PROXY_SAMPLES of the subject prompt,
then as many of the bare class prompt, drawn with noise seeds the judge does not use) and the judge's scores
(best_step.json, or the shard logs while the runs are going), and scores every step as the judge does, with the
judge replaced by a recognizer built from what a real run has: the instance pictures and base-model samples of
the class prompt. A sample counts as the subject when it is nearer to an instance picture than to every class
reference (1-NN) in a feature space of the base model's own:

- hist: a 4x4x4 colour histogram of the pixels (no model);
- unet: the base UNet's middle block, averaged over positions, at a fixed noise level, with an empty prompt;
- judge: the micro world's judge itself on these samples: what a perfect recognizer with this many samples,
  independent of the judge's own, would agree on (the ceiling for any recognizer).

The two feature spaces also give a distance score (`pick`): how much nearer the samples are to the instance
pictures than the base's class samples are.

usage (from the repository root, PYTHONPATH=.): python docs/bench/best_step/samples/analyse.py WORKDIR [WORKDIR ...] --judge best_step.json|shard.log [...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from lib_sdcustom.training import objectives

TOLERANCE = 0.05
REFERENCES = 16  # base class samples used as the class references; the rest measure the base's own share
UNET_TIMESTEP = 250


def judge_scores(paths: list[Path]) -> dict[tuple[str, str, int], dict[int, float]]:
    found: dict[tuple[str, str, int], dict[int, float]] = {}
    line = re.compile(r"^(\S+) / (\S+) / seed (\d+): kept step \d+; judge per step (.*) \(")
    for path in paths:
        if path.suffix == ".json":
            for run in json.loads(path.read_text())["runs"]:
                found[(run["method"], run["concept"], run["seed"])] = {s["step"]: s["judge"] for s in run["steps"]}
            continue
        for text in path.read_text().splitlines():
            match = line.match(text)
            if match:
                steps = dict(part.split(": ") for part in match.group(4).split(", "))
                found[(match.group(1), match.group(2), int(match.group(3)))] = {int(k): float(v) for k, v in steps.items()}
    return found


def hist_features(images: np.ndarray) -> np.ndarray:
    bins = (images // 64).astype(np.int64)  # 4 levels per channel
    index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    counts = np.stack([np.bincount(row.ravel(), minlength=64) for row in index]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


class UnetFeatures:
    def __init__(self) -> None:
        from lib_sdcustom.methods.text_conditioning import encode_tokens, tokenize
        from lib_sdcustom.microworld.model import shipped_checkpoint
        from lib_sdcustom.models.loader import load_bundle

        self.bundle = load_bundle(shipped_checkpoint())
        with torch.no_grad():
            self.context = encode_tokens(self.bundle.text_encoder, tokenize(self.bundle.tokenizer, [""]))
        self.captured: list[torch.Tensor] = []
        self.bundle.unet.mid_block.register_forward_hook(lambda module, args, out: self.captured.append(out))
        self.alphas = self.bundle.noise_scheduler.alphas_cumprod

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        vae, unet = self.bundle.vae, self.bundle.unet
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
        timesteps = torch.full((len(images),), UNET_TIMESTEP)
        noisy = objectives.add_noise(latents, noise, timesteps, self.alphas)
        self.captured.clear()
        unet(noisy, timesteps, encoder_hidden_states=self.context.expand(len(images), -1, -1))
        pooled = self.captured[0].mean(dim=(2, 3))
        return torch.nn.functional.normalize(pooled, dim=1).numpy()


def distances(samples: np.ndarray, instances: np.ndarray, metric: str) -> np.ndarray:
    """Each sample's distance to its nearest picture of `instances` (L1, or cosine on unit vectors)."""
    if metric == "l1":
        return np.abs(samples[:, None] - instances[None]).sum(-1).min(1)
    return 1 - (samples @ instances.T).max(1)


def subject_share(samples: np.ndarray, instances: np.ndarray, references: np.ndarray, metric: str) -> float:
    """Share of samples nearer an instance picture than every class reference."""
    return float(np.mean(distances(samples, instances, metric) < distances(samples, references, metric)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--judge", nargs="+", type=Path, required=True)
    parser.add_argument("--features", nargs="+", default=["hist", "unet", "judge"])
    parser.add_argument("--out", type=Path, help="JSON of every run's per-step shares")
    args = parser.parse_args()
    from PIL import Image

    from lib_sdcustom.microworld.judge import load_judge
    from lib_sdcustom.microworld.teach import instance_images, subject_hits
    from lib_sdcustom.microworld.world import CONCEPTS

    judge = load_judge()

    judged = judge_scores(args.judge)
    extractors = {"hist": (hist_features, "l1")}
    if "unet" in args.features:
        extractors["unet"] = (UnetFeatures(), "cos")
    records = []
    for workdir in args.workdirs:
        for folder in sorted((workdir / "proxy").glob("*-seed*")):
            method, concept, seed = re.match(r"(.+)-([a-z_]+)-seed(\d+)$", folder.name).groups()
            key = (method, concept, int(seed))
            if key not in judged:
                continue
            base = np.load(workdir / "proxy" / f"base-{concept}.npy")
            half = base.shape[0] // 2
            instances = np.stack([np.asarray(image.convert("RGB")) for image in instance_images(CONCEPTS[concept])])
            record = {"method": method, "concept": concept, "seed": int(seed), "judge": judged[key], "shares": {}}
            for name in args.features:
                if name == "judge":
                    def share(pictures: np.ndarray) -> tuple[float, float]:
                        hits = subject_hits(judge, [Image.fromarray(p) for p in pictures], CONCEPTS[concept])
                        return float(np.mean(hits)), 0.0
                else:
                    extract, metric = extractors[name]
                    inst, refs = extract(instances), extract(base[half:half + REFERENCES])

                    def share(pictures: np.ndarray) -> tuple[float, float]:
                        features = extract(pictures)
                        return (subject_share(features, inst, refs, metric),
                                float(distances(features, inst, metric).mean()))
                base_class = share(base[half + REFERENCES:])
                per_step = {}
                for path in sorted(folder.glob("step*.npy")):
                    pictures = np.load(path)
                    n = pictures.shape[0] // 2
                    (subject, subject_distance), (klass, class_distance) = share(pictures[:n]), share(pictures[n:])
                    per_step[int(path.stem[4:])] = (subject, klass, subject_distance, class_distance)
                record["shares"][name] = {"base_class": base_class[0], "base_distance": base_class[1],
                                          "steps": per_step}
            records.append(record)
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    report(records, args.features)


def pick(record: dict, name: str, margin: float, continuous: bool = False) -> int:
    """The step with the highest score (the earlier on a tie), unless it beats the last step by no more than
    `margin`. Share: the judge's formula with the recognizer's shares. Continuous: how much nearer the subject
    prompt's samples are to the instance pictures than the base's class samples are, less how much nearer the
    class prompt's samples have come."""
    shares = record["shares"][name]
    if continuous:
        base = shares["base_distance"]
        scores = {step: (1 - values[2] / base) - max(0.0, 1 - values[3] / base) for step, values in shares["steps"].items()}
    else:
        scores = {step: values[0] - max(0.0, values[1] - shares["base_class"]) for step, values in shares["steps"].items()}
    last = max(scores)
    top = max(scores, key=lambda step: (scores[step], -step))
    return top if scores[top] > scores[last] + margin else last


def report(records: list[dict], features: list[str]) -> None:
    def agree(record: dict, step: int) -> bool:
        judge = {int(k): v for k, v in record["judge"].items()}
        return judge[step] >= max(judge.values()) - TOLERANCE

    print(f"{len(records)} runs")
    last = sum(agree(r, max(int(k) for k in r["judge"])) for r in records)
    print(f"keep the last step: {last}")
    for name in features:
        for continuous in ((False, True) if name != "judge" else (False,)):
            for margin in (0.0, 0.05, 0.1, 0.2):
                by_seed = {seed: sum(agree(r, pick(r, name, margin, continuous)) for r in records if r["seed"] == seed)
                           for seed in sorted({r["seed"] for r in records})}
                total = sum(by_seed.values())
                print(f"{name}{' distance' if continuous else ' share'} margin {margin:g}: {total} of {len(records)} "
                      f"(per seed {by_seed})")
    for r in records:
        judge = {int(k): v for k, v in r["judge"].items()}
        cells = []
        for name in features:
            steps = r["shares"][name]["steps"]
            cells.append(f"{name} " + " ".join(f"{steps[s][0]:.2f}/{steps[s][1]:.2f}" for s in sorted(steps)))
            if name != "judge":
                cells.append(f"{name}-d " + " ".join(f"{steps[s][2]:.3f}" for s in sorted(steps)))
        print(f"{r['method'][:5]} {r['concept'][:14]:14} s{r['seed']} judge " + " ".join(f"{judge[s]:.2f}" for s in sorted(judge))
              + " | " + " | ".join(cells))


if __name__ == "__main__":
    main()
