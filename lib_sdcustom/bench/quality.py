"""`python -m lib_sdcustom.bench quality`: does each method teach the micro-world model a held-out concept,
and what does that cost the rest of the model?

For every method and held-out concept (`world.CONCEPTS`: a heart, never seen; a yellow square with a black
outline, never seen outlined; an orange star, a color/shape pair never seen together) one run trains on
five instance pictures through the same `train()` users run, with fixed seeds, and the result is loaded
back from the exported file the way a consumer would (network file attached, embedding hooked into the
text encoder, checkpoint loaded). The shipped judge then scores fixed-seed samples:

- subject fidelity: share of 'a sks <class>' samples the judge calls the concept (every target attribute);
- prompt fidelity: share of 'a sks <class> on a blue background' samples on a blue background (and, in a
  second column, also showing the concept);
- prior preservation: samples of the bare class prompt ('a shape', 'a square', 'a star') with the same
  seeds as the base model's: the share showing the subject's attributes (base -> trained), and the
  total-variation distance between the judge's attribute distributions of base and trained samples
  (mean over shape, color, background, outline; 0 = the class prompt is unchanged);
- diversity: mean pairwise RMS pixel distance between the subject samples (the instance pictures' own
  value is reported beside it);
- wall time of the training call.

Textual Inversion learns one made-up word standing for the whole concept ('a skstoken'), since it cannot
bind an existing word; everything else uses the DreamBooth-style identifier 'sks' plus the class word.
Captions follow the world's own style: 'a sks shape on a gray background'.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import RunConfig
from ..errors import UserFacingError
from ..files import write_atomically, write_text_atomically
from ..microworld.judge import Judge, load_judge
from ..microworld.model import shipped_checkpoint, text_encoder_folder_name
from ..microworld.quality import GUIDANCE, SAMPLE_STEPS
from ..microworld.teach import (INSTANCE_IMAGES, TI_TRIGGER, Prompts, Sampler, base_run_config, instance_images,
                                prompts_for, sampler, subject_hits, trained_sampler, write_instances)
from ..methods.registry import method_spec
from ..microworld.world import CONCEPTS, IMAGE_SIZE, Concept

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "background", "outline")
TRAIN_SEED = 0
SUBJECT_SEED, PROMPT_SEED, CLASS_SEED = 1000, 2000, 3000


@dataclass(frozen=True)
class Recipe:
    """One row of the table: a method with settings that learn on the micro model in under a minute."""

    key: str
    method: str
    steps: int
    lr: float
    text_encoder_lr: float = 0.0  # 0 = lr
    train_text_encoder: float = -1.0  # share of the run; -1 = the method's default
    batch_size: int = 4
    prior_preservation: bool = False
    rank: int = 8
    min_snr_gamma: float = 5.0  # the pretraining's weighting (docs/bench/tuning.md)


# Tuned on the bundled model with the heart (docs/bench/tuning.md): networks bind the made-up 'sks' through
# the text encoder's LoRA, which needs a higher rate than the UNet's; DreamBooth trains the text encoder too.
_NETWORK = {"steps": 600, "lr": 3e-3, "text_encoder_lr": 6e-3}
RECIPES: Tuple[Recipe, ...] = (
    Recipe("textual_inversion", "textual_inversion", steps=400, lr=5e-2),
    Recipe("lora", "lora", **_NETWORK),
    Recipe("locon", "locon", **_NETWORK),
    Recipe("loha", "loha", **_NETWORK),
    Recipe("lokr", "lokr", **_NETWORK),
    Recipe("dreambooth", "dreambooth", steps=300, lr=2e-4, train_text_encoder=1.0, prior_preservation=True),
    Recipe("dreambooth_no_prior", "dreambooth", steps=300, lr=2e-4, train_text_encoder=1.0),
    Recipe("dreambooth_lora", "dreambooth_lora", prior_preservation=True, **_NETWORK),
)
CLASS_IMAGES = 40


def run_config(recipe: Recipe, concept: Concept, folder: Path, base: Path, class_folder: Path) -> RunConfig:
    """The recipe's run on five pictures of `concept`, everything under `folder`."""
    prompts = prompts_for(concept, recipe.method)
    name = f"{recipe.key}_{concept.name}" if method_spec(recipe.method).uses_token else TI_TRIGGER
    config = base_run_config(recipe.method, base, write_instances(folder / "images", concept, prompts), name=name,
                             out=folder / "out", run_dir=folder / "run")
    config.output.save_precision = "fp32"
    config.optimizer.lr, config.optimizer.text_encoder_lr = recipe.lr, recipe.text_encoder_lr
    config.network.rank, config.network.alpha = recipe.rank, float(recipe.rank)
    config.training.steps, config.training.batch_size, config.training.seed = recipe.steps, recipe.batch_size, TRAIN_SEED
    config.training.train_text_encoder, config.training.min_snr_gamma = recipe.train_text_encoder, recipe.min_snr_gamma
    config.textual_inversion.vectors, config.textual_inversion.init_text = 2, concept.class_noun
    config.textual_inversion.template = "captions"  # the caption files, which hold the trigger word
    db = config.dreambooth
    db.instance_prompt, db.class_prompt = "[filewords]", prompts.class_prompt
    db.prior_preservation, db.num_class_images = recipe.prior_preservation, CLASS_IMAGES
    db.class_sample_steps, db.class_guidance, db.class_data = SAMPLE_STEPS, GUIDANCE, str(class_folder)
    return config


