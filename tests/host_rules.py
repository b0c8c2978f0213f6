"""For tests only: how A1111 1.10.1 maps a LoRA module name onto one of its own model's modules, and what
it then adds to that module's weight.

A port of `extensions-builtin/Lora/networks.py`: `convert_diffusers_name_to_compvis(key, is_sd2)`, the
lookup order of `load_network` (docs/host-formats.md#lora-files, 'Key parsing', steps 1-4) and its reading of bundled
embeddings (`bundle_emb.NAME.*`). The host drops unmatched
keys silently (debug log only), so tests that assert coverage through these rules are the only warning
that a key we write would be ignored. `host_weight_update` ports the `calc_updown` of the module types we
write (LoRA with `dora_scale`, OFT/BOFT, IA3, GLoRA): the host also skips a layer whose update fails with a
debug log only, so a file whose tensors it cannot combine would load 'cleanly' and change nothing.
"""

from __future__ import annotations

import re
from typing import AbstractSet, Any, Callable, Mapping

import torch

_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_QKV_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _block_suffix(block_kind: str, rest: str) -> str:
    """Attention suffixes pass through; a resnet suffix is renamed only when it is exactly a known leaf."""
    return _RESNET_SUFFIX.get(rest, rest) if block_kind == "resnets" else rest


def _open_clip_layer(rest: str) -> str:
    """HF CLIP layer names inside an open_clip resblock (SD2 TE, SDXL TE2); first replacement that applies."""
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def _numbers(match: re.Match) -> list:
    # The host turns every group that starts with digits into an int.
    return [int(g) if re.match(r"\d+", g) else g for g in match.groups()]


def _rules(is_sd2: bool) -> list[tuple[str, Callable[[list], str]]]:
    def text_encoder(m: list) -> str:
        layer, rest = m
        if is_sd2:
            return f"model_transformer_resblocks_{layer}_{_open_clip_layer(rest)}"
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"

    return [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{2 * m[0] - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + 3 * m[0] + m[2]}_{1 if m[1] == 'attentions' else 0}_"
                   f"{_block_suffix(m[1], m[3])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else 2 * m[1]}_"
                   f"{_block_suffix(m[0], m[2])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{3 * m[0] + m[2]}_{1 if m[1] == 'attentions' else 0}_"
                   f"{_block_suffix(m[1], m[3])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + 3 * m[0]}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + 3 * m[0]}_{2 if m[0] > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", text_encoder),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[0]}_{_open_clip_layer(m[1])}"),
    ]


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """The host's converter: the first rule whose regex matches at the start of `key` wins; else `key`."""
    for pattern, build in _rules(is_sd2):
        match = re.match(pattern, key)
        if match:
            return build(_numbers(match))
    return key


def host_target_for(lora_module_name: str, network_layer_mapping_names: AbstractSet[str],
                    is_sd2: bool | None = None) -> str | None:
    """The `network_layer_mapping` name of the module the host patches for `lora_module_name`, or None.

    `is_sd2` defaults to the host's own test: an SD2 text encoder registers the module name
    'model_transformer_resblocks'. For rule 2 (an MHA text encoder), the returned name is the parent MHA
    module; the host keeps the `..._q_proj` key itself so it knows which slice of `in_proj_weight` to patch.
    """
    names = network_layer_mapping_names
    if is_sd2 is None:
        is_sd2 = "model_transformer_resblocks" in names
    key = convert_diffusers_name_to_compvis(lora_module_name, is_sd2)
    if key in names:  # rule 1
        return key
    qkv = _QKV_PROJ.match(key)
    if qkv and qkv.group(1) in names:  # rule 2
        return qkv.group(1)
    if "lora_unet" in lora_module_name:  # rule 3: LDM-named UNet keys (kohya SDXL)
        key = lora_module_name.replace("lora_unet", "diffusion_model")
        return key if key in names else None
    if "lora_te1_text_model" in lora_module_name:  # rule 4: SDXL TE1, then SD1 fallback
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = lora_module_name.replace("lora_te1_text_model", replacement)
            if key in names:
                return key
    return None


