"""Key names of the original (LDM) single-file checkpoint <-> diffusers / transformers, exact both ways.

The host and every `.safetensors` checkpoint use the LDM layout (`model.diffusion_model.input_blocks.1.1...`),
while training runs on diffusers / transformers modules (`down_blocks.0.attentions.0...`). The two layouts
differ only in module paths (plus one reshape in the VAE), so the whole conversion is a table of module-path
prefix pairs computed from the model's shape: number of levels, res blocks per level, and which levels
attend. Computing it (instead of listing SD1.5's keys) is what lets 2-level test models and, later, SDXL's
3-level UNet use the same code.

Text-encoder keys are kept in their *canonical* form `text_model.*` (the layout of transformers 4.x modules
and of every HF checkpoint; `CLIPTextModelWithProjection` adds a top-level `text_projection.weight`).
transformers 5 dropped the `text_model` wrapper from `CLIPTextModel`, so use `text_encoder_state_dict` /
`text_encoder_load_keys` when talking to a live module.

Where the text encoders sit depends on the family (`TEXT_SLOTS`): SD1 one transformers CLIP under
`cond_stage_model.transformer.`, SD2 one open_clip tower under `cond_stage_model.model.`, SDXL a transformers
CLIP-L under `conditioner.embedders.0.transformer.` and an open_clip bigG under `conditioner.embedders.1.model.`
(open_clip names are translated by `open_clip_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from .bundle import ModelFamily

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_ENCODER_PREFIX = "cond_stage_model.model."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
CANONICAL_TEXT_ROOT = "text_model."
PROJECTION_ROOT = "text_projection."  # CLIPTextModelWithProjection's only module outside `text_model`
POSITION_IDS_KEY = "text_model.embeddings.position_ids"
# Old SD1 checkpoints store the CLIP tower one level up; the host renames these on load, and so do we.
_LEGACY_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")

_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_VAE_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
_VAE_ATTENTION = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
# VAE mid-block attention projections: 1x1 convs in LDM, linears in diffusers.
_VAE_CONV_AS_LINEAR = ("to_q", "to_k", "to_v", "to_out.0")

PrefixPairs = list[tuple[str, str]]  # (ldm module path, diffusers module path)


@dataclass(frozen=True)
class UNetLayout:
    """The shape facts that decide UNet key names: one flag per resolution level, res blocks per level, and
    whether SDXL's size/crop embedding (`label_emb`, diffusers `add_embedding`) is there."""

    attention_levels: tuple[bool, ...]
    layers_per_block: int
    label_emb: bool = False

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "UNetLayout":
        return cls(
            attention_levels=tuple("CrossAttn" in kind for kind in config["down_block_types"]),
            layers_per_block=int(config["layers_per_block"]),
            label_emb=config.get("addition_embed_type") == "text_time",
        )


@dataclass(frozen=True)
class VAELayout:
    levels: int
    layers_per_block: int

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VAELayout":
        return cls(levels=len(config["block_out_channels"]), layers_per_block=int(config["layers_per_block"]))


def _sub_pairs(ldm: str, diffusers: str, table: Iterable[tuple[str, str]]) -> PrefixPairs:
    return [(f"{ldm}.{a}", f"{diffusers}.{b}") for a, b in table]


