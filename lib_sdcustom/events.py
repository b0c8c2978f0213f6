"""Typed events the training loop emits, and the cancel flag it obeys.

The CLI's progress bar, the tab, the API and the logs are all just callbacks over these events, so the
loop never knows who is watching.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunStarted:
    total_steps: int
    description: str  # the step arithmetic and what is trained, for the user to check
    run_dir: Path


@dataclass(frozen=True)
class PhaseProgress:
    """Work before or after the training steps, e.g. generating class images or filling the latent cache."""

    phase: str
    done: int
    total: int


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float


@dataclass(frozen=True)
class FileSaved:
    path: Path
    kind: str  # "result", "intermediate", "state", "preview"


@dataclass(frozen=True)
class SamplesRendered:
    step: int
    prompt: str
    images: list[Any] = field(default_factory=list)  # PIL images


@dataclass(frozen=True)
class StepScored:
    """Best-step selection's self-check of a state (`training/step_selection.py`); higher `score` is better."""

    step: int
    fidelity: float
    drift: float
    leak: float
    score: float


@dataclass(frozen=True)
class BestStepKept:
    """Best-step selection chose `step` (of `final_step` trained) as the result."""

    step: int
    final_step: int


@dataclass(frozen=True)
class Warning_:
    message: str


@dataclass(frozen=True)
class RunFinished:
    step: int
    outputs: tuple[Path, ...]
    stopped_early: bool = False
    reason: str = ""


Event = (RunStarted | PhaseProgress | StepDone | FileSaved | SamplesRendered | StepScored | BestStepKept | Warning_
         | RunFinished)
Callback = Callable[[Event], None]


class EventBus:
    """Fans events out to callbacks; a failing watcher is logged, never allowed to kill training."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self._callbacks = list(callbacks)

    def emit(self, event: Event) -> None:
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:  # a broken progress display must not lose an hour of training
                logger.exception("event callback %r failed on %s", callback, type(event).__name__)

    def warn(self, message: str) -> None:
        """Hand a warning to the callbacks, which show it (CLI line, tab, API status); the log gets it at
        INFO only, so a console that shows both does not print it twice."""
        logger.info(message)
        self.emit(Warning_(message))


class CancelToken:
    """Set from another thread (a Cancel button, SIGINT, the host's Interrupt); read once per step."""

    def __init__(self, probe: Callable[[], bool] | None = None) -> None:
        self._event = threading.Event()
        self._probe = probe  # e.g. lambda: shared.state.interrupted inside the host

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or bool(self._probe and self._probe())