def host_bundled_embeddings(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The host's reading of `bundle_emb.*` keys in a LoRA file (`networks.load_network`): per word name, the dict
    it hands to `create_embedding_from_data`. The key splits at its first dot into 'bundle_emb' and the rest;
    the rest at its next dot into the word's name and the vector part; a vector part starting 'string_to_param.'
    becomes `{'string_to_param': {k: tensor}}`, any other is stored under its own name (`clip_l`, `clip_g`)."""
    words: dict[str, dict[str, Any]] = {}
    for key, weight in tensors.items():
        module, _, part = key.partition(".")
        if module != "bundle_emb":
            continue
        name, vector = part.split(".", 1)
        data = words.setdefault(name, {})
        if vector.split(".")[0] == "string_to_param":
            data["string_to_param"] = {vector.split(".", 1)[1]: weight}
        else:
            data[vector] = weight
    return words


# ----- what the host adds to a layer's weight (extensions-builtin/Lora/network*.py, WebUI 1.10.1) -----

def _host_oft(parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """`network_oft.NetworkModuleOFT.calc_updown` for `oft_blocks` (kohya / LyCORIS diag-OFT 3-D, BOFT 4-D)."""
    blocks = parts["oft_blocks"].float()
    alpha = parts.get("alpha")
    out_dim = weight.shape[0]
    boft = blocks.dim() == 4
    if boft:
        boft_m, num_blocks, block_size = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    else:
        num_blocks = blocks.shape[0]
        block_size = out_dim // num_blocks
    constraint = (0 if alpha is None else float(alpha)) * out_dim
    eye = torch.eye(block_size)
    q = blocks - blocks.transpose(-1, -2)
    if constraint != 0:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    rotation = torch.matmul(eye + q, (eye - q).inverse())
    merged = weight.float()
    if not boft:
        merged = merged.reshape(num_blocks, block_size, *weight.shape[1:])
        merged = torch.einsum("k n m, k n ... -> k m ...", rotation, merged).reshape(weight.shape)
    else:
        half = block_size // 2
        for i in range(boft_m):  # einops' '(c g k) -> (c k g)', '(d b) -> d b' and back, with torch views
            k = 2 ** i * half
            merged = merged.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, block_size))
            merged = torch.einsum("b i j, b j ... -> b i ...", rotation[i], merged)
            merged = merged.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in parts:
        merged = parts["rescale"].reshape(-1, *[1] * (weight.dim() - 1)) * merged
    return merged - weight.float()


def _host_lora(parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """`network_lora` without the CP mid weight: up @ down in the weight's shape."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)


def _host_ia3(parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    scale = parts["weight"].float()
    return weight.float() * (scale if parts["on_input"].item() else scale.reshape(-1, 1))


def _host_glora(parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    a1, a2 = parts["a1.weight"].float(), parts["a2.weight"].float()
    b1, b2 = parts["b1.weight"].float(), parts["b2.weight"].float()
    return b2 @ b1 + (weight.float() @ a2) @ a1


def _host_scale(parts: Mapping[str, torch.Tensor], kind: str) -> float:
    """`NetworkModule.calc_scale`: alpha / dim, where only LoRA sets `dim` (OFT sets its own scale 1; IA3 and
    GLoRA leave `dim` unset, so alpha is ignored for them)."""
    if kind == "LoRA" and "alpha" in parts:
        return float(parts["alpha"]) / parts["lora_down.weight"].shape[0]
    return 1.0


def _host_weight_decompose(updown: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """`NetworkModule.apply_weight_decompose`: the merged weight's norm per input column."""
    merged = updown + weight.float()
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale.float() / norm) - weight.float()


_HOST_UPDATES = {"LoRA": _host_lora, "IA3": _host_ia3, "OFT": _host_oft, "GLoRA": _host_glora}


def host_weight_update(kind: str, parts: Mapping[str, torch.Tensor], weight: torch.Tensor,
                       multiplier: float = 1.0) -> torch.Tensor:
    """What the host adds to `weight` for one module of type `kind` with weight parts `parts`
    (`calc_updown` then `finalize_updown`: scale, DoRA, multiplier). A shape the host's module cannot
    combine with `weight` raises, as it does in the host (where the layer is then skipped)."""
    updown = _HOST_UPDATES[kind](parts, weight)
    if updown.numel() == weight.numel():
        updown = updown.reshape(weight.shape)
    updown = updown * _host_scale(parts, kind)
    if "dora_scale" in parts:
        updown = _host_weight_decompose(updown, weight, parts["dora_scale"])
    return updown * multiplier
