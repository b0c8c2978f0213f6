"""Pretrain the micro-world base model on a CPU: the VAE first, then text encoder and UNet together.

Why this shape of run:
- Pools of seeded renders are drawn once, so the run is a function of the seed, and the VAE encodes each
  UNet picture only once. The text encoder and UNet see only the pretraining split
  (`world.pretraining_scenes`: no heart, no outline, no orange star, never 'sks'). The VAE is a generic
  image codec and trains on every split, as SD's VAE was trained on far more than its UNet's captions
  describe: a concept the VAE cannot reproduce could not be taught by any customization method.
- The VAE spends most of its time on 32x32 crops (a fully convolutional net learns edges and colors there at
  a quarter of the cost) and finishes on whole 64x64 pictures, so its one attention block sees full latents.
- Each UNet example gets a fresh caption drawn from the scene's caption variants with the world's weights
  (about 15% empty captions), so every picture teaches every way of describing it, and the empty caption
  teaches the unconditional model that classifier-free guidance needs.
- Phases stop on a time budget (`minutes`) or on explicit step counts; with step counts the run is
  deterministic for a given thread count. The budget is counted in CPU time per thread (`budget_clock`),
  not wall time: on a machine shared with other work a budget then buys the same amount of training. The learning rate follows a cosine over whichever limit applies.
  The step counts reached are logged and stored in the checkpoint metadata, so a timed run can be repeated.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, cast

import numpy as np
import torch

from ..models.bundle import BaseIdentity, ModelBundle, ModelFamily
from ..models.loader import bundle_from_modules
from ..models.tokenizer import load_clip_tokenizer
from ..models.writer import write_ldm_checkpoint, write_text_encoder_folder
from ..training.ema import ExponentialMovingAverage
from ..training.objectives import add_noise, min_snr_weights, per_sample_mse, sample_timesteps
from .model import BASE_NAME, MICRO_TEXT_CONFIG, micro_configs, micro_ldm_yaml_dict, text_encoder_folder_name
from .world import (CAPTION_WEIGHTS, EVERYTHING, IMAGE_SIZE, Scene, caption_variants, pretraining_scenes, render,
                    sample_scene)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.model_yaml import ModelConfigs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    seed: int = 0
    minutes: float = 42.0  # whole budget: pool, VAE, encoding, UNet (the final check is extra)
    vae_share: float = 0.16  # share of the budget for the VAE (its reconstructions saturate; the UNet gains more)
    # Step counts make the run a function of the seed (for a given thread count) and independent of how
    # busy the machine is; 0 = the phase runs on its time share of `minutes`. Why these values (the VAE sets
    # the colour ceiling, the UNet is optimisation-bound): docs/bench/tuning.md.
    vae_steps: int = 2800
    unet_steps: int = 3300
    pool_size: int = 40000  # UNet pictures (pretraining split); the VAE gets half as many from every split
    vae_batch: int = 32
    vae_crop: int = 32
    vae_full_share: float = 0.2  # last share of the VAE phase on whole pictures instead of crops
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction errors
    unet_batch: int = 128
    unet_lr: float = 6e-3  # the best of 1e-3, 3e-3 and 6e-3 on this budget (docs/bench/tuning.md)
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 100


def budget_clock() -> float:
    """Seconds of 'the whole machine of `torch.get_num_threads()` cores': this process's CPU time over its
    thread count. It runs at wall-clock speed on idle cores and slower when other work shares them."""
    return time.process_time() / max(torch.get_num_threads(), 1)


class _Phase:
    """Progress of a phase in [0, 1]: by steps when a step count is given, otherwise by elapsed time."""

    def __init__(self, name: str, seconds: float, steps: int, warmup: int) -> None:
        self.name, self.seconds, self.steps, self.warmup = name, max(seconds, 1e-3), steps, warmup
        self.started = budget_clock()

    @property
    def elapsed(self) -> float:
        return budget_clock() - self.started

    def progress(self, step: int) -> float:
        return step / self.steps if self.steps > 0 else self.elapsed / self.seconds

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then a cosine to 5% over the phase."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(self.progress(step), 1.0)))


# ----------------------------------------------------------------------------------------------- data

@dataclass
class Pool:
    """Rendered pretraining pictures (uint8, N x 3 x 64 x 64) and their scenes."""

    images: torch.Tensor
    scenes: list[Scene]


def render_pool(scenes: Sequence[Scene]) -> Pool:
    size = len(scenes)
    images = np.empty((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, scene in enumerate(scenes):
        images[index] = np.asarray(render(scene))
    return Pool(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), list(scenes))


def vae_scenes(seed: int, size: int) -> list[Scene]:
    """Scenes from every split (held-out shapes and outlines included), from their own random stream."""
    rng = random.Random(f"vae/{seed}")
    return [sample_scene(rng, allowed=EVERYTHING) for _ in range(size)]


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


class CaptionTable:
    """Token ids of every caption variant of every pool scene, so a step only gathers rows.

    Ids are stored in a compact vocabulary (`vocabulary[i]` is the CLIP id of compact id i): the captions
    use a few dozen of CLIP's 49,408 tokens, and training a table of those rows instead of the whole one
    spares the optimizer and the EMA three million untouched parameters per step.
    """

    def __init__(self, tokenizer: CLIPTokenizer, scenes: Sequence[Scene]) -> None:
        from ..methods.text_conditioning import tokenize

        index: dict[str, int] = {}
        variants = []
        for scene in scenes:
            variants.append([index.setdefault(caption, len(index)) for caption in caption_variants(scene)])
        self.captions = list(index)
        clip_ids = tokenize(tokenizer, self.captions)
        self.vocabulary = torch.unique(clip_ids)
        self.ids = torch.searchsorted(self.vocabulary, clip_ids)
        self.variants = torch.tensor(variants, dtype=torch.long)
        self.weights = torch.tensor(CAPTION_WEIGHTS, dtype=torch.float)

    def sample(self, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Compact token ids of one caption per item, drawn with the world's caption weights."""
        choice = torch.multinomial(self.weights, items.numel(), replacement=True, generator=generator)
        return self.ids[self.variants[items, choice]]


