"""UNet module names in a network file, as kohya writes them and the host maps them.

LyCORIS names UNet modules from the diffusers model it is given (`lora_unet_down_blocks_1_attentions_0_...`).
That is kohya's SD1/SD2 layout, and the host converts it to its LDM modules with fixed arithmetic that
assumes SD1's layout: two resnets per level (three LDM blocks) and no attention in the first up block. For
SDXL kohya writes the LDM layout itself (`lora_unet_input_blocks_4_1_...`, `lora_unet_output_blocks_2_2_conv`),
and the host depends on it: its converter would put SDXL's up-samplers at the wrong index and drop them
(docs/host-formats.md#lora-files). The same holds for any other UNet the arithmetic does not fit (a custom small model:
there it would even hit the wrong block). So every UNet but SD1's layout is written with LDM names, which the host
maps directly (its 'lora_unet' -> 'diffusion_model' rule); they are renamed on the way to the file and back
on the way in. Text-encoder names (`lora_te_`, `lora_te1_`, `lora_te2_`) are the same in both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ..models.ldm_keys import unet_module_paths

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

UNET_PREFIX = "lora_unet_"


def uses_ldm_names(unet: UNet2DConditionModel) -> bool:
    """Whether the file names this UNet's modules by their LDM paths (every layout but SD1/SD2's)."""
    config = unet.config
    host_converter_fits = int(config.layers_per_block) == 2 and "CrossAttn" not in config.up_block_types[0]
    return not host_converter_fits


def ldm_unet_names(unet: UNet2DConditionModel) -> dict[str, str]:
    """Trainer (diffusers-path) module name -> LDM-path module name for every UNet Linear/Conv2d."""
    return {UNET_PREFIX + diffusers.replace(".", "_"): UNET_PREFIX + ldm.replace(".", "_")
            for diffusers, ldm in unet_module_paths(unet).items()}


def _rename(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in tensors.items():
        module, dot, part = key.partition(".")
        renamed[names.get(module, module) + dot + part] = value
    return renamed


def to_file_names(tensors: Mapping[str, torch.Tensor], unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The trainer's network tensors under the names the file carries for this UNet."""
    return _rename(tensors, ldm_unet_names(unet)) if uses_ldm_names(unet) else dict(tensors)


def from_file_names(tensors: Mapping[str, torch.Tensor], unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A network file's tensors under the trainer's (LyCORIS on diffusers) names: the inverse of
    `to_file_names`. Names already in the trainer's form pass unchanged (no LDM path is a diffusers path)."""
    if not uses_ldm_names(unet):
        return dict(tensors)
    return _rename(tensors, {file: trainer for trainer, file in ldm_unet_names(unet).items()})
