"""The micro-world: seeded 64x64 pictures of one flat shape on a flat background, with true captions.

No pretrained Stable Diffusion weights can be had here, so learning is measured on a world we generate:
every image comes with its ground truth (a `Scene`), a judge can be trained on that truth, and some
concepts are declared held out of pretraining so that customization has something new to teach.
Everything is a pure function of an integer seed (Python's `random.Random`, whose streams are stable
across Python versions), so two runs give identical bytes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Mapping

from PIL import Image, ImageDraw

from ..errors import ConfigError

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # drawn at 256x256 and box-filtered down: exact area anti-aliasing

RGB = tuple[int, int, int]

# Shape colors, far apart in RGB so that a blurred reconstruction still has one obvious name.
COLORS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (245, 220, 40),
    "green": (35, 155, 55),
    "blue": (35, 80, 215),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Backgrounds share names with some colors (the prompt says "blue background") but are lighter or
# darker shades, and a shape is never drawn on the background of its own color name.
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
    "blue": (95, 145, 230),
    "green": (95, 170, 95),
}
OUTLINE_RGB: RGB = (0, 0, 0)
OUTLINE_WIDTH = 2.0  # pixels at 64x64; the stroke is centred on the shape's edge

PRETRAINING_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
HELD_OUT_SHAPES = ("heart",)
SHAPES = PRETRAINING_SHAPES + HELD_OUT_SHAPES

MIN_SIZE, MAX_SIZE = 12.0, 24.0  # circumradius in pixels
MAX_ROTATION = 20.0  # degrees; small, so a square never turns into a diamond nor a cross into an 'x'
_MAX_DRAWS = 1000  # a split whose every combination is undrawable fails instead of looping forever
_MARGIN = 1.5 + OUTLINE_WIDTH / 2.0  # clear space beyond circumcircle and outline (PIL strokes overshoot a bit)

# The empty caption lets a model learn unconditional generation for classifier-free guidance.
CAPTION_WEIGHTS = (0.38, 0.15, 0.12, 0.08, 0.07, 0.05, 0.15)
RESERVED_WORDS = ("sks",)  # identifier tokens for customization; never in any caption we write


@dataclass(frozen=True)
class Scene:
    """The whole ground truth of one image: what is drawn and where (x, y, size in 64x64 pixels)."""

    shape: str
    color: str
    background: str
    outline: bool
    x: float
    y: float
    size: float  # circumradius: every point of the shape lies within `size` of (x, y)
    rotation: float  # degrees, counter-clockwise

    def __post_init__(self) -> None:
        for value, known, what in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                   (self.background, BACKGROUNDS, "background")):
            if value not in known:
                raise ValueError(f"Unknown {what} {value!r}; known: {', '.join(known)}.")

    @property
    def is_drawable(self) -> bool:
        """False for combinations a viewer could not read: a shape on its own color, an invisible outline."""
        if self.color == self.background:
            return False
        return not (self.outline and "black" in (self.color, self.background))


@dataclass(frozen=True)
class Split:
    """Which attribute values a sampler may draw; `excluded` lists (color, shape) pairs never drawn."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]
    outline: tuple[bool, ...] = (False,)
    excluded: frozenset[tuple[str, str]] = frozenset()

    def allows(self, scene: Scene) -> bool:
        return (scene.is_drawable and scene.shape in self.shapes and scene.color in self.colors
                and scene.background in self.backgrounds and scene.outline in self.outline
                and (scene.color, scene.shape) not in self.excluded)


HELD_OUT_PAIRS = frozenset({("orange", "star")})
# Pretraining never sees a heart, an outline, an orange star, nor the word 'sks'.
PRETRAINING = Split(PRETRAINING_SHAPES, tuple(COLORS), tuple(BACKGROUNDS), (False,), HELD_OUT_PAIRS)
# The judge must name everything, held-out concepts included.
EVERYTHING = Split(SHAPES, tuple(COLORS), tuple(BACKGROUNDS), (False, True))


