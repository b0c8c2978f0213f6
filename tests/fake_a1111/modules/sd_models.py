"""Fake `modules.sd_models`: the checkpoint list refresh and the VRAM parking calls, recorded."""

from types import SimpleNamespace

from modules import shared

model_path = ""
model_data = SimpleNamespace(sd_model=None)


def list_models():
    shared.CALLS.append(("sd_models.list_models", None))


def unload_model_weights(sd_model=None, info=None):
    shared.CALLS.append(("sd_models.unload_model_weights", None))


def send_model_to_device(m):
    shared.CALLS.append(("sd_models.send_model_to_device", None))
