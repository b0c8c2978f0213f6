"""Captions to UNet conditioning, the way the host does it for SD1: 77 tokens, optional clip skip."""

from __future__ import annotations

import torch
from torch import nn

from ..networks.lycoris_backend import TextModelView


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_tokens(text_encoder: nn.Module, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states of the last layer, or of the `clip_skip`-th from the end passed through the final
    layer norm (A1111's 'Clip skip' setting)."""
    device = next(text_encoder.parameters()).device
    output = text_encoder(input_ids.to(device), output_hidden_states=clip_skip > 1)
    if clip_skip <= 1:
        return output[0]
    hidden = output.hidden_states[-clip_skip]
    return TextModelView(text_encoder).text_model.final_layer_norm(hidden)


def encode_captions(bundle, captions: list[str], clip_skip: int, *, trainable: bool) -> torch.Tensor:
    """Conditioning for `captions`; a graph through the text encoder is built only when it is `trainable`."""
    input_ids = tokenize(bundle.tokenizer, captions)
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return encode_tokens(bundle.text_encoder, input_ids, clip_skip)
