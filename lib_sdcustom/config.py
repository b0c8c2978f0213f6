"""Typed run configuration: one dataclass per concern, validated once, saved and loaded as TOML presets.

The same field list drives the TOML file, the CLI flags (`cli.py` builds argparse from the `option()`
metadata below) and, later, the tab's widgets, so an option cannot exist in one place and not another.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .errors import ConfigError
from .methods.registry import METHODS, STYLE_PRIOR_WEIGHT, MethodSpec, method_spec

TI_TEMPLATES = ("object", "style", "captions")
EMBEDDING_FORMATS = ("safetensors", "pt")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor", "sgd")
SCHEDULERS = ("auto", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
TIMESTEP_SAMPLINGS = ("uniform", "stratified")
SAVE_PRECISION = ("fp16", "fp32", "bf16")
PLAIN_PROMPT_CHOICES = ("auto", "on", "off")


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field that also knows its CLI flag, help text and allowed values."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelOptions:
    base: str = option("", "Base checkpoint: an SD1 .safetensors/.ckpt file or a diffusers folder.", flag="--base")
    clip_skip: int = option(1, "Use the text encoder's N-th layer from the end (1 = last, 2 = penultimate).")


def derived_bucket_bounds(resolution: int, step: int) -> tuple[int, int]:
    """Half and twice `resolution`, the smaller one a multiple of `step`."""
    step = max(step, 1)
    return max(step, resolution // 2 // step * step), resolution * 2


@dataclass
class DataOptions:
    data: str = option("", "Folder of training images (same-stem .txt captions; 'N_token class' subfolders give repeats).", flag="--data")
    caption_extension: str = option(".txt", "Extension of caption files beside the images.")
    default_caption: str = option("", "Caption for images without a caption file or class subfolder (default: the output name).")
    repeats: int = option(1, "Repeats per image and epoch for images not in an 'N_...' subfolder.")
    resolution: int = option(512, "Training resolution (side of the square of equal area).", flag="--resolution")
    buckets: bool = option(True, "Group images into aspect-ratio buckets instead of square crops.")
    min_bucket: int = option(256, "Smallest bucket side in pixels (left at the default: half the resolution).")
    max_bucket: int = option(1024, "Largest bucket side in pixels (left at the default: twice the resolution).")
    bucket_step: int = option(64, "Bucket sides are multiples of this.")
    upscale: bool = option(True, "Allow upscaling small images to reach a bucket (--no-upscale keeps their size).")
    flip: bool = option(False, "Randomly mirror images left-right (not for subjects with asymmetric details).")
    random_crop: bool = option(False, "Random instead of centre crop (disables the latent cache).")
    shuffle_captions: bool = option(False, "Shuffle comma-separated caption tags.")
    keep_tokens: int = option(0, "Keep the first N caption tags in place when shuffling.")
    caption_dropout: float = option(0.0, "Probability of training an image with an empty caption.")
    tag_dropout: float = option(0.0, "Probability of dropping each caption tag.")
    masked_loss: bool = option(False, "Learn only the masked part of each image: its alpha channel, or a same-stem "
                                      "NAME.mask.png beside it (white = learn, black = ignore); images without "
                                      "either train whole.")
    cache_latents: bool = option(True, "Encode each image once and reuse the latents (disk cache in the run folder).")

    @property
    def bucket_bounds(self) -> tuple[int, int]:
        """(smallest, largest) bucket side. A bound left at its default follows the resolution, half and
        twice it (kohya's 256-1024 at 512 px), so `--resolution 64` or 1024 needs no bucket flags. As with
        the family defaults, a value equal to the default counts as left at the default."""
        low, high = derived_bucket_bounds(self.resolution, self.bucket_step)
        return (self.min_bucket if self.min_bucket != _DATA_DEFAULTS["min_bucket"] else low,
                self.max_bucket if self.max_bucket != _DATA_DEFAULTS["max_bucket"] else high)


_DATA_DEFAULTS = {item.name: item.default for item in dataclasses.fields(DataOptions)}

#: More steps than any run finishes (a long DreamBooth is tens of thousands); beyond it is a typo.
MAX_STEPS = 1_000_000


@dataclass
class NetworkOptions:
    rank: int = option(8, "Network rank (dim): capacity of the LoRA/LyCORIS update.", flag="--rank")
    alpha: float = option(4.0, "Network alpha: the update is scaled by alpha/rank.", flag="--alpha")
    conv_rank: int = option(0, "Rank for 3x3 convolutions in ResNet blocks (LoCon, LoHa, LoKr; 0 = same as --rank, LoRA ignores it).")
    conv_alpha: float = option(0.0, "Alpha for convolutions (0 = same as --alpha).")
    dropout: float = option(0.0, "Dropout on the network's hidden rank activations.")
    lokr_factor: int = option(-1, "LoKr Kronecker factor (-1 = automatic).")
    loraplus_lr_ratio: float = option(1.0, "LoRA+: learning rate of each layer's up matrix over its down matrix's "
                                           "(kohya's loraplus_lr_ratio; the LoRA+ paper uses 16; 1 = off). LoRA and "
                                           "LoCon. On the quality table's concepts, 16 at a quarter of the rates did "
                                           "no better than 1 overall and worse on styles.")
    dora: bool = option(False, "DoRA: learn each layer's weight norm apart from its direction (LoRA and LoCon; "
                               "slower, often closer to a full fine-tune).", flag="--dora")


@dataclass
class TextualInversionOptions:
    vectors: int = option(1, "Vectors per token (1-75; more vectors hold more detail but use prompt space).", flag="--vectors")
    init_text: str = option("", "Initialise the vectors from this text's token embeddings (e.g. 'dog'); empty = random.", flag="--init-text")
    template: str = option("object", "Prompt templates: 'object', 'style', 'captions' (the .txt captions only) or a template file path.",
                           flag="--template")
    max_norm: float = option(0.0, "Clamp each vector's norm to at most this (0 = off).")
    embedding_format: str = option("safetensors", "File format: safetensors (recommended) or the host's .pt dict.",
                                   choices=EMBEDDING_FORMATS)
    word_first: float = option(0.33, "Pivotal tuning: share of the run in which only the new word learns, before the "
                                     "LoRA joins it (0 = both from the first step).")
    embedding_lr: float = option(0.0, "Pivotal tuning: learning rate of the new word's vectors beside the network "
                                      "(0 = 5e-3, Textual Inversion's default; Textual Inversion itself uses --lr).")


#: Activations and weight initialisations the host's hypernetwork file accepts (`networks/hypernetwork.py` builds them).
HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "mish",
                            "softplus", "softsign", "celu", "selu")
HYPERNETWORK_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")


@dataclass
class HypernetworkOptions:
    layer_structure: str = option("1, 2, 1", "Hypernetwork layer sizes as multiples of the width, starting and ending "
                                  "with 1 (the host's default '1, 2, 1'; '1, 1.5, 1' is smaller).",
                                  flag="--layer-structure")
    widths: str = option("", "Widths it applies to, comma-separated: the text context (768 SD1, 1024 SD2, 2048 SDXL) "
                         "rewrites cross-attention; 320, 640, 1280 also the self-attention of those UNet levels "
                         "(the host's own default is '768, 320, 640, 1280'). Empty = the model's text context only.",
                         flag="--hypernetwork-widths")
    activation_func: str = option("linear", "Activation between the layers ('linear' = none, the host's default).",
                                  choices=HYPERNETWORK_ACTIVATIONS)
    weight_initialization: str = option("Normal", "Initial weights (Kaiming for relu-like, Xavier for sigmoid-like "
                                        "activations).", choices=HYPERNETWORK_INITS)
    layer_norm: bool = option(False, "Add a layer normalisation after each layer.")
    dropout_structure: str = option("", "Dropout after each layer, one value per layer size, first and last 0 (e.g. "
                                    "'0, 0.05, 0'); empty = none.")
    activate_output: bool = option(False, "Also apply the activation after the last layer.")

    @property
    def layer_sizes(self) -> tuple[float, ...]:
        return _numbers(self.layer_structure, "--layer-structure")

    @property
    def dropouts(self) -> tuple[float, ...]:
        """One dropout per layer size (all 0 when none is given), as the host's file stores them."""
        if not self.dropout_structure.strip():
            return (0.0,) * len(self.layer_sizes)
        return _numbers(self.dropout_structure, "--dropout-structure")

    @property
    def width_list(self) -> tuple[int, ...]:
        """The widths asked for; empty when the model's text-context width is meant."""
        values = _numbers(self.widths, "--hypernetwork-widths") if self.widths.strip() else ()
        _require(all(value == int(value) and value > 0 for value in values),
                 f"--hypernetwork-widths {self.widths!r} holds a number that is no width.",
                 "Use the model's attention widths, e.g. '768' or '768, 320, 640, 1280' for SD1.")
        return tuple(sorted({int(value) for value in values}))


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers.",
                          f"Write numbers separated by commas, e.g. {flag} '1, 2, 1'.") from None


