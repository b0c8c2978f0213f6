"""Every fact about a training method that code outside its own module needs, one row per method.

The config (default learning rate and text-encoder share, which option sections to check), the hosts (output
folder, copy rule, prompt snippet), the tab (label, visible sections, token field) and the network layer (which
algorithm) all read a `MethodSpec` here instead of testing method names. A new method is one row below, its
module under `methods/` and its test rows; it touches more only when it brings an option section
(`config.py`) or an output kind the hosts do not yet file (`host/`).

This module imports nothing from the package at load time, so `config.py` can read it; the method classes load
lazily, so a method's optional dependencies load only when it is used.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method


class OutputKind(str, enum.Enum):
    """The host folder (and refresh) a result belongs to."""

    LORA = "lora"
    EMBEDDING = "embedding"
    CHECKPOINT = "checkpoint"
    HYPERNETWORK = "hypernetwork"


#: Option sections only some methods read: the tab shows, and validation checks, only a method's own.
METHOD_SECTIONS = ("network", "textual_inversion", "hypernetwork", "dreambooth", "prior")
#: Base components, as a host hands them to a run (`host.a1111.bundle_from_loaded_model`'s `copy`).
COMPONENTS = frozenset({"unet", "text_encoder"})


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the --method value
    label: str  # shown in the tab's method list
    module: str  # the module under `methods/` holding `class_name`
    class_name: str
    default_lr: float  # when --lr is not given (kohya / A1111 / diffusers practice)
    text_encoder_fraction: float  # share of the run the text encoder learns when --train-text-encoder is not given
    output: OutputKind
    snippet: str  # what the user types in txt2img to use the result; `{name}` and `{weight}` are filled in
    #: Base components the method changes in place: a host must hand these over as copies, never shared.
    trained_in_place: frozenset[str] = frozenset()
    sections: tuple[str, ...] = ()  # the `METHOD_SECTIONS` it reads
    #: Whether the tab asks for a token phrase ('sks dog'); Textual Inversion's trigger is the embedding's name.
    uses_token: bool = True
    network_algorithm: str | None = None  # `networks.algorithms.ALGORITHMS` key of the network it trains
    #: Whether the network file carries a new word named after the output (`bundle_emb.NAME.*`): the hosts name
    #: their embeddings folder (`output.embeddings_dir`), where no embedding may already have that name.
    bundles_word: bool = False
    #: Whether `--plain-prompts auto` adds the shipped plain prompts to its class images: the recipe the quality
    #: benchmark chose for the LoRA/LyCORIS networks and DreamBooth-LoRA (prompts without the trigger stayed as
    #: asked). Full DreamBooth was measured with the class prompt alone.
    plain_prompts_by_default: bool = False
    #: What `--scheduler auto` trains with. The networks and DreamBooth-LoRA decay to 0 (cosine): on the quality
    #: benchmark a constant rate left the result swinging between exports to the last step. The other recipes
    #: were measured constant, or (DreamBooth) gained only with twice the steps.
    default_scheduler: str = "constant"
    #: What `--class-prompt-share -1` (the default) gives the class prompt of the generated class images. A
    #: quarter brought LoRA's bare class prompt back to the base's level and raised its styles; LoCon's stayed
    #: there with an even split (0), and a quarter cost it new combinations (0.83 to 0.68), so it keeps the even
    #: split (docs/bench/class_share).
    class_prompt_share: float = 0.25
    #: What `--prior-weight -1` (the default) weighs the class images' loss by on a subject; style mode weighs
    #: them fully whatever the method (`STYLE_PRIOR_WEIGHT`). DreamBooth's paper and kohya weigh it 1; full
    #: DreamBooth drew new combinations more often at 0.25 on the quality benchmark with the bare class prompt
    #: still at the base's level (docs/bench/prior_by_mode).
    prior_weight: float = 1.0

    @property
    def uses_network(self) -> bool:
        return self.network_algorithm is not None

    def method_class(self) -> type[Method]:
        method: type[Method] = getattr(importlib.import_module(f"{__package__}.{self.module}"), self.class_name)
        return method

    def prompt_snippet(self, name: str, weight: float = 0.8) -> str:
        return self.snippet.format(name=name, weight=weight)


_LORA_SNIPPET = "<lora:{name}:{weight:g}>"
#: The class images' weight in style mode under `--prior-weight -1`. There they are what keeps the style behind its
#: trigger: lighter, they let it into the bare class prompt for DreamBooth (0.32 against 0.21, base 0.15) and
#: pivotal tuning, and cost LoRA's styles (docs/bench/prior_by_mode).
STYLE_PRIOR_WEIGHT = 1.0


def _network(name: str, label: str, algorithm: str, default_lr: float = 1e-4, class_prompt_share: float = 0.25
             ) -> MethodSpec:
    """A network trained on the frozen base; the base's own weights never change (LyCORIS hooks them)."""
    return MethodSpec(name, label, "network", "NetworkMethod", default_lr=default_lr, text_encoder_fraction=1.0,
                      output=OutputKind.LORA, snippet=_LORA_SNIPPET, sections=("network", "prior"),
                      network_algorithm=algorithm, plain_prompts_by_default=True, default_scheduler="cosine",
                      class_prompt_share=class_prompt_share)


METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    _network("lora", "LoRA", "lora"),
    _network("locon", "LoCon (LyCORIS)", "locon", class_prompt_share=0.0),
    _network("loha", "LoHa (LyCORIS)", "loha"),
    _network("lokr", "LoKr (LyCORIS)", "lokr"),
    _network("oft", "OFT (LyCORIS)", "oft"),
    _network("boft", "BOFT (LyCORIS)", "boft"),
    # One scale per channel, starting at 1: the (IA)^3 paper (T-Few) trains them at 3e-3.
    _network("ia3", "(IA)³ (LyCORIS)", "ia3", default_lr=3e-3),
    _network("glora", "GLoRA (LyCORIS)", "glora"),
    # A LoRA and a new word learned together; the word's vectors travel inside the LoRA file. Without class images
    # it drew new combinations best (0.88) but its bare class prompt showed the subject half the time (base
    # 0.01-0.24); with LoRA's class images, 0.61 and 0.14-0.30. Their loss at a quarter of its weight, with half
    # of them for the class prompt: 0.79 and 0.18-0.31 (docs/bench/pivotal_prior).
    MethodSpec("pivotal", "Pivotal tuning (LoRA + new word)", "pivotal", "PivotalMethod", default_lr=1e-4,
               text_encoder_fraction=1.0, output=OutputKind.LORA, snippet="<lora:{name}:{weight:g}> {name}",
               sections=("network", "textual_inversion", "prior"), uses_token=False, network_algorithm="lora",
               bundles_word=True, plain_prompts_by_default=True, default_scheduler="cosine",
               class_prompt_share=0.5, prior_weight=0.25),
    # The vectors hook the token-embedding layer; the table itself is never resized or written.
    MethodSpec("textual_inversion", "Textual Inversion", "textual_inversion", "TextualInversionMethod",
               default_lr=5e-3, text_encoder_fraction=0.0, output=OutputKind.EMBEDDING, snippet="{name}",
               sections=("textual_inversion",), uses_token=False),
    # Small MLPs on the k/v input of every attention, in the host's own .pt layout; the base stays frozen.
    MethodSpec("hypernetwork", "Hypernetwork", "hypernetwork", "HypernetworkMethod", default_lr=1e-5,
               text_encoder_fraction=0.0, output=OutputKind.HYPERNETWORK, snippet="<hypernet:{name}:{weight:g}>",
               sections=("hypernetwork",)),
    # The text encoder learns too: frozen, it left the bare class prompt to become the subject on the micro-world
    # (docs/bench/tuning.md), and the benchmark's DreamBooth recipe trains it for the whole run.
    MethodSpec("dreambooth", "DreamBooth (full fine-tune)", "dreambooth", "DreamBoothMethod", default_lr=2e-6,
               text_encoder_fraction=1.0, output=OutputKind.CHECKPOINT,
               snippet="Select the checkpoint '{name}' at the top of txt2img.", trained_in_place=COMPONENTS,
               sections=("dreambooth", "prior"), prior_weight=0.25),
    # A LoRA on DreamBooth's batches: with LoRA's regularization and schedule it scored the same as LoRA, sample
    # for sample, on the quality benchmark's subjects (docs/bench/tuning.md), so it takes LoRA's defaults.
    MethodSpec("dreambooth_lora", "DreamBooth-LoRA", "dreambooth", "DreamBoothLoraMethod", default_lr=1e-4,
               text_encoder_fraction=1.0, output=OutputKind.LORA, snippet=_LORA_SNIPPET,
               sections=("network", "dreambooth", "prior"), network_algorithm="lora", plain_prompts_by_default=True,
               default_scheduler="cosine"),
)}
METHODS = tuple(METHOD_SPECS)


def method_spec(name: str) -> MethodSpec:
    """The spec of a method the config has validated (an unknown name is a KeyError: validate first)."""
    return METHOD_SPECS[name]


def method_class(name: str) -> type[Method]:
    return METHOD_SPECS[name].method_class()