# ----------------------------------------------------------------------------------------------- VAE

def _kl(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    return cast(torch.Tensor, 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).mean())


def train_vae(pool: Pool, settings: PretrainSettings, seconds: float) -> tuple[AutoencoderKL, int]:
    """An AutoencoderKL trained on L1 + L2 reconstruction and a small KL term (crops first, then whole)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    vae = AutoencoderKL(**micro_configs().vae).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    phase = _Phase("vae", seconds, settings.vae_steps, warmup=50)
    step, losses = 0, []
    while phase.progress(step) < 1.0:
        full = phase.progress(step) >= 1.0 - settings.vae_full_share
        batch = settings.vae_batch // 2 if full else settings.vae_batch
        items = torch.randint(0, len(pool.scenes), (batch,), generator=generator)
        images = pool.images[items]
        if not full:
            y, x = (int(v) for v in torch.randint(0, IMAGE_SIZE - settings.vae_crop + 1, (2,), generator=generator))
            images = images[:, :, y:y + settings.vae_crop, x:x + settings.vae_crop]
        target = _to_unit_range(images)
        posterior = vae.encode(target).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        error = decoded - target
        loss = error.abs().mean() + (error ** 2).mean() + settings.kl_weight * _kl(posterior)
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_lr * phase.lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if step % settings.log_every == 0:
            logger.info("vae step %d (%s) loss %.4f (%.0fs)", step, "64x64" if full else f"{settings.vae_crop}px crops",
                        float(np.mean(losses[-settings.log_every:])), phase.elapsed)
    logger.info("vae: %d steps in %.0fs", step, phase.elapsed)
    return vae.eval().to(memory_format=torch.contiguous_format), step


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every pool picture (unscaled latents)."""
    means, stds = [], []
    vae = vae.to(memory_format=torch.channels_last)
    for start in range(0, images.shape[0], batch_size):
        posterior = vae.encode(_to_unit_range(images[start:start + batch_size])).latent_dist
        means.append(posterior.mean.contiguous())
        stds.append(posterior.std.contiguous())
    vae.to(memory_format=torch.contiguous_format)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------------------------- UNet

def _ddpm_scheduler(configs: ModelConfigs) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**configs.scheduler)


