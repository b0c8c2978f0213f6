"""Textual Inversion embedding files in the layouts the host reads (docs/host-formats.md#embeddings); the only code that
names their keys.

One text encoder (SD1, SD2; the width is the encoder's: 768 for SD1, 1024 for SD2):
- `.safetensors`: one tensor `emb_params` [n, dim] - the host's 'single tensor' layout, the only non-SDXL
  layout a safetensors file can hold (no nested dicts), and what kohya's trainer writes.
- `.pt`: the host's own dict, as its built-in trainer writes it (`string_to_param {'*': tensor}`, `name`,
  `step`, `sd_checkpoint`, ...). diffusers takes the token from `name`, the host from the file stem, so
  `name` is always the stem.

Two text encoders (SDXL): `clip_l` [n, 768] and `clip_g` [n, 1280] (the CLIP-L and OpenCLIP bigG vectors of
one word, same n), in either container. The host turns *every* value of such a dict into a tensor
(`v.detach()` for each item of `create_embedding_from_data`), so a `.pt` holds these two tensors and nothing
else; a `.safetensors` keeps name and step in its string metadata, which the host does not read as data.
This is also sd-scripts' SDXL layout; diffusers loads each tensor into its own encoder.

A LoRA file may carry a word too (pivotal tuning), as `bundle_emb.NAME.string_to_param.*` (one encoder) or
`bundle_emb.NAME.clip_l` / `bundle_emb.NAME.clip_g` (SDXL): the host's Lora extension gathers those keys per
NAME into the same dicts and registers the word while the LoRA is active, unless an embedding of that name was
loaded from the embeddings folder (then the bundled one is skipped with a warning).

The host loads `.pt` files through a restricted unpickler (`host_pickle.save_for_host` writes what it accepts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import ModelLoadError
from ..files import write_atomically
from ..models.bundle import BaseIdentity
from .host_pickle import save_for_host
from .network_file import BUNDLE_PREFIX

EmbeddingFormat = Literal["safetensors", "pt"]
EmbeddingLayout = Literal["a1111_dict", "sdxl_dual", "single_tensor"]
SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "pt": ".pt"}
TENSOR_KEY = "emb_params"
#: The SDXL layout's keys, in text-encoder order (CLIP-L first, then OpenCLIP bigG).
SDXL_KEYS = ("clip_l", "clip_g")
#: What the host's own writer stores under `string_to_token`; nothing reads it, but tools compare layouts.
A1111_PLACEHOLDER_TOKEN_ID = 265
#: Files of the embeddings folder the host reads as an embedding named by the stem (images carry their name inside).
HOST_EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def write_embedding(target: Path, vectors: torch.Tensor | Sequence[torch.Tensor], *, name: str, step: int,
                    base: BaseIdentity, fmt: EmbeddingFormat) -> Path:
    """Write one word's vectors atomically to `target` in `fmt`; return `target`.

    `vectors` is one [n, dim] tensor per text encoder of the base, in checkpoint order: one (or a bare
    tensor) for SD1/SD2, two for SDXL (written as `clip_l`, `clip_g`). Vectors are stored in float32 whatever
    the run's save precision: the host loads them as float32, a vector is a few KiB, and a rounded copy would
    no longer reproduce what the trainer previewed.
    """
    plain = [_plain_vectors(tensor) for tensor in ((vectors,) if isinstance(vectors, torch.Tensor) else vectors)]
    if len(plain) not in (1, len(SDXL_KEYS)):
        raise ValueError(f"an embedding holds vectors for one or two text encoders, not {len(plain)}")
    if len({tensor.shape[0] for tensor in plain}) != 1:
        raise ValueError(f"every text encoder needs the same number of vectors, got {[t.shape[0] for t in plain]}")
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown embedding format {fmt!r}")
    if len(plain) == 1:
        tensors: dict[str, torch.Tensor] = {TENSOR_KEY: plain[0]}
        pickled: dict[str, Any] = {
            "string_to_token": {"*": A1111_PLACEHOLDER_TOKEN_ID},
            "string_to_param": {"*": plain[0]},
            "name": name,
            "step": int(step),
            "sd_checkpoint": base.shorthash,
            "sd_checkpoint_name": base.name or None,
        }
    else:
        tensors = dict(zip(SDXL_KEYS, plain))
        pickled = dict(tensors)  # tensors only: see the module docstring
    if fmt == "safetensors":
        from safetensors.torch import save_file

        metadata = {"name": name, "step": str(int(step)), "sd_checkpoint": base.shorthash or "",
                    "sd_checkpoint_name": base.name or ""}
        return write_atomically(Path(target), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return write_atomically(Path(target), lambda tmp: save_for_host(pickled, tmp))


def _plain_vectors(vectors: torch.Tensor) -> torch.Tensor:
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"embedding vectors must be [n, dim], got {tuple(vectors.shape)}")
    return vectors.detach().to("cpu", torch.float32).contiguous().clone()


def read_embedding(path: Path) -> dict[str, Any]:
    """The raw contents of an embedding file: a safetensors dict, or a pickled dict loaded weights-only."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zipfile and the unpickler each raise their own types
        raise ModelLoadError(f"Could not read the embedding {path}: {error}.",
                             "Check that the file is a complete .safetensors or .pt embedding.") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not an embedding dict.",
                             "Use a file written by a Textual Inversion trainer.")
    return data


