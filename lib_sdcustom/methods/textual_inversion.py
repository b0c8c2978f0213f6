"""Textual Inversion: a new word whose N embedding vectors alone learn; the UNet, VAE and text encoder(s) stay
frozen and bit-identical. SDXL's word has N vectors per text encoder (CLIP-L and OpenCLIP bigG widths),
which learn together; SD1 and SD2 have one encoder.

How the new word reaches each text encoder without changing the base model:
- the trigger word (the output name) in a prompt is replaced by N placeholder tokens that exist only in
  private copies of the tokenizers, so the host's tokenizers are never touched;
- the placeholder ids become id 0 before the text encoder sees them, and a hook on its token-embedding
  layer puts the learned vectors at those positions. The embedding table is never resized or written, so
  every original row stays bit-identical and `close()` only has to remove the hooks.

This reproduces what the host does with the exported file (`sd_hijack_clip.tokenize_line` puts token 0 at
an embedding's positions and `EmbeddingsWithFixes` writes the vectors there): the trigger word expands to
the file's N vectors in place, the rest of the prompt is encoded as usual, and SDXL's pooled vector is
read at the end token as the host reads it (an argmax over the ids, which a large placeholder id would
capture).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, cast

import torch
from torch import nn

from ..config import RunConfig, TextualInversionOptions
from ..data.prompt_templates import BUILT_IN, fill_template, load_templates
from ..errors import ConfigError
from ..formats.embedding_file import (SUFFIXES, EmbeddingFormat, embedding_preview_path, write_embedding,
                                      write_embedding_preview)
from ..models.bundle import ModelBundle
from ..run.context import RunContext
from ..training.batches import Batch, BatchSource
from ..training.conditioning import Conditioning
from .base import Method
from .text_conditioning import encode_ids, tokenize

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

PLACEHOLDER = "<sdcustom-ti-{}>"
#: Resumable-state keys of the vectors, one per text encoder in `bundle.text_encoders` order.
STATE_KEYS = ("vectors", "vectors_2")


class NamedWordCaptions:
    """Caption rules of a method whose trigger is a new word named after the output (Textual Inversion, pivotal
    tuning); put before the `Method` base so these win."""

    @classmethod
    def default_caption(cls, config: RunConfig) -> str:
        """Images without a caption fill `[filewords]` with nothing; the templates supply the trigger word."""
        return config.data.default_caption

    @classmethod
    def trigger_phrase(cls, config: RunConfig, captions: Sequence[str] = ()) -> str:
        return config.output.name


class TextualInversionMethod(NamedWordCaptions, Method):
    name = "textual_inversion"

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        config, bundle = context.config, context.bundle
        self.trigger = config.output.name
        self.templates = load_templates(config.textual_inversion.template)
        for model in (bundle.unet, bundle.vae, *bundle.text_encoders):
            model.requires_grad_(False)
        self.word = LearnedWord(bundle, self.trigger, config.textual_inversion, seed=config.training.seed)

    @property
    def vectors(self) -> list[nn.Parameter]:
        return self.word.vectors

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return self.word.tokenizers

    # ----- facts known before the model is loaded -----
    @classmethod
    def result_suffix(cls, config: RunConfig) -> str:
        return SUFFIXES[config.textual_inversion.embedding_format]

    @classmethod
    def output_files(cls, target: Path) -> list[Path]:
        return [target, embedding_preview_path(target)]

    # ----- training -----
    def build_source(self, source: BatchSource) -> BatchSource:
        self._warn_about_captions_without_trigger()
        return TemplatedSource(source, self.templates, trigger=self.trigger, seed=self.config.training.seed)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.vectors), "lr": self.config.lr, "name": "embedding"}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.word.state()

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.word.load_state(tensors)

    def encode_captions(self, captions: list[str]) -> Conditioning:
        """Every occurrence of the trigger word becomes the N learned vectors (also in preview prompts)."""
        return self.word.encode(captions, self.config.model.clip_skip)

    def expand(self, prompt: str) -> str:
        return self.word.expand(prompt)

    def after_optimizer_step(self, step: int) -> None:
        self.word.apply_max_norm()

    # ----- results -----
    def export(self, target: Path, *, step: int, preview: Any | None = None) -> list[Path]:
        written = [write_embedding(target, [vectors.detach() for vectors in self.vectors], name=target.stem, step=step,
                                   base=self.bundle.identity, fmt=cast(EmbeddingFormat, self.config.textual_inversion.embedding_format))]
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
        widths = " + ".join(str(vectors.shape[1]) for vectors in self.vectors)
        encoders = "text encoders" if len(self.vectors) > 1 else "text encoder"
        return (f"Textual Inversion: '{self.trigger}' as {options.vectors} vector(s) of width {widths}, {init}; "
                f"prompts from the '{template}' template ({len(self.templates)} lines); UNet, VAE and {encoders} frozen")

    def close(self) -> None:
        self.word.remove()

    def _warn_about_captions_without_trigger(self) -> None:
        if all("[name]" in template for template in self.templates):
            return
        missing = [record for record in self.context.training_set.records
                   if record.caption and not self.word.pattern.search(record.caption)]
        if missing:
            self.context.bus.warn(f"{len(missing)} of {len(self.context.training_set.records)} captions do not contain the "
                                  f"trigger word '{self.trigger}'; it is put in front of them "
                                  f"(e.g. '{self.trigger}, {missing[0].caption}').")


class LearnedWord:
    """A new word of N trainable vectors per text encoder, hooked into the bundle's encoders without changing
    them (see the module docstring): what Textual Inversion trains alone and pivotal tuning beside a network.

    SDXL's word has vectors for both encoders (CLIP-L and OpenCLIP bigG widths), each initialised through its
    own tokenizer and table, as the host's `encode_embedding_init_text` does."""

    def __init__(self, bundle: ModelBundle, word: str, options: TextualInversionOptions, *, seed: int) -> None:
        refuse_known_word(bundle.tokenizer, word)  # every encoder shares CLIP's vocabulary
        self.bundle = bundle
        self.max_norm = options.max_norm
        base_tokenizers = (bundle.tokenizer, bundle.tokenizer_2)[:len(bundle.text_encoders)]
        self.vectors: list[nn.Parameter] = []
        self.tokenizers: list[CLIPTokenizer] = []
        self._rows: list[NewTokenRows] = []
        for index, (encoder, tokenizer) in enumerate(zip(bundle.text_encoders, base_tokenizers)):
            embedding = encoder.get_input_embeddings()
            vectors = nn.Parameter(initial_vectors(embedding.weight, tokenizer, options.init_text, options.vectors,
                                                   seed=seed + index))
            private, first_id = _tokenizer_with_placeholders(tokenizer, options.vectors)
            self.vectors.append(vectors)
            self.tokenizers.append(private)
            self._rows.append(NewTokenRows(embedding, first_id, vectors))
        self.apply_max_norm()
        self._expansion = " ".join(PLACEHOLDER.format(i) for i in range(options.vectors))
        self.pattern = trigger_pattern(word)

    def expand(self, prompt: str) -> str:
        return self.pattern.sub(self._expansion, prompt)

    def encode(self, captions: list[str], clip_skip: int) -> Conditioning:
        """Conditioning for `captions`, every occurrence of the word as its vectors, under the current grad mode."""
        expanded = [self.expand(caption) for caption in captions]
        with contextlib.ExitStack() as stack:
            input_ids = [stack.enter_context(rows.placing(tokenize(tokenizer, expanded)))
                         for rows, tokenizer in zip(self._rows, self.tokenizers)]
            return encode_ids(self.bundle, input_ids, clip_skip)

    def apply_max_norm(self) -> None:
        """Clamp each vector's length to `max_norm` (when set; the same bound for every encoder), in place,
        after initialisation and after every optimizer step, so a vector cannot drift far outside the range of
        the model's own token embeddings."""
        if self.max_norm > 0:
            with torch.no_grad():
                for vectors in self.vectors:
                    vectors.copy_(torch.renorm(vectors, p=2, dim=0, maxnorm=self.max_norm))

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the vectors under `STATE_KEYS` (resumable state)."""
        return {key: vectors.detach().clone() for key, vectors in zip(STATE_KEYS, self.vectors)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned; other shapes or keys are a resume with other settings."""
        saved = [tensors.get(key) for key in STATE_KEYS[:len(self.vectors)]]
        if any(item is None or item.shape != vectors.shape for item, vectors in zip(saved, self.vectors)) \
                or len(tensors) != len(self.vectors):
            found = {key: tuple(value.shape) for key, value in tensors.items()}
            wanted = {key: tuple(vectors.shape) for key, vectors in zip(STATE_KEYS, self.vectors)}
            raise ConfigError(f"The saved state holds vectors {found}, this run {wanted}.",
                              "Resume with the run's own settings and base model (--resume RUN_DIR without --vectors).")
        with torch.no_grad():
            for vectors, item in zip(self.vectors, saved):
                vectors.copy_(cast(torch.Tensor, item).to(vectors.device, vectors.dtype))

    def remove(self) -> None:
        for rows in self._rows:
            rows.remove()


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    """The trigger word as a whole word, in any case (the host's CLIP tokenizer lower-cases prompts)."""
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)