@dataclass
class DreamBoothOptions:
    instance_prompt: str = option("", "Prompt for your images, e.g. 'a photo of sks dog' ([filewords] inserts the caption).",
                                  flag="--instance-prompt")
    ema: bool = option(False, "Keep an exponential moving average of the UNet weights and export it.")
    ema_decay: float = option(0.9999, "EMA decay per step.")


@dataclass
class PriorOptions:
    """Regularization (prior preservation) for every method that trains the model: DreamBooth, DreamBooth-LoRA
    and the networks (`methods/prior.py`)."""

    prior_preservation: bool = option(True, "Train on class images too, to keep the class from drifting (networks: "
                                            "when a class prompt, a class folder or style mode gives class images).",
                                      flag="--prior-preservation")
    class_prompt: str = option("", "Prompt for the class, e.g. 'a photo of a dog' (also the caption of class images "
                                   "without a .txt caption).", flag="--class-prompt")
    prior_weight: float = option(-1.0, "Weight of the class-image loss; -1 = the method's default (1.0; on a "
                                       "subject, DreamBooth and pivotal tuning: 0.25; in style mode: 1.0).",
                                 flag="--prior-weight")
    num_class_images: int = option(100, "Number of class images (generated by the base model when the class folder has fewer).",
                                   flag="--num-class-images")
    class_prompt_share: float = option(-1.0, "Share of the generated class images drawn from the class prompt when "
                                              "other prompts join it (style captions, a prompt file, plain prompts), "
                                              "so the bare class prompt stays the base model's; 0 = an even split over "
                                              "all the prompts; -1 = the method's default (a quarter; LoCon: an even "
                                              "split; pivotal tuning: half).", flag="--class-prompt-share")
    class_prompt_file: str = option("", "A text file of more prompts, one a line, to generate class images of too "
                                        "(for a style: varied content without the trigger, so that plain prompts "
                                        "stay plain).", flag="--class-prompt-file")
    plain_prompts: str = option("auto", "Also generate class images of SD Customize's varied everyday prompts "
                                        "(lib_sdcustom/data/plain_prompts.txt: photos, paintings, people, places), "
                                        "so prompts without the trigger keep drawing what they ask for. auto: on for "
                                        "LoRA, LyCORIS and DreamBooth-LoRA networks beside a class prompt, a prompt "
                                        "file or style mode (the quality benchmark's recipe); off for DreamBooth and "
                                        "a class folder alone.",
                                 flag="--plain-prompts", choices=PLAIN_PROMPT_CHOICES)
    class_data: str = option("", "Folder of class images: your own regularization images (same-stem .txt captions, "
                                 "else the class prompt), or where generated ones go (default: a folder in the run "
                                 "directory).", flag="--class-data")
    class_sample_steps: int = option(30, "Sampler steps when generating class images.")
    class_guidance: float = option(7.0, "Guidance scale when generating class images.")
    style: bool = option(False, "Style mode: every caption carries the trigger phrase (put in front where it is "
                                "missing), and class images are generated from each caption without it, so prompts "
                                "without the trigger stay as the base model draws them. DreamBooth: with the "
                                "instance prompt '[filewords]'.", flag="--style")

    def names_prompts(self) -> bool:
        """Whether a class prompt, a prompt file or style mode (the captions) gives prompts to draw class images of."""
        return bool(self.class_prompt.strip() or self.class_prompt_file or self.style)

    def names_class_images(self) -> bool:
        """Whether prompts or a class folder say what class images show; the plain prompts alone do not (see
        `RunConfig.prior_enabled`)."""
        return self.names_prompts() or bool(self.class_data)


