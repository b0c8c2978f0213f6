"""Keep the best step (`training.select_best_step`): score every intermediate export and the last step, and
export the best-scoring state as the result; the intermediate exports stay in their folder.

The scores come from `training/step_selection.py`. What selection needs to survive a cancel and `--resume`
lives beside the resumable states (`state/best-step/`): the starting point's errors, the scores so far, the
class-prompt latents sampled from the base before the first step, and the trainable tensors of the best
step so far (so the result is that state itself, exported with its own preview and metadata). A fresh run
discards the folder with the other states; the record of the finished run is `step_scores.json` in the run
folder and the "sdcustom best step" entry of the result's `NAME.json` card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..data.buckets import image_to_tensor
from ..events import BestStepKept, FileSaved, StepScored
from ..files import write_atomically, write_text_atomically
from ..methods.base import Method
from ..sampling import generate
from ..training.batches import BatchSource, LatentBatchSource
from ..training.conditioning import Conditioning
from ..training.loop import TrainingLoop
from ..training.state import state_root
from ..training.step_selection import (CLASS_SAMPLES, PROBE_SEED, ProbeErrors, StepScore, StepScorer, best, combine,
                                       instance_batches)
from .context import RunContext

SCORES_FILE = "step_scores.json"
CARD_KEY = "sdcustom best step"


def selection_folder(run_dir: Path) -> Path:
    return state_root(run_dir) / "best-step"


class BestStepSelector:
    """Scores states as the run reaches them and keeps the best one's tensors until the export."""

    def __init__(self, method: Method, context: RunContext, scorer: StepScorer, *, reference: ProbeErrors,
                 scores: list[StepScore], kept_step: int | None) -> None:
        self.method = method
        self.context = context
        self.scorer = scorer
        self.reference = reference
        self.scores = scores
        self.kept_step = kept_step  # the step whose tensors are in `best-step/trainable.safetensors`
        self.folder = selection_folder(context.run_dir)

    @classmethod
    def start(cls, method: Method, context: RunContext, pictures: LatentBatchSource, training: BatchSource,
              loop: TrainingLoop, *, encode: Callable[[list[str]], Conditioning],
              resumed_step: int) -> "BestStepSelector":
        """Before the first step of a fresh run (`resumed_step` 0): sample the class prompt and measure the
        starting point. On resume: read them back, with the scores of the steps already done. The probes'
        captions go through `encode` (the run's text-encoder cache when its conditioning is frozen)."""
        config, bundle = context.config, context.bundle
        folder = selection_folder(context.run_dir)
        latents_file = folder / "class_latents.safetensors"
        if resumed_step == 0:
            class_latents = _class_latents(method, context, pictures)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(latents_file, lambda tmp: save_file({"latents": class_latents.contiguous()}, str(tmp)))
        else:
            class_latents = load_file(str(latents_file))["latents"]
        scorer = StepScorer(bundle, encode,
                            instances=instance_batches(training, pictures, pictures.batches_per_epoch),
                            class_latents=class_latents, class_prompt=config.prior.class_prompt,
                            alphas_cumprod=loop.alphas_cumprod, num_timesteps=loop.num_timesteps,
                            autocast=loop.accelerator.autocast, dtype=bundle.unet.dtype)
        if resumed_step == 0:
            method.set_training(False)
            selector = cls(method, context, scorer, reference=scorer.measure(), scores=[], kept_step=None)
            method.set_training(True)
            selector._save_record()
            return selector
        record = json.loads((folder / "record.json").read_text(encoding="utf-8"))
        kept = record["kept_step"] if record["kept_step"] is not None and record["kept_step"] <= resumed_step else None
        scores = [StepScore.from_dict(item) for item in record["scores"] if item["step"] <= resumed_step]
        for score in scores:
            context.bus.emit(scored_event(score))
        return cls(method, context, scorer, reference=ProbeErrors.from_dict(record["reference"]), scores=scores, kept_step=kept)

    # ----- during the run -----
    def score(self, step: int) -> StepScore:
        """Score the current state as `step` (the weights its export would hold); keep its tensors when it is
        the best so far. The method must be in eval mode (no dropout)."""
        with self.method.as_exported():
            result = combine(step, self.scorer.measure(), self.reference)
        self.scores = [item for item in self.scores if item.step != step] + [result]
        if best(self.scores) is result:
            tensors = {key: value.detach().float().cpu().contiguous() for key, value in self.method.trainable_state().items()}
            write_atomically(self.folder / "trainable.safetensors", lambda tmp: save_file(tensors, str(tmp)))
            self.kept_step = step
        self._save_record()
        self.context.bus.emit(scored_event(result))
        return result

    def score_during_training(self, step: int) -> None:
        """The intermediate-export hook's part: score in eval mode, then back to training."""
        self.method.set_training(False)
        self.score(step)
        self.method.set_training(True)

    # ----- at the end -----
    def finish(self, final_step: int, export_step: Callable[[int], list[Path]]) -> int:
        """Score the last step and load the best state into the method (eval mode); the step to export. When
        an earlier step wins, the last one is exported beside the other steps first (`export_step`), so every
        scored state stays in the run's steps folder."""
        self.score(final_step)
        chosen = best(self.scores).step
        if chosen != final_step:
            for path in export_step(final_step):
                self.context.bus.emit(FileSaved(path, "intermediate"))
            self.method.load_trainable_state(load_file(str(self.folder / "trainable.safetensors")))
        self.context.bus.emit(BestStepKept(chosen, final_step))
        return chosen

    def record(self, outputs: list[Path]) -> None:
        """Write `step_scores.json` in the run folder, and the scores into the result's JSON card among
        `outputs` (the export just wrote it; Textual Inversion writes none)."""
        summary = self.summary()
        write_text_atomically(self.context.run_dir / SCORES_FILE, json.dumps(summary, indent=1) + "\n")
        for card in (path for path in outputs if path.suffix == ".json"):
            data = json.loads(card.read_text(encoding="utf-8"))
            data[CARD_KEY] = summary
            data["description"] = f"{data.get('description', '')} {summary['note']}".strip()
            write_text_atomically(card, json.dumps(data, indent=4, ensure_ascii=False))

    def summary(self) -> dict[str, Any]:
        chosen = best(self.scores)
        last = max(item.step for item in self.scores)
        return {"kept_step": chosen.step, "final_step": last,
                "note": f"Kept step {chosen.step} of {last} (best self-check score {chosen.score:.3f}).",
                "scores": [item.to_dict() for item in sorted(self.scores, key=lambda item: item.step)],
                "reference": self.reference.to_dict()}

    def _save_record(self) -> None:
        record = {"reference": self.reference.to_dict(), "kept_step": self.kept_step,
                  "scores": [item.to_dict() for item in self.scores]}
        write_text_atomically(self.folder / "record.json", json.dumps(record) + "\n")


def scored_event(score: StepScore) -> StepScored:
    return StepScored(score.step, score.fidelity, score.drift, score.leak, score.score)


@torch.no_grad()
def _class_latents(method: Method, context: RunContext, pictures: LatentBatchSource) -> torch.Tensor:
    """`CLASS_SAMPLES` samples of the class prompt from the starting point, as latents."""
    config = context.config
    size = config.data.resolution
    method.set_training(False)
    images = generate(context.bundle, [config.prior.class_prompt] * CLASS_SAMPLES, seed=PROBE_SEED,
                      steps=config.training.sample_steps, guidance=config.prior.class_guidance,
                      width=size, height=size, clip_skip=config.model.clip_skip)
    method.set_training(True)
    pixels = torch.stack([image_to_tensor(image, (size, size), flip=False, crop_rng=None) for image in images])
    return pictures.encode(pixels)