def unet_prefix_pairs(layout: UNetLayout) -> PrefixPairs:
    """Module-path pairs for the whole UNet. Transformer blocks share inner names, so they map as a unit."""
    levels = len(layout.attention_levels)
    per_level = layout.layers_per_block + 1  # LDM counts the down/up-sampler as one more block per level
    pairs: PrefixPairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if layout.label_emb:  # sgm's `label_emb = Sequential(Sequential(Linear, SiLU, Linear))`
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    for level in range(levels):
        for j in range(layout.layers_per_block):
            block = 1 + level * per_level + j
            pairs += _sub_pairs(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if layout.attention_levels[level]:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}"))
        if level < levels - 1:
            pairs.append((f"input_blocks.{(level + 1) * per_level}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    pairs += _sub_pairs("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    pairs.append(("middle_block.1", "mid_block.attentions.0"))
    pairs += _sub_pairs("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    for up in range(levels):
        level = levels - 1 - up
        attends = layout.attention_levels[level]
        for j in range(per_level):
            block = up * per_level + j
            pairs += _sub_pairs(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", _UNET_RESNET)
            if attends:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}"))
        if up < levels - 1:
            last = up * per_level + layout.layers_per_block
            pairs.append((f"output_blocks.{last}.{2 if attends else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
    return pairs


def vae_prefix_pairs(layout: VAELayout) -> PrefixPairs:
    pairs: PrefixPairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_out", f"{side}.conv_out"),
                  (f"{side}.norm_out", f"{side}.conv_norm_out")]
        pairs += _sub_pairs(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET)
        pairs += _sub_pairs(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
        pairs += _sub_pairs(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET)
    for level in range(layout.levels):
        for j in range(layout.layers_per_block):
            pairs += _sub_pairs(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                                _VAE_RESNET)
        if level < layout.levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
    for up in range(layout.levels):
        level = layout.levels - 1 - up  # LDM numbers decoder levels by resolution, diffusers by order of use
        for j in range(layout.layers_per_block + 1):
            pairs += _sub_pairs(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET)
        if up < layout.levels - 1:
            pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return pairs


class PrefixMap:
    """A bijection of module-path prefixes, applied to a key by its longest matching whole-component prefix."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._to_diffusers = dict(pairs)
        self._to_ldm = {diffusers: ldm for ldm, diffusers in pairs}
        if len(self._to_diffusers) != len(pairs) or len(self._to_ldm) != len(pairs):
            raise ValueError("prefix table is not one-to-one")

    @staticmethod
    def _lookup(key: str, table: Mapping[str, str]) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                return ".".join([table[head], *parts[cut:]])
        return None

    def to_diffusers(self, ldm_key: str) -> str | None:
        return self._lookup(ldm_key, self._to_diffusers)

    def to_ldm(self, diffusers_key: str) -> str | None:
        return self._lookup(diffusers_key, self._to_ldm)


@dataclass
class Converted:
    """Result of mapping one component's keys: the mapped tensors and the keys no table entry covers."""

    state_dict: dict[str, Any]
    unmapped: list[str]


def _is_vae_conv_as_linear(diffusers_key: str) -> bool:
    module, _, param = diffusers_key.rpartition(".")
    return param == "weight" and ".mid_block.attentions.0." in module and module.endswith(_VAE_CONV_AS_LINEAR)


def _convert(sd: Mapping[str, Any], lookup: Callable[[str], str | None],
             reshape: Callable[[str, str, Any], Any] | None = None) -> Converted:
    out: dict[str, Any] = {}
    unmapped: list[str] = []
    for key, tensor in sd.items():
        target = lookup(key)
        if target is None:
            unmapped.append(key)
        else:
            out[target] = reshape(key, target, tensor) if reshape else tensor
    return Converted(out, unmapped)


def _conv_to_linear(_ldm_key: str, diffusers_key: str, tensor: Any) -> Any:
    if _is_vae_conv_as_linear(diffusers_key) and tensor.dim() == 4:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def _linear_to_conv(diffusers_key: str, _ldm_key: str, tensor: Any) -> Any:
    if _is_vae_conv_as_linear(diffusers_key) and tensor.dim() == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def unet_to_diffusers(ldm_sd: Mapping[str, Any], layout: UNetLayout) -> Converted:
    """`ldm_sd` holds UNet keys without the `model.diffusion_model.` prefix."""
    return _convert(ldm_sd, PrefixMap(unet_prefix_pairs(layout)).to_diffusers)


def unet_to_ldm(diffusers_sd: Mapping[str, Any], layout: UNetLayout) -> Converted:
    return _convert(diffusers_sd, PrefixMap(unet_prefix_pairs(layout)).to_ldm)


def vae_to_diffusers(ldm_sd: Mapping[str, Any], layout: VAELayout) -> Converted:
    """`ldm_sd` holds VAE keys without `first_stage_model.`; mid-attention 1x1 convs become linears."""
    return _convert(ldm_sd, PrefixMap(vae_prefix_pairs(layout)).to_diffusers, _conv_to_linear)


def vae_to_ldm(diffusers_sd: Mapping[str, Any], layout: VAELayout) -> Converted:
    return _convert(diffusers_sd, PrefixMap(vae_prefix_pairs(layout)).to_ldm, _linear_to_conv)


def canonical_text_key(ldm_key: str) -> str:
    """A key without `cond_stage_model.transformer.` -> canonical `text_model.*` (legacy layout renamed)."""
    return CANONICAL_TEXT_ROOT + ldm_key if ldm_key.startswith(_LEGACY_TEXT_PARTS) else ldm_key


def canonical_text_encoder_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A text-encoder state dict from any transformers version -> canonical `text_model.*` keys."""
    return {key if key.startswith((CANONICAL_TEXT_ROOT, PROJECTION_ROOT)) else CANONICAL_TEXT_ROOT + key: value
            for key, value in sd.items()}


def text_encoder_root(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding `embeddings`/`encoder`/`final_layer_norm`: `.text_model` in transformers 4, self in 5."""
    return getattr(text_encoder, "text_model", text_encoder)


def text_encoder_state_dict(text_encoder: torch.nn.Module) -> dict[str, Any]:
    return canonical_text_encoder_keys(text_encoder.state_dict())


def text_encoder_load_keys(text_encoder: torch.nn.Module, canonical_sd: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical keys -> the key layout `text_encoder.load_state_dict` expects in this transformers version."""
    if hasattr(text_encoder, "text_model"):
        return dict(canonical_sd)
    return {key[len(CANONICAL_TEXT_ROOT):] if key.startswith(CANONICAL_TEXT_ROOT) else key: value
            for key, value in canonical_sd.items()}


def _linear_or_conv_names(module: torch.nn.Module) -> list[str]:
    return [name for name, child in module.named_modules()
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d))]


def unet_module_paths(unet: UNet2DConditionModel) -> dict[str, str]:
    """diffusers module path -> LDM module path (under `diffusion_model`) for every UNet Linear/Conv2d."""
    table = PrefixMap(unet_prefix_pairs(UNetLayout.from_diffusers_config(unet.config)))
    out: dict[str, str] = {}
    for name in _linear_or_conv_names(unet):
        target = table.to_ldm(name)
        if target is None:
            raise KeyError(f"UNet module {name!r} has no LDM name")
        out[name] = target
    return out


def text_encoder_module_paths(text_encoder: torch.nn.Module) -> dict[str, str]:
    """Canonical module path (`text_model.…`) -> LDM path under `cond_stage_model` for every Linear.

    The keys are canonical whatever the transformers version; the live module is `text_encoder_root(te)`
    plus the path after `text_model.`.
    """
    root = text_encoder_root(text_encoder)
    return {CANONICAL_TEXT_ROOT + name: "transformer." + CANONICAL_TEXT_ROOT + name
            for name in _linear_or_conv_names(root)}


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder sits in a checkpoint, and whether its keys are open_clip's or transformers'."""

    prefix: str
    open_clip: bool


TEXT_SLOTS: dict[ModelFamily, tuple[TextSlot, ...]] = {
    ModelFamily.SD1: (TextSlot(TEXT_ENCODER_PREFIX, open_clip=False),),
    ModelFamily.SD2: (TextSlot(SD2_TEXT_ENCODER_PREFIX, open_clip=True),),
    ModelFamily.SDXL: (TextSlot(SDXL_TEXT_ENCODER_PREFIX, open_clip=False),
                       TextSlot(SDXL_TEXT_ENCODER_2_PREFIX, open_clip=True)),
}


@dataclass
class LdmParts:
    """A single-file checkpoint split by owner, prefixes removed.

    Text-encoder keys are in their slot's names: canonical transformers keys, or open_clip keys (SD2's
    encoder, SDXL's second) for `open_clip_keys` to translate. `extras` keeps, under their original keys,
    the tensors no module owns (`alphas_cumprod`, `model_ema.*`, `position_ids`, ...). `position_ids` goes
    there too: transformers 4 keeps it as a persistent buffer and 5 does not, so treating it as file data
    keeps both versions' round trips exact.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    extras: dict[str, Any]
    text_encoder_2: dict[str, Any] = field(default_factory=dict)


def split_ldm_state_dict(state: Mapping[str, Any], family: ModelFamily = ModelFamily.SD1) -> LdmParts:
    parts = LdmParts({}, {}, {}, {})
    slots = TEXT_SLOTS[family]
    targets = (parts.text_encoder, parts.text_encoder_2)
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX):]] = value
            continue
        if key.startswith(VAE_PREFIX):
            parts.vae[key[len(VAE_PREFIX):]] = value
            continue
        index = next((i for i, slot in enumerate(slots) if key.startswith(slot.prefix)), None)
        if index is None:
            parts.extras[key] = value
            continue
        inner = key[len(slots[index].prefix):]
        canonical = inner if slots[index].open_clip else canonical_text_key(inner)
        if canonical == POSITION_IDS_KEY:
            parts.extras[key] = value
        else:
            targets[index][canonical] = value
    return parts


def join_ldm_state_dict(unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any],
                        extras: Mapping[str, Any], *, family: ModelFamily = ModelFamily.SD1,
                        text_encoder_2: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inverse of `split_ldm_state_dict`: LDM-named component dicts (text encoders in their slot's names)
    plus extras -> one dict."""
    out: dict[str, Any] = {UNET_PREFIX + key: value for key, value in unet.items()}
    out.update((VAE_PREFIX + key, value) for key, value in vae.items())
    for slot, state in zip(TEXT_SLOTS[family], (text_encoder, text_encoder_2 or {})):
        out.update((slot.prefix + key, value) for key, value in state.items() if key != POSITION_IDS_KEY)
    out.update(extras)
    return out
