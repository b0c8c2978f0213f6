"""`python -m lib_sdcustom.bench quality`: does each method teach the micro-world model a concept, and what
does that cost the rest of the model? Built to tell methods apart (issue 14).

Concepts (`world.BENCH_CONCEPTS`, three of each `world.ConceptKind`): subjects whose features pretraining
never saw together, subjects the base model already draws from plain words, and styles across shapes and
colors. Each kind has two concepts to tune recipes on and one to check them on (`world.Role`); the first
three concepts (heart, outlined square, orange star) can still be named with `--concepts`.

For every method (a recipe of `bench/recipes.py`), concept and training seed one run trains on five instance
pictures through the same `train()` users run, and the result is loaded back from the exported file the way a
consumer would (network file attached, embedding hooked into the text encoder, checkpoint loaded). The shipped judge then
scores fixed-seed samples, 64 per prompt by default:

- subject fidelity: share of 'a sks <class>' samples the judge calls the concept (every target attribute;
  for a style, its style attributes);
- prompt fidelity: share of 'a sks <class> on a blue background' samples on a blue background (and, in a
  second column, also showing the concept); no instance picture has a blue background;
- drift on the class prompt: share of bare class-prompt samples ('a shape', 'a circle') showing the concept,
  and the total-variation distance between the judge's attribute distributions of base and trained samples
  with the same seeds (mean over shape, color, background, outline; 0 = unchanged);
- drift on unrelated prompts without the trigger (`UNRELATED`, the samples split evenly over them): the share
  showing the concept (a style's leak) and the share still drawn as asked;
- diversity: mean pairwise RMS pixel distance between the subject samples (the instance pictures' own
  value is reported beside it), and the wall time of the training call;
- each concept's ceiling (`teach.concept_ceiling`): every sample passes through the VAE, so no method can
  score much above the share of the concept's own pictures the judge recognizes after a VAE round trip.

The report rates each recipe against issue 14's targets kind by kind (`targets_table`).

The base model answers the same prompts (with 'sks' as an unknown word) as the reference row. Every figure
carries a 95% interval from a two-stage bootstrap (`bench/intervals.py`): seeds resampled within each
concept, samples within each seed. `--quick` runs the whole pipeline at toy size for a CI smoke test.

Textual Inversion learns one made-up word standing for the whole concept ('a skstoken'), since it cannot
bind an existing word; everything else uses the DreamBooth-style identifier 'sks' plus the class word.
Captions follow the world's own style: 'a sks shape on a gray background'.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import RunConfig
from ..errors import UserFacingError
from ..files import write_atomically, write_text_atomically
from ..methods.registry import method_spec
from ..microworld.judge import Judge, load_judge
from ..microworld.model import shipped_checkpoint, text_encoder_folder_name
from ..microworld.quality import GUIDANCE, SAMPLE_STEPS, caption_scenes, full_caption
from ..microworld.teach import (IDENTIFIER, INSTANCE_IMAGES, TI_TRIGGER, Prompts, Sampler, base_run_config, concept_ceiling,
                                instance_images, prompts_for, sampler, subject_hits, trained_sampler, write_instances)
from ..microworld.world import BENCH_CONCEPTS, CONCEPTS, IMAGE_SIZE, Concept, ConceptKind, Role
from ..models.bundle import ModelBundle
from .intervals import Estimate, bootstrap_mean
from .recipes import RECIPES, Recipe, recipe_line, recipes_named

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "background", "outline")
TRAIN_SEEDS = (0, 1)
SAMPLES = 64
SAMPLE_SEED = 1000
#: Prompts without the trigger word and what each asks for: is the rest of the model intact, and does the
#: concept (a style above all) creep in? Half leave the color open, where a color style would show first.
UNRELATED: tuple[tuple[str, dict[str, str]], ...] = (
    ("a circle on a gray background", {"shape": "circle", "background": "gray"}),
    ("a square on a white background", {"shape": "square", "background": "white"}),
    ("a triangle on a green background", {"shape": "triangle", "background": "green"}),
    ("a star on a black background", {"shape": "star", "background": "black"}),
    ("a green diamond on a white background", {"shape": "diamond", "color": "green", "background": "white"}),
    ("a blue cross on a gray background", {"shape": "cross", "color": "blue", "background": "gray"}),
    ("an orange square on a green background", {"shape": "square", "color": "orange", "background": "green"}),
    ("a red star on a white background", {"shape": "star", "color": "red", "background": "white"}),
)
@dataclass(frozen=True)
class Size:
    """What a run covers unless the command line says otherwise."""

    concepts: tuple[str, ...]
    methods: tuple[str, ...]
    samples: int
    steps: int  # 0 = each recipe's own
    class_images: int = 0  # for the recipes with prior preservation; 0 = each recipe's own


#: The table's rows (docs/bench/quality.md): each method the issue's targets name, as a user would run it;
#: the other recipes are variants and older rows, run by name with --methods.
TABLE_METHODS = ("lora_class_quarter", "locon_regularized_cosine", "dreambooth_prior_by_mode",
                 "dreambooth_lora_class_quarter", "textual_inversion")
FULL = Size(BENCH_CONCEPTS, TABLE_METHODS, SAMPLES, 0)
#: --quick: the whole pipeline at toy size (the test concept of each kind, a network-free and a checkpoint
#: method, two samples, two steps, four class images, no base-model check), for a CI smoke test.
QUICK = Size(tuple(name for name in BENCH_CONCEPTS if CONCEPTS[name].role is Role.TEST),
             ("textual_inversion", "dreambooth"), 2, 2, 4)


def run_config(recipe: Recipe, concept: Concept, folder: Path, base: Path, class_folder: Path,
               seed: int = TRAIN_SEEDS[0]) -> RunConfig:
    """The recipe's run with training seed `seed` on five pictures of `concept`, everything under `folder`."""
    recipe = recipe.for_concept(concept)
    prompts = prompts_for(concept, recipe.method)
    name = f"{recipe.key}_{concept.name}" if method_spec(recipe.method).uses_token else TI_TRIGGER
    images = write_instances(folder / "images", concept, prompts, describe_content=recipe.content_captions)
    config = base_run_config(recipe.method, base, images, name=name, out=folder / "out", run_dir=folder / "run")
    config.output.save_precision = "fp32"
    config.optimizer.lr, config.optimizer.text_encoder_lr = recipe.lr, recipe.text_encoder_lr
    config.network.rank, config.network.alpha, config.network.dora = recipe.rank, float(recipe.rank), recipe.dora
    config.network.conv_alpha = recipe.rank * recipe.conv_scale
    config.network.dropout, config.network.loraplus_lr_ratio = recipe.dropout, recipe.loraplus_ratio
    config.training.steps, config.training.batch_size, config.training.seed = recipe.steps, recipe.batch_size, seed
    config.training.train_text_encoder, config.training.min_snr_gamma = recipe.train_text_encoder, recipe.min_snr_gamma
    config.training.timestep_sampling, config.training.noise_offset = recipe.timestep_sampling, recipe.noise_offset
    config.data.flip = recipe.flip
    config.optimizer.scheduler = recipe.scheduler
    config.textual_inversion.vectors, config.textual_inversion.init_text = 2, concept.class_noun
    config.textual_inversion.template = "captions"  # the caption files, which hold the trigger word
    config.dreambooth.instance_prompt = "[filewords]"
    config.dreambooth.ema = recipe.ema
    prior = config.prior
    prior.class_prompt, prior.style = prompts.class_prompt, recipe.style
    prior.prior_preservation, prior.num_class_images = recipe.prior_preservation, recipe.class_images
    prior.prior_weight = recipe.prior_weight
    prior.class_prompt_share = recipe.class_prompt_share
    prior.class_sample_steps, prior.class_guidance, prior.class_data = SAMPLE_STEPS, GUIDANCE, str(class_folder)
    # The shipped plain prompts (people, places) are nothing the micro model can draw; `varied_prompts` are its own.
    prior.plain_prompts = "off"
    if recipe.style:  # the identifier alone is the trigger: 'a sks shape on a gray background' -> 'a shape on ...'
        config.data.default_caption = IDENTIFIER
    if recipe.varied_prompts:
        prior.class_prompt_file = str(write_text_atomically(folder / "class_prompts.txt", "\n".join(varied_prompts())))
    return config


