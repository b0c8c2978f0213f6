"""GPU memory of one benchmarked run, phase by phase, so the training steps are told apart from the
one-off work around them.

A run's single peak mixes three things: loading and what comes before the first step (ours encodes the
images for the latent cache with the VAE), the steps, and what comes after the last (ours renders its
final preview, decoded by the VAE, and exports). The reference loop does only the steps. So the peak is
read per phase, resetting torch's peak counter at every step, and beside it what is still allocated at the
last step: the resident tensors (weights, optimizer state, caches) without a step's activations, the
figure `python -m lib_sdcustom.bench resident` counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

GIB = 2**30


class MemoryCounters(Protocol):
    """What `torch.cuda` offers (the tests pass a stand-in)."""

    def max_memory_allocated(self) -> int: ...

    def memory_allocated(self) -> int: ...

    def reset_peak_memory_stats(self) -> None: ...


@dataclass
class PhasePeaks:
    """GiB: the peak to the end of the first step, over the later steps, after the last step; and the
    memory allocated at the last step."""

    to_first_step: float | None = None
    later_steps: float | None = None
    after_last_step: float | None = None
    resident_at_last_step: float | None = None

    @property
    def whole_run(self) -> float | None:
        phases = [value for value in (self.to_first_step, self.later_steps, self.after_last_step) if value is not None]
        return max(phases) if phases else None


class PhaseRecorder:
    """Call `step()` after each training step and `finish()` at the end of the run; `peaks` then holds the
    figures (all None without a GPU)."""

    def __init__(self, counters: MemoryCounters | None) -> None:
        self.counters = counters
        self.peaks = PhasePeaks()

    def step(self) -> None:
        counters = self.counters
        if counters is None:
            return
        peak = counters.max_memory_allocated() / GIB
        if self.peaks.to_first_step is None:
            self.peaks.to_first_step = peak
        else:
            self.peaks.later_steps = max(self.peaks.later_steps or 0.0, peak)
            self.peaks.resident_at_last_step = counters.memory_allocated() / GIB
        counters.reset_peak_memory_stats()

    def finish(self) -> None:
        if self.counters is not None and self.peaks.to_first_step is not None:
            self.peaks.after_last_step = self.counters.max_memory_allocated() / GIB
