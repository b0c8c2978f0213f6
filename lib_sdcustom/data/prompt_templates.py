"""Prompt templates as in the host's built-in trainer: lines with `[name]` (the trigger word) and
`[filewords]` (the image's caption), picked per example.

Textual Inversion uses them to vary the context around the new word; DreamBooth's instance prompt is a
single template ('a photo of sks dog, [filewords]').
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

OBJECT_TEMPLATES = (
    "a photo of a [name]", "a rendering of a [name]", "a cropped photo of the [name]", "the photo of a [name]",
    "a photo of a clean [name]", "a photo of a dirty [name]", "a dark photo of the [name]", "a photo of my [name]",
    "a photo of the cool [name]", "a close-up photo of a [name]", "a bright photo of the [name]",
    "a cropped photo of a [name]", "a photo of the [name]", "a good photo of the [name]", "a photo of one [name]",
    "a close-up photo of the [name]", "a rendition of the [name]", "a photo of the clean [name]",
    "a rendition of a [name]", "a photo of a nice [name]", "a good photo of a [name]", "a photo of the nice [name]",
    "a photo of the small [name]", "a photo of the weird [name]", "a photo of the large [name]",
    "a photo of a cool [name]", "a photo of a small [name]",
)
STYLE_TEMPLATES = (
    "a painting in the style of [name]", "a rendering in the style of [name]", "a cropped painting in the style of [name]",
    "the painting in the style of [name]", "a clean painting in the style of [name]", "a dirty painting in the style of [name]",
    "a dark painting in the style of [name]", "a picture in the style of [name]", "a cool painting in the style of [name]",
    "a close-up painting in the style of [name]", "a bright painting in the style of [name]",
    "a good painting in the style of [name]", "a rendition in the style of [name]", "a nice painting in the style of [name]",
    "a small painting in the style of [name]", "a weird painting in the style of [name]", "a large painting in the style of [name]",
)
BUILT_IN = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "captions": ("[filewords]",)}
#: Everyday prompts of varied content for class images (`--plain-prompts`): what the model should keep drawing.
PLAIN_PROMPTS = Path(__file__).with_name("plain_prompts.txt")


def load_templates(spec: str) -> tuple[str, ...]:
    """A built-in set by name, or the non-empty lines of a template file."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"The template {spec!r} is neither {', '.join(BUILT_IN)} nor an existing file.",
                          "Pick a built-in template or give the path of a text file with one prompt per line.")
    return prompt_lines(path, "template file", "Write one prompt per line, using [name] and [filewords].")


def prompt_lines(path: Path, what: str, fix: str) -> tuple[str, ...]:
    """The non-empty lines of a UTF-8 prompt file; `what` names the file and `fix` says how to fill it."""
    try:
        lines = tuple(line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except UnicodeDecodeError as error:
        raise ConfigError(f"The {what} {path} is not UTF-8 text.", "Save it as UTF-8.") from error
    except OSError as error:
        raise ConfigError(f"The {what} {path} cannot be read ({error.strerror or error}).",
                          "Check the path and the file's permissions.") from error
    if not lines:
        raise ConfigError(f"The {what} {path} has no prompts.", fix)
    return lines


def fill_template(template: str, *, name: str, filewords: str) -> str:
    """Substitute the placeholders and tidy the separators an empty caption leaves behind."""
    return _tidy(template.replace("[name]", name).replace("[filewords]", filewords))


def without_phrase(text: str, phrase: str) -> str:
    """`text` with every whole-word occurrence of `phrase` removed (ignoring case, as the tokenizer does), and
    the separators it leaves tidied: 'a sks shape on gray' without 'sks' is 'a shape on gray'."""
    if not phrase.strip():
        return text
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"
    return _tidy(re.sub(pattern, "", text, flags=re.IGNORECASE))


def _tidy(text: str) -> str:
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    text = re.sub(r"\s{2,}", " ", text)
    return text.strip().strip(",").strip()
