"""Caption shuffle/dropout: kept leading tags, probabilities honoured, randomness only from the rng given."""

from __future__ import annotations

import random

import pytest

from lib_sdcustom.data.captions import (CaptionOptions, drop_caption, drop_tags, process_caption, shuffle_tags,
                                        split_tags)
from lib_sdcustom.errors import ConfigError

CAPTION = "sks dog, grass, sunny, red collar, running, park"


def test_split_tags_strips_and_drops_empty():
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]


def test_shuffle_keeps_leading_tags_and_the_tag_set():
    orders = set()
    for seed in range(20):
        tags = split_tags(shuffle_tags(CAPTION, random.Random(seed), keep_tokens=2))
        assert tags[:2] == ["sks dog", "grass"]
        assert sorted(tags) == sorted(split_tags(CAPTION))
        orders.add(tuple(tags))
    assert len(orders) > 5


def test_same_rng_seed_same_result():
    options = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.1)
    first = [process_caption(CAPTION, random.Random(seed), options) for seed in range(30)]
    again = [process_caption(CAPTION, random.Random(seed), options) for seed in range(30)]
    assert first == again


def test_tag_dropout_never_drops_kept_tags():
    rng = random.Random(0)
    assert drop_tags(CAPTION, rng, 1.0, keep_tokens=1) == "sks dog"
    assert drop_tags(CAPTION, rng, 0.0) == ", ".join(split_tags(CAPTION))


def test_caption_dropout_rate():
    rng = random.Random(1)
    dropped = sum(drop_caption(CAPTION, rng, 0.25) == "" for _ in range(4000))
    assert 850 < dropped < 1150
    assert drop_caption(CAPTION, rng, 1.0) == "" and drop_caption(CAPTION, rng, 0.0) == CAPTION


def test_no_options_leaves_prose_untouched():
    prose = "a photo of sks dog,  sitting"
    assert process_caption(prose, random.Random(0), CaptionOptions()) == prose


@pytest.mark.parametrize("kwargs", [{"keep_tokens": -1}, {"caption_dropout": 1.5}, {"tag_dropout": -0.1},
                                    {"keep_tokens": 1.5}])
def test_invalid_options(kwargs):
    with pytest.raises(ConfigError):
        CaptionOptions(**kwargs)
