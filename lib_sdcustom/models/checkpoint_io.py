"""Reading base-model weights from disk: single files safely, diffusers folders locally.

A `.safetensors` file is read one tensor at a time into its final dtype and device, so loading holds the
converted model plus one tensor, never the whole file besides it (safetensors' `load_file` maps the file,
and every page a conversion reads stays in the process's resident memory until the last tensor is freed:
a 2 GB SD1.5 file loaded as fp32 peaked at 6.3 GB). A `.ckpt` is a pickle and may run code when
unpickled, so it is read only through torch's weights-only unpickler; anything else in it is refused with a
way out (convert to `.safetensors`). Diffusers folders are read with `from_pretrained(<local folder>)` only,
never a hub id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
_FORMAT_FIX = "Use a .safetensors or .ckpt checkpoint, or a diffusers model folder (with model_index.json)."


def read_checkpoint(path: Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """The flat state dict of a single-file checkpoint (a top-level 'state_dict' is unwrapped).

    Floating-point tensors are converted to `dtype` and every tensor goes to `device` as it is read (None:
    as stored, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"The model file {path} does not exist.",
                             "Check the path, or pick a checkpoint from the list.")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, dtype, device)
    if suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path} is not a model file this trainer reads ('{path.suffix}').", _FORMAT_FIX)
    state = read_pickle_weights_only(path)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (it holds a {type(state).__name__}).",
                             _FORMAT_FIX)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for key, value in state.items():  # one tensor at a time, each old one freed as its copy is made
        if torch.is_tensor(value):
            state[key] = _converted(value, dtype, device)
    return cast(dict[str, Any], state)


def _converted(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device or tensor.device, dtype=wanted)


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a `.safetensors` file (empty for other files and unreadable headers).

    Only decides things the weights cannot (SD2's prediction type without a YAML), so a damaged header is
    left for `read_checkpoint` to report.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - the safetensors error class moved between versions; see the docstring
        return {}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e4m3fn") else {}),
}


def _read_safetensors(path: Path, dtype: torch.dtype | None, device: str | torch.device | None) -> dict[str, Any]:
    """Each tensor read with a plain file read into its own buffer, converted, and the buffer dropped.

    Plain reads instead of safetensors' memory map: file pages read through a map count as the process's
    memory while the map lives; pages read with `readinto` are the kernel's cache, not ours.
    """
    from ..formats.safetensors_io import read_header

    header = read_header(path)
    size = path.stat().st_size
    damaged = "The file is damaged or incomplete; download it again."
    state: dict[str, Any] = {}
    with open(path, "rb") as handle:
        for key, info in header.tensors.items():
            begin, end = info.data_offsets
            stored = _SAFETENSORS_DTYPES.get(info.dtype)
            if stored is None:
                raise ModelLoadError(f"{path}: tensor {key} has the data type {info.dtype}, which this trainer "
                                     "cannot read.", "Convert the checkpoint to fp16 or fp32.")
            if not 0 <= begin <= end <= size - header.data_offset:
                raise ModelLoadError(f"{path} could not be read as safetensors: tensor {key} lies outside the file.",
                                     damaged)
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(header.data_offset + begin)
            if handle.readinto(memoryview(buffer.numpy())) != end - begin:  # type: ignore[arg-type]
                raise ModelLoadError(f"{path} could not be read as safetensors: the file ends inside tensor {key}.",
                                     damaged)
            try:
                tensor = buffer.view(stored).reshape(info.shape)
            except RuntimeError as error:
                raise ModelLoadError(f"{path} could not be read as safetensors: tensor {key} does not fit its "
                                     f"shape {list(info.shape)} ({error}).", damaged) from error
            state[key] = _converted(tensor, dtype, device)
    return state


class _LightningModelCheckpoint:
    """Inert stand-in for the one class original SD `.ckpt` files pickle besides tensors.

    The official SD 1.x checkpoints store pytorch_lightning's `ModelCheckpoint` callback (the class, as a
    key of their 'callbacks' entry). The host's restricted unpickler allows exactly that name; we allow it
    the same way, as this harmless empty class, so those files load without Lightning and without
    trusting any other pickled object.
    """

    def __setstate__(self, state: Any) -> None:  # a pickled instance's state is dropped, never executed
        del state


_LightningModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
_LightningModelCheckpoint.__name__ = _LightningModelCheckpoint.__qualname__ = "ModelCheckpoint"


def _allowing_lightning_callback() -> contextlib.AbstractContextManager[object]:
    """torch >= 2.5 can allow extra names in its weights-only unpickler; older torch refuses them."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([_LightningModelCheckpoint]) if safe_globals else contextlib.nullcontext()


_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|Unsupported class) ([\w.]+)")


def read_pickle_weights_only(path: Path) -> Any:
    """What a `.ckpt`/`.pt` holds, read by torch's weights-only unpickler and never by the full one.

    A zip-format file is memory-mapped, so a multi-GB checkpoint is not read into RAM before conversion.
    Damaged bytes fail the unpickler in arbitrary ways (IndexError, KeyError, UnicodeDecodeError, ...), so
    every failure that is not a refused Python object reads as a damaged file. torch's own text advises
    `weights_only=False`, i.e. running the file's code; that advice is never passed on."""
    try:
        with _allowing_lightning_callback():
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - see the docstring
        found = _UNSAFE_GLOBAL.search(str(error))
        if found:
            raise ModelLoadError(
                f"{path} was refused: it holds a pickled Python object ({found.group(1)}), not only tensors, and such "
                "objects can run code when opened.",
                "Use the .safetensors release of the model, or convert it to .safetensors with a tool you trust "
                "(for example the WebUI's checkpoint merger with safetensors output).",
            ) from error
        raise ModelLoadError(
            f"{path} could not be read: it is damaged, incomplete, or not a PyTorch file "
            f"({_unpickler_complaint(error)}).",
            "Re-download the file, or use a .safetensors version of it.") from error


def _unpickler_complaint(error: Exception) -> str:
    """The unpickler's own complaint, without the advice torch wraps around it."""
    detail = str(error).rpartition("WeightsUnpickler error:")[2].strip()
    detail = detail.splitlines()[0] if detail else ""
    return f"{type(error).__name__}: {detail}" if detail and "weights_only" not in detail else type(error).__name__


def is_diffusers_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


SDXL_DIFFUSERS_PARTS = ("text_encoder_2", "tokenizer_2")


@dataclass
class DiffusersParts:
    unet: Any
    vae: Any
    text_encoder: Any
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path | None
    text_encoder_2: Any = None  # SDXL's CLIPTextModelWithProjection
    tokenizer_2_dir: Path | None = None


def load_diffusers_folder(folder: Path, dtype: torch.dtype, *, second_text_encoder: bool = False) -> DiffusersParts:
    """UNet, VAE and text encoder(s) of a local diffusers SD model; raises ModelLoadError for missing parts.

    `second_text_encoder` (SDXL) also loads `text_encoder_2` as a `CLIPTextModelWithProjection`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder).resolve()
    wanted = DIFFUSERS_PARTS + (SDXL_DIFFUSERS_PARTS if second_text_encoder else ())
    missing = [part for part in wanted if not (folder / part).is_dir()]
    if missing:
        raise ModelLoadError(f"The diffusers model folder {folder} lacks {', '.join(missing)}/.",
                             f"Use a complete diffusers Stable Diffusion folder ({', '.join(wanted)}, "
                             "model_index.json).")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
        text_encoder_2 = (CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"),
                                                                      local_files_only=True).to(dtype)
                          if second_text_encoder else None)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"Could not load the diffusers model in {folder}: {error}",
                             "Check that every part holds its config.json and weights.") from error
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config: dict[str, Any] = {}
    if scheduler_path.is_file():
        try:
            scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ModelLoadError(f"Could not read {scheduler_path}: {error}", "Fix or remove the file.") from error
    return DiffusersParts(unet=unet, vae=vae, text_encoder=text_encoder.to(dtype),
                          scheduler_config=scheduler_config, tokenizer_dir=folder / "tokenizer",
                          text_encoder_2=text_encoder_2,
                          tokenizer_2_dir=folder / "tokenizer_2" if second_text_encoder else None)
