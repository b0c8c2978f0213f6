"""The reference the speed benchmark compares against: a minimal diffusers + peft LoRA loop.

It is the core of diffusers' LoRA training examples (train_text_to_image_lora.py): frozen base weights in
the compute dtype, LoRA parameters in fp32 (`cast_training_params`), autocast on CUDA, AdamW with
torch's defaults, gradient clipping, and the loss read every step; latents and text conditioning are made
once before the loop. Nothing of this project is used inside the timed loop; the base model is read with
our loader (diffusers cannot read an LDM single file offline), and the captions are encoded with our
conditioning code once before the first step.

The layers wrapped are chosen by the rule the project's algorithms follow (`networks/algorithms.py`):
every Linear and 1x1 convolution of the transformer blocks for LoRA, plus every layer of the ResNet blocks
and samplers for LoCon, so both sides train the same layers (the report prints both counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..networks.algorithms import UNET_ATTENTION_BLOCKS, UNET_CONV_BLOCKS

PEFT_MISSING = ("the reference loop needs peft that imports beside this environment's accelerate and "
                "transformers (pip install -r requirements-bench.txt)")


def peft_available() -> bool:
    """Whether peft imports here: the newest peft needs a newer accelerate than the WebUI's 0.21 pins."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def target_layers(unet: nn.Module, network: str) -> list[str]:
    """Names of the UNet layers a LoRA (or LoCon) of this project wraps."""
    blocks = UNET_ATTENTION_BLOCKS + (UNET_CONV_BLOCKS if network == "locon" else ())
    names = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for name, layer in block.named_modules():
            is_layer = isinstance(layer, nn.Linear) or (
                isinstance(layer, nn.Conv2d) and (network == "locon" or layer.kernel_size == (1, 1)))
            if is_layer:
                names.append(f"{block_name}.{name}")
    return sorted(set(names))


def run_reference(settings: dict[str, Any], base: Path, on_step: Callable[[], None]) -> int:
    """Train `settings['steps']` steps; call `on_step` after each. Returns the number of wrapped layers."""
    from peft import LoraConfig

    from ..methods.text_conditioning import encode_prompts
    from ..models.loader import load_bundle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle = load_bundle(base, dtype=weight_dtype, device=device)
    unet = bundle.unet
    unet.requires_grad_(False)
    layers = target_layers(unet, settings["network"])
    rank = settings["rank"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=layers))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    if settings.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    batch, side = settings["batch_size"], settings["resolution"] // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((batch, 4, side, side), generator=generator).to(device, weight_dtype)
    with torch.no_grad():
        conditioning = encode_prompts(bundle, ["a photo of a bench"] * batch).to(device, weight_dtype)
    extra: dict[str, Any] = {}
    if conditioning.pooled is not None:  # SDXL: pooled text and (original, crop, target) sizes
        size = float(settings["resolution"])
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch, device=device, dtype=weight_dtype)
        extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
    scheduler = bundle.noise_scheduler
    for _ in range(settings["steps"]):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=weight_dtype, enabled=device.type == "cuda"):
            prediction = unet(noisy, timesteps, encoder_hidden_states=conditioning.context, **extra).sample
        loss = nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        on_step()
    return len(layers)