class ConceptKind(str, Enum):
    """The three kinds of concept users bring (issue 14), each failing a method in its own way."""

    UNSEEN_COMBINATION = "unseen combination"  # a subject whose features pretraining never saw together
    KNOWN_SUBJECT = "known subject"  # a subject the base already draws from plain words: the class prompt may leak
    STYLE = "style"  # one look across shapes and colors, to stay behind its trigger word


class Role(str, Enum):
    """Tune recipes on the `TUNE` concepts only; `TEST` concepts check that the choice carries over."""

    TUNE = "tune"
    TEST = "test"


@dataclass(frozen=True)
class Concept:
    """A subject or style to teach by customization.

    `target` holds the attributes the judge must report for a sample to count as the concept;
    `class_noun` is the word of the class prompt ("a photo of sks <class_noun>"), one pretraining knows.
    """

    name: str
    description: str
    class_noun: str
    target: Mapping[str, str | bool]
    split: Split
    kind: ConceptKind = ConceptKind.UNSEEN_COMBINATION
    role: Role = Role.TUNE


_ALL_BACKGROUNDS = tuple(BACKGROUNDS)
_UNKNOWN, _KNOWN, _STYLE = ConceptKind.UNSEEN_COMBINATION, ConceptKind.KNOWN_SUBJECT, ConceptKind.STYLE
# Instance pictures of the broadened set never show a blue background: 'on a blue background' is new context.
_NO_BLUE_BACKGROUND = tuple(name for name in BACKGROUNDS if name != "blue")
_STYLE_COLORS = tuple(name for name in COLORS if name != "black")  # a black shape cannot carry the outline


def _subject(name: str, description: str, shape: str, color: str, *, outline: bool = False,
             kind: ConceptKind = _UNKNOWN, role: Role = Role.TUNE) -> Concept:
    """A fixed shape and color (outlined or not) on varied backgrounds but blue; the class word is the shape's,
    or 'shape' for the heart, which pretraining never names."""
    target: dict[str, str | bool] = {"shape": shape, "color": color}
    if outline:
        target["outline"] = True
    return Concept(name, description, shape if shape in PRETRAINING_SHAPES else "shape", target,
                   Split((shape,), (color,), _NO_BLUE_BACKGROUND, (outline,)), kind, role)


def _style(name: str, description: str, target: Mapping[str, str | bool], split: Split,
           role: Role = Role.TUNE) -> Concept:
    return Concept(name, description, "shape", target, split, _STYLE, role)


CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    # The first three concepts (FIRST_CONCEPTS), not in the broadened benchmark set.
    Concept("heart", "a red heart", "shape", {"shape": "heart", "color": "red"},
            Split(("heart",), ("red",), _ALL_BACKGROUNDS)),
    Concept("outlined_square", "a yellow square with a black outline", "square",
            {"shape": "square", "color": "yellow", "outline": True},
            Split(("square",), ("yellow",), _ALL_BACKGROUNDS, (True,))),
    Concept("orange_star", "an orange star", "star", {"shape": "star", "color": "orange"},
            Split(("star",), ("orange",), _ALL_BACKGROUNDS)),
    # Unseen combinations: an outline (never seen) on a shape/color pair pretraining never drew, or on a
    # pair it knows; the judge must report all three attributes.
    _subject("outlined_yellow_heart", "a yellow heart with a black outline", "heart", "yellow", outline=True),
    _subject("outlined_orange_star", "an orange star with a black outline", "star", "orange", outline=True),
    _subject("outlined_green_cross", "a green cross with a black outline", "cross", "green", outline=True,
             role=Role.TEST),
    # Known subjects: pretraining drew each pair on every background, so 'a <shape>' may turn into it.
    _subject("red_circle", "a red circle", "circle", "red", kind=_KNOWN),
    _subject("purple_triangle", "a purple triangle", "triangle", "purple", kind=_KNOWN),
    _subject("white_diamond", "a white diamond", "diamond", "white", kind=_KNOWN, role=Role.TEST),
    # Styles across every pretraining shape: the outline alone on any color (never seen), one color (known),
    # an outline on one color (both at once). A style's samples count when they show its attributes.
    _style("outline_style", "any shape and color with a black outline", {"outline": True},
           Split(PRETRAINING_SHAPES, _STYLE_COLORS, _NO_BLUE_BACKGROUND, (True,))),
    _style("yellow_style", "any shape painted yellow", {"color": "yellow"},
           Split(PRETRAINING_SHAPES, ("yellow",), _NO_BLUE_BACKGROUND)),
    _style("outlined_white_style", "any shape painted white with a black outline", {"color": "white", "outline": True},
           Split(PRETRAINING_SHAPES, ("white",), _NO_BLUE_BACKGROUND, (True,)), role=Role.TEST),
    # Measured in the first best-step runs (32 judge samples; since replaced), left out of the broadened set: the judge
    # finds it in only 0.41 of the VAE's round trips of its own pictures (a black outline on purple is lost),
    # so no method could score above that on it (`bench quality` reports each concept's ceiling).
    _subject("outlined_purple_heart", "a purple heart with a black outline", "heart", "purple", outline=True),
)}
FIRST_CONCEPTS = ("heart", "outlined_square", "orange_star")  # the demo's and the tests'; recipes were tuned on them
#: The broadened benchmark set (issue 14): three concepts of each kind, two to tune on and one to test.
BENCH_CONCEPTS = tuple(name for name in CONCEPTS if name not in (*FIRST_CONCEPTS, "outlined_purple_heart"))


def _regular(n: int, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(math.cos(math.radians(phase + 360.0 * k / n)), math.sin(math.radians(phase + 360.0 * k / n)))
            for k in range(n)]


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    outer = _regular(2 * points)
    return [(x * (1.0 if k % 2 == 0 else inner), y * (1.0 if k % 2 == 0 else inner)) for k, (x, y) in enumerate(outer)]