# ----------------------------------------------------------------------------------------------- scores

def attribute_distance(judge: Judge, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> float:
    """Mean over attributes of the total-variation distance between the judged label distributions."""
    first, second = judge.predict(before), judge.predict(after)
    distances = []
    for name in ATTRIBUTES:
        labels = set(first[name]) | set(second[name])
        distances.append(0.5 * sum(abs(first[name].count(label) / len(before) - second[name].count(label) / len(after))
                                   for label in labels))
    return float(np.mean(distances))


def diversity(images: Sequence[Image.Image]) -> float:
    """Mean pairwise RMS distance of pixel values in [0, 1]."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images]).reshape(len(images), -1)
    pairs = [(i, j) for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
    return float(np.mean([np.sqrt(np.mean((arrays[i] - arrays[j]) ** 2)) for i, j in pairs]))


@dataclass
class Scores:
    subject_fidelity: float
    prompt_fidelity: float
    prompt_and_subject: float
    class_subject_share: float
    class_distance: float
    diversity: float
    train_seconds: float


@dataclass
class Baseline:
    """The base model's answers for one concept, against which every trained run is compared."""

    subject_fidelity: float
    class_subject_share: float
    class_images: List[Image.Image]
    instance_diversity: float


def evaluate(sample: Sampler, judge: Judge, concept: Concept, prompts: Prompts, samples: int,
             baseline_class: Sequence[Image.Image], seconds: float) -> Tuple[Scores, List[Image.Image]]:
    subject = sample([prompts.subject] * samples, SUBJECT_SEED)
    on_blue = sample([prompts.on_blue] * samples, PROMPT_SEED)
    class_images = sample([prompts.class_prompt] * samples, CLASS_SEED)
    blue = [label == "blue" for label in judge.predict(on_blue)["background"]]
    blue_subject = [b and s for b, s in zip(blue, subject_hits(judge, on_blue, concept))]
    scores = Scores(
        subject_fidelity=float(np.mean(subject_hits(judge, subject, concept))),
        prompt_fidelity=float(np.mean(blue)), prompt_and_subject=float(np.mean(blue_subject)),
        class_subject_share=float(np.mean(subject_hits(judge, class_images, concept))),
        class_distance=attribute_distance(judge, baseline_class, class_images),
        diversity=diversity(subject), train_seconds=seconds)
    return scores, subject + on_blue + class_images


def baseline(base_sampler: Sampler, judge: Judge, concept: Concept, samples: int) -> Tuple[Baseline, List[Image.Image]]:
    prompts = prompts_for(concept, "dreambooth")
    subject = base_sampler([prompts.subject] * samples, SUBJECT_SEED)
    class_images = base_sampler([prompts.class_prompt] * samples, CLASS_SEED)
    instances = instance_images(concept)
    result = Baseline(float(np.mean(subject_hits(judge, subject, concept))),
                      float(np.mean(subject_hits(judge, class_images, concept))), class_images, diversity(instances))
    return result, instances + subject + class_images


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class BenchResult:
    base_quality: Dict[str, object]
    baselines: Dict[str, Dict[str, float]]
    runs: Dict[str, Dict[str, Dict[str, float]]]  # recipe key -> concept -> scores
    settings: Dict[str, object]
    figures: List[str]


def _grid(rows: Sequence[Sequence[Image.Image]], columns: int) -> Image.Image:
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, len(rows) * IMAGE_SIZE), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row[:columns]):
            sheet.paste(image, (c * IMAGE_SIZE, r * IMAGE_SIZE))
    return sheet


