"""The one in-memory shape of a base model that every method trains against."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy libraries load when a model does, not when this module is imported
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


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
    """UNet, VAE, text encoder(s) and tokenizer(s) of one base, plus the facts training and export need.

    `ldm_config` keeps the original LDM YAML (as a dict) when there was one, so exports of non-standard
    models can write it beside their checkpoint. `ldm_extras` keeps the checkpoint's tensors that no
    diffusers module owns (`alphas_cumprod`, EMA copies, `position_ids`, SD2's unused last text block, ...)
    so that a checkpoint written back holds the same key set as the one read.

    Text encoders per family, and what the host conditions on:
    - SD1: `text_encoder` (CLIP ViT-L) -> last hidden state (or an earlier one, the run's `model.clip_skip`).
    - SD2: `text_encoder` holds the OpenCLIP ViT-H blocks the model runs (all but the last), so its
      `last_hidden_state` (after the final layer norm) is SD2's conditioning; `tokenizer` pads with id 0.
    - SDXL: `text_encoder` (CLIP-L) and `text_encoder_2` (OpenCLIP bigG, `CLIPTextModelWithProjection`);
      the context is both encoders' penultimate hidden states (`hidden_states[-2]`, no final norm)
      concatenated, 768 + 1280 wide, and `text_embeds` of `text_encoder_2` is the pooled vector the UNet
      takes with the size/crop `time_ids`; `tokenizer` pads with the end token, `tokenizer_2` with id 0.
    """

    family: ModelFamily
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # holds the training schedule
    prediction_type: str = "epsilon"  # or "v_prediction"
    identity: BaseIdentity = field(default_factory=lambda: BaseIdentity(name="unknown"))
    ldm_config: dict[str, Any] | None = None
    ldm_extras: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL: OpenCLIP bigG
    tokenizer_2: CLIPTokenizer | None = None  # SDXL: pads with id 0, as open_clip does

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def pixels_per_latent(self) -> int:
        """Image pixels per latent cell along each side: the VAE halves the size in every block but the last (8)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def text_encoders(self) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, ...]:
        """Every text encoder of the base, in checkpoint order (one for SD1/SD2, two for SDXL)."""
        return tuple(encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None)