def classify_embedding(data: dict[str, Any]) -> EmbeddingLayout:
    """Which of the host's recognised layouts `data` is, tried in the host's order
    (`create_embedding_from_data`); raise ModelLoadError where the host would refuse it."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # the host unwraps a ParameterDict the same way
        if len(params) != 1:
            raise ModelLoadError(f"The embedding holds {len(params)} terms in string_to_param; the host needs exactly one.",
                                 "Save one embedding per file.")
        return "a1111_dict"
    if all(key in data for key in SDXL_KEYS):
        others = sorted(key for key, value in data.items() if not isinstance(value, torch.Tensor))
        if others:
            raise ModelLoadError(f"The SDXL embedding also holds {others}, which are not tensors; the host converts every "
                                 "entry of such a file to a tensor and fails on them.",
                                 "Keep only the clip_l and clip_g tensors in the file.")
        return "sdxl_dual"
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return "single_tensor"
    raise ModelLoadError(f"The embedding has keys {sorted(data)}, which the host reads as neither a textual inversion "
                         "embedding nor a diffusers concept.", "Use a file written by a Textual Inversion trainer.")


def embedding_vectors(data: dict[str, Any]) -> torch.Tensor:
    """The vectors [n, dim] the host takes from an SD1/SD2 embedding (SDXL pairs have two: `encoder_vectors`)."""
    vectors = encoder_vectors(data)
    if len(vectors) != 1:
        raise ValueError("an SDXL embedding holds two tensors; read them with encoder_vectors")
    return vectors[0]


def encoder_vectors(data: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The vectors [n, dim] per text encoder, in checkpoint order: one tensor for SD1/SD2, (clip_l, clip_g) for SDXL."""
    layout = classify_embedding(data)
    if layout == "sdxl_dual":
        pair = tuple(data[key].detach() for key in SDXL_KEYS)
        if pair[0].shape[0] != pair[1].shape[0]:
            raise ModelLoadError(f"The SDXL embedding has {pair[0].shape[0]} clip_l and {pair[1].shape[0]} clip_g vectors; "
                                 "the host needs the same number in both.", "Use a file written by an SDXL trainer.")
        return pair
    if layout == "a1111_dict":
        params = data["string_to_param"]
        vectors = next(iter(getattr(params, "_parameters", params).values()))
    else:
        vectors = next(iter(data.values()))
    vectors = vectors.detach()
    return (vectors[None] if vectors.ndim == 1 else vectors,)


def embedding_preview_path(target: Path) -> Path:
    """`NAME.preview.png` beside the embedding: the host's card shows it, and its embedding loader skips
    `*.preview.*` images instead of probing them for embedded data."""
    return Path(target).with_suffix(".preview.png")


def write_embedding_preview(target: Path, image: Any) -> Path:
    path = embedding_preview_path(target)
    picture = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def bundled_word_tensors(name: str, vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` keys of a LoRA file carrying the word `name`: one [n, dim] tensor per text encoder
    in checkpoint order (one for SD1/SD2 as the host's dict layout, two for SDXL as `clip_l`, `clip_g`)."""
    if "." in name or not name:
        raise ValueError(f"a bundled word's name must be non-empty and hold no '.', got {name!r}")
    if len(vectors) == 1:
        return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors[0]}
    if len(vectors) != len(SDXL_KEYS):
        raise ValueError(f"a word holds vectors for one or two text encoders, not {len(vectors)}")
    return {f"{BUNDLE_PREFIX}{name}.{key}": tensor for key, tensor in zip(SDXL_KEYS, vectors)}


def bundled_words(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """The words a LoRA file carries, as the host gathers them: name -> vectors per text encoder (checkpoint
    order), the inverse of `bundled_word_tensors`."""
    words: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
            data = words.setdefault(name, {})
            if part.startswith("string_to_param."):
                data["string_to_param"] = {part.partition(".")[2]: tensor}
            else:
                data[part] = tensor
    return {name: encoder_vectors(data) for name, data in words.items()}


def embeddings_named(folder: Path, name: str) -> list[Path]:
    """Files under `folder` (recursively, as the host scans it) that the host loads as an embedding called `name`,
    compared ignoring case: the host lower-cases prompts, so 'Word' and 'word' would be the same tokens."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = name.lower()
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in HOST_EMBEDDING_SUFFIXES
                  and path.stem.lower() == wanted and path.is_file())
