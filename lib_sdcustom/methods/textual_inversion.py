"""Textual Inversion: a new word whose N embedding vectors alone learn; the UNet, VAE and text encoder stay
frozen and bit-identical.

How the new word reaches the text encoder without changing the base model:
- the trigger word (the output name) in a prompt is replaced by N placeholder tokens that exist only in
  a private copy of the tokenizer, so the host's tokenizer is never touched;
- hooks on the token-embedding layer swap the placeholder ids for a valid id on the way in and put the
  learned vectors in their places on the way out. The embedding table is never resized or written, so
  every original row stays bit-identical and `close()` only has to remove the hooks.

This reproduces what the host does with the exported file: the trigger word expands to the file's N
vectors in place, and the rest of the prompt is encoded as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import RunConfig
from ..data.prompt_templates import BUILT_IN, fill_template, load_templates
from ..errors import ConfigError
from ..formats.embedding_file import SUFFIXES, write_embedding, write_embedding_preview
from ..run_context import RunContext
from .base import Method
from .text_conditioning import encode_tokens, tokenize

if TYPE_CHECKING:
    from ..training.loop import Batch, BatchSource

logger = logging.getLogger(__name__)

PLACEHOLDER = "<sdcustom-ti-{}>"
STATE_KEY = "vectors"


class TextualInversionMethod(Method):
    name = "textual_inversion"

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        config, bundle = context.config, context.bundle
        options = config.textual_inversion
        self.trigger = config.output.name
        self.templates = load_templates(options.template)
        refuse_known_word(bundle.tokenizer, self.trigger)
        embedding = bundle.text_encoder.get_input_embeddings()
        vectors = initial_vectors(embedding.weight, bundle.tokenizer, options.init_text, options.vectors,
                                  seed=config.training.seed)
        for model in (bundle.unet, bundle.text_encoder, bundle.vae):
            model.requires_grad_(False)
        self.vectors = nn.Parameter(vectors)
        self._apply_max_norm()
        self.tokenizer, first_id = _tokenizer_with_placeholders(bundle.tokenizer, options.vectors)
        self._expansion = " ".join(PLACEHOLDER.format(i) for i in range(options.vectors))
        self._trigger_pattern = trigger_pattern(self.trigger)
        self._rows = NewTokenRows(embedding, first_id, self.vectors)

    # ----- facts known before the model is loaded -----
    @classmethod
    def result_suffix(cls, config: RunConfig) -> str:
        return SUFFIXES[config.textual_inversion.embedding_format]

    @classmethod
    def default_caption(cls, config: RunConfig) -> str:
        """Images without a caption fill `[filewords]` with nothing; the templates supply the trigger word."""
        return config.data.default_caption

    @classmethod
    def trigger_phrase(cls, config: RunConfig) -> str:
        return config.output.name

    # ----- training -----
    def build_source(self, source: "BatchSource") -> "BatchSource":
        self._warn_about_captions_without_trigger()
        return TemplatedSource(source, self.templates, trigger=self.trigger, seed=self.config.training.seed)

    def required_disk_bytes(self) -> int:
        return 16 * 2**20  # a few KiB of vectors and a preview image

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.vectors], "lr": self.config.lr, "name": "embedding"}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {STATE_KEY: self.vectors.detach().clone()}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = tensors[STATE_KEY]
        if saved.shape != self.vectors.shape:
            raise ConfigError(f"The saved state holds {tuple(saved.shape)} vectors, this run {tuple(self.vectors.shape)}.",
                              "Resume with the run's own settings (--resume RUN_DIR without --vectors).")
        with torch.no_grad():
            self.vectors.copy_(saved.to(self.vectors.device, self.vectors.dtype))

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Every occurrence of the trigger word becomes the N learned vectors (also in preview prompts)."""
        input_ids = tokenize(self.tokenizer, [self.expand(caption) for caption in captions])
        return encode_tokens(self.bundle.text_encoder, input_ids, self.config.model.clip_skip)

    def expand(self, prompt: str) -> str:
        return self._trigger_pattern.sub(self._expansion, prompt)

    def after_optimizer_step(self, step: int) -> None:
        self._apply_max_norm()

    def _apply_max_norm(self) -> None:
        """Clamp each vector's length to `max_norm` (when set), in place, after initialisation and after every
        optimizer step, so a vector cannot drift far outside the range of the model's own token embeddings."""
        max_norm = self.config.textual_inversion.max_norm
        if max_norm > 0:
            with torch.no_grad():
                self.vectors.copy_(torch.renorm(self.vectors, p=2, dim=0, maxnorm=max_norm))

    # ----- results -----
    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        written = [write_embedding(target, self.vectors, name=target.stem, step=step, base=self.bundle.identity,
                                   fmt=self.config.textual_inversion.embedding_format)]
        if preview is not None:
            written.append(write_embedding_preview(target, preview))
        return written

    def intermediate_path(self, target: Path, step: int) -> Path:
        """In the run folder, not under the output folder: the host loads embeddings from every sub-folder
        of its embeddings folder, so `NAME-STEP` files there would each become a trigger word."""
        return self.context.run_dir / "embeddings" / f"{target.stem}-{step}{target.suffix}"

    def describe(self) -> str:
        options = self.config.textual_inversion
        init = f"initialised from {options.init_text!r}" if options.init_text.strip() else "initialised randomly"
        template = options.template if options.template in BUILT_IN else Path(options.template).name
        return (f"Textual Inversion: '{self.trigger}' as {options.vectors} vector(s) of width {self.vectors.shape[1]}, {init}; "
                f"prompts from the '{template}' template ({len(self.templates)} lines); UNet, VAE and text encoder frozen")

    def close(self) -> None:
        self._rows.remove()

    def _warn_about_captions_without_trigger(self) -> None:
        if all("[name]" in template for template in self.templates):
            return
        missing = [record for record in self.context.training_set.records
                   if record.caption and not self._trigger_pattern.search(record.caption)]
        if missing:
            self.context.bus.warn(f"{len(missing)} of {len(self.context.training_set.records)} captions do not contain the "
                                  f"trigger word '{self.trigger}'; it is put in front of them "
                                  f"(e.g. '{self.trigger}, {missing[0].caption}').")


