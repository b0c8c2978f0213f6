"""The loss rules checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lib_sdcustom.training import objectives
from lib_sdcustom.training.schedules import lr_factor

ALPHAS = torch.tensor([0.99, 0.75, 0.5, 0.2])


def test_v_target_matches_hand_computation() -> None:
    latents = torch.full((1, 1, 1, 1), 2.0)
    noise = torch.full((1, 1, 1, 1), -1.0)
    t = torch.tensor([1])  # alpha_bar = 0.75
    v = objectives.training_target("v_prediction", latents, noise, t, ALPHAS)
    expected = math.sqrt(0.75) * -1.0 - math.sqrt(0.25) * 2.0
    assert v.item() == pytest.approx(expected)
    assert torch.equal(objectives.training_target("epsilon", latents, noise, t, ALPHAS), noise)


def test_add_noise_is_the_forward_process() -> None:
    latents, noise = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 3.0)
    noisy = objectives.add_noise(latents, noise, torch.tensor([0, 2]), ALPHAS)
    assert noisy[0].item() == pytest.approx(math.sqrt(0.99) + math.sqrt(0.01) * 3)
    assert noisy[1].item() == pytest.approx(math.sqrt(0.5) + math.sqrt(0.5) * 3)


def test_min_snr_weights() -> None:
    t = torch.tensor([0, 2, 3])  # SNR = 99, 1, 0.25
    eps = objectives.min_snr_weights(t, ALPHAS, 5.0, "epsilon")
    assert eps.tolist() == pytest.approx([5 / 99, 1.0, 1.0], rel=1e-5)
    v = objectives.min_snr_weights(t, ALPHAS, 5.0, "v_prediction")
    assert v.tolist() == pytest.approx([5 / 100, 0.5, 0.25 / 1.25], rel=1e-5)


def test_noise_offset_adds_a_per_channel_constant() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    plain = objectives.sample_noise(latents, torch.Generator().manual_seed(0))
    offset = objectives.sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.1)
    difference = offset - plain
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference), atol=1e-6)
    assert difference.abs().max() > 0


def test_stratified_timesteps_put_one_sample_in_each_slice_of_the_schedule() -> None:
    """Each of the batch's equal slices of the schedule gets exactly one timestep, in shuffled order, while a
    sample's timestep stays uniform over the whole schedule (its mean over many batches is the middle)."""
    generator = torch.Generator().manual_seed(0)
    batches = torch.stack([objectives.sample_timesteps(8, 1000, generator, "stratified") for _ in range(2000)])
    assert batches.min() >= 0 and batches.max() <= 999
    assert all(sorted((batch // 125).tolist()) == list(range(8)) for batch in batches)
    assert not all(torch.equal(batch // 125, torch.arange(8)) for batch in batches[:20])
    assert batches[:, 0].float().mean().item() == pytest.approx(499.5, abs=15)
    independent = [objectives.sample_timesteps(8, 1000, generator) for _ in range(20)]
    assert any(sorted((batch // 125).tolist()) != list(range(8)) for batch in independent)
    assert batches.dtype == independent[0].dtype == torch.long


def test_weighted_loss_scales_each_sample() -> None:
    per_sample = torch.tensor([1.0, 3.0])
    assert objectives.weighted_loss(per_sample).item() == 2.0
    assert objectives.weighted_loss(per_sample, torch.tensor([1.0, 0.0])).item() == 0.5


@pytest.mark.parametrize("name,step,expected", [
    ("constant", 50, 1.0), ("linear", 50, 0.5), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
    ("polynomial", 50, 0.5), ("cosine_with_restarts", 25, 0.5),
])
def test_schedules(name: str, step: int, expected: float) -> None:
    assert lr_factor(name, step, 100, restarts=2) == pytest.approx(expected, abs=1e-9)


def test_warmup_ramps_linearly() -> None:
    assert [lr_factor("cosine", s, 100, warmup_steps=4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
