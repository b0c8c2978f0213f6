"""The figures behind decoding previews in bf16 (docs/bench/speed.md, "SDXL memory").

    python docs/bench/vae_bf16.py peak decode|encode SIZE float32|bfloat16|autocast
        peak RSS above the weights of one SDXL-VAE decode (or encode) at SIZE px, random weights from the
        stock config, in a fresh process per figure (run each alone: the peak is the process's)
    python docs/bench/vae_bf16.py quality
        the bundled micro-world VAE (trained) on 64 world images: bf16 decodes against fp32's, in pixel levels
"""
from __future__ import annotations

import copy
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def peak(op: str, size: int, precision: str) -> str:
    from diffusers import AutoencoderKL

    from lib_sdcustom.models.bundle import ModelFamily
    from lib_sdcustom.models.ldm_config import configs_from_ldm
    from lib_sdcustom.models.stock_configs import stock_ldm_config

    autocast = precision == "autocast"
    dtype = torch.float32 if autocast else getattr(torch, precision)
    torch.manual_seed(0)
    configs = configs_from_ldm(copy.deepcopy(stock_ldm_config(ModelFamily.SDXL, "epsilon")), source="stock")
    vae = AutoencoderKL(**configs.vae).to(dtype=dtype).eval()
    x = torch.randn(1, 4, size // 8, size // 8) if op == "decode" else torch.rand(1, 3, size, size) * 2 - 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    started = time.process_time()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = vae.decode(x.to(dtype)).sample if op == "decode" else vae.encode(x.to(dtype)).latent_dist.mode()
    top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (f"{op} {size} px {precision}: peak RSS {top - base:.2f} GiB above the weights, "
            f"{time.process_time() - started:.0f} s CPU, finite={bool(torch.isfinite(out).all())}")


def quality() -> str:
    import lib_sdcustom.microworld as microworld
    from lib_sdcustom.microworld.world import pretraining_examples
    from lib_sdcustom.models.loader import load_bundle

    vae = load_bundle(Path(microworld.__file__).parent / "base" / "microworld.safetensors").vae.float().eval()
    images = [np.asarray(image.convert("RGB"), dtype=np.float32) for image, _ in pretraining_examples(0, 64)]
    pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1

    def levels(decoded: torch.Tensor) -> torch.Tensor:
        return ((decoded.float().clamp(-1, 1) + 1) * 127.5).round()

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        exact = levels(vae.decode(latents).sample)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = levels(vae.decode(latents).sample)
        weights = levels(vae.to(dtype=torch.bfloat16).decode(latents.bfloat16()).sample)
    lines = []
    for name, out in (("fp32 weights under bf16 autocast", autocast), ("bf16 weights", weights)):
        difference = (out - exact).abs()
        psnr = 10 * torch.log10(255**2 / ((out - exact) ** 2).mean())
        lines.append(f"micro-world VAE, {pixels.shape[-1]} px, 64 images, {name} vs fp32: mean |difference| "
                     f"{difference.mean():.2f} levels, max {difference.max():.0f}, "
                     f"{100 * (difference > 2).float().mean():.2f}% of values off by more than 2, PSNR {psnr:.1f} dB")
    return "\n".join(lines)


if __name__ == "__main__":
    print(quality() if sys.argv[1] == "quality" else peak(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