def trigger_pattern(trigger: str) -> re.Pattern:
    """The trigger word as a whole word, in any case (the host's CLIP tokenizer lower-cases prompts)."""
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)


def refuse_known_word(tokenizer, trigger: str) -> None:
    """A trigger word that is one token already has a meaning the model learned; training it as a new word
    would be ambiguous in every prompt that uses the old meaning."""
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise ConfigError(
            f"The trigger word {trigger!r} (the output name) is a word the text encoder already knows (one token).",
            f"Choose a rare or made-up word that does not occur in normal prompts, e.g. 'sks-{trigger}' or 'zwx{trigger}'.")


def initial_vectors(table: torch.Tensor, tokenizer, init_text: str, count: int, *, seed: int) -> torch.Tensor:
    """Starting vectors [count, dim] in float32: the init text's token embeddings stretched to `count`
    (each repeated in order, as the host's own trainer does), or random with the table's spread."""
    weights = table.detach()
    if not init_text.strip():
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, weights.shape[1]), generator=generator)
        return (noise * weights.float().std().cpu()).to(weights.device)
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"The init text {init_text!r} gives no tokens.", "Use a word or two describing the subject, e.g. 'dog'.")
    if len(ids) > count:
        logger.warning("The init text %r has %d tokens but the embedding has %d vector(s); only the first %d token(s) "
                       "are used. Raise --vectors or shorten --init-text.", init_text, len(ids), count, count)
        ids = ids[:count]
    rows = weights[torch.tensor(ids, device=weights.device)].float()
    return rows[[index * len(ids) // count for index in range(count)]].clone()


def _tokenizer_with_placeholders(tokenizer, count: int):
    """A private copy of the tokenizer with `count` placeholder tokens; returns it and the first new id."""
    private = copy.deepcopy(tokenizer)
    placeholders = [PLACEHOLDER.format(i) for i in range(count)]
    added = private.add_tokens(placeholders)
    ids = private.convert_tokens_to_ids(placeholders)
    if added != count or ids != list(range(len(tokenizer), len(tokenizer) + count)):
        raise RuntimeError(f"placeholder tokens got ids {ids} instead of {len(tokenizer)}..")
    return private, ids[0]


class NewTokenRows:
    """Forward hooks on a token-embedding layer: ids from `first_id` on read rows of `vectors` instead.

    The table itself is never resized or written; prompts without placeholder ids give the same output,
    bit for bit, as without the hooks.
    """

    def __init__(self, embedding: nn.Embedding, first_id: int, vectors: torch.Tensor) -> None:
        self.first_id = first_id
        self.vectors = vectors
        self._ids: torch.Tensor | None = None
        self._handles = [embedding.register_forward_pre_hook(self._swap_ids),
                         embedding.register_forward_hook(self._insert_vectors)]

    def _swap_ids(self, module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        self._ids = ids
        return (ids.masked_fill(ids >= self.first_id, 0), *args[1:])

    def _insert_vectors(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids, self._ids = self._ids, None
        new = ids >= self.first_id
        if not bool(new.any()):
            return output
        rows = (ids - self.first_id).clamp(min=0)
        learned = self.vectors.to(output.device, output.dtype)[rows]
        return torch.where(new.unsqueeze(-1), learned, output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TemplatedSource:
    """Wraps a batch source: each caption becomes a prompt from the templates, `[name]` = the trigger word
    and `[filewords]` = the image's caption (empty when it has none).

    The template is picked from (seed, batch index, position), so a resumed run sees the same prompts. A
    prompt without the trigger word (a caption-only template, a custom line without `[name]`) gets it in
    front, since a prompt without the word teaches the vectors nothing.
    """

    def __init__(self, source: "BatchSource", templates: tuple[str, ...], *, trigger: str, seed: int) -> None:
        self.source = source
        self.templates = templates
        self.trigger = trigger
        self.seed = seed
        self._pattern = trigger_pattern(trigger)

    def batch(self, index: int) -> "Batch":
        batch = self.source.batch(index)
        prompts = [self.prompt(caption, index, position) for position, caption in enumerate(batch.captions)]
        return dataclasses.replace(batch, captions=prompts)

    def prompt(self, caption: str, index: int, position: int) -> str:
        template = self.templates[random.Random(f"ti-template/{self.seed}/{index}/{position}").randrange(len(self.templates))]
        text = fill_template(template, name=self.trigger, filewords=caption)
        if not self._pattern.search(text):
            text = f"{self.trigger}, {text}" if text else self.trigger
        return text
