"""A base model on disk -> a `ModelBundle`, outside the host.

Modules are built from the checkpoint's own config with empty (meta) parameters and then take the file's
tensors directly (`load_state_dict(strict=True, assign=True)`): no random initialisation of a full-size
model, no second copy of the weights, and every tensor the modules need must come from the file. The file
is read tensor by tensor straight into the wanted dtype and device (`checkpoint_io.read_checkpoint`), so
a bf16 load of a 2 GB SD1.5 file onto a GPU holds about one tensor in CPU memory at a time.

SD1, SD2 and SDXL load the same way; the family (from the keys) picks where the text encoders sit, and the
config (YAML or stock) their shapes. open_clip towers (SD2, SDXL's second encoder) are translated by
`open_clip_keys`; their tensors that no module owns are kept in `ldm_extras`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ModelLoadError
from ..hashing import legacy_model_hash, sha256_file
from . import ldm_keys
from .bundle import BaseIdentity, ModelBundle, ModelFamily
from .checkpoint_io import is_diffusers_folder, load_diffusers_folder, read_checkpoint, read_metadata
from .detect import detect_diffusers_family, detect_family
from .ldm_config import configs_for_checkpoint, configs_from_ldm
from .model_yaml import ModelConfigs, yaml_beside
from .open_clip_keys import open_clip_to_transformers
from .stock_configs import SD1_V1_INFERENCE, STOCK_CONFIG_NAME
from .tokenizer import load_clip_tokenizer, load_open_clip_tokenizer

logger = logging.getLogger(__name__)

_SHOWN_KEYS = 3


def load_bundle(path: str | Path, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None) -> ModelBundle:
    """Load an SD1, SD2 or SDXL single-file checkpoint (`.safetensors`, `.ckpt`) or a diffusers model folder,
    with floating-point weights in `dtype` on `device` (default: the CPU)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"The base model {path} does not exist.",
                             "Check the path, or pick a checkpoint from the list.")
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ModelLoadError(f"The folder {path} is not a diffusers model (it has no model_index.json).",
                                 "Pick a checkpoint file, or a diffusers model folder.")
        return _load_diffusers(path, dtype, device)
    return _load_single_file(path, dtype, device)


def _load_single_file(path: Path, dtype: torch.dtype, device: str | torch.device | None) -> ModelBundle:
    state = read_checkpoint(path, dtype=dtype, device=device)
    family = detect_family(state, path)
    configs, ldm = configs_for_checkpoint(path, family, read_metadata(path))
    if configs.family is not family:
        raise ModelLoadError(f"{path} is an {_family_name(family)} checkpoint, but its model config {configs.source} "
                             f"describes an {_family_name(configs.family)} model.",
                             "Use the YAML that was published with this checkpoint, or remove it.")
    tensors = {key: value for key, value in state.items() if torch.is_tensor(value)}
    if len(tensors) != len(state):
        logger.debug("%s: ignoring %d non-tensor entries", path, len(state) - len(tensors))
    parts = ldm_keys.split_ldm_state_dict(tensors, family)
    del state, tensors

    def mismatch(detail: str) -> ModelLoadError:
        return _mismatch_error(path, configs, detail)

    unet_layout = ldm_keys.UNetLayout.from_diffusers_config(configs.unet)
    vae_layout = ldm_keys.VAELayout.from_diffusers_config(configs.vae)
    unet_sd = mapped_or_fail(ldm_keys.unet_to_diffusers(parts.unet, unet_layout), ldm_keys.UNET_PREFIX, mismatch)
    vae_sd = mapped_or_fail(ldm_keys.vae_to_diffusers(parts.vae, vae_layout), ldm_keys.VAE_PREFIX, mismatch)
    text_sds = text_encoder_weights(parts, configs, mismatch)
    unet, vae, *text_encoders = _build_modules(configs, unet_sd, vae_sd, text_sds, dtype, mismatch)
    tokenizers = _tokenizers(family, [_tokenizer_dir(folder)
                                      for folder in (configs.text_encoder_dir, configs.text_encoder_2_dir)])
    logger.info("Loaded %s (%s, config: %s)", path, family.value, configs.source)
    identity = BaseIdentity(name=path.stem, path=path.resolve(), sha256=sha256_file(path),
                            legacy_hash=legacy_model_hash(path))
    return bundle_from_modules(family, unet, vae, text_encoders, tokenizers, configs.scheduler, identity=identity,
                               ldm_config=ldm, ldm_extras=parts.extras)


