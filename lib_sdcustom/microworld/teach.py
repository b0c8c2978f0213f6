"""Teaching the micro model a held-out concept: instance folders, prompts, and sampling from a trained result.

Shared by the demo, the quality benchmark and the tests, so all three train on the same kind of data and
judge the same way. Captions follow the world's own style with the identifier in place of the subject
('a sks shape on a gray background'); Textual Inversion, which cannot bind an existing word, uses one
made-up word for the whole concept instead ('a skstoken on a gray background'). Trained results are read
back from the exported file, the way a consumer of the file would use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import RunConfig
from ..methods.registry import OutputKind, method_spec
from ..models.bundle import ModelBundle
from ..training.conditioning import Conditioning
from .judge import Judge
from .quality import GUIDANCE, SAMPLE_STEPS, round_trip
from .world import IMAGE_SIZE, Concept, Scene, concept_scenes, render

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

IDENTIFIER = "sks"
TI_TRIGGER = "skstoken"
INSTANCE_IMAGES = 5
INSTANCE_SEED = 3  # no blue background among any concept's five pictures: "on a blue background" is new context
CEILING_PICTURES, CEILING_SEED = 200, 7

Sampler = Callable[[list[str], int], list[Image.Image]]


@dataclass(frozen=True)
class Prompts:
    word: str  # what stands for the concept in a prompt: 'sks shape', or the Textual Inversion word
    class_noun: str
    trigger: str  # the made-up part of `word`: the identifier 'sks', or the new word itself

    def caption(self, background: str) -> str:
        return f"a {self.word} on a {background} background"

    @property
    def subject(self) -> str:
        return f"a {self.word}"

    @property
    def on_blue(self) -> str:
        return self.caption("blue")

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun}"


def prompts_for(concept: Concept, method: str) -> Prompts:
    if method_spec(method).uses_token:
        return Prompts(f"{IDENTIFIER} {concept.class_noun}", concept.class_noun, IDENTIFIER)
    return Prompts(TI_TRIGGER, concept.class_noun, TI_TRIGGER)


def instance_images(concept: Concept, n: int = INSTANCE_IMAGES, seed: int = INSTANCE_SEED) -> list[Image.Image]:
    return [render(scene) for scene in concept_scenes(concept.name, seed, n)]


def content_caption(scene: Scene, concept: Concept, trigger: str) -> str:
    """A caption naming what the picture shows except the concept's own attributes, with the trigger where
    they would go: 'a sks red circle on a gray background' for the outline style. How users caption a style
    (everything but the style), so that the same words without the trigger ask for the base's look."""
    color = "" if "color" in concept.target else f"{scene.color} "
    noun = concept.class_noun if "shape" in concept.target else scene.shape
    return f"a {trigger} {color}{noun} on a {scene.background} background"


def write_instances(folder: Path, concept: Concept, prompts: Prompts, *, n: int = INSTANCE_IMAGES,
                    seed: int = INSTANCE_SEED, describe_content: bool = False) -> Path:
    """`n` pictures of the concept, each with a same-stem .txt caption naming the identifier: 'a sks shape on a
    gray background', or with `describe_content` the picture's other attributes too (`content_caption`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(concept_scenes(concept.name, seed, n)):
        render(scene).save(folder / f"{index:02d}.png")
        caption = content_caption(scene, concept, prompts.trigger) if describe_content else prompts.caption(scene.background)
        (folder / f"{index:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def base_run_config(method: str, base: Path, images: Path, *, name: str, out: Path, run_dir: Path) -> RunConfig:
    """A run on the micro model's 64x64 pictures; callers set steps and learning rates."""
    config = RunConfig(method=method)
    config.model.base = str(base)
    config.data.data = str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = IMAGE_SIZE, IMAGE_SIZE, IMAGE_SIZE
    config.output.name, config.output.out, config.output.run_dir = name, str(out), str(run_dir)
    config.training.save_state_every, config.training.sample_steps = 0, SAMPLE_STEPS
    return config


def sampler(bundle: ModelBundle, encode: Callable[[list[str]], Conditioning | torch.Tensor] | None = None) -> Sampler:
    """Prompts -> images with the benchmark's sampler settings; image i uses noise seed + i."""
    from ..sampling import generate

    def sample(prompts: list[str], seed: int) -> list[Image.Image]:
        return generate(bundle, prompts, seed=seed, steps=SAMPLE_STEPS, guidance=GUIDANCE, width=IMAGE_SIZE,
                        height=IMAGE_SIZE, encode=encode)

    return sample