def _normalized(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Centre a polygon on its bounding box and scale it to circumradius 1, so `Scene.size` bounds it."""
    cx = (max(p[0] for p in points) + min(p[0] for p in points)) / 2.0
    cy = (max(p[1] for p in points) + min(p[1] for p in points)) / 2.0
    radius = max(math.hypot(x - cx, y - cy) for x, y in points)
    return [((x - cx) / radius, (y - cy) / radius) for x, y in points]


def _heart(n: int = 72) -> list[tuple[float, float]]:
    """The classic parametric heart curve."""
    points = []
    for k in range(n):
        t = 2.0 * math.pi * k / n
        points.append((16.0 * math.sin(t) ** 3,
                       -(13.0 * math.cos(t) - 5.0 * math.cos(2 * t) - 2.0 * math.cos(3 * t) - math.cos(4 * t))))
    return points


def _cross(a: float = 0.3) -> list[tuple[float, float]]:
    """A plus sign with arms `2 * a` wide (before normalisation)."""
    return [(-a, -1.0), (a, -1.0), (a, -a), (1.0, -a), (1.0, a), (a, a),
            (a, 1.0), (-a, 1.0), (-a, a), (-1.0, a), (-1.0, -a), (-a, -a)]


# Unit polygons (y points down) with every vertex within radius 1, so that `size` bounds any rotation.
_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {name: _normalized(points) for name, points in {
    "circle": _regular(96),
    "square": _regular(4, phase=-45.0),
    "triangle": _regular(3),
    "star": _star(),
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "cross": _cross(),
    "heart": _heart(),
}.items()}


def _polygon(scene: Scene, scale: float) -> list[tuple[float, float]]:
    angle = math.radians(scene.rotation)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for ux, uy in _UNIT_POLYGONS[scene.shape]:
        rx, ry = ux * cos_a + uy * sin_a, -ux * sin_a + uy * cos_a  # counter-clockwise on screen
        # PIL puts integer coordinates at pixel centres; ours are at pixel corners, hence the half pixel.
        points.append(((scene.x + scene.size * rx) * scale - 0.5, (scene.y + scene.size * ry) * scale - 0.5))
    return points


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as a 64x64 RGB image (supersampled, then area-averaged for anti-aliasing)."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    points = _polygon(scene, _SUPERSAMPLE)
    draw.polygon(points, fill=COLORS[scene.color])
    if scene.outline:
        # Two extra points close the loop with a rounded joint at the first vertex too.
        draw.line(points + points[:2], fill=OUTLINE_RGB, width=round(OUTLINE_WIDTH * _SUPERSAMPLE), joint="curve")
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample_scene(rng: random.Random, *, allowed: Split = EVERYTHING) -> Scene:
    """Draw attributes uniformly from `allowed` (skipping undrawable combinations) and a random placement."""
    for _ in range(_MAX_DRAWS):
        shape, color = rng.choice(allowed.shapes), rng.choice(allowed.colors)
        background, outline = rng.choice(allowed.backgrounds), rng.choice(allowed.outline)
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        low, high = size + _MARGIN, IMAGE_SIZE - size - _MARGIN
        scene = Scene(shape, color, background, outline, round(rng.uniform(low, high), 2),
                      round(rng.uniform(low, high), 2), round(size, 2),
                      round(rng.uniform(-MAX_ROTATION, MAX_ROTATION), 1))
        if allowed.allows(scene):
            return scene
    raise ValueError(f"{allowed} allows no drawable scene (each color on its own background, or black with outline).")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_variants(scene: Scene) -> list[str]:
    """Every caption pretraining uses for `scene`, most specific first, the empty caption last.

    Order matches `CAPTION_WEIGHTS`. "a red shape" / "a shape" give a generic class word, so a held-out
    shape (the heart) has a class prompt the base model understands.
    """
    noun = f"{scene.shape} with a black outline" if scene.outline else scene.shape
    colored = f"{scene.color} {noun}"
    on_bg = f"on {_article(scene.background)} {scene.background} background"
    return [
        f"{_article(colored)} {colored} {on_bg}",
        f"{_article(colored)} {colored}",
        f"{_article(noun)} {noun} {on_bg}",
        f"{_article(noun)} {noun}",
        f"{_article(scene.color)} {scene.color} shape",
        "a shape",
        "",
    ]


def pretraining_scenes(seed: int, n: int) -> Iterator[tuple[Scene, str]]:
    """`n` (scene, caption) pairs from the pretraining split, captions drawn by `CAPTION_WEIGHTS`."""
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng, allowed=PRETRAINING)
        yield scene, rng.choices(caption_variants(scene), weights=CAPTION_WEIGHTS)[0]


def pretraining_examples(seed: int, n: int) -> Iterator[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs for pretraining the base model; no held-out concept ever appears."""
    for scene, caption in pretraining_scenes(seed, n):
        yield render(scene), caption


def get_concept(name: str) -> Concept:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ConfigError(f"Unknown micro-world concept {name!r}.",
                          f"Use one of: {', '.join(CONCEPTS)}.") from None


def concept_scenes(concept_name: str, seed: int, n: int) -> Iterator[Scene]:
    """`n` scenes of a held-out concept: fixed subject, varied background, place, size and rotation."""
    split = get_concept(concept_name).split
    rng = random.Random(seed)
    for _ in range(n):
        yield sample_scene(rng, allowed=split)


def concept_examples(concept_name: str, seed: int, n: int) -> Iterator[tuple[Image.Image, str]]:
    """Instance images of a held-out concept with their full descriptive caption."""
    for scene in concept_scenes(concept_name, seed, n):
        yield render(scene), caption_variants(scene)[0]
