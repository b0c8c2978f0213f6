"""Hypernetwork: small MLPs on the k/v input of the UNet's attentions learn; the UNet, VAE and text encoder(s)
stay frozen and bit-identical (hooks only, removed by `close`). Exported as the host's own `.pt`, used with
`<hypernet:NAME:1>`. How the modules are laid out and applied: `networks/hypernetwork.py`.

Which widths: the ones asked for, else the model's text-context width (cross-attention only: a fifth of the
parameters of the host's own default widths on SD1.5). Every width must be one the model's attentions have;
that is checked from the checkpoint's header before the model loads (`check_before_load`), and again on the loaded
model (a pickled checkpoint has no header to read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..formats.embedding_file import embedding_preview_path, write_embedding_preview
from ..formats.hypernetwork_file import SUFFIX, write_hypernetwork
from ..models.checkpoint_io import is_diffusers_folder
from ..networks.hypernetwork import Hypernetwork, HypernetworkShape, attention_widths
from ..run.context import RunContext
from ..training.conditioning import Conditioning
from .base import SAVE_DTYPES, Method
from .text_conditioning import encode_captions


def shape_from_config(config: RunConfig) -> HypernetworkShape:
    options = config.hypernetwork
    return HypernetworkShape(layer_structure=options.layer_sizes, activation_func=options.activation_func,
                             layer_norm=options.layer_norm, dropout_structure=options.dropouts,
                             activate_output=options.activate_output, weight_init=options.weight_initialization)


def check_widths(wanted: tuple[int, ...], available: set[int], model: str) -> None:
    """Refuse widths the model's attentions do not have: the host would skip them, so they would train nothing."""
    missing = sorted(set(wanted) - available)
    if missing:
        raise ConfigError(f"--hypernetwork-widths names {missing}, but the attentions of {model} have the widths "
                          f"{sorted(available)}.", f"Use widths from {sorted(available)}, or leave "
                          "--hypernetwork-widths empty for the model's text context.")


def header_attention_widths(base: Path) -> set[int] | None:
    """The UNet attentions' k/v input widths from a `.safetensors` header (an LDM checkpoint, or a diffusers
    folder's UNet file), without loading a tensor; None where no header tells (a pickled `.ckpt`)."""
    from ..formats.safetensors_io import read_header

    if is_diffusers_folder(base):
        files, prefix = sorted((base / "unet").glob("*.safetensors")), ""
    else:
        files, prefix = ([base] if base.suffix.lower() == ".safetensors" and base.is_file() else []), "model.diffusion_model."
    widths = {info.shape[1] for path in files for key, info in read_header(path).tensors.items()
              if key.startswith(prefix) and key.endswith(".to_k.weight") and len(info.shape) == 2}
    return widths or None


class HypernetworkMethod(Method):
    name = "hypernetwork"

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        bundle, config = context.bundle, context.config
        for model in (bundle.unet, *bundle.text_encoders, bundle.vae):
            model.requires_grad_(False)
        available = attention_widths(bundle.unet)
        widths = config.hypernetwork.width_list or (int(bundle.unet.config.cross_attention_dim),)
        check_widths(widths, available, bundle.identity.name)
        device = next(bundle.unet.parameters()).device
        self.network = Hypernetwork(widths, shape_from_config(config))
        # Seeded from the run, as a network's initial weights are (`NetworkMethod`).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            self.network.initialise()
        self.network.to(device)
        self.hooked = self.network.attach(bundle.unet)

    # ----- facts known before the model is loaded -----
    @classmethod
    def result_suffix(cls, config: RunConfig) -> str:
        return SUFFIX

    @classmethod
    def output_files(cls, target: Path) -> list[Path]:
        return [target, embedding_preview_path(target)]

    @classmethod
    def check_before_load(cls, config: RunConfig) -> None:
        widths = config.hypernetwork.width_list
        available = header_attention_widths(Path(config.model.base)) if widths else None
        if available is not None:
            check_widths(widths, available, Path(config.model.base).name)

    # ----- training -----
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.network.parameters()), "lr": self.config.unet_lr, "name": "unet"}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.network.flat_state()

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.network.load_flat_state(tensors)
        except (RuntimeError, ValueError, KeyError) as error:
            raise ConfigError(f"The saved state does not fit this run's hypernetwork ({error}).",
                              "Resume with the run's own settings and base model (--resume RUN_DIR alone).") from error

    def encode_captions(self, captions: list[str]) -> Conditioning:
        return encode_captions(self.bundle, captions, self.config.model.clip_skip, trainable=False)

    def frozen_text_conditioning(self) -> bool:
        return True

    def set_training(self, training: bool) -> None:
        self.network.train(training)

    # ----- results -----
    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        dtype = SAVE_DTYPES[self.config.output.save_precision]
        written = [write_hypernetwork(target, self.network, step=step, base=self.bundle.identity, dtype=dtype)]
        if preview is not None:  # NAME.preview.png: a name the host's cards look for beside any model file
            written.append(write_embedding_preview(target, preview))
        return written

    def describe(self) -> str:
        shape = self.network.shape
        params = sum(parameter.numel() for parameter in self.network.parameters())
        structure = ", ".join(f"{size:g}" for size in shape.layer_structure)
        return (f"hypernetwork, layers {structure}, activation {shape.activation_func}, widths "
                f"{', '.join(map(str, self.network.widths))}: {self.hooked} UNet modules (attentions), {params:,} trainable "
                "parameters; UNet, VAE and text encoders frozen")

    def close(self) -> None:
        self.network.detach()