def train_unet(mean: torch.Tensor, std: torch.Tensor, captions: CaptionTable, scale_factor: float,
               settings: PretrainSettings, seconds: float) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """Text encoder and UNet trained together on epsilon prediction, with an EMA copy of both."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = micro_configs(scale_factor)
    torch.manual_seed(settings.seed + 1)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    unet = UNet2DConditionModel(**configs.unet).train()
    compact = {**MICRO_TEXT_CONFIG, "vocab_size": int(captions.vocabulary.numel())}
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(compact)).train()
    named = [("unet." + n, p) for n, p in unet.named_parameters()] + \
            [("text." + n, p) for n, p in text_encoder.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=settings.unet_lr, weight_decay=0.0)
    ema = ExponentialMovingAverage(named, settings.ema_decay)
    alphas = _ddpm_scheduler(configs).alphas_cumprod.float()
    phase = _Phase("unet", seconds, settings.unet_steps, warmup=200)
    step, losses = 0, []
    while phase.progress(step) < 1.0:
        items = torch.randint(0, mean.shape[0], (settings.unet_batch,), generator=generator)
        latents = (mean[items] + std[items] * torch.randn(mean[items].shape, generator=generator)) * scale_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(latents.shape[0], alphas.shape[0], generator)
        context = text_encoder(captions.sample(items, generator))[0]
        prediction = unet(add_noise(latents, noise, timesteps, alphas), timesteps, context).sample
        weights = min_snr_weights(timesteps, alphas, settings.min_snr_gamma, "epsilon")
        loss = (per_sample_mse(prediction, noise) * weights).mean()
        for group in optimizer.param_groups:
            group["lr"] = settings.unet_lr * phase.lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        step += 1
        ema.update(step)
        losses.append(loss.item())
        if step % settings.log_every == 0:
            logger.info("unet step %d loss %.4f lr %.1e (%.0fs)", step, float(np.mean(losses[-settings.log_every:])),
                        optimizer.param_groups[0]["lr"], phase.elapsed)
    logger.info("unet: %d steps in %.0fs", step, phase.elapsed)
    with torch.no_grad():
        for name, param in named:
            param.copy_(ema.shadow[name])
    return unet.eval(), _full_vocabulary(text_encoder, captions.vocabulary).eval(), step


def _full_vocabulary(compact: CLIPTextModel, vocabulary: torch.Tensor) -> CLIPTextModel:
    """The text encoder over all of CLIP's tokens: trained rows where captions had them, and the usual random
    initialisation elsewhere (as for any token a model never saw, e.g. 'sks')."""
    from transformers import CLIPTextConfig, CLIPTextModel

    full = CLIPTextModel(CLIPTextConfig.from_dict(dict(MICRO_TEXT_CONFIG)))
    table_name = next(name for name, param in compact.named_parameters() if param is compact.get_input_embeddings().weight)
    table = full.get_input_embeddings().weight.detach().clone()
    table[vocabulary] = compact.get_input_embeddings().weight.detach()
    full.load_state_dict({**compact.state_dict(), table_name: table})
    return full


# ----------------------------------------------------------------------------------------------- run

@dataclass
class PretrainResult:
    bundle: ModelBundle
    vae_steps: int
    unet_steps: int
    scale_factor: float
    seconds: float  # on the budget clock


def pretrain(settings: PretrainSettings) -> PretrainResult:
    """The whole run in memory; `write_pretrained` stores the result."""
    started, wall_started = budget_clock(), time.monotonic()
    budget = settings.minutes * 60.0

    def used() -> float:
        return budget_clock() - started

    vae_pool = render_pool(vae_scenes(settings.seed, max(settings.pool_size // 2, 1)))
    pool = render_pool([scene for scene, _ in pretraining_scenes(settings.seed, settings.pool_size)])
    logger.info("pools: %d + %d pictures rendered (%.0fs)", len(vae_pool.scenes), len(pool.scenes), used())
    vae, vae_steps = train_vae(vae_pool, settings, budget * settings.vae_share - used())
    del vae_pool
    mean, std = encode_pool(vae, pool.images)
    scale_factor = float(1.0 / (mean ** 2 + std ** 2).mean().sqrt())
    vae.register_to_config(scaling_factor=scale_factor)
    logger.info("pool encoded (%.0fs so far); latent scale factor %.4f", used(), scale_factor)
    tokenizer = load_clip_tokenizer()
    captions = CaptionTable(tokenizer, pool.scenes)
    unet, text_encoder, unet_steps = train_unet(mean, std, captions, scale_factor, settings, budget - used())
    logger.info("pretraining took %.1f budget minutes (%.1f wall-clock minutes)", used() / 60,
                (time.monotonic() - wall_started) / 60)
    bundle = bundle_from_modules(ModelFamily.SD1, unet, vae, [text_encoder], [tokenizer],
                                 micro_configs(scale_factor).scheduler, identity=BaseIdentity(name=BASE_NAME))
    return PretrainResult(bundle, vae_steps, unet_steps, scale_factor, used())


def write_pretrained(result: PretrainResult, folder: Path, settings: PretrainSettings, *,
                     name: str = BASE_NAME, info: dict[str, object] | None = None) -> Path:
    """`folder/NAME.safetensors` (fp16, LDM layout), `NAME.yaml` and `NAME_text_encoder/config.json`.

    The text-encoder folder holds no tokenizer files (our loader then uses the bundled CLIP tokenizer, the
    same vocabulary), which keeps the shipped model within its 10 MB; the YAML names the folder relative to
    itself, which our loader resolves.
    """
    folder = Path(folder)
    write_text_encoder_folder(folder / text_encoder_folder_name(name), MICRO_TEXT_CONFIG, tokenizer_files=False)
    ldm = micro_ldm_yaml_dict(text_encoder_folder_name(name), result.scale_factor)
    record = {"settings": asdict(settings), "vae_steps": result.vae_steps, "unet_steps": result.unet_steps,
              "seconds": round(result.seconds), **(info or {})}
    bundle = result.bundle
    return write_ldm_checkpoint(folder / f"{name}.safetensors", ldm, bundle.unet, bundle.vae, bundle.text_encoder,
                                dtype=torch.float16, metadata={"sdcustom_microworld": json.dumps(record)})

