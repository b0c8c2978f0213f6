"""Pivotal tuning: a new word (Textual Inversion's vectors) and a LoRA learned together, in one LoRA file.

The word learns alone for the first third of the run (`word_first`), then word and network learn together,
each at its own learning rate (the word at Textual Inversion's, the network at LoRA's), so the vectors find
what the base model can already express before the network learns the rest. On the micro-world heart (two
training seeds, 64 samples each) this beat training both from the first step: the subject in 127 vs 94 of 128
samples, with the prompt's blue background 66 vs 29, the bare class prompt showing the subject 29 vs 89
(`docs/bench/pivotal_word_first.py`; measured with the network joining at step 200 of 600). The file holds
the network and the word's vectors as `bundle_emb.NAME.*` (`formats/embedding_file.bundled_word_tensors`):
the WebUI registers the word while the LoRA is active, so `<lora:NAME:1> a photo of NAME` uses both.

Its LoRA changes the model as LoRA's does, so it trains on class images as LoRA does (`PriorMixin`). At LoRA's
full weight they kept the bare class prompt at the base model's level but took back the new combinations that
pivotal tuning alone draws best; its defaults weigh them 0.25 (docs/bench/pivotal_prior).

The word is the output name, so the host's own rules for it apply before any model loads: it must not be a
word CLIP already has as one token (it would replace that word in every prompt), and no embedding of that
name may sit in the host's embeddings folder (the host would skip the bundled word and use that one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import RunConfig
from ..data.prompt_templates import load_templates
from ..errors import ConfigError
from ..formats.embedding_file import bundled_word_tensors, embeddings_named
from ..formats.network_file import BUNDLE_PREFIX
from ..models.tokenizer import load_clip_tokenizer
from ..run.context import RunContext
from ..training.conditioning import Conditioning
from .network import NetworkMethod
from .registry import method_spec
from .textual_inversion import STATE_KEYS, LearnedWord, NamedWordCaptions, TemplatedSource, refuse_known_word

if TYPE_CHECKING:
    from ..training.batches import BatchSource


class PivotalMethod(NamedWordCaptions, NetworkMethod):
    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        config = context.config
        self.word_name = config.output.name
        self.templates = load_templates(config.textual_inversion.template)
        self.word = LearnedWord(context.bundle, self.word_name, config.textual_inversion, seed=config.training.seed)

    # ----- facts known before the model is loaded -----
    @classmethod
    def check_before_load(cls, config: RunConfig) -> None:
        # Every SD family tokenizes with CLIP's vocabulary, which ships with the package.
        refuse_known_word(load_clip_tokenizer(), config.output.name)
        folders = [Path(config.output.embeddings_dir)] if config.output.embeddings_dir else \
            [Path(config.output.out).parent / "embeddings", Path(config.output.out).parent.parent / "embeddings"]
        clashes = [path for folder in folders for path in embeddings_named(folder, config.output.name)]
        if clashes:
            raise ConfigError(
                f"The embedding {clashes[0]} already uses the word {config.output.name!r}; the WebUI would use it and "
                "skip the word bundled in this LoRA.",
                "Choose another --name, or move that embedding out of the embeddings folder.")
        super().check_before_load(config)  # the class images' sources (`PriorMixin`)

    # ----- training -----
    @property
    def embedding_lr(self) -> float:
        return self.config.textual_inversion.embedding_lr or method_spec("textual_inversion").default_lr

    def late_groups(self) -> dict[str, int]:
        """The network's groups join after the word has learned alone for `word_first` of the run."""
        start = round(self.config.textual_inversion.word_first * self.config.training.steps)
        return {group["name"]: start for group in super().param_groups()} if start else {}

    def captioned(self, source: "BatchSource") -> "BatchSource":
        """The templates' prompts: each holds the word, so style mode's captions need nothing more."""
        return TemplatedSource(source, self.templates, trigger=self.word_name, seed=self.config.training.seed)

    def param_groups(self) -> list[dict[str, Any]]:
        # The word's group first: progress reports show the last group's rate, the network's, as for LoRA.
        return [{"params": list(self.word.vectors), "lr": self.embedding_lr, "name": "embedding"}, *super().param_groups()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The network's tensors plus the word's under the file's own `bundle_emb` keys (kept through export)."""
        vectors = list(self.word.state().values())
        return {**super().trainable_state(), **bundled_word_tensors(self.word_name, vectors)}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        bundled_keys = list(bundled_word_tensors(self.word_name, self.word.vectors))
        missing = [key for key in bundled_keys if key not in tensors]
        if missing:
            raise ConfigError(f"The saved state holds no vectors for the word {self.word_name!r} ({missing[0]}).",
                              "Resume with the run's own settings and output name (--resume RUN_DIR).")
        self.word.load_state({state_key: tensors[key] for state_key, key in zip(STATE_KEYS, bundled_keys)})
        super().load_trainable_state({key: value for key, value in tensors.items() if not key.startswith(BUNDLE_PREFIX)})

    def encode_captions(self, captions: list[str]) -> Conditioning:
        """The word's vectors always learn, so the graph goes through the text encoders (and their LoRA)."""
        return self.word.encode(captions, self.config.model.clip_skip)

    def frozen_text_conditioning(self) -> bool:
        return False

    def after_optimizer_step(self, step: int) -> None:
        self.word.apply_max_norm()

    def describe(self) -> str:
        widths = " + ".join(str(vectors.shape[1]) for vectors in self.word.vectors)
        count = self.word.vectors[0].shape[0]
        start = round(self.config.textual_inversion.word_first * self.config.training.steps)
        alone = f"alone for the first {start} steps, then with the network" if start else "with the network throughout"
        return (f"{super().describe()}; new word '{self.word_name}' as {count} vector(s) of width {widths} at learning "
                f"rate {self.embedding_lr:g}, {alone}, bundled in the LoRA file")

    def close(self) -> None:
        self.word.remove()
        super().close()
