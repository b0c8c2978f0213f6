"""Attach a LyCORIS network to a diffusers UNet and the CLIP text encoder(s), with kohya module names.

LyCORIS's kohya front end names each module from its path in the model it is given, which yields the
kohya SD1 names (`lora_unet_down_blocks_0_...`, `lora_te_text_model_encoder_...`) for diffusers and
transformers modules. Two wrinkles are handled here:
- its target lists are class attributes shared by every network in the process, so we set them for the
  duration of one construction and put them back;
- transformers 5 dropped the `text_model` level of `CLIPTextModel`, which would drop `text_model_` from
  the text-encoder names, so the encoder is presented through a view that always has it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from ..config import NetworkOptions
from ..errors import ConfigError
from .algorithms import TEXT_ENCODER_BLOCKS, NetworkAlgorithm
from .file_layout import from_host_layout, to_host_layout
from .kohya_names import from_file_names
from .lean_forward import use_lean_forward

if TYPE_CHECKING:
    from lycoris.kohya import LycorisNetworkKohya
    from transformers.models.clip.modeling_clip import CLIPTextTransformer

_PRESET_LOCK = threading.Lock()
_PRESET_FIELDS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                  "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "TARGET_EXCLUDE_NAME")


class TextModelView(nn.Module):
    """Presents a CLIP text encoder so that its module paths start with `text_model.` in every transformers version."""

    text_model: CLIPTextTransformer

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = getattr(text_encoder, "text_model", text_encoder)


def convolution_paths(model: nn.Module) -> list[str]:
    """Module paths of every convolution in `model`: what a `linear_only` algorithm leaves out."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


@contextlib.contextmanager
def kohya_targets(algorithm: NetworkAlgorithm, exclude: Sequence[str] = ()) -> Iterator[type]:
    """LyCORIS's kohya network class with our targets for `algorithm`; `exclude` holds module paths (as
    the model names them) to leave out."""
    from lycoris.kohya import LycorisNetworkKohya

    # LyCORIS logs every module it creates at INFO on stdout, and sets that level when imported.
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    with _PRESET_LOCK:
        saved = {name: getattr(LycorisNetworkKohya, name) for name in _PRESET_FIELDS}
        LycorisNetworkKohya.apply_preset({
            "enable_conv": algorithm.trains_convolutions,
            "unet_target_module": list(algorithm.unet_blocks),
            "unet_target_name": [],
            "text_encoder_target_module": list(TEXT_ENCODER_BLOCKS),
            "text_encoder_target_name": [],
            "module_algo_map": {},
            "name_algo_map": {},
            # LyCORIS matches these with re.match and also compares them whole; anchored, a path names itself only.
            "exclude_name": [re.escape(path) + "$" for path in exclude],
        })
        try:
            yield LycorisNetworkKohya
        finally:
            for name, value in saved.items():
                setattr(LycorisNetworkKohya, name, value)


