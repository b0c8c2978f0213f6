"""Caption augmentation: tag shuffle with fixed leading tags, tag dropout and whole-caption dropout.

Why: with a fixed caption the model ties the subject to the exact tag order and to every tag; shuffling
and dropping tags spreads what is learned over the trigger word. The first `keep_tokens` tags (usually
the trigger, e.g. 'sks dog') stay first and are never dropped, so the trigger keeps its place. Caption
dropout (empty prompt) trains the unconditional case used by classifier-free guidance.

All functions are pure: randomness comes only from the `random.Random` passed in, so the same seed gives
the same captions after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import ConfigError

TAG_SEPARATOR = ", "


@dataclass(frozen=True)
class CaptionOptions:
    """`shuffle`: shuffle comma-separated tags after the first `keep_tokens`. `caption_dropout`: chance
    the whole caption becomes ''. `tag_dropout`: chance each unkept tag is removed."""

    shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise ConfigError(f"keep_tokens must be a whole number of 0 or more, got {self.keep_tokens!r}.",
                              "Set keep_tokens to how many leading tags stay in place (e.g. 1).")
        for name in ("caption_dropout", "tag_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability between 0 and 1, got {value!r}.",
                                  f"Set {name} to e.g. 0.05, or 0 to turn it off.")

    @property
    def changes_captions(self) -> bool:
        return self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones removed."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    """Shuffle the tags after the first `keep_tokens`."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return TAG_SEPARATOR.join(kept + rest)


def drop_tags(caption: str, rng: random.Random, probability: float, keep_tokens: int = 0) -> str:
    """Remove each tag after the first `keep_tokens` with the given probability."""
    tags = split_tags(caption)
    kept = tags[:keep_tokens] + [tag for tag in tags[keep_tokens:] if rng.random() >= probability]
    return TAG_SEPARATOR.join(kept)


def drop_caption(caption: str, rng: random.Random, probability: float) -> str:
    """'' with the given probability, else the caption unchanged."""
    return "" if rng.random() < probability else caption


def process_caption(caption: str, rng: random.Random, options: CaptionOptions) -> str:
    """Apply the options in kohya's order: whole-caption dropout, then tag dropout, then shuffle.

    With no option on the caption is returned untouched (a prose caption keeps its commas as written).
    """
    if not options.changes_captions:
        return caption
    caption = drop_caption(caption, rng, options.caption_dropout)
    if caption and options.tag_dropout > 0:
        caption = drop_tags(caption, rng, options.tag_dropout, options.keep_tokens)
    if caption and options.shuffle:
        caption = shuffle_tags(caption, rng, options.keep_tokens)
    return caption


def overlong_captions_warning(captions: Sequence[tuple[str, str]], count_tokens: Callable[[str], int], limit: int,
                              shown: int = 5) -> str | None:
    """One warning naming the images whose caption is longer than the `limit` tokens the text encoder
    reads (the rest is cut off and never learned), or None. `captions` holds (image name, caption)."""
    long = [(name, count) for name, caption in captions if (count := count_tokens(caption)) > limit]
    if not long:
        return None
    names = ", ".join(f"{name} ({count} tokens)" for name, count in long[:shown])
    more = f" and {len(long) - shown} more" if len(long) > shown else ""
    return (f"{len(long)} caption(s) are longer than the {limit} tokens the text encoder reads; the words past "
            f"the limit are cut off and not learned: {names}{more}. Shorten them to keep every word.")
