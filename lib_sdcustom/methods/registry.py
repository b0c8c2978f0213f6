"""Method name -> class. Imported lazily so a method's optional dependencies load only when it is used."""

from __future__ import annotations

import importlib

from ..config import NETWORK_METHODS
from .base import Method

_METHOD_CLASSES = {
    **{name: ("network", "NetworkMethod") for name in NETWORK_METHODS},
    "textual_inversion": ("textual_inversion", "TextualInversionMethod"),
    "dreambooth": ("dreambooth", "DreamBoothMethod"),
    "dreambooth_lora": ("dreambooth", "DreamBoothLoraMethod"),
}


def method_class(name: str) -> type[Method]:
    module_name, class_name = _METHOD_CLASSES[name]
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)