def varied_prompts(seed: int = 0) -> list[str]:
    """Plain prompts of varied content for a style's class images: every full caption pretraining knows ('a red
    circle on a gray background'), shuffled, without the benchmark's own prompts without the trigger."""
    held_out = {prompt for prompt, _ in UNRELATED}
    prompts = [caption for caption in map(full_caption, caption_scenes()) if caption not in held_out]
    random.Random(seed).shuffle(prompts)
    return prompts


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
    """Mean pairwise RMS distance of pixel values in [0, 1] (0 for a single image)."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images]).reshape(len(images), -1)
    pairs = [(i, j) for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
    return float(np.mean([np.sqrt(np.mean((arrays[i] - arrays[j]) ** 2)) for i, j in pairs])) if pairs else 0.0


@dataclass
class Scores:
    """One model's answers for one concept: per-sample verdicts (1 = yes), then figures of the whole run."""

    subject: list[int]  # 'a sks <class>' shows the concept
    prompt: list[int]  # 'a sks <class> on a blue background' is on blue
    prompt_and_subject: list[int]  # ... and shows the concept
    class_subject: list[int]  # the bare class prompt shows the concept
    unrelated_subject: list[int]  # a prompt without the trigger shows the concept
    unrelated_fidelity: list[int]  # a prompt without the trigger is drawn as asked
    class_distance: float
    diversity: float
    train_seconds: float


