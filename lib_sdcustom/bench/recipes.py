"""The recipes `bench quality` can run: each a method with the settings it trains with on the micro model.

The table's rows (`quality.TABLE_METHODS`) carry the defaults the README states; every other recipe is a lever
measured against one of them, kept so the report in `docs/bench/<lever>/` can be run again. `recipe_line` is how
a report names them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..methods.registry import method_spec
from ..microworld.world import Concept, ConceptKind

#: Class images a recipe with prior preservation generates (twice that with varied plain prompts as well).
CLASS_IMAGES = 40


#: Every table recipe's min-SNR weighting, the pretraining's (docs/bench/tuning.md, docs/bench/min_snr).
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class Recipe:
    """One row of the table: a method with settings that learn on the micro model in under a minute."""

    key: str
    method: str
    steps: int
    lr: float
    text_encoder_lr: float = 0.0  # 0 = lr
    train_text_encoder: float = -1.0  # share of the run; -1 = the method's default
    batch_size: int = 4
    prior_preservation: bool = False
    prior_weight: float = 1.0  # of the class images' loss (--prior-weight)
    rank: int = 8
    #: Alpha over rank of the ResNet convolutions (LoCon's `--conv-alpha` / `--rank`); the attention layers' is 1.
    conv_scale: float = 1.0
    dropout: float = 0.0  # networks: --dropout, on each layer's rank activations
    dora: bool = False  # networks: --dora
    loraplus_ratio: float = 1.0  # LoRA/LoCon: the up matrices' rate over the rest (--loraplus-lr-ratio)
    flip: bool = False  # --flip: each picture mirrored half the time (every micro-world concept is mirror-safe)
    min_snr_gamma: float = MIN_SNR_GAMMA
    timestep_sampling: str = "uniform"  # --timestep-sampling
    noise_offset: float = 0.0  # --noise-offset: each latent channel's noise shifted by this times one normal draw
    scheduler: str = "constant"  # learning-rate schedule (`--scheduler`)
    class_images: int = CLASS_IMAGES  # used with prior preservation
    style: bool = False  # networks: --style (class images of the captions without the trigger)
    content_captions: bool = False  # captions name each picture's other attributes (`teach.content_caption`)
    varied_prompts: bool = False  # class images also of `varied_prompts()` (--class-prompt-file)
    class_prompt_share: float = 0.0  # of the class images, with varied prompts (--class-prompt-share; 0 = even)
    ema: bool = False  # DreamBooth: export the UNet's moving average (--ema)
    #: Settings that replace the above on a style concept: what the README tells a user training a style to tick.
    on_styles: tuple[tuple[str, Any], ...] = ()

    def for_concept(self, concept: Concept) -> Recipe:
        """The recipe as a user would run it on `concept`."""
        return replace(self, **dict(self.on_styles)) if concept.kind is ConceptKind.STYLE else self


# Tuned on the bundled model with the heart (docs/bench/tuning.md): networks bind the made-up 'sks' through
# the text encoder's LoRA, which needs a higher rate than the UNet's; DreamBooth trains the text encoder too.
_NETWORK: dict[str, Any] = {"steps": 600, "lr": 3e-3, "text_encoder_lr": 6e-3}
# Regularization on varied plain prompts as well as the class prompt: on the tune concepts (docs/bench/regularization)
# it kept 'on a blue background' working where class images of the class prompt alone did not (0.97 against 0.30
# on the red circle). On a style, style mode as the README advises: captions that name everything but the style.
_VARIED: dict[str, Any] = {"prior_preservation": True, "varied_prompts": True, "class_images": 2 * CLASS_IMAGES}
_STYLE_MODE = (("style", True), ("content_captions", True))
# DreamBooth's recipe (300 steps, the text encoder trained throughout) with its class images of the class prompt
# alone, a quarter of them when other prompts join, and style mode on a style: the base of its levers.
_DREAMBOOTH: dict[str, Any] = {"steps": 300, "lr": 2e-4, "train_text_encoder": 1.0, "prior_preservation": True,
                               "class_prompt_share": 0.25, "on_styles": _STYLE_MODE}
# DreamBooth as it ships (docs/bench/prior_by_mode): the class images' loss at a quarter on a subject, in full in
# style mode.
_DREAMBOOTH_BY_MODE: dict[str, Any] = {**_DREAMBOOTH, "prior_weight": 0.25,
                                       "on_styles": (*_STYLE_MODE, ("prior_weight", 1.0))}
# LoCon's table row (class images of the class prompt and varied prompts, decaying rate, style mode on styles), and
# LoRA's (the same with a quarter of the class images for the class prompt): the bases of the levers tried.
_COSINE_VARIED: dict[str, Any] = {"on_styles": _STYLE_MODE, "scheduler": "cosine", **_VARIED}
_LORA_QUARTER: dict[str, Any] = {**_COSINE_VARIED, "class_prompt_share": 0.25}
# The networks' steps at a quarter of their rates: the down matrices' rates with LoRA+, whose up matrices run faster.
_QUARTER_RATES: dict[str, Any] = {**_NETWORK, "lr": _NETWORK["lr"] / 4, "text_encoder_lr": _NETWORK["text_encoder_lr"] / 4}
RECIPES: tuple[Recipe, ...] = (
    Recipe("textual_inversion", "textual_inversion", steps=400, lr=5e-2),
    Recipe("lora", "lora", **_NETWORK),
    Recipe("locon", "locon", **_NETWORK),
    Recipe("loha", "loha", **_NETWORK),
    Recipe("lokr", "lokr", **_NETWORK),
    # Not tuned: the WebUI's default layers (1, 2, 1 on the text context) at a rate the micro model moves with.
    Recipe("hypernetwork", "hypernetwork", steps=600, lr=1e-3),
    Recipe("dora", "lora", dora=True, **_NETWORK),
    Recipe("oft", "oft", **_NETWORK),
    Recipe("ia3", "ia3", **_NETWORK),
    Recipe("glora", "glora", **_NETWORK),
    # The LoRA recipe with the word learning alone for its first third (the method's default `--word-first`).
    Recipe("pivotal", "pivotal", **_NETWORK),
    # On a style in style mode (captions naming all but the style, the instance prompt '[filewords]'), as the
    # README advises since DreamBooth has it, with the shipped quarter of the class images for the class prompt
    # (on a subject the class prompt is its only prompt); measured without it before, in docs/bench/style_mode.
    Recipe("dreambooth", "dreambooth", **_DREAMBOOTH),
    Recipe("dreambooth_no_prior", "dreambooth", steps=300, lr=2e-4, train_text_encoder=1.0),
    Recipe("dreambooth_lora", "dreambooth_lora", prior_preservation=True, **_NETWORK),
    # LoRA with regularization (docs/bench/regularization): class images of the class prompt; style mode on
    # captions that name everything but the style, and those captions alone.
    Recipe("lora_prior", "lora", prior_preservation=True, **_NETWORK),
    Recipe("lora_style", "lora", prior_preservation=True, style=True, content_captions=True, **_NETWORK),
    Recipe("lora_content", "lora", content_captions=True, **_NETWORK),
    Recipe("lora_style_varied", "lora", prior_preservation=True, style=True, content_captions=True,
           varied_prompts=True, class_images=2 * CLASS_IMAGES, **_NETWORK),
    # The networks regularized on the class prompt and varied plain prompts, in style mode on a style.
    Recipe("lora_regularized", "lora", on_styles=_STYLE_MODE, **_VARIED, **_NETWORK),
    Recipe("locon_regularized", "locon", on_styles=_STYLE_MODE, **_VARIED, **_NETWORK),
    # The same with the rate decaying to zero (cosine), the networks' default (`--scheduler auto`): the state
    # settles by the last step instead of swinging between exports.
    Recipe("lora_regularized_cosine", "lora", **_COSINE_VARIED, **_NETWORK),
    Recipe("locon_regularized_cosine", "locon", **_COSINE_VARIED, **_NETWORK),
    # DreamBooth-LoRA with the networks' regularization and decay, its defaults since (measured before DreamBooth
    # had style mode), and DreamBooth for twice its steps with the rate decaying over them.
    Recipe("dreambooth_lora_varied_cosine", "dreambooth_lora", scheduler="cosine", **_VARIED, **_NETWORK),
    # LoRA's cosine row with half the class images of the bare class prompt (an even split gives it 1 of 80),
    # the same at 1.5 times the rates (against the decay's halving of the total step), and with a quarter.
    Recipe("lora_class_half", "lora", class_prompt_share=0.5, **_COSINE_VARIED, **_NETWORK),
    Recipe("lora_class_half_fast", "lora", class_prompt_share=0.5, **_COSINE_VARIED,
           **{**_NETWORK, "lr": 4.5e-3, "text_encoder_lr": 9e-3}),
    Recipe("lora_class_quarter", "lora", **_LORA_QUARTER, **_NETWORK),
    # LoCon and DreamBooth-LoRA as they ship: the quarter share that LoRA's row measured; DreamBooth-LoRA in
    # style mode on a style, like the networks.
    Recipe("locon_class_quarter", "locon", **_LORA_QUARTER, **_NETWORK),
    Recipe("dreambooth_lora_class_quarter", "dreambooth_lora", **_LORA_QUARTER, **_NETWORK),
    Recipe("dreambooth_cosine", "dreambooth", steps=600, lr=2e-4, train_text_encoder=1.0, prior_preservation=True,
           scheduler="cosine"),
    # The same with the networks' class images (a quarter of the class prompt, the rest of varied plain prompts)
    # instead of the class prompt's alone.
    Recipe("dreambooth_varied_cosine", "dreambooth", steps=600, lr=2e-4, train_text_encoder=1.0,
           scheduler="cosine", class_prompt_share=0.25, **_VARIED),
    # Levers not swept before, tried on the new combinations' tune concepts against the shipped rows
    # (docs/bench/prior_weight): the class images' loss at half weight (for LoCon with its even split), twice
    # LoRA's rank, twice its text encoder's rate, DreamBooth at twice its rate. DreamBooth's class images at half
    # weight are its default since, and its row.
    Recipe("lora_quarter_prior_half", "lora", prior_weight=0.5, **_LORA_QUARTER, **_NETWORK),
    Recipe("lora_quarter_rank16", "lora", rank=16, **_LORA_QUARTER, **_NETWORK),
    Recipe("lora_quarter_te_fast", "lora", **_LORA_QUARTER, **{**_NETWORK, "text_encoder_lr": 1.2e-2}),
    Recipe("locon_prior_half", "locon", prior_weight=0.5, **_COSINE_VARIED, **_NETWORK),
    Recipe("dreambooth_prior_half", "dreambooth", prior_weight=0.5, **_DREAMBOOTH),
    # DreamBooth's row with the UNet's moving average exported: the constant rate leaves the last step wherever
    # the last batches pushed it, and the seeds' spread is most of each interval.
    Recipe("dreambooth_prior_half_ema", "dreambooth", prior_weight=0.5, ema=True, **_DREAMBOOTH),
    # DreamBooth's class images at a quarter of their weight: half had lifted its held-out cross.
    Recipe("dreambooth_prior_quarter", "dreambooth", prior_weight=0.25, **_DREAMBOOTH),
    # DreamBooth as it ships since (docs/bench/prior_by_mode): a quarter of the weight on a subject, where it drew
    # new combinations best, and the full weight in style mode, where lighter class images let the style into
    # the bare class prompt.
    Recipe("dreambooth_prior_by_mode", "dreambooth", **_DREAMBOOTH_BY_MODE),
    Recipe("dreambooth_fast", "dreambooth", **{**_DREAMBOOTH, "lr": 4e-4}),
    # The batch and the ratio of the UNet's rate to the text encoder's (docs/bench/rates; none adopted): twice
    # LoRA's batch, against the seeds' spread; the networks' UNet at their text encoder's rate (without
    # convolutions, LoRA's attention layers alone must learn a look the base has never drawn; LoCon for styles).
    Recipe("lora_quarter_batch8", "lora", **_LORA_QUARTER, **{**_NETWORK, "batch_size": 8}),
    Recipe("lora_quarter_unet_fast", "lora", **_LORA_QUARTER, **{**_NETWORK, "lr": 6e-3}),
    Recipe("locon_unet_fast", "locon", **_COSINE_VARIED, **{**_NETWORK, "lr": 6e-3}),
    # DreamBooth's text encoder at twice the UNet's rate, as the networks train theirs: the purple triangle, its
    # weak concept, came out in the wrong colour, and twice both rates (dreambooth_fast) lifted it.
    Recipe("dreambooth_te_fast", "dreambooth", text_encoder_lr=4e-4, prior_weight=0.5, **_DREAMBOOTH),
    # The same on the shipped quarter weight, which had kept the held-out cross that the faster text encoder lost
    # at 0.5.
    Recipe("dreambooth_by_mode_te_fast", "dreambooth", text_encoder_lr=4e-4, **_DREAMBOOTH_BY_MODE),
    # Between the two: at 4e-4 the purple triangle gained and the held-out cross lost the most.
    Recipe("dreambooth_by_mode_te_mid", "dreambooth", text_encoder_lr=3e-4, **_DREAMBOOTH_BY_MODE),
    # Min-SNR's gamma, set once on one concept (docs/bench/tuning.md), swept on LoRA's new combinations
    # (docs/bench/min_snr): off weights the low-noise steps, where an outline is drawn, as much as the rest; 1
    # weights them less than 5 does, leaving the layout and colour decided at high noise.
    Recipe("lora_quarter_snr_off", "lora", **_LORA_QUARTER, **{**_NETWORK, "min_snr_gamma": 0.0}),
    Recipe("lora_quarter_snr1", "lora", **_LORA_QUARTER, **{**_NETWORK, "min_snr_gamma": 1.0}),
    # The same for LoCon's styles (off: the outline style is a low-noise detail; 1, the other way).
    Recipe("locon_snr_off", "locon", **_COSINE_VARIED, **{**_NETWORK, "min_snr_gamma": 0.0}),
    Recipe("locon_snr1", "locon", **_COSINE_VARIED, **{**_NETWORK, "min_snr_gamma": 1.0}),
    # LoCon with its convolutions' updates scaled down (kohya's lower --conv-alpha; docs/bench/conv_alpha): LoCon
    # draws new combinations (0.83) where LoRA, without convolutions, does not (0.66), and LoRA draws styles (0.83)
    # where LoCon does not (0.74); a lighter convolution update is the setting between the two.
    Recipe("locon_conv_half", "locon", conv_scale=0.5, **_COSINE_VARIED, **_NETWORK),
    Recipe("locon_conv_quarter", "locon", conv_scale=0.25, **_COSINE_VARIED, **_NETWORK),
    # LoRA's and DreamBooth's rows with each batch's timesteps stratified over the schedule
    # (docs/bench/timestep_sampling): the runs' spread between seeds (0.11 to 1.00 on new combinations) is most of
    # their intervals, and timesteps drawn independently leave some batches on a few noise levels.
    Recipe("lora_quarter_stratified", "lora", timestep_sampling="stratified", **_LORA_QUARTER, **_NETWORK),
    Recipe("dreambooth_stratified", "dreambooth", timestep_sampling="stratified", **_DREAMBOOTH_BY_MODE),
    # LoRA's row with dropout on its rank activations (kohya's network_dropout, 0.1 as its users set it;
    # docs/bench/dropout): a regularizer against runs that latch onto whatever their first steps happened to fit.
    Recipe("lora_quarter_dropout", "lora", dropout=0.1, **_LORA_QUARTER, **_NETWORK),
    # LoRA's and LoCon's rows with LoRA+ (docs/bench/loraplus): the up matrices, which start at zero, learn
    # faster than the down matrices, at 4 times the rate, and at 16 and 32 times a quarter of it (16 is the
    # paper's ratio; the down matrices slower).
    Recipe("lora_quarter_plus4", "lora", loraplus_ratio=4.0, **_LORA_QUARTER, **_NETWORK),
    Recipe("lora_quarter_plus16", "lora", loraplus_ratio=16.0, **_LORA_QUARTER, **_QUARTER_RATES),
    Recipe("lora_quarter_plus32", "lora", loraplus_ratio=32.0, **_LORA_QUARTER, **_QUARTER_RATES),
    Recipe("locon_plus16", "locon", loraplus_ratio=16.0, **_COSINE_VARIED, **_QUARTER_RATES),
    # The table's LoRA and DreamBooth rows with mirrored pictures (`--flip`, kohya's flip_aug): twice the views of
    # five pictures, against runs that learn the pictures' layouts and drop a feature (docs/bench/flip).
    Recipe("lora_quarter_flip", "lora", flip=True, **_LORA_QUARTER, **_NETWORK),
    Recipe("dreambooth_by_mode_flip", "dreambooth", flip=True, **_DREAMBOOTH_BY_MODE),
    # LoRA's and LoCon's rows with DoRA (`--dora`; docs/bench/dora): each layer's weight norm learnt apart from its
    # direction. On the held-out cross without class images DoRA drew 0.78 against LoRA's 0.69 (new_methods).
    Recipe("lora_quarter_dora", "lora", dora=True, **_LORA_QUARTER, **_NETWORK),
    Recipe("locon_cosine_dora", "locon", dora=True, **_COSINE_VARIED, **_NETWORK),
    # LoRA's row with a noise offset of 0.1 (the top of the range kohya's users set; docs/bench/noise_offset): noise
    # that also shifts each channel's mean teaches the whole-picture colour the plain noise hides, and the new
    # combinations LoRA misses drop one of colour, outline and shape.
    Recipe("lora_quarter_noise_offset", "lora", noise_offset=0.1, **_LORA_QUARTER, **_NETWORK),
    # Pivotal tuning as LoRA's row ships (a quarter of the class images for the class prompt, cosine, style mode on
    # a style): a new word beside the network, against the networks' seed-dependent new combinations.
    Recipe("pivotal_class_quarter", "pivotal", **_LORA_QUARTER, **_NETWORK),
    # Class images of the bare class prompt alone, at a constant rate (kohya's plain regularization images).
    Recipe("pivotal_prior", "pivotal", prior_preservation=True, **_NETWORK),
    # LoRA's class images at pivotal tuning's constant rate: the decay's share of what the class images cost.
    Recipe("pivotal_class_quarter_constant", "pivotal", **{**_LORA_QUARTER, "scheduler": "constant"}, **_NETWORK),
    # The shipped pivotal row without the text encoder's LoRA: the word alone binds the subject in the text.
    Recipe("pivotal_class_quarter_unet", "pivotal", train_text_encoder=0.0, **_LORA_QUARTER, **_NETWORK),
    # The class images' loss at a quarter of its weight (pivotal's drift for its new combinations), and the same
    # with half the class images for the class prompt (against the drift of the bare class prompt): its defaults.
    Recipe("pivotal_prior_weight_quarter", "pivotal", prior_weight=0.25, **_LORA_QUARTER, **_NETWORK),
    Recipe("pivotal_prior_weight_quarter_class_half", "pivotal", prior_weight=0.25,
           **{**_LORA_QUARTER, "class_prompt_share": 0.5}, **_NETWORK),
    # Pivotal tuning's lighter prior on LoRA.
    Recipe("lora_prior_weight_quarter_class_half", "lora", prior_weight=0.25,
           **{**_LORA_QUARTER, "class_prompt_share": 0.5}, **_NETWORK),
)


def recipes_named(keys: Sequence[str]) -> list[Recipe]:
    """The recipes of these keys, in that order."""
    known = {recipe.key: recipe for recipe in RECIPES}
    return [known[key] for key in keys]


def recipe_line(recipes: Sequence[dict[str, Any]]) -> str:
    """How a report names its recipes: each setting that differs from the table's usual, read from the stored
    settings, so a report merged from older runs still reads right."""
    def settings(r: dict[str, Any]) -> str:
        rank = f" / {r['rank']}" if method_spec(r["method"]).uses_network else ""
        schedule = r.get("scheduler", "constant")  # older reports ran every recipe at a constant rate
        decay = "" if schedule == "constant" else f", {schedule} decay"
        share = r.get("class_prompt_share", 0.0)  # older reports split the class images evenly
        held = f", {share:.0%} of the class images of the class prompt" if share else ""
        on_styles = dict(r.get("on_styles", ()))
        style = ", style mode on styles" if on_styles.get("style") else ""
        weight = r.get("prior_weight", 1.0)  # older reports weighed the class images fully
        style_weight = on_styles.get("prior_weight", weight)
        weighed = f", class images' loss at weight {weight:g}" if weight != 1.0 and r["prior_preservation"] else ""
        weighed += f" ({style_weight:g} on styles)" if weighed and style_weight != weight else ""
        rate = f"{r['lr']:g} (text encoder {r['text_encoder_lr']:g})" if r.get("text_encoder_lr") else f"{r['lr']:g}"
        gamma = r.get("min_snr_gamma", MIN_SNR_GAMMA)
        snr = "" if gamma == MIN_SNR_GAMMA else (", min-SNR off" if gamma == 0 else f", min-SNR gamma {gamma:g}")
        ema = ", the UNet's moving average exported" if r.get("ema") else ""  # older reports had no EMA recipe
        conv_scale = r.get("conv_scale", 1.0)  # older reports scaled convolutions as the attention layers
        conv = f", convolutions' alpha {conv_scale:g} x rank" if conv_scale != 1.0 else ""
        dropout = f", dropout {r['dropout']:g}" if r.get("dropout") else ""  # older reports had no dropout recipe
        ratio = r.get("loraplus_ratio", 1.0)  # older reports trained both matrices at one rate
        plus = f", LoRA+ up matrices at {ratio:g} x the rate" if ratio != 1.0 else ""
        flip = ", pictures mirrored half the time" if r.get("flip") else ""  # older reports never mirrored
        dora = ", DoRA" if r.get("dora") else ""
        sampling = r.get("timestep_sampling", "uniform")  # older reports drew each timestep on its own
        strata = ", stratified timesteps" if sampling == "stratified" else ""
        offset = f", noise offset {r['noise_offset']:g}" if r.get("noise_offset") else ""  # older reports had none
        return (f"{r['key']} {r['steps']} / {rate} / {r['batch_size']}{rank}{dora}{conv}{dropout}{plus}{decay}{held}{weighed}"
                f"{snr}{strata}{offset}{flip}{ema}{style}")

    return ("Recipes (steps, lr, batch, rank; the rate is constant unless a decay is named): "
            + "; ".join(settings(r) for r in recipes) + ".")
