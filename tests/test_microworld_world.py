"""The micro-world generator: determinism, bounds, captions and the pretraining/held-out split."""

import math
import random

import numpy as np
import pytest

from lib_sdcustom.errors import ConfigError
from lib_sdcustom.microworld import world
from lib_sdcustom.microworld.world import (
    BACKGROUNDS, BENCH_CONCEPTS, CONCEPTS, EVERYTHING, PRETRAINING, SHAPES, ConceptKind, Role, Scene, Split,
    caption_variants, concept_examples, concept_scenes, pretraining_examples, pretraining_scenes, render, sample_scene,
)


def _bytes(pairs):
    return [(image.tobytes(), caption) for image, caption in pairs]


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    first = _bytes(pretraining_examples(7, 40))
    assert first == _bytes(pretraining_examples(7, 40))
    assert first != _bytes(pretraining_examples(8, 40))
    assert _bytes(concept_examples("heart", 3, 5)) == _bytes(concept_examples("heart", 3, 5))


def test_images_are_64x64_rgb_and_anti_aliased():
    scene = Scene("circle", "red", "gray", False, 32.0, 32.0, 20.0, 0.0)
    pixels = np.asarray(render(scene))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    colors = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert {(215, 35, 35), (128, 128, 128)} <= colors
    assert len(colors) > 5, "the edge should carry blended pixels"


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_stays_inside_the_frame_at_the_extremes(shape):
    """Largest size, pushed into each corner, any rotation, with the outline stroke: the border stays clear."""
    size = world.MAX_SIZE
    low, high = size + world._MARGIN, world.IMAGE_SIZE - size - world._MARGIN
    for x, y in ((low, low), (low, high), (high, low), (high, high)):
        for rotation in (-world.MAX_ROTATION, 0.0, world.MAX_ROTATION):
            scene = Scene(shape, "yellow", "blue", True, x, y, size, rotation)
            pixels = np.asarray(render(scene)).astype(int)
            background = np.array(BACKGROUNDS["blue"])
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            assert (border == background).all(), (shape, x, y, rotation)
            assert (np.abs(pixels - background).sum(axis=2) > 0).sum() > 150, "the shape must be drawn"


def test_shape_polygons_fit_their_circumradius():
    for name, polygon in world._UNIT_POLYGONS.items():
        assert max(math.hypot(x, y) for x, y in polygon) == pytest.approx(1.0), name
    assert set(world._UNIT_POLYGONS) == set(SHAPES)


def test_sampled_scenes_fit_and_are_readable():
    rng = random.Random(0)
    for _ in range(500):
        scene = sample_scene(rng, allowed=EVERYTHING)
        assert scene.is_drawable and EVERYTHING.allows(scene)
        assert world.MIN_SIZE <= scene.size <= world.MAX_SIZE
        for centre in (scene.x, scene.y):
            assert scene.size + world._MARGIN - 0.01 <= centre <= world.IMAGE_SIZE - scene.size - world._MARGIN + 0.01
        assert scene.color != scene.background
        assert not (scene.outline and "black" in (scene.color, scene.background))


def test_caption_forms():
    scene = Scene("circle", "red", "gray", False, 30, 30, 15, 0)
    assert caption_variants(scene) == [
        "a red circle on a gray background", "a red circle", "a circle on a gray background", "a circle",
        "a red shape", "a shape", "",
    ]
    outlined = Scene("square", "orange", "white", True, 30, 30, 15, 0)
    assert caption_variants(outlined)[:5] == [
        "an orange square with a black outline on a white background", "an orange square with a black outline",
        "a square with a black outline on a white background", "a square with a black outline", "an orange shape",
    ]
    assert len(world.CAPTION_WEIGHTS) == len(caption_variants(scene))
    assert sum(world.CAPTION_WEIGHTS) == pytest.approx(1.0)


def test_pretraining_never_shows_held_out_concepts_or_the_identifier():
    pairs = list(pretraining_scenes(123, 3000))
    captions = {caption for _, caption in pairs}
    words = {word for caption in captions for word in caption.split()}
    assert not words & {*world.RESERVED_WORDS, "sks", "heart", "outline"}
    assert not any("orange star" in caption for caption in captions)
    for scene, caption in pairs:
        assert PRETRAINING.allows(scene)
        assert scene.shape != "heart" and not scene.outline and (scene.color, scene.shape) != ("orange", "star")
        assert caption in caption_variants(scene)
    assert "" in captions and len(captions) > 100
    # every pretraining attribute value actually occurs
    assert {s.shape for s, _ in pairs} == set(world.PRETRAINING_SHAPES)
    assert {s.color for s, _ in pairs} == set(world.COLORS)
    assert {s.background for s, _ in pairs} == set(BACKGROUNDS)


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concepts_are_held_out_and_fixed(name):
    concept = CONCEPTS[name]
    scenes = list(concept_scenes(name, 0, 30))
    for scene in scenes:
        # A known subject is one pretraining drew, an unseen combination is new to it; a style may be either.
        if concept.kind is not ConceptKind.STYLE:
            assert PRETRAINING.allows(scene) == (concept.kind is ConceptKind.KNOWN_SUBJECT)
        assert all(getattr(scene, attribute) == value for attribute, value in concept.target.items())
    assert len({scene.background for scene in scenes}) > 1, "instances should vary their context"
    image, caption = next(concept_examples(name, 0, 1))
    assert caption == caption_variants(scenes[0])[0] and image.size == (64, 64)
    assert concept.class_noun in {w for s, c in pretraining_scenes(0, 500) for w in c.split()}


def test_the_benchmark_set_has_three_concepts_of_each_kind_one_held_out_for_testing():
    concepts = [CONCEPTS[name] for name in BENCH_CONCEPTS]
    for kind in ConceptKind:
        of_kind = [concept for concept in concepts if concept.kind is kind]
        assert len(of_kind) == 3 and [c.role for c in of_kind].count(Role.TEST) == 1, kind
    assert not set(world.FIRST_CONCEPTS) & set(BENCH_CONCEPTS) and set(world.FIRST_CONCEPTS) <= set(CONCEPTS)


def test_unknown_concept_is_a_user_facing_error():
    with pytest.raises(ConfigError, match="heart"):
        list(concept_scenes("dragon", 0, 1))


def test_sampler_respects_a_custom_split():
    split = Split(("star",), ("blue", "white"), ("gray",), (True,))
    rng = random.Random(1)
    scenes = [sample_scene(rng, allowed=split) for _ in range(50)]
    assert all(s.shape == "star" and s.outline and s.background == "gray" for s in scenes)
    assert {s.color for s in scenes} == {"blue", "white"}
    with pytest.raises(ValueError, match="no drawable scene"):
        sample_scene(rng, allowed=Split(("star",), ("black",), ("black",)))
