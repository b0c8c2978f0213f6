"""Original SD `.ckpt` files pickle pytorch_lightning's ModelCheckpoint class; the host allows exactly that
name, and so do we (as an inert stand-in), while any other pickled object is still refused."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.models.checkpoint_io import read_checkpoint

requires_safe_globals = pytest.mark.skipif(not hasattr(torch.serialization, "safe_globals"),
                                           reason="torch < 2.5 cannot allow extra names in its weights-only loader")


def _pickle_with_fake_lightning(path, *, instance: bool) -> None:
    """Write a checkpoint that references pytorch_lightning's ModelCheckpoint, without Lightning installed."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({name: types.ModuleType(name) for name in names[:2]})
    sys.modules[module.__name__] = module
    try:
        callbacks = {ModelCheckpoint: {"best_model_score": None}} if not instance else {"cb": ModelCheckpoint()}
        torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(2)}, "callbacks": callbacks,
                    "global_step": 470000}, path)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


@requires_safe_globals
@pytest.mark.parametrize("instance", [False, True])
def test_lightning_callback_is_allowed_like_the_host(tmp_path, instance):
    path = tmp_path / "sd-v1-4.ckpt"
    _pickle_with_fake_lightning(path, instance=instance)
    state = read_checkpoint(path)
    assert torch.equal(state["model.diffusion_model.x"], torch.ones(2))


class Other:
    pass


def test_any_other_object_is_still_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": Other()}, path)
    with pytest.raises(ModelLoadError, match="evil.ckpt"):
        read_checkpoint(path)
