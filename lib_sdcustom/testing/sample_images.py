"""Small generated inputs shared by the benchmarks and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_sample_images(folder: Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Smooth random colour fields with a bright square: enough structure for a loss to fall."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for index in range(count):
        base = rng.rand(4, 4, 3)
        image = np.kron(base, np.ones((size // 4, size // 4, 1)))
        x, y = rng.randint(0, size // 2, size=2)
        image[y:y + size // 3, x:x + size // 3] = [1.0, 0.9, 0.1]
        Image.fromarray((image * 255).astype("uint8")).save(folder / f"img{index}.png")
    return folder