def _save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def run(out: Path, workdir: Path, *, recipes: Sequence[Recipe] = RECIPES, concepts: Sequence[str] = tuple(CONCEPTS),
        samples: int = 16, base_per_caption: int = 1, base: Optional[Path] = None) -> BenchResult:
    """Train and score every recipe on every concept; write figures to `out` and return the figures."""
    from ..microworld.quality import reconstruction_accuracy, sample_quality
    from ..models.loader import load_bundle
    from ..train import train

    base = Path(base) if base is not None else shipped_checkpoint()
    judge = load_judge()
    out.mkdir(parents=True, exist_ok=True)
    base_bundle = load_bundle(base)
    report, _ = sample_quality(base_bundle, judge, per_caption=base_per_caption)
    base_quality = {"reconstruction": reconstruction_accuracy(base_bundle.vae, judge), "samples": report.to_dict()}
    logger.info("base model: %s", report.summary())
    base_sampler = sampler(base_bundle)
    baselines: Dict[str, Baseline] = {}
    reference_rows: List[List[Image.Image]] = []
    for name in concepts:
        baselines[name], images = baseline(base_sampler, judge, CONCEPTS[name], samples)
        reference_rows += [images[:INSTANCE_IMAGES], images[INSTANCE_IMAGES:INSTANCE_IMAGES + samples],
                           images[INSTANCE_IMAGES + samples:]]
    figures = [out / "quality_reference.png"]
    _save_png(_grid(reference_rows, min(samples, 8)), figures[0])

    runs: Dict[str, Dict[str, Dict[str, float]]] = {}
    for recipe in recipes:
        rows: List[List[Image.Image]] = []
        for name in concepts:
            concept = CONCEPTS[name]
            folder = workdir / recipe.key / name
            if folder.exists():
                shutil.rmtree(folder)
            config = run_config(recipe, concept, folder, base, workdir / f"class_images_{name}")
            # The base's YAML names its text-encoder folder relative to itself; a checkpoint exported
            # elsewhere needs the folder beside it too.
            text_folder = text_encoder_folder_name(base.stem)
            shutil.copytree(base.parent / text_folder, Path(config.output.out) / text_folder)
            started = time.monotonic()
            result = train(config)
            seconds = time.monotonic() - started
            scores, images = evaluate(trained_sampler(config, result.outputs[0]), judge, concept,
                                      prompts_for(concept, recipe.method), samples, baselines[name].class_images, seconds)
            runs.setdefault(recipe.key, {})[name] = asdict(scores)
            logger.info("%s / %s: %s", recipe.key, name, ", ".join(f"{k} {v:.3f}" for k, v in asdict(scores).items()))
            rows += [images[:samples], images[samples:2 * samples], images[2 * samples:]]
        figure = out / f"quality_{recipe.key}.png"
        _save_png(_grid(rows, min(samples, 8)), figure)
        figures.append(figure)
    settings = {"base": base.name, "instance_images": INSTANCE_IMAGES, "samples": samples, "sample_steps": SAMPLE_STEPS,
                "guidance": GUIDANCE, "class_images": CLASS_IMAGES, "threads": torch.get_num_threads(),
                "recipes": [asdict(recipe) for recipe in recipes]}
    return BenchResult(base_quality, {name: {k: v for k, v in asdict(b).items() if k != "class_images"}
                                      for name, b in baselines.items()},
                       runs, settings, [figure.name for figure in figures])