def _embedding_encoder(bundle: ModelBundle, path: Path, trigger: str) -> Callable[[list[str]], torch.Tensor]:
    """Prompts with the trigger word expanded to the file's vectors, as the host applies an embedding."""
    from ..formats.embedding_file import embedding_vectors, read_embedding
    from ..methods.text_conditioning import encode_tokens, tokenize
    from ..methods.textual_inversion import PLACEHOLDER, NewTokenRows, _tokenizer_with_placeholders, trigger_pattern

    vectors = embedding_vectors(read_embedding(path)).float()
    tokenizer, first_id = _tokenizer_with_placeholders(bundle.tokenizer, vectors.shape[0])
    NewTokenRows(bundle.text_encoder.get_input_embeddings(), first_id, vectors)
    expansion = " ".join(PLACEHOLDER.format(i) for i in range(vectors.shape[0]))
    pattern = trigger_pattern(trigger)
    return lambda prompts: encode_tokens(bundle.text_encoder,
                                         tokenize(tokenizer, [pattern.sub(expansion, p) for p in prompts]))


def trained_sampler(config: RunConfig, result: Path, bundle: ModelBundle | None = None) -> Sampler:
    """Sample from what a run exported: a checkpoint is loaded, a network file attached to the base (or to
    `bundle`, a freshly loaded base) with the word it carries (pivotal tuning) hooked in as the host does, a
    hypernetwork attached, an embedding hooked into its text encoder."""
    from ..models.loader import load_bundle

    kind = config.spec.output
    if kind is OutputKind.CHECKPOINT:
        return sampler(load_bundle(result))
    bundle = bundle if bundle is not None else load_bundle(Path(config.model.base))
    if kind is OutputKind.EMBEDDING:
        return sampler(bundle, _embedding_encoder(bundle, result, config.output.name))
    if kind is OutputKind.HYPERNETWORK:  # at weight 1, as `<hypernet:NAME:1>`
        from ..formats.hypernetwork_file import hypernetwork_from_dict, read_hypernetwork_dict

        hypernetwork = hypernetwork_from_dict(read_hypernetwork_dict(result)).eval()
        hypernetwork.to(next(bundle.unet.parameters()).device).attach(bundle.unet)
        return sampler(bundle)
    from safetensors.torch import load_file

    from ..networks.algorithms import algorithm_for
    from ..networks.lycoris_backend import attach_network

    from ..formats.embedding_file import bundled_words
    from ..formats.network_file import BUNDLE_PREFIX
    from ..methods.textual_inversion import STATE_KEYS, LearnedWord

    tensors = load_file(str(result))
    words = bundled_words(tensors)
    network = {key: value for key, value in tensors.items() if not key.startswith(BUNDLE_PREFIX)}
    attached = attach_network(bundle.unet, bundle.text_encoder, algorithm_for(config.method), config.network,
                              train_text_encoder=any(key.startswith("lora_te") for key in network))
    attached.load_state_dict(network)
    if not words:
        return sampler(bundle)
    word = LearnedWord(bundle, config.output.name, config.textual_inversion, seed=0)
    word.load_state(dict(zip(STATE_KEYS, words[config.output.name])))
    return sampler(bundle, lambda prompts: word.encode(prompts, config.model.clip_skip))


def subject_hits(judge: Judge, images: Sequence[Image.Image] | torch.Tensor, concept: Concept) -> list[bool]:
    """Per image: does the judge report every target attribute of the concept?"""
    predicted = judge.predict(images)
    return [all(predicted[name][i] == value for name, value in concept.target.items()) for i in range(len(images))]


def concept_ceiling(vae: AutoencoderKL, judge: Judge, concept: Concept, *, n: int = CEILING_PICTURES) -> float:
    """Share of the VAE's round trips of `n` pictures of the concept that the judge counts as the concept: about
    the most any method can score on it, since every sample is decoded by this VAE (a black outline on a dark
    color is often lost on the way)."""
    pictures = [render(scene) for scene in concept_scenes(concept.name, CEILING_SEED, n)]
    return float(np.mean(subject_hits(judge, round_trip(vae, pictures), concept)))
