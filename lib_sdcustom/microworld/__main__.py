"""Command line for the micro-world: `python -m lib_sdcustom.microworld COMMAND ...`.

  samples OUT_DIR [--n N] [--seed S] [--concept NAME]   pretraining (or concept) images with .txt captions
  train-judge OUT.safetensors [--steps N] [--seed S]    train the judge, report its accuracy, save it
  eval-judge [PATH]                                     accuracy of a saved judge (default: the shipped one)
  pretrain OUT_DIR [--minutes M] [--seed S]             pretrain the micro base model (VAE, then text encoder + UNet)
  eval-model [CHECKPOINT]                               judge a micro model's samples (default: the shipped one)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ..errors import OutputError, UserFacingError
from ..files import output_path, write_atomically, write_text_atomically
from .pretrain import PretrainSettings
from .world import CONCEPTS, IMAGE_SIZE, concept_examples, pretraining_examples

logger = logging.getLogger(__name__)


def _grid(images: Sequence[Image.Image], columns: int = 16) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, max(rows, 1) * IMAGE_SIZE), (255, 255, 255))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * IMAGE_SIZE, (index // columns) * IMAGE_SIZE))
    return sheet


def _save_png(image: Image.Image, target: Path) -> None:
    write_atomically(target, lambda tmp: image.save(tmp, format="PNG"))


def write_samples(folder: Path, pairs: Iterable[tuple[Image.Image, str]], *, overwrite: bool) -> int:
    """Write `0000.png` + `0000.txt` per pair (a training-folder layout) and a `grid.png` of them all."""
    images: list[Image.Image] = []
    for index, (image, caption) in enumerate(pairs):
        stem = f"{index:04d}"
        _save_png(image, output_path(folder, stem, ".png", overwrite=overwrite))
        write_text_atomically(output_path(folder, stem, ".txt", overwrite=overwrite), caption + "\n")
        images.append(image)
    _save_png(_grid(images), output_path(folder, "grid", ".png", overwrite=overwrite))
    return len(images)


def _format_report(report: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(report.values())))
    lines = ["condition    " + " ".join(f"{name:>10}" for name in columns)]
    lines += [f"{condition:<12} " + " ".join(f"{scores[name]:>10.3f}" for name in columns)
              for condition, scores in report.items()]
    return "\n".join(lines)


def _samples(args: argparse.Namespace) -> None:
    if args.concept:
        pairs = concept_examples(args.concept, args.seed, args.n)
    else:
        pairs = pretraining_examples(args.seed, args.n)
    count = write_samples(Path(args.out_dir), pairs, overwrite=args.overwrite)
    logger.info("Wrote %d images with captions and grid.png to %s", count, args.out_dir)


def _train_judge(args: argparse.Namespace) -> None:
    from .judge import robustness_report, train_judge  # torch only for the commands that need it

    target = Path(args.out)
    if target.suffix != ".safetensors":
        raise OutputError(f"The judge file {target} must end in .safetensors.", "Name it e.g. judge.safetensors.")
    output_path(target.parent, target.stem, ".safetensors", overwrite=args.overwrite)
    output_path(target.parent, target.stem, ".json", overwrite=args.overwrite)
    judge = train_judge(args.seed, args.steps)
    report = robustness_report(judge, n=args.eval_n)
    logger.info("Accuracy on %d unseen images:\n%s", args.eval_n, _format_report(report))
    weights, labels = judge.save(target, info={"seed": args.seed, "steps": args.steps, "accuracy": report})
    logger.info("Saved %s and %s", weights, labels)


def _eval_judge(args: argparse.Namespace) -> None:
    from .judge import load_judge, robustness_report

    report = robustness_report(load_judge(Path(args.path) if args.path else None), n=args.eval_n)
    logger.info("Accuracy on %d unseen images:\n%s", args.eval_n, _format_report(report))


def _pretrain(args: argparse.Namespace) -> None:
    from .pretrain import pretrain, write_pretrained

    folder = Path(args.out_dir)
    for suffix in (".safetensors", ".yaml", ".quality.json", ".quality.png"):
        output_path(folder, args.name, suffix, overwrite=args.overwrite)
    settings = PretrainSettings(seed=args.seed, minutes=args.minutes, vae_steps=args.vae_steps,
                                unet_steps=args.unet_steps, pool_size=args.pool_size)
    result = pretrain(settings)
    checkpoint = write_pretrained(result, folder, settings, name=args.name)
    logger.info("Saved %s (%.1f MB) with its .yaml and text-encoder folder", checkpoint, checkpoint.stat().st_size / 1e6)
    if args.eval_samples:
        _evaluate(checkpoint, args.eval_samples)


def _evaluate(checkpoint: Path, per_caption: int) -> None:
    """Judge the model as written to disk (fp16 weights, loaded like any user checkpoint)."""
    import json

    from ..models.loader import load_bundle
    from .quality import quality_grid, reconstruction_accuracy, sample_quality

    bundle = load_bundle(checkpoint)
    reconstruction = reconstruction_accuracy(bundle.vae)
    logger.info("VAE reconstructions (every split, held-out concepts included): %s",
                ", ".join(f"{name} {value:.3f}" for name, value in reconstruction.items()))
    report, images = sample_quality(bundle, per_caption=per_caption)
    logger.info("Samples: %s", report.summary())
    stem = checkpoint.with_suffix("")
    write_text_atomically(Path(f"{stem}.quality.json"), json.dumps(
        {"checkpoint": checkpoint.name, "reconstruction": reconstruction, "samples": report.to_dict()}, indent=1) + "\n")
    _save_png(quality_grid(images, per_caption), Path(f"{stem}.quality.png"))
    logger.info("Wrote %s.quality.json and %s.quality.png", stem, stem)


def _eval_model(args: argparse.Namespace) -> None:
    from .model import shipped_checkpoint

    _evaluate(Path(args.checkpoint) if args.checkpoint else shipped_checkpoint(), args.samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_sdcustom.microworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    samples = commands.add_parser("samples", help="write generated images with captions")
    samples.add_argument("out_dir")
    samples.add_argument("--n", type=int, default=64)
    samples.add_argument("--seed", type=int, default=0)
    samples.add_argument("--concept", choices=sorted(CONCEPTS), help="a held-out concept instead of pretraining data")
    samples.add_argument("--overwrite", action="store_true")
    samples.set_defaults(run=_samples)

    train = commands.add_parser("train-judge", help="train the attribute judge and save it")
    train.add_argument("out", help="weights file, e.g. judge.safetensors (a .json is written beside it)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-n", type=int, default=1000)
    train.add_argument("--overwrite", action="store_true")
    train.set_defaults(run=_train_judge)

    evaluate = commands.add_parser("eval-judge", help="report a saved judge's accuracy")
    evaluate.add_argument("path", nargs="?", help="judge .safetensors (default: the one shipped in the package)")
    evaluate.add_argument("--eval-n", type=int, default=1000)
    evaluate.set_defaults(run=_eval_judge)

    pre = commands.add_parser("pretrain", help="pretrain the micro-world base model on the CPU")
    pre.add_argument("out_dir")
    pre.add_argument("--minutes", type=float, default=PretrainSettings.minutes,
                     help="time budget of a phase run with 0 steps (default %(default)s)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--vae-steps", type=int, default=PretrainSettings.vae_steps,
                     help="VAE steps (default %(default)s; 0 = its share of the time budget)")
    pre.add_argument("--unet-steps", type=int, default=PretrainSettings.unet_steps,
                     help="UNet steps (default %(default)s; 0 = the rest of the time budget)")
    pre.add_argument("--pool-size", type=int, default=40000, help="rendered pictures for the UNet phase")
    pre.add_argument("--name", default="microworld", help="file stem of the checkpoint")
    pre.add_argument("--eval-samples", type=int, default=2,
                     help="samples per caption combination for the final check (0 = skip it)")
    pre.add_argument("--overwrite", action="store_true")
    pre.set_defaults(run=_pretrain)

    model = commands.add_parser("eval-model", help="judge a micro model's samples of every caption combination")
    model.add_argument("checkpoint", nargs="?", help="micro model .safetensors (default: the shipped one)")
    model.add_argument("--samples", type=int, default=2, help="samples per caption combination")
    model.set_defaults(run=_eval_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserFacingError as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
