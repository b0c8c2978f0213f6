"""95% intervals for benchmark figures that average samples within training seeds within concepts.

Samples drawn from one trained model are not independent of each other the way the samples of two trained
models are: a run that learned the concept badly fails on most of its samples at once. So a figure's
interval comes from a two-stage (hierarchical) percentile bootstrap: within each concept (a stratum, kept
whole because the table averages over a fixed concept set) the training seeds are resampled, and within
each drawn seed its samples. A single-value group (a per-run figure such as training time) contributes
only its seed-to-seed spread. With two seeds the seed stage is coarse, which widens rather than hides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def bootstrap_mean(strata: Sequence[Sequence[Sequence[float]]], *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> Estimate:
    """Mean over strata of the mean over groups of the mean over values, with its bootstrap interval.

    `strata[s][g]` holds the values (e.g. 0/1 verdicts per sample) of group g (a training seed) of stratum
    s (a concept). Deterministic for a given `seed`.
    """
    if not strata or any(not groups or any(len(values) == 0 for values in groups) for groups in strata):
        raise ValueError("Every stratum needs at least one group and every group at least one value.")
    rng = np.random.default_rng(seed)
    point, draws = [], np.zeros(resamples)
    for groups in strata:
        arrays = [np.asarray(values, dtype=np.float64) for values in groups]
        point.append(np.mean([values.mean() for values in arrays]))
        # inner[g][b, slot]: mean of a fresh resample of group g's values for slot `slot` of draw b.
        inner = np.stack([values[rng.integers(0, len(values), (resamples, len(arrays), len(values)))].mean(axis=-1)
                          for values in arrays])
        picked = rng.integers(0, len(arrays), (resamples, len(arrays)))
        slots = np.arange(len(arrays))[None, :]
        draws += inner[picked, np.arange(resamples)[:, None], slots].mean(axis=1)
    draws /= len(strata)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return Estimate(float(np.mean(point)), float(low), float(high))
