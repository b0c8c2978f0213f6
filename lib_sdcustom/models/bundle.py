"""The one in-memory shape of a base model that every method trains against."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelFamily(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


@dataclass(frozen=True)
class BaseIdentity:
    """Where the base came from, in the forms the host and kohya metadata quote it.

    `sha256` is the full-file hash, `shorthash` its first 10 hex (A1111 titles, TI `sd_checkpoint`), and
    `legacy_hash` the old 8-hex `model_hash` (sha256 of 64 KiB at offset 1 MiB, kohya `ss_sd_model_hash`).
    """

    name: str
    path: Path | None = None
    sha256: str | None = None
    legacy_hash: str | None = None

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


@dataclass
class ModelBundle:
    """UNet, VAE, text encoder and tokenizer of one base, plus the facts training and export need.

    `ldm_config` keeps the original LDM YAML (as a dict) when there was one, so exports of non-standard
    models can write it beside their checkpoint. `ldm_extras` keeps the checkpoint's tensors that no
    diffusers module owns (`alphas_cumprod`, EMA copies, `position_ids`, ...) so that a checkpoint written
    back holds the same key set as the one read.
    """

    family: ModelFamily
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler holding the training schedule
    prediction_type: str = "epsilon"  # or "v_prediction"
    clip_skip: int = 1
    identity: BaseIdentity = field(default_factory=lambda: BaseIdentity(name="unknown"))
    ldm_config: dict | None = None
    ldm_extras: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)
