"""Text-to-image sampling from a ModelBundle, for a run's previews (`PreviewRenderer`) and class images.

We run our own small DDIM loop instead of a diffusers pipeline: pipelines import half of transformers
and fail to import beside the host's transformers 4.30.2, while the scheduler classes work everywhere.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .events import EventBus, FileSaved, SamplesRendered
from .run.family_defaults import model_native_resolution
from .methods.text_conditioning import encode_prompts
from .models.bundle import ModelBundle
from .run.context import RunContext
from .training.conditioning import Conditioning, SizeConditioning, as_conditioning


def _scheduler_for_sampling(bundle: ModelBundle, steps: int, zero_terminal_snr: bool = False) -> Any:
    """diffusers' DDIMScheduler on the training schedule. A model trained with zero terminal SNR starts from pure
    noise, which needs the rescaled schedule and 'trailing' timesteps that include t = T (Lin et al. 2023)."""
    from diffusers import DDIMScheduler

    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                          steps_offset=1, prediction_type=bundle.prediction_type, **extra)
    scheduler.set_timesteps(steps)
    return scheduler


def latents_to_images(bundle: ModelBundle, latents: torch.Tensor, dtype: torch.dtype | None = None) -> list[Image.Image]:
    """Decode with the VAE in its own dtype, or with a copy of it in `dtype` (bf16 for a bf16 run's previews:
    half the decoder's activation memory, which at SDXL's 1024 px is gigabytes, for a copy of a tenth of a
    GiB; bf16 has fp32's exponent range, so the SDXL VAE's fp16 overflow cannot happen; docs/bench/speed.md
    has the figures and the cost in pixel levels). The VAE itself is left as it is: it encodes training data."""
    vae = bundle.vae if dtype in (None, bundle.vae.dtype) else copy.deepcopy(bundle.vae).to(dtype)
    decoded = vae.decode(latents.to(vae.device, vae.dtype) / bundle.vae_scaling_factor).sample
    array = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(item)) for item in array]


@torch.no_grad()
def generate(bundle: ModelBundle, prompts: list[str], *, seed: int, steps: int = 20, guidance: float = 7.0,
             width: int = 512, height: int = 512, negative_prompt: str = "", clip_skip: int = 1,
             progress: Callable[[int, int], None] | None = None,
             encode: Callable[[list[str]], Conditioning | torch.Tensor] | None = None,
             zero_terminal_snr: bool = False, decode_dtype: torch.dtype | None = None) -> list[Image.Image]:
    """One image per prompt; image i uses noise from seed + i, so a batch equals the same prompts one by one.

    `encode` turns prompts into conditioning (default: the bundle's tokenizers and text encoders the host's
    way, with `clip_skip`); a training method passes its own, so previews see what it trains. A plain tensor
    from `encode` is SD1/SD2 context. SDXL is told each image is an uncropped `height` x `width` picture.
    `decode_dtype`: see `latents_to_images`."""
    unet = bundle.unet
    device, dtype = unet.device, unet.dtype
    scheduler = _scheduler_for_sampling(bundle, steps, zero_terminal_snr)
    encode = encode or (lambda texts: encode_prompts(bundle, texts, clip_skip))
    conditioning = as_conditioning(encode(prompts))
    unconditional = as_conditioning(encode([negative_prompt] * len(prompts)))
    unet_kwargs = Conditioning.cat([unconditional, conditioning]).to(device, dtype).unet_kwargs(
        [SizeConditioning.uncropped(height, width)] * (2 * len(prompts)))
    channels, cells = unet.config.in_channels, bundle.pixels_per_latent
    noise = [torch.randn((1, channels, height // cells, width // cells), generator=torch.Generator().manual_seed(seed + i))
             for i in range(len(prompts))]
    latents = torch.cat(noise).to(device, dtype) * scheduler.init_noise_sigma
    for number, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        uncond_out, cond_out = unet(model_input, timestep, **unet_kwargs).sample.chunk(2)
        guided = uncond_out + guidance * (cond_out - uncond_out)
        latents = scheduler.step(guided, timestep, latents).prev_sample
        if progress:
            progress(number + 1, steps)
    return latents_to_images(bundle, latents, decode_dtype)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class PreviewRenderer:
    """Renders preview images with a fixed seed so successive previews are comparable, conditioned by the
    method's own `encode` (e.g. a Textual Inversion word expands to its learned vectors)."""

    def __init__(self, context: RunContext, bus: EventBus, encode: Callable[[list[str]], Conditioning]) -> None:
        self.context = context
        self.bus = bus
        self.encode = encode
        config = context.config
        self.prompt = config.training.sample_prompt or context.trigger_phrase
        self.steps = config.training.sample_steps
        # A bf16 run decodes its previews in bf16 (not an fp16 one: the SDXL VAE overflows there). Class images
        # are decoded by the VAE as it is: they are training data.
        self.decode_dtype = torch.bfloat16 if config.training.mixed_precision == "bf16" else None

    def encode_ahead(self) -> None:
        """Encode the preview's prompt and the empty negative prompt now, one call each as `generate` makes
        them, so a caching `encode` serves every preview while the text encoders are off the device."""
        for texts in ([self.prompt], [""]):  # "": generate's default negative prompt
            self.encode(texts)

    def render(self, step: int) -> Image.Image:
        """One preview, saved as `samples/stepNNNNNNNN.png` in the run folder and announced on the bus."""
        bundle = self.context.bundle  # at most the family's own size: SDXL previews at 512 px look broken
        size = min(self.context.config.data.resolution, model_native_resolution(bundle))
        image = generate(bundle, [self.prompt], seed=self.context.config.training.seed, steps=self.steps,
                         width=size, height=size, encode=self.encode,
                         zero_terminal_snr=self.context.config.training.zero_terminal_snr,
                         decode_dtype=self.decode_dtype)[0]
        folder = self.context.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{step:08d}.png"
        image.save(path)
        self.bus.emit(SamplesRendered(step=step, prompt=self.prompt, images=[image]))
        self.bus.emit(FileSaved(path, "preview"))
        return image
