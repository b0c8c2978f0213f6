"""A human-readable report on a LoRA/LyCORIS network, an embedding or a checkpoint file.

It answers what a user asks before typing a prompt: what kind of file this is, which model family it is
for (and which family the host will file its card under), its rank/alpha/vector count, and whether the
hash the host trusts matches the data. `.safetensors` files are read from their header (plus the alpha
scalars), so inspecting a large checkpoint costs no tensor loading; pickled files are read with
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ModelLoadError
from ..hashing import addnet_hash_file
from ..models.checkpoint_io import read_pickle_weights_only
from . import safetensors_io
from .hypernetwork_file import flat_tensors, is_hypernetwork_dict, shape_of, widths_of
from .network_file import BUNDLE_PREFIX, group_network_keys, host_module_type, module_type_of, prefix_of

_PICKLE_SUFFIXES = {".pt", ".bin", ".ckpt", ".pth"}
_WIDTH_FAMILY = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.", "first_stage_model.")
_PREFIX_TITLES = {"lora_unet": "UNet", "lora_te": "text encoder", "lora_te1": "text encoder 1 (CLIP-L)",
                  "lora_te2": "text encoder 2 (OpenCLIP-G)"}
_SHOWN_NETWORK_METADATA = (
    "ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_network_module",
    "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_clip_skip",
    "ss_num_train_images", "ss_epoch", "ss_steps", "modelspec.architecture", "modelspec.title",
)
_TORCH_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class _Contents:
    """What any container holds, in one shape: tensor shapes/dtypes, metadata, and lazy tensor access."""

    path: Path
    container: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    load: Callable[[list[str]], dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor entries of a pickled dict


def _unreadable(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot inspect {path}: {why}.",
        "inspect reads LoRA/LyCORIS networks, Textual Inversion embeddings and Stable Diffusion checkpoints "
        "(.safetensors, or .pt/.bin/.ckpt holding plain tensors).",
    )


def _read_safetensors(path: Path) -> _Contents:
    header = safetensors_io.read_header(path)
    return _Contents(
        path=path, container="safetensors",
        shapes={k: t.shape for k, t in header.tensors.items()},
        dtypes={k: t.dtype for k, t in header.tensors.items()},
        metadata=header.metadata,
        load=lambda keys: safetensors_io.load_tensors(path, keys),
    )


def _read_pickle(path: Path) -> _Contents:
    data = read_pickle_weights_only(path)
    if not isinstance(data, dict):
        raise _unreadable(path, f"it holds a {type(data).__name__}, not a dict of tensors")
    if is_hypernetwork_dict(data):
        tensors_src = flat_tensors(data)
        extras = {key: value for key, value in data.items() if not isinstance(key, int)}
        extras[_HYPERNETWORK] = data
    elif isinstance(data.get("state_dict"), dict):
        tensors_src, extras = data["state_dict"], {k: v for k, v in data.items() if k != "state_dict"}
    elif isinstance(data.get("string_to_param"), dict):
        tensors_src = {f"string_to_param.{k}": v for k, v in data["string_to_param"].items()}
        extras = {k: v for k, v in data.items() if k not in ("string_to_param", "string_to_token")}
    else:
        tensors_src, extras = data, {}
    tensors = {str(k): v for k, v in tensors_src.items() if isinstance(v, torch.Tensor)}
    extras.update({str(k): v for k, v in tensors_src.items() if not isinstance(v, torch.Tensor)})
    return _Contents(
        path=path, container="pickle (torch.load, weights only)",
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        dtypes={k: _TORCH_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for k, v in tensors.items()},
        extras=extras,
        load=lambda keys: {k: tensors[k] for k in keys},
    )


def _read(path: Path) -> _Contents:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in _PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise _unreadable(path, f"'{suffix or path.name}' is not a model file extension")


def _is_network(keys: list[str]) -> bool:
    return any(k.startswith(BUNDLE_PREFIX) or prefix_of(k.partition(".")[0]) for k in keys)


def _is_checkpoint(keys: list[str]) -> bool:
    return any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys)


#: Token-embedding widths of the text encoders embeddings are made for (SD1 CLIP-L, SD2 OpenCLIP-H).
_EMBEDDING_WIDTHS = (768, 1024)


def _is_embedding(c: _Contents) -> bool:
    """An SDXL clip_l/clip_g pair, an A1111 dict, or one tensor of vectors as wide as a text encoder's tokens
    (any other lone tensor is not called an embedding)."""
    keys = sorted(c.shapes)
    if keys == ["clip_g", "clip_l"] or (len(keys) == 1 and keys[0].startswith("string_to_param.")):
        return True
    return len(keys) == 1 and len(c.shapes[keys[0]]) in (1, 2) and c.shapes[keys[0]][-1] in _EMBEDDING_WIDTHS


#: Diffusion-model blocks of families SD Customize does not train, with or without the LDM prefix.
_UNSUPPORTED_FAMILIES = (("joint_blocks.", "SD3 / SD3.5 (MMDiT)"), ("double_blocks.", "FLUX.1"),
                         ("transformer_blocks.", "a transformer (DiT) model such as PixArt"))
_NOT_SUPPORTED = "not supported: SD Customize trains and exports for SD1, SD2 and SDXL only"


def _unsupported_family(keys: list[str]) -> str | None:
    for block, family in _UNSUPPORTED_FAMILIES:
        if any(k.startswith(block) or k.startswith("model.diffusion_model." + block) for k in keys):
            return family
    return None


# ----------------------------------------------------------------------------------------------- helpers

def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def _counted(counter: Counter[Any], unit: str) -> str:
    return ", ".join(f"{value} ({n} {unit})" for value, n in counter.most_common())


def _dtype_line(c: _Contents) -> str:
    return _counted(Counter(c.dtypes.values()), "tensors")


def _host_card_version(metadata: dict[str, str]) -> str:
    """The host's `NetworkOnDisk.detect_version` (what decides on which models the card is listed)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if metadata.get("ss_v2") == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def _family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "SDXL"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "SD2"
    if version.startswith("sd_v1"):
        return "SD1"
    return None