def _family_name(family: ModelFamily) -> str:
    return family.value.upper()


def _mismatch_error(path: Path, configs: ModelConfigs, detail: str) -> ModelLoadError:
    if configs.from_yaml:
        return ModelLoadError(f"{path} does not match its model config {configs.source}: {detail}",
                              "Use the YAML that was published with this checkpoint, or remove the YAML if the "
                              "checkpoint is a standard model of its family.")
    return ModelLoadError(
        f"{path} does not fit {configs.source} (it is not a standard-size {_family_name(configs.family)} model): "
        f"{detail}",
        f"Put the model's LDM config beside it as {yaml_beside(path).name} (NAME.yaml next to NAME"
        f"{path.suffix}), as the WebUI also expects.",
    )


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def mapped_or_fail(converted: ldm_keys.Converted, prefix: str,
                    mismatch: Callable[[str], ModelLoadError]) -> dict[str, Any]:
    if converted.unmapped:
        raise mismatch(f"it has tensors the config does not describe: "
                       f"{_key_list([prefix + key for key in converted.unmapped])}")
    return converted.state_dict


def text_encoder_weights(parts: ldm_keys.LdmParts, configs: ModelConfigs,
                         mismatch: Callable[[str], ModelLoadError], *, views: bool = False) -> list[dict[str, Any]]:
    """Each text encoder's tensors in canonical transformers keys, in checkpoint order.

    open_clip towers are translated (`views`: see `open_clip_to_transformers`); their tensors that the module
    does not own (SD2's last block and projection, `logit_scale`) move to `parts.extras` under their
    checkpoint keys.
    """
    out: list[dict[str, Any]] = []
    for slot, raw in zip(ldm_keys.TEXT_SLOTS[configs.family], (parts.text_encoder, parts.text_encoder_2)):
        if not slot.open_clip:
            out.append(raw)
            continue
        if configs.open_clip is None:
            raise mismatch("its config names no open_clip layout for an open_clip text encoder")
        split = open_clip_to_transformers(raw, configs.open_clip, views=views)
        if split.unmapped:
            raise mismatch(f"it has tensors the config does not describe: "
                           f"{_key_list([slot.prefix + key for key in split.unmapped])}")
        parts.extras.update((slot.prefix + key, value) for key, value in split.extras.items())
        out.append(split.state_dict)
    return out


def text_encoder_factory(config: Mapping[str, Any]) -> Callable[[], torch.nn.Module]:
    """Builds the transformers text model a CLIPTextConfig dict names (SDXL's second encoder has a projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.get("architectures", ()) \
        else CLIPTextModel
    return lambda: cls(CLIPTextConfig.from_dict(dict(config)))


def _build_modules(configs: ModelConfigs, unet_sd: dict[str, Any], vae_sd: dict[str, Any],
                   text_sds: list[dict[str, Any]], dtype: torch.dtype,
                   mismatch: Callable[[str], ModelLoadError]) -> tuple[torch.nn.Module, ...]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = build_with_weights("UNet", lambda: UNet2DConditionModel(**configs.unet), unet_sd, dtype, mismatch)
    vae = build_with_weights("VAE", lambda: AutoencoderKL(**configs.vae), vae_sd, dtype, mismatch)
    text_configs = [configs.text_encoder] + ([configs.text_encoder_2] if configs.text_encoder_2 else [])
    names = ["text encoder"] if len(text_configs) == 1 else ["first text encoder", "second text encoder"]
    text_encoders = [build_with_weights(name, text_encoder_factory(config), state, dtype, mismatch,
                                        canonical_text=True)
                     for name, config, state in zip(names, text_configs, text_sds)]
    return (unet, vae, *text_encoders)


def build_with_weights(what: str, factory: Callable[[], torch.nn.Module], state: Mapping[str, Any], dtype: torch.dtype,
            mismatch: Callable[[str], ModelLoadError], canonical_text: bool = False) -> torch.nn.Module:
    """Build a module with meta parameters and hand it the file's tensors (cast to `dtype`)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            module = factory()
    except (ValueError, TypeError) as error:
        raise mismatch(f"its config cannot build the {what} ({error})") from error
    if canonical_text:
        state = ldm_keys.text_encoder_load_keys(module, state)
    weights = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    # Persistent buffers the module derives itself (transformers 4's `position_ids`) are not file data.
    expected = module.state_dict()
    for name, buffer in module.named_buffers():
        if name in expected and name not in weights:
            weights[name] = buffer
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise mismatch(f"{what}: {_short_load_error(module, weights)}") from error
    devices = {value.device for value in weights.values()} - {torch.device("cpu")}
    if devices:  # the buffers the module made itself join the weights on their device
        module.to(devices.pop())
    return module


