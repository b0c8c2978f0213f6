"""The benchmark's two-stage bootstrap: right point estimate, honest width, deterministic."""

import pytest

from lib_sdcustom.bench.intervals import bootstrap_mean


def test_constant_values_give_a_zero_width_interval_at_the_value():
    estimate = bootstrap_mean([[[1.0] * 8, [1.0] * 8], [[0.0] * 4]])
    assert (estimate.mean, estimate.low, estimate.high) == (0.5, 0.5, 0.5)


def test_point_estimate_weights_concepts_then_seeds_equally_whatever_their_sample_counts():
    estimate = bootstrap_mean([[[1, 1, 1, 1], [0, 0]], [[1]]])
    assert estimate.mean == pytest.approx((0.5 + 1.0) / 2)


def test_interval_covers_the_mean_and_narrows_with_more_samples():
    few = bootstrap_mean([[[1, 0] * 8, [1, 0] * 8]])
    many = bootstrap_mean([[[1, 0] * 64, [1, 0] * 64]])
    assert few.low < 0.5 < few.high and many.low < 0.5 < many.high
    assert many.high - many.low < few.high - few.low
    # About +-1.96 * sqrt(0.25 / 256) for 256 fair coin flips.
    assert many.high - many.low == pytest.approx(2 * 1.96 * (0.25 / 256) ** 0.5, rel=0.25)


def test_disagreeing_seeds_widen_the_interval_beyond_the_pooled_samples():
    agreeing = bootstrap_mean([[[1, 0] * 32, [1, 0] * 32]])
    disagreeing = bootstrap_mean([[[1] * 64, [0] * 64]])
    assert agreeing.mean == disagreeing.mean == 0.5
    assert disagreeing.high - disagreeing.low > 4 * (agreeing.high - agreeing.low)


def test_same_seed_same_interval_and_empty_input_is_refused():
    data = [[[1, 0, 1], [0, 0, 1]], [[1, 1, 0]]]
    assert bootstrap_mean(data, seed=3) == bootstrap_mean(data, seed=3)
    with pytest.raises(ValueError):
        bootstrap_mean([[[1], []]])
    with pytest.raises(ValueError):
        bootstrap_mean([])
