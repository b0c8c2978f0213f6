"""What one run knows beyond its config: the loaded base, the scanned data and when it started.

Methods and exporters read it instead of receiving a dozen loose arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data.dataset import TrainingSet
from ..events import CancelToken, EventBus
from ..models.bundle import ModelBundle


@dataclass
class RunContext:
    config: RunConfig
    bundle: ModelBundle
    training_set: TrainingSet
    data_folder: Path
    run_dir: Path
    trigger_phrase: str
    num_processes: int = 1
    latents_cached: bool = False
    started_at: float = field(default_factory=time.time)
    bus: EventBus = field(default_factory=EventBus)  # methods warn and report progress through it
    cancel: CancelToken = field(default_factory=CancelToken)
