"""Writing and reading kohya-format LoRA / LyCORIS `.safetensors` files, the way the host loads them.

The host (A1111 `extensions-builtin/Lora`) splits every key at its first `.` into a module name and a
weight part, maps the module name onto its own model, and picks a module type from the set of weight parts.
Keys it cannot map are dropped silently and a part set it does not know makes the whole file fail to load,
so the writer checks the key set before anything reaches the disk: a malformed set is a bug in our
exporter and raises `ValueError`.

`sshs_model_hash` is trusted by the host without checking, so it is computed here from the very bytes
written: the data section of a safetensors file does not depend on its metadata, which makes the hash of a
serialization with only the `ss_*` keys (what kohya hashes) equal to the final file's addnet hash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import write_atomically
from ..hashing import addnet_hash, addnet_legacy_hash
from . import safetensors_io

NETWORK_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
BUNDLE_PREFIX = "bundle_emb."
_MODULE_NAME = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_[A-Za-z0-9_]+$")
_SDXL_DIFFUSERS_UPSAMPLER = re.compile(r"^lora_unet_up_blocks_\d+_upsamplers_")
_ALPHA = "alpha"
_DORA = "dora_scale"


@dataclass(frozen=True)
class ModuleType:
    """One of the host's `networks.module_types`: which weight-part sets it accepts.

    `required` lists alternative part sets (LoKr factors may be full or low-rank); a module matches when it
    holds one of them and nothing outside it, `optional` and `alpha`. `needs_alpha` is set for the types
    whose host scale is alpha/dim; the others (IA3, full, norm) are stored by LyCORIS without one.
    """

    name: str
    required: tuple[frozenset[str], ...]
    optional: frozenset[str]
    needs_alpha: bool

    def matches(self, parts: frozenset[str]) -> bool:
        extra_ok = self.optional | {_ALPHA}
        return any(req <= parts and parts <= req | extra_ok for req in self.required)


def _sets(*alternatives: tuple[str, ...]) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(a) for a in alternatives)


MODULE_TYPES: tuple[ModuleType, ...] = (  # in the host's `networks.module_types` order
    ModuleType("LoRA", _sets(("lora_up.weight", "lora_down.weight")),
               frozenset({"lora_mid.weight", _DORA}), needs_alpha=True),
    ModuleType("LoHa", _sets(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
               frozenset({"hada_t1", "hada_t2", _DORA}), needs_alpha=True),
    ModuleType("IA3", _sets(("weight",)), frozenset({"on_input"}), needs_alpha=False),
    ModuleType("OFT", _sets(("oft_blocks",)), frozenset({"rescale"}), needs_alpha=True),
    ModuleType("LoKr", _sets(("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
                             ("lokr_w1_a", "lokr_w1_b", "lokr_w2"),
                             ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")),
               frozenset({"lokr_t2", _DORA}), needs_alpha=True),
    ModuleType("Full", _sets(("diff",)), frozenset({"diff_b"}), needs_alpha=False),
    ModuleType("Norm", _sets(("w_norm", "b_norm")), frozenset(), needs_alpha=False),
    ModuleType("GLoRA", _sets(("a1.weight", "a2.weight", "b1.weight", "b2.weight")), frozenset(),
               needs_alpha=True),
)


def split_key(key: str) -> tuple[str, str]:
    """The host's split: module name before the first '.', weight part after it."""
    module, _, part = key.partition(".")
    return module, part


def group_network_keys(keys: list[str]) -> tuple[dict[str, set[str]], list[str]]:
    """Weight parts per module name, plus the bundled-embedding keys set apart."""
    modules: dict[str, set[str]] = {}
    bundled: list[str] = []
    for key in keys:
        if key.startswith(BUNDLE_PREFIX):
            bundled.append(key)
            continue
        module, part = split_key(key)
        modules.setdefault(module, set()).add(part)
    return modules, bundled


def module_type_of(parts: set[str] | frozenset[str]) -> ModuleType | None:
    """The single module type `parts` fits, or None when none or several do."""
    found = [t for t in MODULE_TYPES if t.matches(frozenset(parts))]
    return found[0] if len(found) == 1 else None


def host_module_type(parts: set[str] | frozenset[str]) -> ModuleType | None:
    """The host's own choice: the first type whose required parts are present (it ignores extra parts)."""
    return next((t for t in MODULE_TYPES if any(req <= parts for req in t.required)), None)


def prefix_of(module: str) -> str | None:
    match = _MODULE_NAME.match(module)
    return match.group(1) if match else None