@dataclass
class AttachedNetwork:
    """A network wired into the models' forward passes; `detach()` restores them exactly."""

    network: LycorisNetworkKohya
    algorithm: NetworkAlgorithm
    unet: nn.Module

    @property
    def unet_modules(self) -> list[nn.Module]:
        return list(self.network.unet_loras)

    @property
    def text_encoder_modules(self) -> list[nn.Module]:
        return list(self.network.text_encoder_loras)

    def param_groups(self, *, unet_lr: float, text_encoder_lr: float, up_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
        """One group per model; with LoRA+ (`up_lr_ratio` != 1) its up matrices come first in a group of their own,
        under the same name, so that a schedule that stops or delays 'text_encoder' moves both, and the last group,
        whose rate the loop reports, runs at the UNet's own rate."""
        groups = []
        for modules, lr, label in ((self.text_encoder_modules, text_encoder_lr, "text_encoder"), (self.unet_modules, unet_lr, "unet")):
            up: list[nn.Parameter] = []
            rest: list[nn.Parameter] = []
            for module in modules:
                for name, param in module.named_parameters():
                    if param.requires_grad:
                        (up if up_lr_ratio != 1 and name.startswith("lora_up.") else rest).append(param)
            groups += [{"params": params, "lr": rate, "name": label}
                       for params, rate in ((up, lr * up_lr_ratio), (rest, lr)) if params]
        return groups

    @property
    def modules_by_name(self) -> dict[str, nn.Module]:
        return {module.lora_name: module for module in self.network.loras}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """kohya-named tensors (weights and `alpha`) in the host's layout (`file_layout`), detached copies on the CPU."""
        tensors = {key: value.detach().cpu().clone() for key, value in self.network.state_dict().items()}
        return to_host_layout(tensors, self.modules_by_name)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors under the trainer's names (resumable state) or a network file's (`kohya_names`)."""
        tensors = from_host_layout(from_file_names(tensors, self.unet), self.modules_by_name)
        self.network.load_state_dict(tensors, strict=True)

    def detach(self) -> None:
        for module in self.network.loras:
            module.restore()


def text_encoder_views(text_encoders: nn.Module | Sequence[nn.Module]) -> TextModelView | list[TextModelView]:
    """What LyCORIS is given for the text encoders: one view (kohya prefix `lora_te_`, SD1/SD2) or a list of
    two (`lora_te1_`, `lora_te2_`: SDXL's CLIP-L and OpenCLIP bigG, as kohya names them)."""
    if isinstance(text_encoders, nn.Module):
        return TextModelView(text_encoders)
    views = [TextModelView(encoder) for encoder in text_encoders]
    return views[0] if len(views) == 1 else views


def attach_network(unet: nn.Module, text_encoder: nn.Module | Sequence[nn.Module], algorithm: NetworkAlgorithm,
                   options: NetworkOptions, *, train_text_encoder: bool, bypass: bool = True) -> AttachedNetwork:
    """Build the LyCORIS modules for `algorithm` and hook them into `unet` (and the text encoders: one
    module, or `bundle.text_encoders`).

    `bypass` (LyCORIS `bypass_mode`, the default) adds the network's output to the layer's: LoRA and LoCon
    run `W x + up(down(x))` and never build a weight update (`lean_forward`). Without it LyCORIS runs each
    layer twice, once with its weight and once with a freshly built full-size update (3-5x slower on
    full-size models); that merged-weight form is kept only as the reference the tests compare against. Bypass is also the
    only form that works on fp8-stored base weights. The weights, names and files are the same either way.
    One difference: the network dropout acts on the network's output in bypass mode, while LyCORIS's
    merged-weight LoRA ignores it. Algorithms whose bypass forward differs from what the host computes
    (`bypass_matches_host`), and DoRA, always train on the merged weight.

    DoRA keeps `dora_scale` per input column (`wd_on_out=False`), the orientation the host reads."""
    conv_rank = (options.conv_rank or options.rank) if algorithm.trains_convolutions else 0
    conv_alpha = options.conv_alpha or options.alpha
    text_view = text_encoder_views(text_encoder)
    exclude = convolution_paths(unet) if algorithm.linear_only else []
    with kohya_targets(algorithm, exclude) as network_class:
        try:
            network = network_class(
                text_view if train_text_encoder else None, unet,
                multiplier=1.0, lora_dim=options.rank, alpha=options.alpha,
                conv_lora_dim=conv_rank, conv_alpha=conv_alpha,
                dropout=options.dropout, network_module=algorithm.lycoris_algo,
                factor=options.lokr_factor, warn_on_unmatched=False,
                weight_decompose=options.dora, wd_on_out=False,
                bypass_mode=bypass and algorithm.bypass_matches_host and not options.dora,
            )
        except ValueError as error:  # BOFT: a layer width with no power-of-two block count at this rank
            if "impossible to decompose" not in str(error):
                raise
            raise ConfigError(f"{algorithm.name.upper()} cannot split a layer of this model at --rank "
                              f"{options.rank}: {error}", "Use an even --rank of 16 or 32.") from error
    network.apply_to(text_view if train_text_encoder else None, unet, train_text_encoder, True)
    # LyCORIS builds its modules on the CPU; on a GPU they would otherwise be copied to it every forward
    # and the optimizer would step on the CPU. They stay fp32 (the frozen base may be bf16 or fp16).
    network.to(device=next(unet.parameters()).device, dtype=torch.float32)
    network.requires_grad_(True)
    use_lean_forward(network.loras)
    return AttachedNetwork(network=network, algorithm=algorithm, unet=unet)