def refuse_known_word(tokenizer: CLIPTokenizer, trigger: str) -> None:
    """A trigger word that is one token already has a meaning the model learned; training it as a new word
    would be ambiguous in every prompt that uses the old meaning."""
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise ConfigError(
            f"The trigger word {trigger!r} (the output name) is a word the text encoder already knows (one token).",
            f"Choose a rare or made-up word that does not occur in normal prompts, e.g. 'sks-{trigger}' or 'zwx{trigger}'.")


def initial_vectors(table: torch.Tensor, tokenizer: CLIPTokenizer, init_text: str, count: int, *, seed: int) -> torch.Tensor:
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


def _tokenizer_with_placeholders(tokenizer: CLIPTokenizer, count: int) -> tuple[CLIPTokenizer, int]:
    """A private copy of the tokenizer with `count` placeholder tokens; returns it and the first new id."""
    private = copy.deepcopy(tokenizer)
    placeholders = [PLACEHOLDER.format(i) for i in range(count)]
    added = private.add_tokens(placeholders)
    ids = private.convert_tokens_to_ids(placeholders)
    if added != count or ids != list(range(len(tokenizer), len(tokenizer) + count)):
        raise RuntimeError(f"placeholder tokens got ids {ids} instead of {len(tokenizer)}..")
    return private, ids[0]