@dataclass
class Baseline:
    """The base model's answers for one concept, against which every trained run is compared."""

    scores: Scores
    class_images: list[Image.Image]
    instance_diversity: float


def _as_ints(flags: Iterable[bool]) -> list[int]:
    return [int(flag) for flag in flags]


def unrelated_prompts(samples: int) -> tuple[list[str], list[dict[str, str]]]:
    """`samples` split evenly over `UNRELATED` (at least one each), taking turns so that a figure's first
    row shows every prompt: the prompts and what each asks for."""
    rounds = max(1, samples // len(UNRELATED))
    chosen = [item for _ in range(rounds) for item in UNRELATED]
    return [prompt for prompt, _ in chosen], [asked for _, asked in chosen]


def sample_groups(sample: Sampler, groups: Sequence[list[str]], batch_size: int = 128) -> list[list[Image.Image]]:
    """Every group's prompts in as few sampler batches as fit `batch_size` (on this model a 25-step batch of
    14 prompts costs little more than one of 2); image i of the joined list uses noise seed `SAMPLE_SEED + i`,
    so base and trained models answer each prompt with the same noise."""
    prompts = [prompt for group in groups for prompt in group]
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        images += sample(prompts[start:start + batch_size], SAMPLE_SEED + start)
    split, start = [], 0
    for group in groups:
        split.append(images[start:start + len(group)])
        start += len(group)
    return split


def evaluate(sample: Sampler, judge: Judge, concept: Concept, prompts: Prompts, samples: int,
             reference_class: Sequence[Image.Image] | None = None,
             seconds: float = 0.0) -> tuple[Scores, list[list[Image.Image]]]:
    """Score one model; the class drift is measured against `reference_class` (None: the base model itself,
    drift 0). Returns the scores and the images per prompt group (subject, blue, class, unrelated)."""
    other_prompts, asked = unrelated_prompts(samples)
    subject, on_blue, class_images, unrelated = sample_groups(
        sample, [[prompts.subject] * samples, [prompts.on_blue] * samples, [prompts.class_prompt] * samples,
                 other_prompts])
    blue = [label == "blue" for label in judge.predict(on_blue)["background"]]
    judged = judge.predict(unrelated)
    scores = Scores(
        subject=_as_ints(subject_hits(judge, subject, concept)),
        prompt=_as_ints(blue),
        prompt_and_subject=_as_ints(b and s for b, s in zip(blue, subject_hits(judge, on_blue, concept))),
        class_subject=_as_ints(subject_hits(judge, class_images, concept)),
        unrelated_subject=_as_ints(subject_hits(judge, unrelated, concept)),
        unrelated_fidelity=_as_ints(all(judged[name][i] == value for name, value in wants.items())
                                    for i, wants in enumerate(asked)),
        class_distance=attribute_distance(judge, class_images if reference_class is None else reference_class,
                                          class_images),
        diversity=diversity(subject), train_seconds=seconds)
    return scores, [subject, on_blue, class_images, unrelated]


def baseline(base_sampler: Sampler, judge: Judge, concept: Concept, samples: int) -> tuple[Baseline, list[list[Image.Image]]]:
    """The base model on the prompts of the 'sks' methods; rows: instance pictures, then its samples."""
    scores, images = evaluate(base_sampler, judge, concept, prompts_for(concept, "dreambooth"), samples)
    instances = instance_images(concept)
    return Baseline(scores, images[2], diversity(instances)), [instances, images[0], images[2], images[3]]


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class BenchResult:
    """Everything a report shows, as plain JSON values (a merged report is read back from JSON files)."""

    base_quality: dict[str, Any]  # empty under --quick
    baselines: dict[str, dict[str, Any]]  # concept -> {"scores": Scores as a dict, "instance_diversity"}
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]]  # recipe key -> concept -> training seed -> Scores
    settings: dict[str, Any]
    figures: list[str]
    ceilings: dict[str, float] = field(default_factory=dict)  # concept -> `teach.concept_ceiling`


