"""Where the frozen text encoders and the VAE sit while the training steps run.

With the latent cache filled and each caption's text-encoder output cached, a step uses neither the VAE
nor the text encoders, yet they would hold training-device memory beside the UNet the step needs: for
SDXL in bf16, 1.52 GiB of text encoders and 0.31 GiB of fp32 VAE (`python -m lib_sdcustom.bench resident`).
`IdleModels` moves them to the CPU for the steps and back for the work that uses them: the VAE for each
preview (whose prompts are encoded ahead, like the captions, so the text encoders stay parked through the
final preview, the run's largest one-off peak) and all of them after it. The text encoders are parked the
same way while the VAE fills the latent cache before the steps, the other one-off peak.

Moves are exact copies, so the training result is the same bit for bit; only where the memory is
changes. A parked model that is called anyway (a latent or a caption the caches missed) comes back to
the training device before it runs and stays there: such a run is as correct as an unparked one, it only
keeps the memory, and the log says which model came back.

Only a bundle this run loaded is parked. A host's bundle shares its tensors with the host's model, which
keeps them on the GPU anyway: a parked copy would free nothing there and cost a copy in RAM.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from ..config import DataOptions
from ..models.bundle import ModelBundle

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

#: Where idle models wait: host memory.
STORE = torch.device("cpu")


def fixed_captions(data: DataOptions) -> bool:
    """Whether every image always trains with the same caption, so one epoch's captions are all there are."""
    return not data.shuffle_captions and data.caption_dropout == 0 and data.tag_dropout == 0


def _placeable(device: torch.device, owned: bool) -> bool:
    return owned and device != STORE


def idle_while_encoding(bundle: ModelBundle, device: torch.device, *, owned: bool) -> dict[str, nn.Module]:
    """The text encoders, while the VAE fills the latent cache: that fp32 encode at full resolution is a
    one-off peak of gigabytes (2.5 GiB for one 1024 px SDXL image), and they would sit beside it unused."""
    return _text_encoders(bundle) if _placeable(device, owned) else {}


def _text_encoders(bundle: ModelBundle) -> dict[str, nn.Module]:
    return {f"text encoder {number}": encoder for number, encoder in enumerate(bundle.text_encoders, start=1)}


def idle_during_steps(bundle: ModelBundle, device: torch.device, data: DataOptions, *, latents_cached: bool,
                      text_cached: bool, owned: bool) -> dict[str, nn.Module]:
    """The models the steps leave idle, by name: the VAE when the latent cache holds every image, the text
    encoders when, besides, their outputs are cached for captions that never change (`fixed_captions`):
    their cache is filled before the steps by reading one epoch of batches, cheap only from cached latents.
    None on a device that is the store itself, or for a bundle the run does not own (module docstring)."""
    if not _placeable(device, owned):
        return {}
    idle: dict[str, nn.Module] = {"VAE": bundle.vae} if latents_cached else {}
    if latents_cached and text_cached and fixed_captions(data):
        idle.update(_text_encoders(bundle))
    return idle


def _move(module: nn.Module, device: torch.device) -> None:
    """The one place a model changes device (tests watch it)."""
    module.to(device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


class IdleModels:
    """Parks `models` on the CPU for the steps (`parked`) and brings them back to `device` around the work
    that needs them (`restored_for`); see the module docstring."""

    def __init__(self, models: dict[str, nn.Module], device: torch.device) -> None:
        self.models = models
        self.device = device
        self.parked_names: set[str] = set()
        self._hooks: dict[str, list[Any]] = {}

    @property
    def holds_text_encoders(self) -> bool:
        return any(name.startswith("text encoder") for name in self.models)

    def park(self, names: Iterable[str] | None = None) -> None:
        """Move the named models (default: all) to the store, each with a hook that brings it back if called."""
        for name in self.models if names is None else names:
            module = self.models[name]
            _move(module, STORE)
            self.parked_names.add(name)
            self._hooks[name] = [part.register_forward_pre_hook(self._comes_back(name), with_kwargs=True)
                                 for part in (module, *module.children())]

    def restore(self) -> None:
        for name in list(self.parked_names):
            self._restore(name)

    def _restore(self, name: str) -> None:
        for hook in self._hooks.pop(name, []):
            hook.remove()
        _move(self.models[name], self.device)
        self.parked_names.discard(name)

    def _comes_back(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]],
                                                tuple[tuple[Any, ...], dict[str, Any]]]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if name in self.parked_names:
                logger.info("The %s was parked off %s for the training steps but is needed (a cache missed); "
                            "it stays on %s for the rest of the steps.", name, self.device, self.device)
                self._restore(name)
            moved: tuple[tuple[Any, ...], dict[str, Any]] = _to_device((args, kwargs), self.device)
            return moved
        return hook

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """The idle models off the training device inside the block, back on it after (also on an error)."""
        self.park()
        try:
            yield
        finally:
            self.restore()

    def restored_for(self, work: Callable[[int], Result], names: Iterable[str] | None = None) -> Callable[[int], Result]:
        """`work` (a preview at a step) with the named models (default: all) back on the device, parked
        again after it; the others stay parked unless `work` calls them."""
        def restored(step: int) -> Result:
            wanted = self.parked_names & set(self.models if names is None else names)  # not those a miss brought back
            for name in wanted:
                self._restore(name)
            try:
                return work(step)
            finally:
                self.park(wanted)
        return restored
