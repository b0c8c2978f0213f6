"""The open_clip text tower of SD2 and SDXL checkpoints <-> a transformers CLIP text model, exact both ways.

SD2 stores its OpenCLIP ViT-H text encoder under `cond_stage_model.model.` and SDXL its bigG encoder under
`conditioner.embedders.1.model.`, in open_clip's own names (docs/host-formats.md#checkpoints):
- `transformer.resblocks.N.attn.in_proj_weight` / `in_proj_bias` hold q, k and v stacked in that order
  (`nn.MultiheadAttention`); transformers has separate `q_proj`, `k_proj`, `v_proj`;
- `positional_embedding` is a bare parameter, transformers' is `position_embedding.weight`;
- `text_projection` is used as `pooled @ text_projection` ([width, embed_dim]), so transformers'
  `text_projection.weight` (an `nn.Linear` weight, [embed_dim, width]) is its *transpose*
  (docs/host-formats.md#text-projection-orientation; diffusers' `convert_open_clip_checkpoint` transposes the
  same way).

Not every tensor of the tower belongs to the module the trainer builds (`OpenClipLayout`). SD2 runs only the
first `layers - 1` blocks (its configs say `layer: penultimate`); diffusers' SD2 text encoder likewise has 23
of ViT-H's 24 blocks and no projection (`single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE` lists
`resblocks.23.*` and `text_projection`). No consumer uses `logit_scale`. Those tensors come back as `extras`,
untouched, so that a checkpoint written back has the key set and the bits it was read with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .ldm_keys import CANONICAL_TEXT_ROOT, POSITION_IDS_KEY, Converted, PrefixMap

PROJECTION_KEY = "text_projection"  # open_clip
HF_PROJECTION_KEY = "text_projection.weight"  # transformers CLIPTextModelWithProjection
LOGIT_SCALE_KEY = "logit_scale"

_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_HF_QKV_KEY = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q", "k", "v")  # nn.MultiheadAttention's order inside in_proj
_BLOCK_PARTS = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
_TOP_PARTS = (
    ("token_embedding", "embeddings.token_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final", "final_layer_norm"),
)


@dataclass(frozen=True)
class OpenClipLayout:
    """How a checkpoint's open_clip tower relates to the transformers module built for it.

    `layers` is the tower's block count (keys beyond it are foreign), `used_layers` the blocks the module
    holds (the rest are kept as extras) and `projection` whether the module owns `text_projection`
    (`CLIPTextModelWithProjection`, SDXL's pooled output) or leaves it to the extras (SD2).
    """

    layers: int
    used_layers: int
    projection: bool


@dataclass
class OpenClipSplit:
    """open_clip keys (prefix removed) sorted by owner: the module (canonical transformers keys), the extras
    (open_clip keys, unchanged tensors) and keys no open_clip text tower has."""

    state_dict: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


def _prefix_map(layers: int) -> PrefixMap:
    pairs = [(ldm, CANONICAL_TEXT_ROOT + hf) for ldm, hf in _TOP_PARTS]
    for index in range(layers):
        pairs += [(f"transformer.resblocks.{index}.{ldm}", f"{CANONICAL_TEXT_ROOT}encoder.layers.{index}.{hf}")
                  for ldm, hf in _BLOCK_PARTS]
    return PrefixMap(pairs)


def _hf_layer_count(keys: Iterable[str]) -> int:
    return 1 + max((int(match.group(1)) for match in map(_HF_LAYER_KEY.match, keys) if match), default=-1)


def open_clip_to_transformers(state: Mapping[str, Any], layout: OpenClipLayout, *, views: bool = False) -> OpenClipSplit:
    """Split q/k/v, transpose the projection, rename; blocks and tensors the module does not own -> extras.

    `views=True` gives q/k/v and the projection as views of the given tensors (a host's weights shared, not
    copied); such a module must not be written with safetensors, which refuses tensors sharing memory.
    """
    table = _prefix_map(layout.used_layers)
    out = OpenClipSplit()
    for key, tensor in state.items():
        block = _BLOCK_KEY.match(key)
        if block and int(block.group(1)) >= layout.layers:
            out.unmapped.append(key)
        elif (block and int(block.group(1)) >= layout.used_layers) or key == LOGIT_SCALE_KEY:
            out.extras[key] = tensor
        elif key == PROJECTION_KEY:
            if layout.projection:
                out.state_dict[HF_PROJECTION_KEY] = tensor.t() if views else tensor.t().contiguous()
            else:
                out.extras[key] = tensor
        elif block and block.group(2) in _FUSED:
            prefix = f"{CANONICAL_TEXT_ROOT}encoder.layers.{block.group(1)}.self_attn"
            # Copies, not views: three views of one storage could not be saved (safetensors refuses shared memory).
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                out.state_dict[f"{prefix}.{name}_proj.{_FUSED[block.group(2)]}"] = part if views else part.clone()
        else:
            target = table.to_diffusers(key)
            if target is None:
                out.unmapped.append(key)
            else:
                out.state_dict[target] = tensor
    return out


def transformers_to_open_clip(state: Mapping[str, Any]) -> Converted:
    """The inverse for whatever the module holds: canonical transformers keys (see
    `ldm_keys.canonical_text_encoder_keys`) -> open_clip keys. `position_ids` is derived, not stored."""
    fused: dict[tuple[str, str], dict[str, Any]] = {}
    rest = {key: value for key, value in state.items() if key != POSITION_IDS_KEY}
    table = _prefix_map(_hf_layer_count(rest))
    for key in list(rest):
        match = _HF_QKV_KEY.match(key)
        if match:
            fused.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = rest.pop(key)
    out: dict[str, Any] = {}
    unmapped: list[str] = []
    for (index, kind), parts in fused.items():
        if set(parts) != set(_QKV):
            unmapped += [f"{CANONICAL_TEXT_ROOT}encoder.layers.{index}.self_attn.{name}_proj.{kind}"
                         for name in sorted(parts)]
            continue
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts[name] for name in _QKV], dim=0)
    for key, tensor in rest.items():
        if key == HF_PROJECTION_KEY:
            out[PROJECTION_KEY] = tensor.t().contiguous()
            continue
        target = table.to_ldm(key)
        if target is None:
            unmapped.append(key)
        else:
            out[target] = tensor
    return Converted(out, unmapped)