class NewTokenRows:
    """Hooks on a token-embedding layer that put rows of `vectors` at the positions of placeholder ids (those
    from `first_id` on) in the layer's output. The table is never resized or written, and prompts without
    placeholders give the same output, bit for bit, as without the hooks.

    Two ways in: inside `placing(ids)`, which hands back the ids with every placeholder set to 0 (the host's
    token for an embedding's positions) for the whole text encoder to see, as SDXL's pooled output needs; or
    by passing placeholder ids straight in, which the layer swaps for 0 on its own (enough where only the
    hidden states matter).
    """

    def __init__(self, embedding: nn.Embedding, first_id: int, vectors: torch.Tensor) -> None:
        self.first_id = first_id
        self.vectors = vectors
        self._placed: tuple[torch.Tensor, torch.Tensor] | None = None  # set by `placing`
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # found by the pre-hook, for one call
        self._handles = [embedding.register_forward_pre_hook(self._swap_ids),
                         embedding.register_forward_hook(self._insert_vectors)]

    def _placement(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ids >= self.first_id, (ids - self.first_id).clamp(min=0)

    @contextlib.contextmanager
    def placing(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        self._placed = self._placement(ids)
        try:
            yield ids.masked_fill(self._placed[0], 0)
        finally:
            self._placed = None

    def _swap_ids(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._placed is not None:
            return None
        self._pending = self._placement(args[0])
        return (args[0].masked_fill(self._pending[0], 0), *args[1:])

    def _insert_vectors(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        placement, self._pending = self._placed or self._pending, None
        if placement is None:
            raise RuntimeError("the embedding layer ran without its pre-hook")
        new, rows = (part.to(output.device) for part in placement)
        if new.shape != output.shape[:-1]:
            raise RuntimeError(f"token embedding output {tuple(output.shape)} does not match the placed ids "
                               f"{tuple(new.shape)}")
        if not bool(new.any()):
            return output
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

    def __init__(self, source: BatchSource, templates: tuple[str, ...], *, trigger: str, seed: int) -> None:
        self.source = source
        self.templates = templates
        self.trigger = trigger
        self.seed = seed
        self._pattern = trigger_pattern(trigger)

    def batch(self, index: int) -> Batch:
        batch = self.source.batch(index)
        prompts = [self.prompt(caption, index, position) for position, caption in enumerate(batch.captions)]
        return dataclasses.replace(batch, captions=prompts)

    def prompt(self, caption: str, index: int, position: int) -> str:
        template = self.templates[random.Random(f"ti-template/{self.seed}/{index}/{position}").randrange(len(self.templates))]
        text = fill_template(template, name=self.trigger, filewords=caption)
        if not self._pattern.search(text):
            text = f"{self.trigger}, {text}" if text else self.trigger
        return text