def _check_module(module: str, parts: set[str], tensors: dict[str, torch.Tensor]) -> None:
    if prefix_of(module) is None:
        raise ValueError(f"Network key {module!r} does not start with one of {', '.join(NETWORK_PREFIXES)} "
                         "followed by '_<module path>'; the host would ignore it.")
    if "lokr_t1" in parts:
        raise ValueError(f"{module}: 'lokr_t1' (LoKr with a Tucker-decomposed w1) is not supported by the host; "
                         "export LoKr without it.")
    module_type = module_type_of(parts)
    if module_type is None:
        raise ValueError(f"{module}: weight parts {sorted(parts)} match none of the host's module types "
                         f"({', '.join(t.name for t in MODULE_TYPES)}).")
    if module_type.needs_alpha and _ALPHA not in parts:
        raise ValueError(f"{module}: {module_type.name} module has no 'alpha'; the host would scale it by 1.")
    if _ALPHA in parts and tensors[f"{module}.{_ALPHA}"].numel() != 1:
        raise ValueError(f"{module}.alpha must be a scalar, got shape {tuple(tensors[f'{module}.{_ALPHA}'].shape)}.")
    if module_type.name == "LoRA":
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        if up.dim() < 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"{module}: lora_down rank {down.shape[0]} does not match lora_up {tuple(up.shape)}.")
    if _DORA in parts and tensors[f"{module}.{_DORA}"].shape[0] != 1:
        raise ValueError(f"{module}: dora_scale {tuple(tensors[f'{module}.{_DORA}'].shape)} is output-oriented; "
                         "the host needs [1, in] (LyCORIS wd_on_out=False).")


def _check_bundled(keys: list[str]) -> None:
    per_name: dict[str, list[str]] = {}
    for key in keys:
        name, _, rest = key[len(BUNDLE_PREFIX):].partition(".")
        if not name or not rest:
            raise ValueError(f"Bundled embedding key {key!r} is not 'bundle_emb.<name>.<vector>'.")
        per_name.setdefault(name, []).append(rest)
    for name, rests in per_name.items():
        if len(rests) != 1 and sorted(rests) != ["clip_g", "clip_l"]:
            raise ValueError(f"Bundled embedding {name!r} has vectors {sorted(rests)}; the host accepts one "
                             "'string_to_param.<k>', one single vector, or 'clip_l' + 'clip_g'.")


def _check_family(module_names: list[str], metadata: dict[str, str]) -> None:
    """Prefix rules the host enforces only by silently dropping weights."""
    prefixes = {prefix_of(m) for m in module_names}
    if "lora_te" in prefixes and prefixes & {"lora_te1", "lora_te2"}:
        raise ValueError("Network mixes 'lora_te_' (SD1/SD2) with 'lora_te1_'/'lora_te2_' (SDXL) keys.")
    version = metadata.get("ss_base_model_version")
    if version is None:
        if prefixes & {"lora_te1", "lora_te2"}:
            raise ValueError("SDXL network keys without ss_base_model_version: the host would hide its card on SDXL.")
        return
    if version.startswith("sdxl_"):
        if "lora_te" in prefixes:
            raise ValueError("SDXL network uses 'lora_te_' keys, which the host cannot map on SDXL; "
                             "use 'lora_te1_'/'lora_te2_'.")
        wrong = [m for m in module_names if _SDXL_DIFFUSERS_UPSAMPLER.match(m)]
        if wrong:
            raise ValueError(f"SDXL network names upsamplers in diffusers layout ({wrong[0]}); the host maps "
                             "them to the wrong layer. Use the LDM names (lora_unet_output_blocks_N_2_conv).")
    elif prefixes & {"lora_te1", "lora_te2"}:
        raise ValueError(f"{version} network uses SDXL text-encoder prefixes 'lora_te1_'/'lora_te2_'; use 'lora_te_'.")


def validate_network_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Raise `ValueError` unless every key is one the host will load as intended."""
    if not tensors:
        raise ValueError("Network has no tensors.")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"Network value for {key!r} is {type(value).__name__}, not a tensor.")
    for name, text in metadata.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"Metadata {name!r} must map str to str, got {type(text).__name__}.")
    modules, bundled = group_network_keys(list(tensors))
    for module, parts in modules.items():
        _check_module(module, parts, tensors)
    _check_bundled(bundled)
    _check_family(list(modules), metadata)


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A private CPU copy: safetensors refuses tensors that share storage (tied or sliced weights). Bundled
    word vectors stay float32 as in an embedding file (the host loads them as float32; they are a few KiB)."""
    if key.startswith(BUNDLE_PREFIX):
        dtype = torch.float32
    wanted = dtype if tensor.is_floating_point() or key.endswith(f".{_ALPHA}") else tensor.dtype
    return tensor.detach().to("cpu", dtype=wanted, copy=True).contiguous()


def write_network_file(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                       dtype: torch.dtype) -> Path:
    """Validate, cast to `dtype`, add kohya's `sshs_*` hashes and write `target` atomically.

    `target` is final: the caller chose the name and the overwrite policy (`files.output_path`).
    """
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"Network dtype must be float16, float32 or bfloat16, got {dtype}.")
    validate_network_state(tensors, metadata)
    cast = {key: _cast(key, value, dtype) for key, value in tensors.items()}
    hashed = safetensors_io.serialize(cast, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    final_metadata = {
        **{k: v for k, v in metadata.items() if not k.startswith("sshs_")},
        "sshs_model_hash": addnet_hash(hashed),
        "sshs_legacy_hash": addnet_legacy_hash(hashed),
    }
    del hashed
    blob = safetensors_io.serialize(cast, final_metadata)
    return write_atomically(Path(target), lambda tmp: tmp.write_bytes(blob))


def read_network_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a network `.safetensors` file."""
    header = safetensors_io.read_header(Path(path))
    return safetensors_io.load_tensors(Path(path)), header.metadata
