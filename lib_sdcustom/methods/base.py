"""What a training method is: the loop asks it these questions and nothing else.

A method decides what is trainable (and at which learning rates), how captions become conditioning,
what its resumable state is, and what it exports. The loop owns everything else: noise, targets, loss
weighting, precision, accumulation, checkpoints, events and cancel.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..config import RunConfig
from ..formats.sidecars import sidecar_paths
from ..run.context import RunContext
from ..training.batches import BatchSource
from ..training.conditioning import Conditioning

#: Room for the preview PNG and the JSON card beside a result (a 512 px preview PNG is a few hundred KiB).
SIDECAR_BYTES = 2**20
#: torch dtype of each --save-precision.
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


class Method(abc.ABC):
    name: str = ""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.config = context.config
        self.bundle = context.bundle

    # ----- facts known before the model is loaded (checked early, so mistakes cost seconds) -----
    @classmethod
    def result_suffix(cls, config: RunConfig) -> str:
        """Extension of the exported file; the output path is checked before any model loads."""
        return ".safetensors"

    @classmethod
    def output_files(cls, target: Path) -> list[Path]:
        """Every file an export writes for `target`: the result and the card files the host reads beside it
        (checked before training, so an existing card is not replaced without --overwrite)."""
        return [target, *sidecar_paths(target)]

    @classmethod
    def check_before_load(cls, config: RunConfig) -> None:
        """Refuse, with a `UserFacingError` naming the fix, what the method can tell is wrong before any model
        loads: from the config (names the host would not accept) or the base file's header (widths it lacks).
        Most methods accept any config that validated and any SD1, SD2 or SDXL base."""

    @classmethod
    def default_caption(cls, config: RunConfig) -> str:
        """Caption for images without a caption file: by default the output name, the word users will type."""
        return config.data.default_caption or config.output.name

    @classmethod
    def trigger_phrase(cls, config: RunConfig, captions: Sequence[str] = ()) -> str:
        """What to type to use the result: the preview prompt and a network's activation text. The default
        caption when one is set; else the phrase every caption shares ('sks shape' from 'a sks shape on a red
        background', ...), since the output name is a word those images never trained; else the name.
        DreamBooth captions images with '' but is triggered by its instance prompt."""
        return config.data.default_caption or shared_phrase(captions) or cls.default_caption(config)

    # ----- hooks with sensible defaults -----
    def build_source(self, source: BatchSource) -> BatchSource:
        """Wrap the image batches, e.g. to add class images or turn captions into prompt templates."""
        return source

    def class_cycle_batches(self) -> int:
        """Micro-batches after which the class images `build_source` added have all been drawn once, so that
        their captions repeat from then on (0: none added)."""
        return 0

    def intermediate_path(self, target: Path, step: int) -> Path:
        """Where the intermediate result of `step` goes: a sub-folder named after the result, as
        `NAME-step00000100.safetensors`."""
        return target.parent / f"{target.stem}-steps" / f"{target.stem}-step{step:08d}{target.suffix}"

    def required_disk_bytes(self) -> int:
        """Free space needed in the output folder, checked before training starts: the trained tensors at
        the save precision, plus room for the preview image and card."""
        itemsize = torch.empty((), dtype=SAVE_DTYPES[self.config.output.save_precision]).element_size()
        return sum(tensor.numel() for tensor in self.trainable_state().values()) * itemsize + SIDECAR_BYTES

    @abc.abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its own 'lr'."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything the optimizer changes, for resumable state and export."""

    @abc.abstractmethod
    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `trainable_state` returned (resume)."""

    @abc.abstractmethod
    def encode_captions(self, captions: list[str]) -> Conditioning:
        """Text conditioning for the UNet (context, plus SDXL's pooled vector), with gradients where the
        method trains a text encoder. `text_conditioning.encode_captions` does it the host's way per family."""

    @abc.abstractmethod
    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        """Write the result (and sidecars) to `target`; return the paths written."""

    def frozen_text_conditioning(self) -> bool:
        """True when `encode_captions` gives the same output for a caption all run long (no text-encoder
        weights or token vectors train), so the loop may cache its outputs per caption."""
        return False

    def describe(self) -> str:
        """One line about what is trained, for the start-of-run summary."""
        return self.name

    def late_groups(self) -> dict[str, int]:
        """Param-group name -> the step from which it learns (its lr is 0 before), for groups that join late."""
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (`step` = steps done), e.g. to update an EMA of the weights."""

    def set_training(self, training: bool) -> None:
        """Switch trainable parts between train and eval mode (dropout), e.g. around preview sampling."""

    @contextlib.contextmanager
    def as_exported(self) -> Iterator[None]:
        """Within the block the models hold the weights an export would write, so that previews and best-step
        scores judge the result the user gets (DreamBooth's EMA); for most methods that is the trained state."""
        yield

    def close(self) -> None:
        """Undo any change to the base models (unhook networks) so a host's model is left as it was."""


#: Words that frame a caption's subject rather than name it; trimmed from the ends of the shared phrase.
_FRAME_WORDS = frozenset("a an the of on in at with and photo picture image".split())


def shared_phrase(captions: Sequence[str]) -> str:
    """The longest run of words found in every caption (compared as the tokenizer does, ignoring case and
    commas), without framing words at its ends; '' if there is none."""
    word_lists = [caption.replace(",", " ").split() for caption in captions]
    if not word_lists or not all(word_lists):
        return ""
    first = word_lists[0]
    others = [f" {' '.join(words).lower()} " for words in word_lists[1:]]
    best = (0, 0)
    for start in range(len(first)):
        for end in range(len(first), start + best[1] - best[0], -1):
            if all(f" {' '.join(first[start:end]).lower()} " in text for text in others):
                best = (start, end)
                break
    start, end = best
    while start < end and first[start].lower() in _FRAME_WORDS:
        start += 1
    while end > start and first[end - 1].lower() in _FRAME_WORDS:
        end -= 1
    return " ".join(first[start:end])
