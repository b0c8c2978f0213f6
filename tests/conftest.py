"""Shared fixtures: a tiny SD1 checkpoint written in the LDM layout (so tests go through the real
loading path) and small generated image folders. Nothing here touches the network."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest
import torch

from lib_sdcustom.config import RunConfig
from lib_sdcustom.errors import TrainingStopped
from lib_sdcustom.events import CancelToken, StepDone
from lib_sdcustom.testing.sample_images import write_sample_images

# Two cores, shared: one intra-op thread is faster for tiny tensors than two fighting threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from lib_sdcustom.testing.tiny import write_tiny_sd1

    return write_tiny_sd1(tmp_path_factory.mktemp("tiny_model"), name="tiny", seed=0)


write_images = write_sample_images


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_images(tmp_path / "images")


def model_digest(bundle) -> str:
    """sha256 over every tensor of the UNet, text encoder and VAE: proof a base was left untouched."""
    hasher = hashlib.sha256()
    for model in (bundle.unet, bundle.text_encoder, bundle.vae):
        for key, value in sorted(model.state_dict().items()):
            hasher.update(key.encode())
            hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def cancel_at(step: int) -> tuple[CancelToken, Callable[[object], None]]:
    """A cancel token and a run callback that pulls it once the run reports `step`: an interruption at a known
    step, for the resume tests."""
    cancel = CancelToken()

    def stop(event: object) -> None:
        if isinstance(event, StepDone) and event.step == step:
            cancel.cancel()

    return cancel, stop


def train_until_cancelled(config: RunConfig, step: int) -> None:
    """Train `config` and interrupt it once it reports `step`, as a user's cancel would: the first half of
    the resume tests."""
    from lib_sdcustom.run.train import train

    cancel, stop = cancel_at(step)
    with pytest.raises(TrainingStopped):
        train(config, callbacks=[stop], cancel=cancel)
