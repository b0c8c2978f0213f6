"""Text-encoder outputs kept per caption while the text encoders are frozen.

With frozen encoders a caption always encodes to the same conditioning, yet the loop would run both SDXL
encoders (CLIP-L and the 700M-parameter bigG) every step. Each distinct caption is encoded once, with the
same code path as without the cache, and reused; captions that change every step (shuffled tags, dropout)
simply miss. Only valid when nothing in the encoders trains: the method says so (`Method.frozen_text_conditioning`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .conditioning import Conditioning


class TextEncoderCache:
    """Wraps `encode(captions) -> Conditioning`; returns the same values, encoding each caption once."""

    def __init__(self, encode: Callable[[list[str]], Conditioning]) -> None:
        self.encode = encode
        self.rows: dict[str, Conditioning] = {}
        self.hits = 0
        self.misses = 0

    def __call__(self, captions: list[str]) -> Conditioning:
        missing = list(dict.fromkeys(caption for caption in captions if caption not in self.rows))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if missing:
            with torch.no_grad():
                encoded = self.encode(missing).detach()
            for index, caption in enumerate(missing):
                self.rows[caption] = Conditioning(
                    encoded.context[index:index + 1], None if encoded.pooled is None else encoded.pooled[index:index + 1])
        return Conditioning.cat([self.rows[caption] for caption in captions])
