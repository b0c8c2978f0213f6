"""The micro-world judge: the shipped weights, save/load, input forms and seeded training."""

import json

import pytest
import torch
from PIL import ImageFilter

from lib_sdcustom.errors import ModelLoadError
from lib_sdcustom.microworld import judge as judge_module
from lib_sdcustom.microworld.judge import (
    ATTRIBUTES, SHIPPED_WEIGHTS, Judge, JudgeNet, evaluation_set, images_to_tensor, load_judge, train_judge,
    world_labels,
)
from lib_sdcustom.microworld.world import CONCEPTS, concept_scenes, render

FIXED_SEED = 2024  # neither the training seed nor the default evaluation seed


@pytest.fixture(scope="module")
def shipped():
    return load_judge()


@pytest.fixture(scope="module")
def fixed_set():
    return evaluation_set(FIXED_SEED, 200)


def test_shipped_judge_is_small_and_names_the_worlds_labels(shipped):
    assert SHIPPED_WEIGHTS.stat().st_size < 600_000
    assert shipped.labels == world_labels()
    assert sum(p.numel() for p in shipped.net.parameters()) < 250_000


def test_shipped_judge_reads_clean_images(shipped, fixed_set):
    images, scenes = fixed_set
    scores = shipped.accuracy(images, scenes)
    assert set(scores) == set(ATTRIBUTES) | {"all"}
    assert all(score >= 0.95 for score in scores.values()), scores


def test_shipped_judge_survives_blur(shipped, fixed_set):
    images, scenes = fixed_set
    scores = shipped.accuracy([image.filter(ImageFilter.GaussianBlur(1)) for image in images], scenes)
    assert all(score >= 0.9 for score in scores.values()), scores


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_shipped_judge_recognises_held_out_concepts(shipped, name):
    scenes = list(concept_scenes(name, FIXED_SEED, 20))
    predicted = shipped.predict([render(scene) for scene in scenes])
    for attribute, value in CONCEPTS[name].target.items():
        assert sum(label == value for label in predicted[attribute]) >= 19, (attribute, predicted[attribute])


def test_tensor_and_pil_inputs_agree(shipped, fixed_set):
    images = fixed_set[0][:16]
    as_tensor = images_to_tensor(images)
    assert as_tensor.shape == (16, 3, 64, 64) and 0.0 <= float(as_tensor.min()) <= float(as_tensor.max()) <= 1.0
    assert shipped.predict(as_tensor) == shipped.predict(images)
    upscaled = torch.nn.functional.interpolate(as_tensor, scale_factor=2, mode="nearest")
    assert shipped.predict(upscaled)["shape"] == shipped.predict(images)["shape"]
    with pytest.raises(ValueError):
        shipped.predict(as_tensor[:, :1])


def _tiny_judge() -> Judge:
    torch.manual_seed(0)
    widths = (4, 8)
    return Judge(JudgeNet({k: len(v) for k, v in world_labels().items()}, widths), world_labels(), widths)


def test_save_load_round_trip(tmp_path, fixed_set):
    judge = _tiny_judge()
    weights, meta = judge.save(tmp_path / "j.safetensors", info={"steps": 3})
    assert meta == tmp_path / "j.json" and json.loads(meta.read_text())["info"] == {"steps": 3}
    loaded = load_judge(weights)
    assert loaded.labels == judge.labels and loaded.widths == judge.widths
    images = fixed_set[0][:32]
    for name, probs in loaded.probabilities(images).items():
        assert torch.allclose(probs, judge.probabilities(images)[name], atol=2e-2), name


def test_loading_a_broken_judge_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        load_judge(tmp_path / "none.safetensors")
    weights, meta = _tiny_judge().save(tmp_path / "j.safetensors")
    meta.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ModelLoadError, match="j.safetensors"):
        load_judge(weights)


def test_training_is_deterministic_for_a_seed():
    def run():
        return train_judge(1, 3, batch_size=8, pool_size=32, widths=(4, 8), log_every=0).net.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_augmentation_keeps_range_and_constant_images():
    generator = torch.Generator().manual_seed(0)
    batch = torch.full((6, 3, 64, 64), 0.5)
    blurred = judge_module._blur(batch, torch.linspace(0.3, 1.6, 6))
    assert torch.allclose(blurred, batch, atol=1e-6)
    augmented = judge_module._augment(torch.rand(6, 3, 64, 64, generator=generator), generator)
    assert augmented.shape == (6, 3, 64, 64) and float(augmented.min()) >= 0.0 and float(augmented.max()) <= 1.0
