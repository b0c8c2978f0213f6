"""A procedural micro-world for measuring whether customization really teaches something.

`world` renders seeded 64x64 scenes with true captions and declares which concepts pretraining never sees;
`judge` is a small classifier that names a picture's shape, color, background and outline, so samples can
be scored automatically. `python -m lib_sdcustom.microworld --help` lists the commands.
"""

from .world import (
    BENCH_CONCEPTS,
    CONCEPTS,
    EVERYTHING,
    PRETRAINING,
    Concept,
    ConceptKind,
    Role,
    Scene,
    Split,
    caption_variants,
    concept_examples,
    concept_scenes,
    get_concept,
    pretraining_examples,
    pretraining_scenes,
    render,
    sample_scene,
)

__all__ = [
    "BENCH_CONCEPTS", "CONCEPTS", "EVERYTHING", "PRETRAINING", "Concept", "ConceptKind", "Role", "Scene", "Split",
    "caption_variants", "concept_examples", "concept_scenes", "get_concept", "pretraining_examples", "pretraining_scenes", "render",
    "sample_scene",
]
