"""Captions to UNet conditioning, the way the host does it for each family.

- SD1: CLIP ViT-L, 77 tokens, last hidden state (or A1111's 'Clip skip': an earlier layer through the
  final layer norm).
- SD2: the bundle's OpenCLIP ViT-H tower already ends one block early (the host conditions on the
  penultimate layer), so its last hidden state is the conditioning: the same code path as SD1. Clip skip
  does not apply: the host's OpenCLIP embedder ignores the setting.
- SDXL: CLIP-L's and OpenCLIP bigG's penultimate hidden states (no final norm) side by side (768 + 1280),
  plus bigG's projected pooled vector; clip skip does not apply (the host always uses the penultimate layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, cast

import torch
from torch import nn

from ..models.bundle import ModelBundle, ModelFamily
from ..networks.lycoris_backend import TextModelView
from ..training.conditioning import Conditioning

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return cast(torch.Tensor, tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids)


def encode_tokens(text_encoder: nn.Module, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states of the last layer, or of the `clip_skip`-th from the end passed through the final
    layer norm (A1111's 'Clip skip' setting)."""
    device = next(text_encoder.parameters()).device
    output = text_encoder(input_ids.to(device), output_hidden_states=clip_skip > 1)
    if clip_skip <= 1:
        return cast(torch.Tensor, output[0])
    hidden = output.hidden_states[-clip_skip]
    return cast(torch.Tensor, TextModelView(text_encoder).text_model.final_layer_norm(hidden))


def encode_sdxl_tokens(text_encoder: nn.Module, text_encoder_2: nn.Module, input_ids: torch.Tensor,
                       input_ids_2: torch.Tensor) -> Conditioning:
    """SDXL's conditioning from both encoders' token ids (each tokenized by its own tokenizer)."""
    first = text_encoder(input_ids.to(next(text_encoder.parameters()).device), output_hidden_states=True)
    second = text_encoder_2(input_ids_2.to(next(text_encoder_2.parameters()).device), output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].device)], dim=-1)
    return Conditioning(context, second.text_embeds.to(context.device))


def encode_ids(bundle: ModelBundle, input_ids: Sequence[torch.Tensor], clip_skip: int = 1) -> Conditioning:
    """Conditioning from token ids, one tensor per text encoder in `bundle.text_encoders` order (Textual
    Inversion tokenizes itself), under the current grad mode."""
    if bundle.text_encoder_2 is not None:
        return encode_sdxl_tokens(bundle.text_encoder, bundle.text_encoder_2, input_ids[0], input_ids[1])
    clip_skip = clip_skip if bundle.family is ModelFamily.SD1 else 1
    return Conditioning(encode_tokens(bundle.text_encoder, input_ids[0], clip_skip))


def encode_prompts(bundle: ModelBundle, captions: list[str], clip_skip: int = 1) -> Conditioning:
    """Conditioning for `captions` with the bundle's tokenizers, under the current grad mode."""
    tokenizers = (bundle.tokenizer, bundle.tokenizer_2)[:len(bundle.text_encoders)]
    return encode_ids(bundle, [tokenize(tokenizer, captions) for tokenizer in tokenizers], clip_skip)


def encode_captions(bundle: ModelBundle, captions: list[str], clip_skip: int, *, trainable: bool) -> Conditioning:
    """Conditioning for `captions`; a graph through the text encoders is built only when they are `trainable`."""
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return encode_prompts(bundle, captions, clip_skip)