def _short_load_error(module: torch.nn.Module, weights: Mapping[str, Any]) -> str:
    """The first few missing, unexpected or mis-shaped keys, instead of torch's page-long message."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [f"{key} {tuple(weights[key].shape)} vs {shape}" for key, shape in expected.items()
             if key in weights and tuple(weights[key].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_key_list(unexpected)}")
    if wrong:
        problems.append(f"wrong shape (file vs config) {_key_list(wrong)}")
    return "; ".join(problems) or "the tensors do not fit the model"


def _tokenizer_dir(text_encoder_dir: Path | None) -> Path | None:
    if text_encoder_dir is not None and (text_encoder_dir / "vocab.json").is_file() \
            and (text_encoder_dir / "merges.txt").is_file():
        return text_encoder_dir
    return None


def _tokenizers(family: ModelFamily, folders: list[Path | None]) -> list[Any]:
    """One tokenizer per text encoder (a None folder: the bundled files): CLIP's for transformers slots,
    open_clip's (padding with id 0) for open_clip ones."""
    return [(load_open_clip_tokenizer if slot.open_clip else load_clip_tokenizer)(folder)
            for slot, folder in zip(ldm_keys.TEXT_SLOTS[family], folders)]


def _load_diffusers(folder: Path, dtype: torch.dtype, device: str | torch.device | None) -> ModelBundle:
    family = detect_diffusers_family(folder)
    parts = load_diffusers_folder(folder, dtype, second_text_encoder=family is ModelFamily.SDXL)
    if device is not None:
        for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
            if module is not None:
                module.to(device)
    stock = configs_from_ldm(SD1_V1_INFERENCE, source=STOCK_CONFIG_NAME).scheduler
    # The folder's scheduler may be PNDM/DDIM/...; only the training schedule is taken from it.
    scheduler = {key: parts.scheduler_config.get(key, default) for key, default in stock.items()}
    scheduler["clip_sample"] = False
    encoders = [parts.text_encoder] + ([parts.text_encoder_2] if parts.text_encoder_2 is not None else [])
    tokenizers = _tokenizers(family, [parts.tokenizer_dir, parts.tokenizer_2_dir])
    logger.info("Loaded diffusers model %s (%s)", folder, family.value)
    return bundle_from_modules(family, parts.unet, parts.vae, encoders, tokenizers, scheduler,
                               identity=BaseIdentity(name=folder.name, path=folder.resolve()))


def bundle_from_modules(family: ModelFamily, unet: Any, vae: Any, text_encoders: Sequence[Any],
                        tokenizers: Sequence[Any], scheduler: Mapping[str, Any], *, identity: BaseIdentity,
                        ldm_config: dict[str, Any] | None = None,
                        ldm_extras: Mapping[str, Any] | None = None) -> ModelBundle:
    """The one place a `ModelBundle` is put together, for a file, a diffusers folder or the host's model.

    The modules come out frozen, in eval mode and with SDPA attention (each method unfreezes what it
    trains); `scheduler` is the DDPMScheduler kwargs of the training schedule, whose `prediction_type` is
    the bundle's. Text encoders and tokenizers are in checkpoint order (SDXL: CLIP-L, then bigG).
    """
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    return ModelBundle(
        family=family,
        unet=unet,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        noise_scheduler=DDPMScheduler(**scheduler),
        prediction_type=str(scheduler["prediction_type"]),
        identity=identity,
        ldm_config=ldm_config,
        ldm_extras=dict(ldm_extras or {}),
        text_encoder_2=text_encoders[1] if len(text_encoders) > 1 else None,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
    )