# ----------------------------------------------------------------------------------------------- report

def _mean(runs: Dict[str, Dict[str, float]], key: str) -> float:
    return float(np.mean([scores[key] for scores in runs.values()]))


def _machine(settings: Dict[str, object]) -> str:
    processes = int(settings.get("processes", 1))  # type: ignore[arg-type]
    threads = f"{settings['threads']} CPU thread{'s' if settings['threads'] != 1 else ''}"
    return threads if processes == 1 else f"{processes} processes side by side, {threads} each; merged with --merge"


def markdown(result: BenchResult) -> str:
    base = result.base_quality["samples"]["accuracy"]  # type: ignore[index]
    rec = result.base_quality["reconstruction"]  # type: ignore[assignment]
    concepts = list(result.baselines)
    base_subject = float(np.mean([b["subject_fidelity"] for b in result.baselines.values()]))
    base_class = float(np.mean([b["class_subject_share"] for b in result.baselines.values()]))
    lines = [
        "# Customization quality on the micro-world model",
        "",
        f"Produced by `python -m lib_sdcustom.bench quality` ({_machine(result.settings)}). "
        f"Base model `{result.settings['base']}`; {result.settings['instance_images']} instance pictures per concept; "
        f"{result.settings['samples']} samples per prompt, DDIM {result.settings['sample_steps']} steps, guidance "
        f"{result.settings['guidance']}; concepts: {', '.join(concepts)}. Figures are means over the concepts.",
        "",
        f"Base model: judge accuracy on samples of every caption combination: shape {base['shape']:.3f}, color "
        f"{base['color']:.3f}, background {base['background']:.3f}; on VAE reconstructions: shape {rec['shape']:.3f}, "
        f"color {rec['color']:.3f}, background {rec['background']:.3f}, outline {rec['outline']:.3f}.",
        "",
        f"| method | subject fidelity (base {base_subject:.2f}) | prompt fidelity: blue bg | blue bg + subject | "
        f"class prompt shows subject (base {base_class:.2f}) | class drift (TV) | diversity | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in result.runs.items():
        lines.append(f"| {key} | {_mean(runs, 'subject_fidelity'):.2f} | {_mean(runs, 'prompt_fidelity'):.2f} | "
                     f"{_mean(runs, 'prompt_and_subject'):.2f} | {_mean(runs, 'class_subject_share'):.2f} | "
                     f"{_mean(runs, 'class_distance'):.3f} | {_mean(runs, 'diversity'):.3f} | "
                     f"{_mean(runs, 'train_seconds'):.0f} |")
    instance_diversity = float(np.mean([b["instance_diversity"] for b in result.baselines.values()]))
    lines += ["", f"Diversity of the instance pictures themselves: {instance_diversity:.3f}.", "",
              "Subject fidelity per concept:", "",
              "| method | " + " | ".join(concepts) + " |", "|---|" + "---|" * len(concepts),
              "| base | " + " | ".join(f"{result.baselines[c]['subject_fidelity']:.2f}" for c in concepts) + " |"]
    for key, runs in result.runs.items():
        lines.append(f"| {key} | " + " | ".join(f"{runs[c]['subject_fidelity']:.2f}" for c in concepts) + " |")
    lines += ["", "Recipes (steps, lr, batch, rank): " + "; ".join(
        f"{r['key']} {r['steps']} / {r['lr']:g} / {r['batch_size']}" + (f" / {r['rank']}" if method_spec(r["method"]).uses_network else "")
        for r in result.settings["recipes"]) + ".",  # type: ignore[union-attr]
        "", "Figures: " + ", ".join(f"[{name}]({name})" for name in result.figures) +
        ". Per concept, three rows: 'a sks <class>', '... on a blue background', the bare class prompt "
        "(reference: instance pictures, base model on 'a sks <class>', base model on the class prompt)."]
    return "\n".join(lines) + "\n"


def write_report(result: BenchResult, out: Path) -> Tuple[Path, Path]:
    json_path = write_text_atomically(out / "quality.json", json.dumps(asdict(result), indent=1) + "\n")
    md_path = write_text_atomically(out / "quality.md", markdown(result))
    return json_path, md_path


def merge_reports(folders: Sequence[Path], out: Path) -> BenchResult:
    """One report from runs split by `--methods` over several processes or machines (the runs are
    independent, and on a small model one thread per run uses the cores better than one run on all).
    The shards must share everything but their recipes, or their rows would not be comparable."""
    parts = []
    for folder in folders:
        path = Path(folder) / "quality.json"
        if not path.is_file():
            raise UserFacingError(f"No benchmark report at {path}. Pass the --out folders of finished quality runs.")
        parts.append(json.loads(path.read_text()))
    first = parts[0]
    shared = {key: value for key, value in first["settings"].items() if key != "recipes"}
    runs: Dict[str, Dict[str, Dict[str, float]]] = {}
    recipes: List[Dict[str, object]] = []
    figures = first["figures"][:1]  # the base model's reference grid, the same in every shard
    out.mkdir(parents=True, exist_ok=True)
    for folder, part in zip(folders, parts):
        settings = {key: value for key, value in part["settings"].items() if key != "recipes"}
        if settings != shared or part["baselines"] != first["baselines"]:
            raise UserFacingError(f"The report in {folder} was made with other settings or another base model than "
                                  f"the one in {folders[0]}; run every shard with the same options.")
        runs.update(part["runs"])
        recipes += part["settings"]["recipes"]
        for name in part["figures"][1:]:
            shutil.copyfile(Path(folder) / name, out / name)
        figures += part["figures"][1:]
    shutil.copyfile(Path(folders[0]) / figures[0], out / figures[0])
    return BenchResult(first["base_quality"], first["baselines"], runs,
                       {**shared, "recipes": recipes, "processes": len(parts)}, figures)


def recipes_named(keys: Sequence[str]) -> List[Recipe]:
    known = {recipe.key: recipe for recipe in RECIPES}
    return [known[key] for key in keys]


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for quality.json/.md and figures")
    parser.add_argument("--workdir", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", choices=[recipe.key for recipe in RECIPES],
                        default=[recipe.key for recipe in RECIPES])
    parser.add_argument("--concepts", nargs="+", choices=sorted(CONCEPTS), default=list(CONCEPTS))
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt and run")
    parser.add_argument("--steps", type=int, default=0, help="override every recipe's step count (0 = the recipe's)")
    parser.add_argument("--base", type=Path, help="micro-world checkpoint (default: the bundled one)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="FOLDER",
                        help="instead of running: join the reports in these --out folders (shards run with "
                             "different --methods) into one report in --out")


def main(args) -> int:
    """Run the benchmark, write quality.json, quality.md and the figures, print the table."""
    import sys
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.merge:
        try:
            result = merge_reports(args.merge, args.out)
        except UserFacingError as error:
            sys.stderr.write(f"{error}\n")
            return 2
    else:
        recipes = [replace(recipe, steps=args.steps) if args.steps else recipe for recipe in recipes_named(args.methods)]
        with tempfile.TemporaryDirectory(prefix="sdcustom-quality-") as scratch:
            workdir = args.workdir or Path(scratch)
            result = run(args.out, workdir, recipes=recipes, concepts=args.concepts, samples=args.samples, base=args.base)
    json_path, md_path = write_report(result, args.out)
    sys.stdout.write(markdown(result) + f"\nWrote {json_path}, {md_path} and {len(result.figures)} figures in {args.out}\n")
    return 0
