"""Regularization for the networks: the settings on every surface (CLI, TOML, tab, API), the class half of each
batch with per-image captions, prior preservation and style mode on the tiny model, the user's own folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import write_images
from lib_sdcustom.cli import build_parser, config_from_args
from lib_sdcustom.config import SECTIONS, PriorOptions, RunConfig, config_from_dict, config_to_dict, dumps_toml, load_config
from lib_sdcustom.data.class_images import MANIFEST_NAME, user_class_images
from lib_sdcustom.data.latent_cache import LatentCache
from lib_sdcustom.data.prompt_templates import without_phrase
from lib_sdcustom.data.scan import ImageRecord
from lib_sdcustom.events import RunStarted
from lib_sdcustom.methods.dreambooth import DreamBoothBatches
from lib_sdcustom.methods.prior import (ClassPrior, PriorBatches, StyleCaptions, class_image_counts, class_prompts,
                                       plain_prompts, split_count, style_caption)
from lib_sdcustom.methods.registry import METHODS, method_spec
from lib_sdcustom.run.train import train
from lib_sdcustom.training.batches import Batch
from lib_sdcustom.training.objectives import weighted_loss
from lib_sdcustom.ui import form

CLASS = "a photo of a dog"
CHANGED = {"prior_preservation": False, "class_prompt": "a photo of a cat", "prior_weight": 0.5,
           "num_class_images": 7, "class_prompt_share": 0.5, "class_prompt_file": "prompts.txt", "plain_prompts": "on", "class_data": "reg", "class_sample_steps": 9, "class_guidance": 3.5, "style": True}


def test_every_regularization_setting_reaches_the_cli_the_preset_the_tab_and_the_api(tmp_path):
    assert set(CHANGED) == {field.name for field in dataclasses.fields(PriorOptions)}, "a new setting needs a row here"
    flags = []
    for field in dataclasses.fields(PriorOptions):
        flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
        value = CHANGED[field.name]
        flags += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)])
    from_cli = config_from_args(build_parser().parse_args(["train", *flags]))
    assert dataclasses.asdict(from_cli.prior) == CHANGED
    preset = tmp_path / "run.toml"
    preset.write_text(dumps_toml(from_cli))
    assert load_config(preset).prior == from_cli.prior
    from_api = config_from_dict(json.loads(json.dumps(config_to_dict(from_cli))), source="the request")
    assert from_api.prior == from_cli.prior
    fields = form.option_fields()
    assert set(form.SECTION_TITLES) == set(SECTIONS)
    shown = {field.name for field in fields if field.section == "prior"}
    assert shown == set(CHANGED)
    values = [CHANGED[f.name] if f.section == "prior" else f.default for f in fields]
    from_tab = form.config_from_form("lora", "imgs", "x", "sks", "dog", fields, values)
    assert dataclasses.asdict(from_tab.prior) == CHANGED
    for method in METHODS:
        assert form.section_visible("prior", method) is (method_spec(method).uses_network or method == "dreambooth"), method


def test_presets_saved_before_the_move_load_their_dreambooth_class_settings():
    config = config_from_dict({"method": "dreambooth", "dreambooth": {"instance_prompt": "sks", "class_prompt": CLASS,
                                                                      "prior_weight": 0.5, "ema": True}})
    assert (config.prior.class_prompt, config.prior.prior_weight, config.dreambooth.ema) == (CLASS, 0.5, True)


def test_the_tab_gives_a_network_a_class_prompt_from_the_class_but_not_in_style_mode():
    fields = form.option_fields()
    defaults = [f.default for f in fields]
    assert form.config_from_form("lora", "imgs", "x", "sks", "dog", fields, defaults).prior.class_prompt == CLASS
    style = [True if f.key == "prior.style" else f.default for f in fields]
    assert form.config_from_form("lora", "imgs", "x", "sks", "dog", fields, style).prior.class_prompt == ""


def test_style_captions_keep_the_trigger_and_class_prompts_are_the_captions_without_it():
    assert without_phrase("a sks shape on a gray background", "sks") == "a shape on a gray background"
    assert without_phrase("A house, SKS Style, at dusk", "sks style") == "A house, at dusk"
    assert without_phrase("asks nothing", "sks") == "asks nothing"
    assert style_caption("a house by a lake", "sks") == "sks, a house by a lake"
    assert style_caption("a sks house", "sks") == "a sks house"
    assert style_caption("", "sks") == "", "caption dropout stays unconditional"
    options = PriorOptions(class_prompt="a shape", style=True)
    captions = ["a sks circle on gray", "sks, a square", "a sks circle on gray", "sks"]
    assert class_prompts(options, captions, "sks", plain=False) == ["a shape", "a circle on gray", "a square", ""]
    assert class_prompts(PriorOptions(class_prompt=CLASS), captions, "sks", plain=False) == [CLASS]


def test_a_prompt_file_adds_its_lines_to_the_class_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n a tree \n", encoding="utf-8")
    options = PriorOptions(class_prompt="a shape", class_prompt_file=str(path), style=True)
    assert class_prompts(options, ["a sks square"], "sks", plain=False) == ["a shape", "a square", "a red circle", "a tree"]
    assert split_count(40, 3) == [14, 13, 13] and split_count(2, 3) == [1, 1, 0]


def test_the_class_prompt_keeps_its_share_of_class_images_however_many_prompts_join_it():
    prompts = ["a shape", *(f"a shape {index}" for index in range(79))]
    assert class_image_counts(80, prompts, "a shape", 0.0) == [1] * 80, "0: an even split, as before"
    halved = class_image_counts(80, prompts, "a shape", 0.5)
    assert halved[0] == 40 and sum(halved) == 80 and halved[1:] == [1] * 40 + [0] * 39
    assert class_image_counts(10, ["a shape", "a tree", "a cat"], "a shape", 0.5) == [5, 3, 2]
    assert class_image_counts(10, ["a shape", "a tree"], "a shape", 1.0) == [10, 0]
    assert class_image_counts(10, ["a shape", "a tree"], "a shape", 0.01) == [1, 9], "never rounded down to none"
    assert class_image_counts(10, ["a tree", "a cat"], "", 0.5) == [5, 5], "no class prompt: nothing to favour"
    assert class_image_counts(10, ["a shape"], "a shape", 0.5) == [10]


@pytest.mark.parametrize("setting, methods, chosen", [
    ("class_prompt_share", {"lora": 0.25, "locon": 0.0, "dreambooth_lora": 0.25, "dreambooth": 0.25, "pivotal": 0.5},
     0.75),
    ("prior_weight", {"lora": 1.0, "locon": 1.0, "dreambooth_lora": 1.0, "dreambooth": 0.25, "pivotal": 0.25}, 0.0),
])
def test_a_prior_setting_left_at_minus_one_takes_the_methods_measured_value(setting, methods, chosen):
    """-1 (the default) takes the method's own value; any other value, 0 included, is the user's."""
    assert {method: getattr(RunConfig(method=method), setting) for method in methods} == methods
    for method in methods:
        config = RunConfig(method=method)
        setattr(config.prior, setting, chosen)
        assert getattr(config, setting) == chosen


@pytest.mark.parametrize("method", ["lora", "dreambooth", "pivotal"])
def test_style_mode_weighs_the_class_images_fully_unless_the_user_sets_a_weight(method):
    """In style mode the class images keep the style behind its trigger; a lighter default let it leak."""
    config = RunConfig(method=method)
    config.prior.style = True
    assert config.prior_weight == 1.0
    config.prior.prior_weight = 0.25
    assert config.prior_weight == 0.25


def test_plain_prompts_add_the_shipped_everyday_prompts_after_the_others(tmp_path):
    """The shipped list is read from the installed package (tests/test_packaging.py installs it)."""
    path = tmp_path / "prompts.txt"
    path.write_text("a tree\n", encoding="utf-8")
    plain = plain_prompts()
    assert len(plain) == len(set(plain)) >= 50 and all(prompt.islower() or prompt[0].islower() for prompt in plain)
    options = PriorOptions(class_prompt=CLASS, class_prompt_file=str(path))
    assert class_prompts(options, ["a sks dog"], "sks", plain=True) == [CLASS, "a tree", *plain]


def _plain(method: str, **prior: object) -> tuple[bool, bool]:
    """(plain prompts used, class images trained on) for `method` with these prior settings."""
    config = RunConfig(method=method)
    config.prior = PriorOptions(**prior)  # type: ignore[arg-type]
    return config.plain_prompts, config.prior_enabled


def test_auto_plain_prompts_join_a_networks_class_images_but_never_start_regularization_alone():
    """The quality benchmark's recipe for LoRA/LyCORIS: the class prompt's images plus varied plain prompts.
    DreamBooth-LoRA takes LoRA's; full DreamBooth was measured with the class prompt alone; without a class
    nothing is regularized."""
    assert _plain("lora", class_prompt=CLASS) == (True, True)
    assert _plain("dreambooth_lora", class_prompt=CLASS) == (True, True)
    assert _plain("locon", style=True) == (True, True)
    assert _plain("lora") == (False, False)
    assert _plain("lora", class_prompt=CLASS, prior_preservation=False) == (False, False)
    assert _plain("lora", class_prompt=CLASS, plain_prompts="off") == (False, True)
    assert _plain("dreambooth", class_prompt=CLASS) == (False, True)
    assert _plain("dreambooth", class_prompt=CLASS, plain_prompts="on") == (True, True)
    assert _plain("lora", plain_prompts="on") == (True, True)
    assert _plain("lora", plain_prompts="on", prior_preservation=False) == (True, False)
    assert _plain("textual_inversion", class_prompt=CLASS) == (False, False)


def test_presets_saved_when_plain_prompts_was_on_or_off_still_load():
    for saved, now in ((True, "on"), (False, "off")):
        assert config_from_dict({"prior": {"plain_prompts": saved}}).prior.plain_prompts == now


def _record(path: Path, caption: str) -> ImageRecord:
    Image.new("RGB", (64, 64), "white").save(path)
    return ImageRecord(path=path, caption=caption, repeats=1, subfolder="", size=(64, 64),
                       sha256=hashlib.sha256(path.read_bytes()).hexdigest(), caption_source="file")


def test_the_class_half_carries_each_class_images_own_caption_and_the_prior_weight(tmp_path):
    records = [_record(tmp_path / f"c{i}.png", f"caption {i}") for i in range(3)]

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return torch.zeros((pixels.shape[0], 4, 8, 8))

    prior = ClassPrior(records, weight=0.5, cache=LatentCache(None, "test"), encode=encode, seed=1, stride=2,
                       latent_scale=8)

    class Source:
        def batch(self, index: int) -> Batch:
            return Batch(latents=torch.ones((2, 4, 8, 8)), captions=["sks a", "sks b"])

    batch = PriorBatches(Source(), prior).batch(4)
    assert batch.captions[:2] == ["sks a", "sks b"]
    assert batch.captions[2:] == prior.captions(4, 2) and len(set(batch.captions[2:]) | {"caption 0", "caption 1",
                                                                                       "caption 2"}) == 3
    assert torch.equal(batch.latents[2:], torch.zeros((2, 4, 8, 8)))
    per_sample = torch.tensor([0.3, 1.7, 0.9, 2.5], dtype=torch.float64)
    expected = per_sample[:2].mean() + 0.5 * per_sample[2:].mean()
    torch.testing.assert_close(weighted_loss(per_sample, batch.weights.double()), expected, atol=1e-12, rtol=0)


def test_a_users_folder_captions_its_images_by_their_txt_files_else_the_class_prompt(tmp_path):
    _record(tmp_path / "a.png", "")
    _record(tmp_path / "b.png", "")
    (tmp_path / "b.txt").write_text("a dog on a sofa\n", encoding="utf-8")
    images = user_class_images(tmp_path, CLASS, 2)
    assert [(r.path.name, r.caption) for r in images.records] == [("a.png", CLASS), ("b.png", "a dog on a sofa")]


def lora_config(tiny_checkpoint: Path, images: Path, root: Path, **prior: object) -> RunConfig:
    config = RunConfig(method="lora")
    config.model.base, config.data.data = str(tiny_checkpoint), str(images)
    config.data.resolution, config.data.min_bucket, config.data.max_bucket = 64, 64, 128
    config.output.name, config.output.out, config.output.run_dir = "net", str(root / "out"), str(root / "run")
    config.network.rank, config.network.alpha, config.optimizer.lr = 4, 2.0, 1e-3
    config.training.steps, config.training.sample_steps, config.training.save_state_every = 1, 1, 0
    config.prior = dataclasses.replace(PriorOptions(num_class_images=2, class_sample_steps=2,
                                                    class_data=str(root.parent / "class")), **prior)
    return config


# Every network's class images include the plain prompts by default (`--plain-prompts auto`); the class prompt
# keeps its method's share of them (`--class-prompt-share`; of two images, the one it always keeps).
@pytest.mark.parametrize("method, name, share", [("lora", "net", "25%"), ("pivotal", "zwx-toy", "50%")])
def test_a_networks_first_loss_is_the_instance_term_plus_the_weighted_class_term(tiny_checkpoint, image_folder,
                                                                                  tmp_path, method, name, share):
    losses, described, weights_on_file = {}, [], []
    for weight in (0.0, 1.0, 2.0):
        config = lora_config(tiny_checkpoint, image_folder, tmp_path / f"w{weight}", class_prompt=CLASS,
                             prior_weight=weight)
        config.method, config.output.name = method, name
        result = train(config, callbacks=[lambda event: described.append(event.description)
                                          if isinstance(event, RunStarted) else None])
        losses[weight] = result.losses[0]
        with safe_open(str(result.outputs[0]), "pt") as handle:
            weights_on_file.append(handle.metadata()["ss_prior_loss_weight"])
    assert weights_on_file == ["0.0", "1.0", "2.0"], "kohya's record of the weight trained with"
    assert (f"prior preservation with 2 images of 'a photo of a dog' ({share} of them) and 64 plain prompts "
            "(weight 1.0)") in described[1]
    manifest = json.loads((tmp_path / "class" / MANIFEST_NAME).read_text())["images"]
    assert [entry["prompt"] for entry in manifest] == [CLASS, plain_prompts()[0]], "generated once, reused by the later runs"
    class_term = losses[1.0] - losses[0.0]
    assert abs(class_term) > 1e-3
    assert losses[2.0] - losses[0.0] == pytest.approx(2 * class_term, abs=1e-5)


# Pivotal tuning's trigger is its new word, the output's name (an uncaptioned picture's prompt is the word alone);
# the others' is the default caption.
@pytest.mark.parametrize("method, trigger", [("lora", "sks"), ("dreambooth_lora", "sks"), ("pivotal", "zwx-toy")])
def test_style_mode_generates_class_images_of_every_caption_without_the_trigger(tiny_checkpoint, tmp_path, method,
                                                                                 trigger):
    images = write_images(tmp_path / "images")
    for index, caption in enumerate([f"a {trigger} dog on grass", "a cat", f"a {trigger} dog on grass"]):
        (images / f"img{index}.txt").write_text(caption, encoding="utf-8")
    config = lora_config(tiny_checkpoint, images, tmp_path / "run", style=True, num_class_images=4, plain_prompts="off")
    config.method, config.dreambooth.instance_prompt = method, "[filewords]"
    if method == "pivotal":
        config.output.name = trigger
    else:
        config.data.default_caption = trigger
    described: list[str] = []
    train(config, callbacks=[lambda event: described.append(event.description) if isinstance(event, RunStarted) else None])
    manifest = json.loads((tmp_path / "class" / MANIFEST_NAME).read_text())["images"]
    # img3 has no caption: captioned with the trigger, its plain prompt is '' (the unconditional picture).
    assert sorted(entry["prompt"] for entry in manifest) == ["", "a cat", "a dog on grass", "a dog on grass"]
    assert f"style mode, prior preservation with 4 images of the captions without {trigger!r}" in described[0]


def test_dreambooth_in_style_mode_puts_the_trigger_in_each_caption_and_defaults_to_filewords(tmp_path):
    class Captions:
        def batch(self, index: int) -> Batch:
            return Batch(latents=torch.zeros(2, 4, 8, 8), captions=["a house by a lake", ""])

    batches = DreamBoothBatches(StyleCaptions(Captions(), "sks"), instance_prompt="[filewords]", name="x", prior=None)
    assert batches.batch(0).captions == ["sks, a house by a lake", ""]
    config = RunConfig(method="dreambooth_lora")
    config.prior.style, config.data.default_caption = True, "sks"
    assert method_spec("dreambooth_lora").method_class().trigger_phrase(config, ["a house", "a lake"]) == "sks"
    fields = form.option_fields()
    style = [True if f.key == "prior.style" else f.default for f in fields]
    for method in ("dreambooth", "dreambooth_lora"):
        assert form.config_from_form(method, "imgs", "x", "sks", "", fields, style).dreambooth.instance_prompt == \
            "[filewords]"
    plain = [f.default for f in fields]
    assert form.config_from_form("dreambooth", "imgs", "x", "sks", "dog", fields, plain).dreambooth.instance_prompt == \
        "a photo of sks dog"
