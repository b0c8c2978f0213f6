"""The diffusion training objective as small pure functions: noise, targets and loss weights.

Kept free of models and state so each rule can be checked against a hand computation.
"""

from __future__ import annotations

import torch


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus the 'noise offset' term that lets a model learn overall brightness.

    The offset adds one random value per (sample, channel), as in the crosslabs write-up kohya follows.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        per_channel = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * per_channel.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     sampling: str = "uniform") -> torch.Tensor:
    """One training timestep per sample, each uniform over the schedule.

    "stratified" splits the schedule into `batch` equal strata and draws one timestep inside each, handed to
    the samples in random order (jittered stratification, the low-discrepancy sampler of Kingma et al.'s
    Variational Diffusion Models): every sample's timestep is still uniform, but a batch never piles onto a few
    noise levels, so the loss and its gradient vary less from step to step and from seed to seed.
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator, dtype=torch.long)
    strata = torch.randperm(batch, generator=generator).to(torch.float64)
    jitter = torch.rand(batch, generator=generator, dtype=torch.float64)
    return ((strata + jitter) * num_train_timesteps / batch).long().clamp_(max=num_train_timesteps - 1)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    alpha = _gather(alphas_cumprod, timesteps, latents)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet should output: eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = _gather(alphas_cumprod, timesteps, latents)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule shifted and scaled so the last timestep is pure noise (Lin et al. 2023, algorithm 1).

    SD's schedules leave a little signal at t = T, so a model never learns to start from pure noise and
    cannot make very dark or bright pictures. sqrt(alpha_bar) is moved linearly so its last value becomes 0
    and its first stays put; only a v-prediction model can learn there (at SNR 0 epsilon is the input)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = (root - last) * first / (first - last)
    return (rescaled ** 2).to(alphas_cumprod.dtype)


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    alpha = alphas_cumprod[timesteps.cpu()].float()
    return alpha / (1 - alpha)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023).

    For an epsilon target the weight is min(SNR, gamma) / SNR; a v target already carries a factor of
    SNR + 1, so there it is min(SNR, gamma) / (SNR + 1). (Per sample, the epsilon error is SNR times and the
    v error SNR + 1 times the x0 error, so both give min(SNR, gamma) x the x0 error; at zero terminal SNR
    the v weight is 0 where the epsilon one would divide by 0.)
    """
    ratio = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(ratio, max=gamma)
    denominator = ratio + 1 if prediction_type == "v_prediction" else ratio
    return clipped / denominator


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32 whatever the autocast dtype.

    With a `mask` [B, 1, h, w] (masked loss) it is the mask-weighted mean: the error where the mask is 0 does not
    count, and a small subject trains as strongly as one filling the frame. A sample whose crop holds nothing of
    its mask has a loss of 0 (there is nothing of the subject to learn in it)."""
    errors = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, prediction.ndim))
    if mask is None:
        return errors.mean(dim=dims)
    weights = mask.to(errors.device, errors.dtype).expand_as(errors)
    return (errors * weights).sum(dim=dims) / weights.sum(dim=dims).clamp_min(torch.finfo(errors.dtype).tiny)


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.device)).mean()