def grid_name(key: str) -> str:
    """The file of a recipe's sample grid in a report's folder."""
    return f"quality_{key}.png"


def _grid(rows: Sequence[Sequence[Image.Image]], columns: int) -> Image.Image:
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, len(rows) * IMAGE_SIZE), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row[:columns]):
            sheet.paste(image, (c * IMAGE_SIZE, r * IMAGE_SIZE))
    return sheet


def _save_png(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _base_quality(bundle: ModelBundle, judge: Judge) -> dict[str, Any]:
    from ..microworld.quality import reconstruction_accuracy, sample_quality

    report, _ = sample_quality(bundle, judge, per_caption=1)
    logger.info("base model: %s", report.summary())
    return {"reconstruction": reconstruction_accuracy(bundle.vae, judge), "samples": report.to_dict()}


def prepared_run(recipe: Recipe, concept: Concept, seed: int, workdir: Path, base: Path) -> RunConfig:
    """The run's settings, in a fresh folder of `workdir`. Class images are kept per concept and seed: the training
    seed seeds their generation, so a seed's runs train on the same ones whichever shard makes them first."""
    folder = workdir / recipe.key / concept.name / f"seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    config = run_config(recipe, concept, folder, base, workdir / f"class_images_{concept.name}_seed{seed}", seed)
    # The base's YAML names its text-encoder folder relative to itself; a checkpoint exported
    # elsewhere needs the folder beside it too.
    text_folder = text_encoder_folder_name(base.stem)
    shutil.copytree(base.parent / text_folder, Path(config.output.out) / text_folder)
    return config


def _train_and_score(recipe: Recipe, concept: Concept, seed: int, workdir: Path, base: Path, judge: Judge,
                     samples: int, reference_class: Sequence[Image.Image]) -> tuple[Scores, list[list[Image.Image]]]:
    from ..run.train import train

    config = prepared_run(recipe, concept, seed, workdir, base)
    started = time.monotonic()
    result = train(config)
    seconds = time.monotonic() - started
    return evaluate(trained_sampler(config, result.outputs[0]), judge, concept, prompts_for(concept, recipe.method),
                    samples, reference_class, seconds)


def run(out: Path, workdir: Path, *, recipes: Sequence[Recipe] = RECIPES, concepts: Sequence[str] = BENCH_CONCEPTS,
        seeds: Sequence[int] = TRAIN_SEEDS, samples: int = SAMPLES, base: Path | None = None,
        check_base: bool = True) -> BenchResult:
    """Train and score every recipe on every concept with every training seed; write the figures (samples of
    the first seed) to `out`. `check_base` also measures the base model over every caption combination."""
    from ..models.loader import load_bundle

    base = Path(base) if base is not None else shipped_checkpoint()
    judge = load_judge()
    out.mkdir(parents=True, exist_ok=True)
    base_bundle = load_bundle(base)
    base_quality = _base_quality(base_bundle, judge) if check_base else {}
    base_sampler = sampler(base_bundle)
    baselines: dict[str, Baseline] = {}
    reference_rows: list[list[Image.Image]] = []
    for name in concepts:
        baselines[name], rows = baseline(base_sampler, judge, CONCEPTS[name], samples)
        reference_rows += rows
    figures = [out / "quality_reference.png"]
    _save_png(_grid(reference_rows, min(samples, 8)), figures[0])

    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for recipe in recipes:
        rows = []
        for name in concepts:
            for seed in seeds:
                scores, images = _train_and_score(recipe, CONCEPTS[name], seed, workdir, base, judge, samples,
                                                  baselines[name].class_images)
                runs.setdefault(recipe.key, {}).setdefault(name, {})[str(seed)] = asdict(scores)
                logger.info("%s / %s / seed %d: subject %.2f, blue %.2f, class shows subject %.2f, unrelated show "
                            "subject %.2f, %.0fs", recipe.key, name, seed, np.mean(scores.subject),
                            np.mean(scores.prompt), np.mean(scores.class_subject),
                            np.mean(scores.unrelated_subject), scores.train_seconds)
                if seed == seeds[0]:
                    rows += images
        figure = out / grid_name(recipe.key)
        _save_png(_grid(rows, min(samples, 8)), figure)
        figures.append(figure)
    settings = {"base": base.name, "instance_images": INSTANCE_IMAGES, "samples": samples, "seeds": list(seeds),
                "unrelated_prompts": [prompt for prompt, _ in UNRELATED], "sample_steps": SAMPLE_STEPS,
                "guidance": GUIDANCE, "threads": torch.get_num_threads(),
                "recipes": [asdict(recipe) for recipe in recipes]}
    return BenchResult(base_quality, {name: {"scores": asdict(b.scores), "instance_diversity": b.instance_diversity}
                                      for name, b in baselines.items()},
                       runs, settings, [figure.name for figure in figures],
                       {name: concept_ceiling(base_bundle.vae, judge, CONCEPTS[name]) for name in concepts})


# ----------------------------------------------------------------------------------------------- report

#: Table columns: (Scores field, header); the class-drift and time columns make no sense for the base row.
COLUMNS = (("subject", "subject fidelity"), ("prompt", "blue bg"), ("prompt_and_subject", "blue bg + subject"),
           ("class_subject", "class prompt shows subject"), ("unrelated_subject", "no-trigger prompts show subject"),
           ("unrelated_fidelity", "no-trigger prompts as asked"), ("class_distance", "class drift (TV)"),
           ("diversity", "diversity"), ("train_seconds", "train s"))
_TRAINED_ONLY = ("class_distance", "train_seconds")


def estimate(runs: dict[str, dict[str, dict[str, Any]]], concepts: Sequence[str], key: str) -> Estimate:
    """One figure over `concepts` (each with its seeds and samples) with its bootstrap interval."""
    def values(scores: dict[str, Any]) -> list[float]:
        value = scores[key]
        return list(value) if isinstance(value, list) else [float(value)]

    return bootstrap_mean([[values(scores) for scores in runs[name].values()] for name in concepts])


def _base_runs(result: BenchResult) -> dict[str, dict[str, dict[str, Any]]]:
    """The base model's scores shaped like a recipe's runs (one 'seed'), so `estimate` reads both."""
    return {name: {"base": baseline["scores"]} for name, baseline in result.baselines.items()}


def _cell(figure: Estimate, key: str) -> str:
    if key == "train_seconds":
        return f"{figure.mean:.0f} [{figure.low:.0f}, {figure.high:.0f}]"
    return str(figure)


def _kind_table(result: BenchResult, kind: ConceptKind) -> list[str]:
    concepts = [name for name in result.baselines if CONCEPTS[name].kind is kind]
    if not concepts:
        return []
    tested = [name for name in concepts if CONCEPTS[name].role is Role.TEST]
    base = _base_runs(result)
    ceiling = (f"Ceiling: the judge finds the concept in {np.mean([result.ceilings[name] for name in concepts]):.2f} of "
               "the VAE's round trips of its own pictures, about the most any method can reach." if result.ceilings else "")
    lines = [f"### {kind.value.capitalize()}: {', '.join(concepts)}" + (f" (test: {', '.join(tested)})" if tested else ""),
             *(["", ceiling] if ceiling else []), "", "| method | " + " | ".join(header for _, header in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS),
             "| base | " + " | ".join("-" if key in _TRAINED_ONLY else _cell(estimate(base, concepts, key), key)
                                     for key, _ in COLUMNS) + " |"]
    for recipe, runs in result.runs.items():
        lines.append(f"| {recipe} | " + " | ".join(_cell(estimate(runs, concepts, key), key) for key, _ in COLUMNS) + " |")
    return lines + [""]


#: Done when (issue 14), for every kind of concept: a share of at least `GOAL` for the concept (subject fidelity,
#: or style score) and for the blue background it is asked to keep; the bare class prompt and the prompts
#: without the trigger show the concept at most `DRIFT_MARGIN` more often than the base model; every one of
#: these figures known to within +-`HALF_WIDTH` (its 95% interval).
GOAL, DRIFT_MARGIN, HALF_WIDTH = 0.8, 0.1, 0.1
_AT_LEAST = (("subject", "concept"), ("prompt", "blue bg"))
_AT_MOST_BASE = (("class_subject", "class prompt"), ("unrelated_subject", "no-trigger prompts"))


def _target_cell(figure: Estimate, bound: float, at_least: bool) -> str:
    """'0.91 met', '0.34 short by 0.46' or '0.95 over by 0.15', with ', +-0.12' where the interval is too wide.
    A miss too small for two decimals gets three ('0.798 short by 0.002'), never a 'short by 0.00'."""
    gap = (bound - figure.mean) if at_least else (figure.mean - bound)
    digits = 3 if 0 < gap < 0.005 else 2
    verdict = "met" if gap <= 0 else f"{'short' if at_least else 'over'} by {gap:.{digits}f}"
    half_width = max(figure.mean - figure.low, figure.high - figure.mean)
    return f"{figure.mean:.{digits}f} {verdict}" + (f", +-{half_width:.2f}" if half_width > HALF_WIDTH else "")


def targets_table(result: BenchResult) -> list[str]:
    """Each recipe against the issue's targets, kind by kind (bounds of the drift columns are the base's
    figure plus `DRIFT_MARGIN`); an interval wider than +-`HALF_WIDTH` is named in its cell."""
    base = _base_runs(result)
    lines = [f"Against the targets: concept and blue background >= {GOAL}; class prompt and no-trigger prompts show "
             f"the concept at most {DRIFT_MARGIN} more often than the base model; 95% intervals within "
             f"+-{HALF_WIDTH} (a wider one is named in its cell).", "",
             "| method | kind | " + " | ".join(header for _, header in _AT_LEAST + _AT_MOST_BASE) + " |",
             "|---|---|" + "---|" * (len(_AT_LEAST) + len(_AT_MOST_BASE))]
    for recipe, runs in result.runs.items():
        for kind in ConceptKind:
            concepts = [name for name in result.baselines if CONCEPTS[name].kind is kind]
            if not concepts:
                continue
            cells = [_target_cell(estimate(runs, concepts, key), GOAL, True) for key, _ in _AT_LEAST]
            if result.ceilings:
                cells[0] += f" (ceiling {np.mean([result.ceilings[name] for name in concepts]):.2f})"
            cells += [_target_cell(estimate(runs, concepts, key), estimate(base, concepts, key).mean + DRIFT_MARGIN,
                                   False) for key, _ in _AT_MOST_BASE]
            lines.append(f"| {recipe} | {kind.value} | " + " | ".join(cells) + " |")
    return lines + [""]


def _machine(settings: dict[str, Any]) -> str:
    processes = int(settings.get("processes", 1))
    threads = f"{settings['threads']} CPU thread{'s' if settings['threads'] != 1 else ''}"
    return threads if processes == 1 else f"{processes} processes side by side, {threads} each; merged with --merge"


def _base_line(base_quality: dict[str, Any]) -> str:
    if not base_quality:
        return "Base model check over every caption combination: skipped (--quick)."
    base, rec = base_quality["samples"]["accuracy"], base_quality["reconstruction"]
    return (f"Base model: judge accuracy on samples of every caption combination: shape {base['shape']:.3f}, color "
            f"{base['color']:.3f}, background {base['background']:.3f}; on VAE reconstructions: shape "
            f"{rec['shape']:.3f}, color {rec['color']:.3f}, background {rec['background']:.3f}, outline "
            f"{rec['outline']:.3f}.")


def markdown(result: BenchResult) -> str:
    settings = result.settings
    concepts = list(result.baselines)
    samples = int(settings["samples"])
    lines = [
        "# Customization quality on the micro-world model",
        "",
        f"Produced by `python -m lib_sdcustom.bench quality` ({_machine(settings)}). Base model `{settings['base']}`; "
        f"{settings['instance_images']} instance pictures per concept; training seeds "
        f"{', '.join(map(str, settings['seeds']))}; {samples} samples per prompt and run "
        f"({len(unrelated_prompts(samples)[0])} over the {len(settings['unrelated_prompts'])} prompts without the "
        f"trigger), DDIM {settings['sample_steps']} steps, guidance {settings['guidance']}.",
        "",
        "Each figure is a mean over the kind's concepts, their training seeds and samples, with its 95% interval "
        "in brackets: a two-stage percentile bootstrap (training seeds resampled within each concept, samples "
        "within each seed; `lib_sdcustom/bench/intervals.py`). Recipes are to be tuned on the 'tune' concepts "
        "and checked on the 'test' ones.",
        "",
        _base_line(result.base_quality),
        "",
    ]
    for kind in ConceptKind:
        lines += _kind_table(result, kind)
    lines += targets_table(result)
    instance_diversity = float(np.mean([b["instance_diversity"] for b in result.baselines.values()]))
    lines += [f"Diversity of the instance pictures themselves: {instance_diversity:.3f}.", "",
              "Subject fidelity per concept (ceiling: the judge on VAE round trips of 200 of its pictures):", "",
              "| method | " + " | ".join(f"{name} ({CONCEPTS[name].role.value})" for name in concepts) + " |",
              "|---|" + "---|" * len(concepts)]
    if result.ceilings:
        lines.append("| ceiling | " + " | ".join(f"{result.ceilings[c]:.2f}" for c in concepts) + " |")
    for key, runs in {"base": _base_runs(result), **result.runs}.items():
        lines.append(f"| {key} | " + " | ".join(str(estimate(runs, [c], "subject")) for c in concepts) + " |")
    lines += ["", "Prompts without the trigger: " + "; ".join(f"'{p}'" for p in settings["unrelated_prompts"]) + ".",
              "", recipe_line(settings["recipes"]) + " Why, and how this table was run: [tuning.md](tuning.md).",
              "", "Figures: " + ", ".join(f"[{name}]({name})" for name in result.figures) +
              ". Per concept, four rows from the first training seed: 'a sks <class>', '... on a blue background', "
              "the bare class prompt, the prompts without the trigger (reference: instance pictures, then the base "
              "model on the same three prompt groups)."]
    return "\n".join(lines) + "\n"


def write_report(result: BenchResult, out: Path) -> tuple[Path, Path]:
    json_path = write_text_atomically(out / "quality.json", json.dumps(asdict(result), indent=1) + "\n")
    md_path = write_text_atomically(out / "quality.md", markdown(result))
    return json_path, md_path


def _shared_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings shards must share: not their recipes, their training seeds, nor how many processes an
    earlier merge joined."""
    return {key: value for key, value in settings.items() if key not in ("recipes", "seeds", "processes")}


def _seeds_join(held: dict[str, Any], shard: dict[str, Any]) -> bool:
    """Whether a shard's runs of one recipe on one concept join those `held`: yes when its seeds are all new
    (a later shard with more seeds), no when any is held already (a rerun in front replaces the runs behind
    it, seeds and all)."""
    return not held.keys() & shard.keys()


def _same_measure(first: Any, second: Any) -> bool:
    """Whether two shards measured the same thing: every judge verdict equal, every float (a diversity, a
    distance) equal to float rounding, which differs between processes that split the work otherwise."""
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_same_measure(first[key], second[key]) for key in first)
    if isinstance(first, list) and isinstance(second, list):
        return len(first) == len(second) and all(map(_same_measure, first, second))
    if isinstance(first, float) or isinstance(second, float):
        return math.isclose(first, second, rel_tol=1e-4, abs_tol=1e-6)
    return bool(first == second)


def merge_reports(folders: Sequence[Path], out: Path, *, concepts: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None, base: Path | None = None) -> BenchResult:
    """One report from runs split over several processes or machines by `--methods`, by `--concepts` or both
    (the runs are independent, and on a small model one thread per run uses the cores better than one run on
    all), or by `--seeds` (more training seeds for some recipes). The shards must share every setting but their
    recipes, concepts and seeds, and together hold every kept recipe on every kept concept with the same seeds;
    `concepts` and `methods` (recipe keys) keep only those, so a shard may also hold a variant stopped part way.
    A recipe's figures on a concept, its settings and its grid are the first shard's that ran it (so a rerun
    goes in front of the report it replaces); a shard of other seeds of a recipe must have run it with the same
    settings.
    Concepts whose ceiling a shard did not record (older reports) are measured on `base`'s VAE."""
    kept_grids = None if methods is None else {grid_name(key) for key in methods}
    parts = []
    for folder in folders:
        path = Path(folder) / "quality.json"
        if not path.is_file():
            raise UserFacingError(f"No benchmark report at {path}. Pass the --out folders of finished quality runs.")
        parts.append(json.loads(path.read_text()))
    first = parts[0]
    shared = _shared_settings(first["settings"])
    baselines: dict[str, dict[str, Any]] = {}
    ceilings: dict[str, float] = {}
    runs: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    figures = first["figures"][:1]  # the base model's reference grid of the first shard
    out.mkdir(parents=True, exist_ok=True)
    for folder, part in zip(folders, parts):
        settings = _shared_settings(part["settings"])
        clash = [name for name, baseline in part["baselines"].items()
                 if not _same_measure(baselines.get(name, baseline), baseline)]
        if settings != shared or clash:
            raise UserFacingError(f"The report in {folder} was made with other settings or another base model than "
                                  f"the one in {folders[0]}; run every shard with the same options.")
        baselines.update(part["baselines"])
        ceilings.update(part.get("ceilings", {}))
        for recipe in part["settings"]["recipes"]:
            key = recipe["key"]
            if methods is not None and key not in methods:
                continue
            earlier_recipe = recipes.setdefault(key, recipe)
            earlier = runs.get(key, {})
            joining = [name for name, by_seed in part["runs"].get(key, {}).items()
                       if earlier.get(name) and _seeds_join(earlier[name], by_seed)]
            if joining and any(earlier_recipe[field] != recipe[field] for field in earlier_recipe.keys() & recipe.keys()):
                raise UserFacingError(f"The report in {folder} ran {key} with other settings than an earlier shard, "
                                      f"so its seeds cannot join that shard's on {', '.join(joining)}.",
                                      "Run every seed of a recipe with the same options.")
        for key, by_concept in part["runs"].items():
            if methods is None or key in methods:
                for name, by_seed in by_concept.items():
                    held = runs.setdefault(key, {}).setdefault(name, {})
                    if _seeds_join(held, by_seed):
                        held.update(by_seed)
        for name in part["figures"][1:]:
            if name not in figures and (kept_grids is None or name in kept_grids):
                shutil.copyfile(Path(folder) / name, out / name)
                figures.append(name)
    kept = list(concepts) if concepts else list(baselines)
    seeds = sorted({int(seed) for by_concept in runs.values() for name in kept for seed in by_concept.get(name, {})})
    missing = [f"{key} on {name} with seed(s) {', '.join(str(seed) for seed in seeds if str(seed) not in held)}"
               for key, by_concept in runs.items() for name in kept
               for held in [by_concept.get(name, {})] if sorted(map(int, held)) != seeds]
    if missing or any(name not in baselines for name in kept):
        raise UserFacingError(f"The reports in {', '.join(map(str, folders))} lack {', '.join(missing) or 'a concept'}.",
                              "Run the missing recipes, concepts and seeds as another shard and merge it too, or keep "
                              "only the recipes run with every seed (--methods).")
    unmeasured = [name for name in kept if name not in ceilings]
    if unmeasured:
        from ..models.loader import load_bundle

        vae, judge = load_bundle(Path(base) if base else shipped_checkpoint()).vae, load_judge()
        ceilings.update({name: concept_ceiling(vae, judge, CONCEPTS[name]) for name in unmeasured})
    shutil.copyfile(Path(folders[0]) / figures[0], out / figures[0])
    processes = sum(int(part["settings"].get("processes", 1)) for part in parts)
    return BenchResult(first["base_quality"], {name: baselines[name] for name in kept},
                       {key: {name: by_concept[name] for name in kept} for key, by_concept in runs.items()},
                       {**shared, "seeds": seeds, "recipes": list(recipes.values()), "processes": processes}, figures,
                       {name: ceilings[name] for name in kept})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="folder for quality.json/.md and figures")
    parser.add_argument("--workdir", type=Path, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", choices=[recipe.key for recipe in RECIPES],
                        help=f"default: the table's {', '.join(FULL.methods)} ({', '.join(QUICK.methods)} under "
                             f"--quick); with --merge, the recipes the report keeps (default: all)")
    parser.add_argument("--concepts", nargs="+", choices=sorted(CONCEPTS),
                        help=f"default: the nine of the broadened set ({', '.join(QUICK.concepts)} under --quick); "
                             f"with --merge, the concepts the report keeps")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TRAIN_SEEDS), help="training seeds")
    parser.add_argument("--samples", type=int, help=f"samples per prompt and run (default {SAMPLES}; "
                                                    f"{QUICK.samples} under --quick)")
    parser.add_argument("--steps", type=int, default=0, help="override every recipe's step count (0 = the recipe's)")
    parser.add_argument("--quick", action="store_true",
                        help="toy size for a smoke test: test concepts, 2 samples, 2 steps, no base-model check")
    parser.add_argument("--base", type=Path, help="micro-world checkpoint (default: the bundled one)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="FOLDER",
                        help="instead of running: join the reports in these --out folders (shards run with "
                             "different --methods or --concepts) into one report in --out")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark, write quality.json, quality.md and the figures, print the table."""
    import sys
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.merge:
        try:
            result = merge_reports(args.merge, args.out, concepts=args.concepts, methods=args.methods, base=args.base)
        except UserFacingError as error:
            sys.stderr.write(f"{error}\n")
            return 2
    else:
        size = QUICK if args.quick else FULL
        overrides: dict[str, Any] = {key: value for key, value in (("steps", args.steps or size.steps),
                                                   ("class_images", size.class_images)) if value}
        recipes = [replace(recipe, **overrides, on_styles=tuple(item for item in recipe.on_styles if item[0] not in overrides))
                   for recipe in recipes_named(args.methods or size.methods)]
        with tempfile.TemporaryDirectory(prefix="sdcustom-quality-") as scratch:
            workdir = args.workdir or Path(scratch)
            result = run(args.out, workdir, recipes=recipes, concepts=args.concepts or size.concepts,
                         seeds=args.seeds, samples=args.samples or size.samples, base=args.base,
                         check_base=not args.quick)
    json_path, md_path = write_report(result, args.out)
    sys.stdout.write(markdown(result) + f"\nWrote {json_path}, {md_path} and {len(result.figures)} figures in {args.out}\n")
    return 0
