"""What a training method is: the loop asks it these questions and nothing else.

A method decides what is trainable (and at which learning rates), how captions become conditioning,
what its resumable state is, and what it exports. The loop owns everything else: noise, targets, loss
weighting, precision, accumulation, checkpoints, events and cancel.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch

from ..models.bundle import ModelBundle


class Method(abc.ABC):
    name: str = ""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

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
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text conditioning for the UNet, with gradients where the method trains the text encoder."""

    @abc.abstractmethod
    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        """Write the result (and sidecars) to `target`; return the paths written."""

    def describe(self) -> str:
        """One line about what is trained, for the start-of-run summary."""
        return self.name

    def set_training(self, training: bool) -> None:
        """Switch trainable parts between train and eval mode (dropout), e.g. around preview sampling."""

    def close(self) -> None:
        """Undo any change to the base models (unhook networks) so a host's model is left as it was."""