# ----------------------------------------------------------------------------------------------- networks

def _in_features(module: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    for part in ("lora_down.weight", "hada_w1_b", "hada_w2_b", "a1.weight"):
        shape = shapes.get(f"{module}.{part}")
        if shape is not None and len(shape) >= 2:
            return shape[1]
    return None


def _network_family_from_keys(modules: dict[str, set[str]], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """SDXL by its text-encoder prefixes; else by cross-attention context or CLIP width (768/1024/2048)."""
    prefixes = {prefix_of(m) for m in modules}
    if prefixes & {"lora_te1", "lora_te2"}:
        return "SDXL"
    for suffix in ("attn2_to_k", "attn2_to_v", "self_attn_q_proj", "self_attn_k_proj"):
        for module in modules:
            if module.endswith(suffix):
                width = _in_features(module, shapes)
                if width is not None:
                    return _WIDTH_FAMILY.get(width, f"unknown (width {width})")
    return None


def _module_rank(module: str, kind: str, shapes: dict[str, tuple[int, ...]]) -> int | str | None:
    """The rank; for OFT/BOFT the block size (LyCORIS's meaning of --rank there)."""
    first_dim = {"LoRA": "lora_down.weight", "LoHa": "hada_w1_b", "GLoRA": "a1.weight"}.get(kind)
    if first_dim is not None:
        return shapes[f"{module}.{first_dim}"][0]
    if kind == "OFT" and f"{module}.oft_blocks" in shapes:
        return shapes[f"{module}.oft_blocks"][-1]
    if kind == "LoKr":
        for part in ("lokr_w1_b", "lokr_w2_b"):
            if f"{module}.{part}" in shapes:
                return shapes[f"{module}.{part}"][0]
        return "full"
    return None


def _format_name(kinds: Counter[str], modules: dict[str, set[str]], shapes: dict[str, tuple[int, ...]]) -> str:
    names = []
    dora = " with DoRA (weight-decomposed, dora_scale)" if any("dora_scale" in parts for parts in modules.values()) else ""
    for kind in kinds:
        if kind == "OFT":
            butterfly = any(len(shapes.get(f"{m}.oft_blocks", ())) == 4 for m in modules)
            names.append("BOFT (butterfly orthogonal finetuning)" if butterfly else "OFT (orthogonal finetuning)")
            continue
        if kind != "LoRA":
            names.append({"IA3": "IA3 ((IA)^3 per-channel scales)", "GLoRA": "GLoRA (generalised LoRA)"}.get(kind, kind) + dora)
            continue
        lora = [m for m in modules if "lora_down.weight" in modules[m]]
        conv = any(len(shapes[f"{m}.lora_down.weight"]) == 4 and shapes[f"{m}.lora_down.weight"][2:] != (1, 1)
                   for m in lora)
        cp = any("lora_mid.weight" in modules[m] for m in lora)
        names.append(("LoCon (LoRA on linear and 3x3 conv layers)" if conv else "LoRA (kohya)")
                     + (" with CP/Tucker mid weights" if cp else "") + dora)
    return " + ".join(names)


def _top_tags(metadata: dict[str, str], count: int = 10) -> str | None:
    try:
        per_dir = json.loads(metadata["ss_tag_frequency"])
        totals: Counter[str] = Counter()
        for tags in per_dir.values():
            totals.update({tag: int(n) for tag, n in tags.items()})
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return ", ".join(f"{tag} ({n})" for tag, n in totals.most_common(count)) or None


def _network_report(c: _Contents) -> list[str]:
    modules, bundled = group_network_keys(list(c.shapes))
    kinds: dict[str, str] = {}  # module -> the type the host will build for it
    for module, parts in modules.items():
        module_type = host_module_type(parts)
        if module_type is not None:
            kinds[module] = module_type.name
    kind_counts = Counter(kinds.values())
    alpha_keys = [f"{m}.alpha" for m in modules if f"{m}.alpha" in c.shapes]
    alphas = Counter(round(float(t.float().item()), 6) for t in c.load(alpha_keys).values())
    ranks = Counter(r for m, k in kinds.items() if (r := _module_rank(m, k, c.shapes)) is not None)
    per_prefix = Counter(prefix_of(m) for m in modules)
    family_keys = _network_family_from_keys(modules, c.shapes)
    family_meta = _family_from_metadata(c.metadata)
    card = _host_card_version(c.metadata)
    alias = c.metadata.get("ss_output_name", c.path.stem)

    lines = [
        "Kind: LoRA/LyCORIS network (kohya key format)",
        f"Prompt: <lora:{alias}:1>" + (f"  (file stem '{c.path.stem}' works too)" if alias != c.path.stem else ""),
        f"Format: {_format_name(kind_counts, modules, c.shapes) or 'none'}",
        f"Module types: {_counted(kind_counts, 'modules')}",
        "Modules: " + ", ".join(f"{title} {per_prefix[p]}" for p, title in _PREFIX_TITLES.items() if p in per_prefix)
        + (f", unrecognised prefix {per_prefix[None]}" if None in per_prefix else ""),
        f"Rank: {_counted(ranks, 'modules') or 'n/a'}",
        f"Alpha: {_counted(alphas, 'modules') or 'none'}",
        f"Family from keys: {family_keys or 'undetermined'}; from metadata: {family_meta or 'none'}; "
        f"host lists the card for: {card}",
        f"Dtype: {_dtype_line(c)}",
    ]
    if bundled:
        names = sorted({k[len(BUNDLE_PREFIX):].partition(".")[0] for k in bundled})
        lines.append(f"Bundled embeddings: {', '.join(names)}")
    lines += _network_metadata_lines(c)
    lines += _network_warnings(modules, family_keys, card)
    return lines


def _network_metadata_lines(c: _Contents) -> list[str]:
    lines = [f"Metadata: {len(c.metadata)} keys"]
    lines += [f"  {key}: {c.metadata[key]}" for key in _SHOWN_NETWORK_METADATA if key in c.metadata]
    tags = _top_tags(c.metadata)
    if tags:
        lines.append(f"  top tags: {tags}")
    stored = c.metadata.get("sshs_model_hash")
    if c.container == "safetensors":
        actual = addnet_hash_file(c.path)
        verdict = "no sshs_model_hash" if stored is None else ("matches" if stored == actual else "DOES NOT MATCH")
        lines.append(f"Hash (addnet, host short hash {actual[:12]}): {verdict}")
    return lines


def _network_warnings(modules: dict[str, set[str]], family_keys: str | None, card: str) -> list[str]:
    warnings = []
    refused = [m for m, parts in modules.items() if host_module_type(parts) is None]
    if refused:
        warnings.append(f"{len(refused)} modules match none of the host's module types, e.g. {refused[0]} "
                        f"{sorted(modules[refused[0]])}: the host refuses to load the file.")
    partial = [m for m, parts in modules.items() if m not in refused and module_type_of(parts) is None]
    if partial:
        example = modules[partial[0]]
        warnings.append(f"{len(partial)} modules carry weight parts the host ignores, e.g. {partial[0]} "
                        f"{sorted(example)}" + (" (lokr_t1: the host cannot apply this LoKr correctly)"
                                                if "lokr_t1" in example else "") + ".")
    prefixes = {prefix_of(m) for m in modules}
    if family_keys == "SDXL" and "lora_te" in prefixes:
        warnings.append("lora_te_ keys are ignored on SDXL.")
    if family_keys in ("SD1", "SD2", "SDXL") and card != family_keys:
        warnings.append(f"Keys say {family_keys} but the host will list the card for {card} "
                        "(set ss_base_model_version / ss_v2, or 'sd version' in NAME.json).")
    return [f"Warning: {w}" for w in warnings]


# ----------------------------------------------------------------------------------------------- embeddings

def _embedding_report(c: _Contents) -> list[str]:
    keys = sorted(c.shapes)
    if keys == ["clip_g", "clip_l"]:
        fmt, vectors = "SDXL pair (clip_l + clip_g)", c.shapes["clip_g"][0]
        width = c.shapes["clip_l"][-1] + c.shapes["clip_g"][-1]
        if c.shapes["clip_l"][0] != vectors:
            fmt += f" - WARNING: clip_l has {c.shapes['clip_l'][0]} vectors, clip_g {vectors}"
    else:
        shape = c.shapes[keys[0]]
        fmt = ("A1111 dict (string_to_param)" if keys[0].startswith("string_to_param.")
               else f"single tensor '{keys[0]}'")
        vectors, width = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    lines = [
        "Kind: Textual Inversion embedding",
        f"Trigger word: {c.path.stem}",
        f"Format: {fmt}",
        f"Vectors: {vectors}" + ("  (more than 75 do not fit one prompt chunk)" if vectors > 75 else ""),
        f"Width: {width} -> {_WIDTH_FAMILY.get(width, 'unknown family (the host skips it on SD1/SD2/SDXL)')}",
        f"Dtype: {_dtype_line(c)}",
    ]
    for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if key in c.extras:
            lines.append(f"{key}: {c.extras[key]}")
    if "name" in c.extras and c.extras["name"] != c.path.stem:
        lines.append(f"Warning: stored name {c.extras['name']!r} differs from the file stem; A1111 uses the stem, "
                     "diffusers the stored name.")
    if c.metadata:
        lines.append(f"Metadata: {len(c.metadata)} keys: {', '.join(sorted(c.metadata)[:12])}")
    return lines


# ----------------------------------------------------------------------------------------------- hypernetworks

#: The extras key under which a pickled hypernetwork keeps its whole dict (its widths are int keys).
_HYPERNETWORK = "<hypernetwork>"
_CONTEXT_FAMILY = {768: "SD1", 1024: "SD2", 2048: "SDXL"}


def _hypernetwork_report(c: _Contents) -> list[str]:
    data = c.extras[_HYPERNETWORK]
    shape = shape_of(data)
    widths = widths_of(data)
    families = sorted({_CONTEXT_FAMILY[width] for width in widths if width in _CONTEXT_FAMILY})
    parameters = sum(value.numel() for value in c.load(list(c.shapes)).values())
    lines = [
        "Kind: hypernetwork (the WebUI's .pt layout)",
        f"Prompt: <hypernet:{c.path.stem}:1>",
        f"Widths: {', '.join(map(str, widths))}" + (f" (text context of {', '.join(families)})" if families else ""),
        f"Layer structure: {', '.join(f'{size:g}' for size in shape.layer_structure)}",
        f"Activation: {shape.activation_func}, layer norm: {shape.layer_norm}",
        f"Dropout structure: {', '.join(f'{value:g}' for value in shape.dropout_structure)}",
        f"Parameters: {parameters:,}",
        f"Dtype: {_dtype_line(c)}",
    ]
    for key in ("activate_output", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if key in data:
            lines.append(f"{key}: {data[key]}")
    if "activate_output" not in data:
        lines.append("Warning: no activate_output key; the host then adds an activation after the last layer.")
    if data.get("name", c.path.stem) != c.path.stem:
        lines.append(f"Warning: stored name {data['name']!r} differs from the file stem; the host lists the file by its "
                     "stem but caches it under the stored name.")
    return lines


# ----------------------------------------------------------------------------------------------- checkpoints

def _checkpoint_family(keys: list[str]) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model."):
        return "SDXL (conditioner.embedders.1.model.*)"
    if has("conditioner.embedders.0.model."):
        return "SDXL refiner (conditioner.embedders.0.model.*)"
    if has("cond_stage_model.model."):
        return "SD2 (cond_stage_model.model.*, OpenCLIP)"
    if has("cond_stage_model.transformer."):
        return "SD1 (cond_stage_model.transformer.*, CLIP-L)"
    return "unknown (no text encoder keys; not a family SD Customize supports)"


def _checkpoint_report(c: _Contents) -> list[str]:
    keys = list(c.shapes)
    parts: Counter[str] = Counter()
    for key in keys:
        if key.startswith("model.diffusion_model."):
            parts["UNet"] += 1
        elif key.startswith(("cond_stage_model.", "conditioner.")):
            parts["text encoder"] += 1
        elif key.startswith("first_stage_model."):
            parts["VAE"] += 1
        else:
            parts["other (EMA, schedule buffers, ...)"] += 1
    lines = [
        "Kind: Stable Diffusion checkpoint (LDM single file)",
        f"Family: {_checkpoint_family(keys)}",
        "Parts: " + ", ".join(f"{name} {n} tensors" for name, n in parts.items()),
    ]
    if "VAE" not in parts:
        lines.append("Warning: no VAE (first_stage_model.*) tensors: the host needs a separate VAE for this file.")
    conv_in = c.shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4:
        lines.append(f"UNet input channels: {conv_in[1]}" + ("  (inpainting)" if conv_in[1] == 9 else ""))
    lines += [f"Tensors: {len(keys)}", f"Dtype: {_dtype_line(c)}"]
    if c.metadata:
        lines.append(f"Metadata: {len(c.metadata)} keys: {', '.join(sorted(c.metadata)[:12])}")
    for key in ("epoch", "global_step"):
        if key in c.extras:
            lines.append(f"{key}: {c.extras[key]}")
    return lines


def inspect_file(path: Path) -> str:
    """Describe `path`; raise `ModelLoadError` for anything that is not a network, embedding or checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist or is not a file.", "Check the path.")
    contents = _read(path)
    keys = list(contents.shapes)
    if not keys:
        raise _unreadable(path, "it holds no tensors")
    unsupported = _unsupported_family(keys)
    if unsupported:
        body = ["Kind: diffusion model checkpoint of a family SD Customize does not support",
                f"Family: {unsupported} - {_NOT_SUPPORTED}", f"Tensors: {len(keys)}", f"Dtype: {_dtype_line(contents)}"]
    elif _HYPERNETWORK in contents.extras:
        body = _hypernetwork_report(contents)
    elif _is_network(keys):
        body = _network_report(contents)
    elif _is_checkpoint(keys):
        body = _checkpoint_report(contents)
    elif _is_embedding(contents):
        body = _embedding_report(contents)
    else:
        raise _unreadable(path, f"its {len(keys)} tensors (e.g. {sorted(keys)[0]!r}) match no known layout")
    header = f"File: {path.name} ({_size(path)}, {contents.container})"
    return "\n".join([header, *body])