@dataclass
class OptimizerOptions:
    lr: float = option(0.0, "Learning rate (0 = the method's default: LoRA 1e-4, Textual Inversion 5e-3, DreamBooth 2e-6).",
                       flag="--lr")
    unet_lr: float = option(0.0, "Learning rate for the UNet (0 = --lr).")
    text_encoder_lr: float = option(0.0, "Learning rate for the text encoder (0 = --lr).")
    optimizer: str = option("adamw", "Optimizer.", choices=OPTIMIZERS)
    weight_decay: float = option(0.01, "Weight decay.")
    scheduler: str = option("auto", "Learning-rate schedule after warmup (auto = the method's: a cosine decay to 0 "
                                    "for LoRA/LyCORIS networks, constant for the others).", choices=SCHEDULERS)
    warmup_steps: int = option(0, "Linear warmup steps.")
    restarts: int = option(1, "Number of cycles for cosine_with_restarts.")
    power: float = option(1.0, "Power of the polynomial schedule.")
    max_grad_norm: float = option(1.0, "Clip gradients to this norm (0 = no clipping).")


@dataclass
class TrainingOptions:
    steps: int = option(1000, "Number of optimizer steps (Textual Inversion: 1,000-3,000 are typical).", flag="--steps")
    batch_size: int = option(1, "Images per step.", flag="--batch-size")
    gradient_accumulation: int = option(1, "Accumulate gradients over N batches per optimizer step.")
    mixed_precision: str = option("no", "Mixed precision (fp16 needs a CUDA GPU; bf16 works on recent GPUs and CPU).", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    compile_unet: bool = option(False, "Compile the UNet with torch.compile (torch >= 2.2): the first steps take "
                                       "minutes longer while it compiles; later steps may be faster on a GPU.",
                                flag="--compile")
    fp8_base: bool = option(False, "Store the frozen base's UNet and text-encoder layers as 8-bit floats (float8_e4m3fn, "
                                   "widened layer by layer when used): about half the memory of fp16 weights, slightly "
                                   "less exact. Not for DreamBooth, which trains the UNet itself.")
    train_text_encoder: float = option(-1.0, "Train the text encoder for this fraction of the steps (0 = frozen, 1 = the whole run; "
                                             "-1 = the method's default: 1 for the networks and DreamBooth).", flag="--train-text-encoder")
    seed: int = option(42, "Random seed; the same seed and data give the same result.", flag="--seed")
    noise_offset: float = option(0.0, "Noise offset (0.05-0.1 helps very dark or bright images).")
    min_snr_gamma: float = option(5.0, "Min-SNR loss weighting gamma (0 = off). 5, the Min-SNR paper's value, is what "
                                       "the quality table's recipes train with; off and 1 did no better there.")
    timestep_sampling: str = option("uniform", "How each batch draws its noise levels: 'uniform' (each sample on its own) "
                                               "or 'stratified' (one in each equal slice of the schedule, so a batch "
                                               "covers every noise level). The quality table's recipes train with "
                                               "uniform; stratified did no better there.", choices=TIMESTEP_SAMPLINGS)
    zero_terminal_snr: bool = option(False, "Rescale the noise schedule to zero terminal SNR (v-prediction models only; "
                                            "the model then needs a trailing-timestep sampler).")
    cache_text_encoder_outputs: bool = option(False, "Encode each caption once and reuse it while the text encoders are "
                                                     "frozen (saves their compute every step, mostly for SDXL).")
    save_state_every: int = option(100, "Save resumable state every N steps (0 = only on cancel); dropped when "
                                        "the run finishes unless keep_final_state is on.")
    keep_final_state: bool = option(False, "Keep the resumable state of the last step, to train further later (for "
                                           "DreamBooth it is as large as the model and its optimizer).")
    save_every: int = option(0, "Also export an intermediate result every N steps (0 = off).")
    select_best_step: bool = option(False, "Score every intermediate export (save_every) and the last step by the "
                                           "model's own denoising error on your pictures and on class-prompt samples "
                                           "(needs the class prompt), and keep the best as the result; the others "
                                           "stay in the steps folder.")
    sample_every: int = option(0, "Render preview images every N steps (0 = only at the end).")
    sample_prompt: str = option("", "Prompt for preview images (default: the output name or first caption).")
    sample_steps: int = option(20, "Sampler steps for previews.")


@dataclass
class OutputOptions:
    name: str = option("", "Output name: the file stem and the word used in prompts.", flag="--name")
    out: str = option("", "Output folder; the result lands as OUT/NAME.safetensors.", flag="--out")
    overwrite: bool = option(False, "Replace an existing output of the same name.", flag="--overwrite")
    save_precision: str = option("fp16", "Precision of the saved weights.", choices=SAVE_PRECISION)
    run_dir: str = option("", "Folder for resumable state, caches and logs (default: OUT/../sdcustom-runs/NAME).")
    embeddings_dir: str = option("", "The host's embeddings folder, checked before a pivotal run for an embedding that "
                                     "already has the new word's name (the host would skip the bundled word). Empty: "
                                     "where a WebUI keeps it beside OUT (OUT/../embeddings and OUT/../../embeddings).")


@dataclass
class RunConfig:
    method: str = option("lora", "Training method.", flag="--method", choices=METHODS)
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    textual_inversion: TextualInversionOptions = field(default_factory=TextualInversionOptions)
    hypernetwork: HypernetworkOptions = field(default_factory=HypernetworkOptions)
    dreambooth: DreamBoothOptions = field(default_factory=DreamBoothOptions)
    prior: PriorOptions = field(default_factory=PriorOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    # ----- derived values (one place for the defaulting rules) -----
    @property
    def spec(self) -> MethodSpec:
        """The method's facts (`methods/registry.py`)."""
        return method_spec(self.method)

    @property
    def run_path(self) -> Path:
        if self.output.run_dir:
            return Path(self.output.run_dir)
        return Path(self.output.out).resolve().parent / "sdcustom-runs" / self.output.name

    @property
    def lr(self) -> float:
        return self.optimizer.lr or self.spec.default_lr

    @property
    def scheduler(self) -> str:
        """The learning-rate schedule the run trains with: `--scheduler auto` takes the method's."""
        chosen = self.optimizer.scheduler
        return self.spec.default_scheduler if chosen == "auto" else chosen

    @property
    def unet_lr(self) -> float:
        return self.optimizer.unet_lr or self.lr

    @property
    def text_encoder_lr(self) -> float:
        return self.optimizer.text_encoder_lr or self.lr

    @property
    def text_encoder_fraction(self) -> float:
        """Share of the run during which the text encoder learns (0 = frozen)."""
        value = self.training.train_text_encoder
        return self.spec.text_encoder_fraction if value < 0 else value

    @property
    def uses_network(self) -> bool:
        return self.spec.uses_network

    @property
    def class_prompt_share(self) -> float:
        """The class prompt's share of the generated class images: `--class-prompt-share`, or the method's."""
        value = self.prior.class_prompt_share
        return self.spec.class_prompt_share if value < 0 else value

    @property
    def prior_weight(self) -> float:
        """The class images' weight in the loss: `--prior-weight`, or the method's (in style mode, the full weight)."""
        value = self.prior.prior_weight
        if value >= 0:
            return value
        return STYLE_PRIOR_WEIGHT if self.prior.style else self.spec.prior_weight

    @property
    def plain_prompts(self) -> bool:
        """Whether class images include the shipped plain prompts. 'auto' adds them where the method's recipe
        does (`MethodSpec.plain_prompts_by_default`) and the run already draws class images of other prompts:
        beside a class prompt they keep the rest of the prompt intact. Without prompts the user asked for no
        regularization, or for their own images in a class folder (a mistyped folder must not be filled with
        pictures of the plain prompts)."""
        prior = self.prior
        if prior.plain_prompts == "auto":
            return self.spec.plain_prompts_by_default and prior.prior_preservation and prior.names_prompts()
        return prior.plain_prompts == "on"

    @property
    def prior_enabled(self) -> bool:
        """Whether the run trains on class images: the method can, prior preservation is on, and something says
        what the class images show."""
        prior = self.prior
        return ("prior" in self.spec.sections and prior.prior_preservation
                and (prior.names_class_images() or self.plain_prompts))

    def validate(self) -> "RunConfig":
        """Check every value once, before any model is loaded; raise ConfigError naming the option."""
        _validate(self)
        return self


SECTIONS = ("model", "data", "network", "textual_inversion", "hypernetwork", "dreambooth", "prior", "optimizer", "training",
            "output")
#: Settings whose type changed: presets saved before still load (`--plain-prompts` was on/off).
RETYPED_SETTINGS: dict[tuple[str, str], dict[Any, Any]] = {("prior", "plain_prompts"): {True: "on", False: "off"}}
#: Settings that moved to another section: presets saved before the move still load.
MOVED_SETTINGS = {("dreambooth", name): "prior" for name in ("prior_preservation", "class_prompt", "prior_weight",
                                                              "num_class_images", "class_data", "class_sample_steps",
                                                              "class_guidance")}


def _require(condition: bool, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(problem, fix)


def _validate(config: RunConfig) -> None:
    _require(config.method in METHODS, f"Unknown method {config.method!r}.", f"Use one of: {', '.join(METHODS)}.")
    _require(bool(config.model.base), "No base model given.", "Pass --base PATH to an SD1 checkpoint or diffusers folder.")
    _require(bool(config.data.data), "No training images given.", "Pass --data FOLDER with your images.")
    _require(bool(config.output.name), "No output name given.", "Pass --name NAME (the word you will use in prompts).")
    _require(bool(config.output.out), "No output folder given.", "Pass --out FOLDER (e.g. models/Lora).")
    opt = config.optimizer
    _require(opt.optimizer in OPTIMIZERS, f"Unknown optimizer {opt.optimizer!r}.", f"Use one of: {', '.join(OPTIMIZERS)}.")
    _require(opt.scheduler in SCHEDULERS, f"Unknown scheduler {opt.scheduler!r}.", f"Use one of: {', '.join(SCHEDULERS)}.")
    for name, value in (("--lr", opt.lr), ("--unet-lr", opt.unet_lr), ("--text-encoder-lr", opt.text_encoder_lr)):
        _require(math.isfinite(value) and value >= 0, f"{name} is {value}.", "Use a positive learning rate such as 1e-4 (0 = default).")
    _require(opt.warmup_steps >= 0 and opt.restarts >= 1, "Warmup must be >= 0 and restarts >= 1.", "Fix --warmup-steps / --restarts.")
    _require(opt.max_grad_norm >= 0, f"--max-grad-norm is {opt.max_grad_norm}.", "Use 0 (off) or a positive norm such as 1.0.")
    net = config.network
    if config.uses_network:
        _require(net.rank >= 1, f"--rank is {net.rank}; a network needs rank 1 or more.", "Use e.g. --rank 8 (4-32 is typical).")
        _require(net.rank <= 1024, f"--rank is {net.rank}.", "Use a rank of at most 1024 (4-128 is typical).")
        _require(net.alpha > 0, f"--alpha is {net.alpha}.", "Use a positive alpha, e.g. half the rank.")
        _require(net.conv_rank >= 0 and net.conv_alpha >= 0, "--conv-rank and --conv-alpha must be >= 0.", "Use 0 for 'same as rank/alpha'.")
        _require(0 <= net.dropout < 1, f"--dropout is {net.dropout}.", "Use a value in [0, 1).")
        _validate_network_algorithm(config)
    data = config.data
    _require(64 <= data.resolution <= 4096 and data.resolution % 8 == 0, f"--resolution is {data.resolution}.",
             "Use a multiple of 8 between 64 and 4096 (512 for SD1).")
    _require(data.bucket_step % 8 == 0 and data.bucket_step > 0, f"--bucket-step is {data.bucket_step}.", "Use a multiple of 8 such as 64.")
    low, high = data.bucket_bounds
    _require(low <= data.resolution <= high,
             f"--resolution {data.resolution} is outside the bucket range --min-bucket {low} to --max-bucket {high}.",
             "Leave both bucket flags out (they then follow the resolution: --min-bucket {} --max-bucket {}), "
             "or give bounds around {}.".format(*derived_bucket_bounds(data.resolution, data.bucket_step), data.resolution))
    _require(data.repeats >= 1, f"--repeats is {data.repeats}.", "Use 1 or more.")
    for name, value in (("--caption-dropout", data.caption_dropout), ("--tag-dropout", data.tag_dropout)):
        _require(0 <= value < 1, f"{name} is {value}.", "Use a probability in [0, 1).")
    _validate_method_sections(config)
    train = config.training
    _require(train.train_text_encoder == -1 or 0 <= train.train_text_encoder <= 1,
             f"--train-text-encoder is {train.train_text_encoder}.", "Use a fraction between 0 (frozen) and 1 (the whole run).")
    _require(1 <= train.steps <= MAX_STEPS, f"--steps is {train.steps}.",
             f"Train for 1 to {MAX_STEPS:,} steps (hundreds to a few thousand are typical).")
    _require(train.batch_size >= 1 and train.gradient_accumulation >= 1, "Batch size and accumulation must be >= 1.",
             "Fix --batch-size / --gradient-accumulation.")
    _require(train.mixed_precision in MIXED_PRECISION, f"Unknown mixed precision {train.mixed_precision!r}.",
             f"Use one of: {', '.join(MIXED_PRECISION)}.")
    _require(train.timestep_sampling in TIMESTEP_SAMPLINGS, f"Unknown timestep sampling {train.timestep_sampling!r}.",
             f"Use one of: {', '.join(TIMESTEP_SAMPLINGS)}.")
    _require(not (train.fp8_base and "unet" in config.spec.trained_in_place),
             f"fp8 base storage is on, but {config.spec.label} trains the UNet's own weights, which cannot be 8-bit.",
             "Turn fp8_base off, or use DreamBooth-LoRA (method dreambooth_lora), which keeps the base frozen.")
    _require(train.noise_offset >= 0 and train.min_snr_gamma >= 0, "Noise offset and min-SNR gamma must be >= 0.", "Use 0 to turn them off.")
    for name in ("save_state_every", "save_every", "sample_every"):
        _require(getattr(train, name) >= 0, f"--{name.replace('_', '-')} is negative.", "Use 0 (off) or a step count.")
    _validate_best_step(config)
    _require(config.output.save_precision in SAVE_PRECISION, f"Unknown save precision {config.output.save_precision!r}.",
             f"Use one of: {', '.join(SAVE_PRECISION)}.")


def _validate_best_step(config: RunConfig) -> None:
    """Best-step selection needs steps to choose from and a class prompt to measure drift on."""
    train = config.training
    if not train.select_best_step:
        return
    _require(0 < train.save_every < train.steps,
             f"Best-step selection is on, but save_every is {train.save_every} with {train.steps} steps, so there is "
             "no intermediate result to choose from.",
             f"Set save_every to a share of the run (e.g. --save-every {max(1, train.steps // 6)}), or turn "
             "select_best_step off.")
    _require(bool(config.prior.class_prompt.strip()),
             "Best-step selection is on, but no class prompt was given; it measures how far the class drifts on "
             "samples of that prompt.", "Pass --class-prompt, e.g. 'a photo of a dog' (in the tab: fill in the class).")


def _validate_network_algorithm(config: RunConfig) -> None:
    """What a network algorithm cannot do (`networks/algorithms.py`), said before any model loads."""
    from .networks.algorithms import ALGORITHMS, algorithm_for

    algorithm, net = algorithm_for(config.method), config.network
    dora_methods = [m for m in METHODS if (name := method_spec(m).network_algorithm) and ALGORITHMS[name].supports_dora]
    _require(not net.dora or algorithm.supports_dora,
             f"--dora is on with {config.spec.label}; DoRA decomposes a LoRA/LoCon update, and LyCORIS and the WebUI "
             "do not combine it with this method the way it is trained here.",
             f"Turn --dora off, or use one of: {', '.join(dora_methods)}.")
    _require(not (config.training.fp8_base and not (algorithm.bypass_matches_host and not net.dora)),
             f"fp8 base storage is on with {config.spec.label}{' and --dora' if net.dora else ''}, which trains on the "
             "layers' merged weights; LyCORIS can only add to an 8-bit layer's output.",
             "Turn fp8_base off, or train LoRA, LoCon, LoHa, LoKr or GLoRA without --dora.")
    up_methods = [m for m in METHODS if (name := method_spec(m).network_algorithm) and ALGORITHMS[name].up_matrix]
    _require(net.loraplus_lr_ratio > 0, f"--loraplus-lr-ratio is {net.loraplus_lr_ratio}.",
             "Use a ratio above 0: 1 is plain LoRA, 16 what the LoRA+ paper uses.")
    _require(net.loraplus_lr_ratio == 1 or algorithm.up_matrix,
             f"--loraplus-lr-ratio is {net.loraplus_lr_ratio} with {config.spec.label}, which has no up matrix to "
             "speed up; LoRA+ is for updates made of an up and a down matrix.",
             f"Set --loraplus-lr-ratio 1, or use one of: {', '.join(up_methods)}.")
    _require(net.rank >= algorithm.min_rank and not (algorithm.even_rank and net.rank % 2),
             f"--rank is {net.rank}; {algorithm.rank_note}",
             f"Use {'an even' if algorithm.even_rank else 'a'} --rank of {algorithm.min_rank} or more.")


def _validate_method_sections(config: RunConfig) -> None:
    sections = config.spec.sections
    if "textual_inversion" in sections:
        ti = config.textual_inversion
        _require(not any(char.isspace() for char in config.output.name),
                 f"The trigger word {config.output.name!r} (--name) contains a space; {config.spec.label} needs one word.",
                 "Join the parts into one made-up word, e.g. 'sks-dog' or 'my_style'.")
        _require(not (config.spec.bundles_word and "." in config.output.name),
                 f"The word {config.output.name!r} (--name) contains a '.', which the WebUI reads as the end of a "
                 "bundled word's name in the LoRA file.", "Use a name without dots, e.g. 'sks-dog'.")
        _require(0 <= ti.word_first < 1, f"--word-first is {ti.word_first}.",
                 "Use a share of the run in [0, 1), e.g. 0.33 (0 = word and LoRA from the first step).")
        _require(ti.embedding_lr >= 0 and math.isfinite(ti.embedding_lr), f"--embedding-lr is {ti.embedding_lr}.",
                 "Use a positive learning rate such as 5e-3 (0 = default).")
        _require(1 <= ti.vectors <= 75, f"--vectors is {ti.vectors}; the host fits 1 to 75 vectors in a prompt chunk.",
                 "Use 1-8 vectors (more vectors hold more detail but leave less room in the prompt).")
        _require(ti.max_norm >= 0, f"--max-norm is {ti.max_norm}.", "Use 0 (off) or a positive norm.")
        _require(ti.embedding_format in EMBEDDING_FORMATS, f"Unknown embedding format {ti.embedding_format!r}.",
                 f"Use one of: {', '.join(EMBEDDING_FORMATS)}.")
        _require(bool(ti.template), "No prompt template given.", f"Use one of {', '.join(TI_TEMPLATES)} or a template file path.")
    if "hypernetwork" in sections:
        _validate_hypernetwork(config.hypernetwork)
    if "dreambooth" in sections:
        db = config.dreambooth
        _require(bool(db.instance_prompt.strip()), "No instance prompt given.",
                 "Pass --instance-prompt, e.g. 'a photo of sks dog'.")
        _require(not (config.prior.prior_preservation and not config.prior.class_prompt.strip()
                       and not config.prior.style),
                 "Prior preservation is on but no class prompt was given.",
                 "Pass --class-prompt, e.g. 'a photo of a dog', or turn it off with --no-prior-preservation.")
        _require(not (config.prior.style and "[filewords]" not in db.instance_prompt),
                 f"Style mode is on with {config.spec.label}, but the instance prompt {db.instance_prompt!r} gives "
                 "every picture the same caption, so the style cannot be told apart from what the pictures show.",
                 "Set the instance prompt to '[filewords]' (each picture's own caption, the trigger put in front) "
                 "and caption what each picture shows but not the style, or turn --style off.")
        _require(0 < db.ema_decay < 1, f"--ema-decay is {db.ema_decay}.", "Use a value just below 1, e.g. 0.9999.")
    _validate_prior(config)


def _validate_prior(config: RunConfig) -> None:
    """Prior preservation's numbers, and class images asked of a method that cannot train on them."""
    prior, spec = config.prior, config.spec
    _require(prior.plain_prompts in PLAIN_PROMPT_CHOICES, f"--plain-prompts is {prior.plain_prompts!r}.",
             f"Use one of: {', '.join(PLAIN_PROMPT_CHOICES)}.")
    if "prior" not in spec.sections:
        # The class prompt alone is allowed: best-step selection measures drift on it for every method.
        users = ", ".join(name for name in METHODS if "prior" in method_spec(name).sections)
        asked = [flag for flag, value in (("--class-data", prior.class_data), ("--class-prompt-file",
                                          prior.class_prompt_file), ("--plain-prompts on", prior.plain_prompts == "on"),
                                          ("--style", prior.style)) if value]
        _require(not (prior.prior_preservation and asked),
                 f"{spec.label} cannot train on class images (it does not change the model's own weights), but "
                 f"{' and '.join(asked)} asks for them.",
                 f"Leave --class-data and --class-prompt-file empty, --plain-prompts at auto or off and --style off (or pass "
                 f"--no-prior-preservation), or use a method that can: {users}.")
        return
    _require(prior.prior_weight == -1 or (math.isfinite(prior.prior_weight) and prior.prior_weight >= 0),
             f"--prior-weight is {prior.prior_weight}.",
             "Use a weight >= 0 (1.0 is typical; 0 trains on the class images without effect), or -1 for the "
             "method's default.")
    _require(prior.num_class_images >= 1, f"--num-class-images is {prior.num_class_images}.",
             "Use 1 or more (100-200 is typical).")
    _require(prior.class_prompt_share == -1 or 0 <= prior.class_prompt_share <= 1,
             f"--class-prompt-share is {prior.class_prompt_share}.",
             "Use a share from 0 (an even split over all the prompts) to 1 (the class prompt alone), or -1 for "
             "the method's default.")
    _require(prior.class_sample_steps >= 1 and prior.class_guidance >= 1,
             "Class-image sampler steps and guidance must be >= 1.", "Fix --class-sample-steps / --class-guidance.")


def _validate_hypernetwork(options: HypernetworkOptions) -> None:
    """The host's own asserts (`HypernetworkModule.__init__`), checked before any model loads."""
    sizes = options.layer_sizes
    _require(len(sizes) >= 2 and sizes[0] == 1 and sizes[-1] == 1,
             f"--layer-structure {options.layer_structure!r} does not start and end with 1.",
             "The hypernetwork maps a width onto itself: write e.g. '1, 2, 1' (the host's default) or '1, 1.5, 1'.")
    _require(all(math.isfinite(size) and 0 < size <= 8 for size in sizes),
             f"--layer-structure {options.layer_structure!r} has a size outside (0, 8].",
             "Use multiples of the width such as 0.5, 1, 1.5 or 2.")
    dropouts = options.dropouts
    _require(len(dropouts) == len(sizes), f"--dropout-structure {options.dropout_structure!r} has {len(dropouts)} "
             f"values for {len(sizes)} layer sizes.", "Give one dropout per layer size, e.g. '0, 0.05, 0' for '1, 2, 1'.")
    _require(dropouts[0] == 0 and dropouts[-1] == 0 and all(0 <= value < 1 for value in dropouts),
             f"--dropout-structure {options.dropout_structure!r} must start and end with 0 and hold values in [0, 1).",
             "Write e.g. '0, 0.05, 0', or leave it empty for no dropout.")
    options.width_list  # parses; whether the model has them is checked against its checkpoint (`check_before_load`)
    _require(options.activation_func in HYPERNETWORK_ACTIVATIONS, f"Unknown activation {options.activation_func!r}.",
             f"Use one of: {', '.join(HYPERNETWORK_ACTIVATIONS)}.")
    _require(options.weight_initialization in HYPERNETWORK_INITS,
             f"Unknown weight initialisation {options.weight_initialization!r}.", f"Use one of: {', '.join(HYPERNETWORK_INITS)}.")


# ----- TOML presets -----

def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts, refusing unknown keys so a typo is not silently ignored."""
    config = RunConfig()
    for key, value in values.items():
        if key == "method":
            config.method = str(value)
        elif key in SECTIONS and isinstance(value, dict):
            value = {name: _retyped(key, name, item) for name, item in value.items()}
            moved = {name: item for name, item in value.items() if (key, name) in MOVED_SETTINGS}
            _fill_section(getattr(config, key), {name: item for name, item in value.items() if name not in moved},
                          f"{source} [{key}]")
            for name, moved_value in moved.items():
                section = MOVED_SETTINGS[(key, name)]
                _fill_section(getattr(config, section), {name: moved_value}, f"{source} [{key}] (now [{section}])")
        else:
            raise ConfigError(f"Unknown setting {key!r} in {source}.",
                              f"Top-level keys are 'method' and the sections {', '.join(SECTIONS)}.")
    return config


def _retyped(section: str, name: str, value: Any) -> Any:
    """A value in the type its setting had when the preset was saved, in today's type."""
    translation = RETYPED_SETTINGS.get((section, name), {})
    return translation[value] if isinstance(value, bool) and value in translation else value


def _fill_section(section: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"Unknown setting {key!r} in {where}.", f"Known settings: {', '.join(fields)}.")
        setattr(section, key, _coerce(value, getattr(section, key), f"{where} {key}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    expected = type(current)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.", "Write true or false.")
    if not isinstance(value, expected):
        raise ConfigError(f"{where} must be a {expected.__name__}, got {value!r}.", f"Write a {expected.__name__}.")
    return value


def _toml_module() -> types.ModuleType:
    """tomllib, or tomli on Python 3.10 (the A1111 venv); imported late so that a missing tomli costs only
    preset loading, not the import of the whole extension."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return cast(types.ModuleType, tomllib)


def load_config(path: Path) -> RunConfig:
    tomllib = _toml_module()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.", "Check the path given to --config.")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.", "Fix the file or save a new preset.") from error
    return config_from_dict(values, source=str(path))


def dumps_toml(config: RunConfig) -> str:
    """Serialize to TOML. Our values are flat scalars, so a tiny writer beats another dependency."""
    data = config_to_dict(config)
    lines = [f"method = {_toml_value(data['method'])}"]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in data[section].items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
