"""The tab's option widgets, generated from the config dataclasses, and form values -> `RunConfig`.

Options come from the same `option()` metadata the CLI and the TOML presets use (help text, choices), so a
new setting appears in the tab without UI code; only the few inputs the tab lays out itself are listed here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import SECTIONS, RunConfig, config_from_dict
from ..errors import ConfigError
from ..methods.registry import METHOD_SECTIONS, METHOD_SPECS

#: Inputs the tab lays out itself (or the host decides), not in the option accordions.
MAIN_FIELDS = {("model", "base"), ("data", "data"), ("output", "name"), ("output", "out"), ("output", "run_dir")}
SECTION_TITLES = {
    "model": "Model", "data": "Images and captions", "network": "Network (LoRA / LyCORIS)",
    "textual_inversion": "Textual Inversion", "hypernetwork": "Hypernetwork", "dreambooth": "DreamBooth",
    "prior": "Regularization (prior preservation, style mode)", "optimizer": "Optimizer",
    "training": "Training", "output": "Output",
}
METHOD_LABELS = {name: spec.label for name, spec in METHOD_SPECS.items()}
METHOD_HELP = ("lora, locon, loha, lokr, oft, boft, ia3, glora: a small add-on file switched on in a prompt (all but "
               "lora are LyCORIS variants; 'DoRA' in the network options decomposes a LoRA/LoCon); textual_inversion: "
               "a new word; hypernetwork: the WebUI's hypernetwork (a style on every prompt, switched on with "
               "<hypernet:NAME:1>); dreambooth: a new checkpoint; dreambooth_lora: DreamBooth's recipe saved as a "
               "LoRA; pivotal: a LoRA and a new word trained together, in one LoRA file.")


@dataclass(frozen=True)
class OptionField:
    section: str
    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()

    def coerce(self, value: Any) -> Any:
        """Widget value -> the field's type (gradio hands numbers back as floats, blanks as None)."""
        if value is None or value == "":
            return self.default if self.kind is not str else ""
        if self.kind is bool:
            return bool(value)
        if self.kind is int:
            return int(round(float(value)))
        if self.kind is float:
            return float(value)
        return str(value)


def option_fields() -> list[OptionField]:
    defaults = RunConfig()
    found = []
    for section in SECTIONS:
        values = getattr(defaults, section)
        for field in dataclasses.fields(values):
            if (section, field.name) in MAIN_FIELDS:
                continue
            default = getattr(values, field.name)
            found.append(OptionField(section, field.name, type(default), default, field.metadata.get("help", ""),
                                     field.metadata.get("choices")))
    return found


def section_visible(section: str, method: str | None) -> bool:
    """Sections only some methods read show for those; the others always show (`method` is None while the
    dropdown is cleared)."""
    spec = METHOD_SPECS.get(method or "")
    return section not in METHOD_SECTIONS or (spec is not None and section in spec.sections)


def uses_token(method: str | None) -> bool:
    """Whether the method learns a token phrase (Textual Inversion's trigger is the embedding's name)."""
    spec = METHOD_SPECS.get(method or "")
    return spec is None or spec.uses_token


def apply_subject(config: RunConfig, token: str, subject_class: str) -> None:
    """The token ('sks') and class ('dog') -> captions and prompts of the method, unless set explicitly."""
    token, subject_class = (token or "").strip(), (subject_class or "").strip()
    dreambooth, prior = config.dreambooth, config.prior
    if subject_class and not prior.class_prompt and not prior.style and ("prior" in config.spec.sections
                                                                         or config.training.select_best_step):
        # prior preservation trains on it; best-step selection measures drift on it
        prior.class_prompt = f"a photo of a {subject_class}"
    if not uses_token(config.method):
        if subject_class and not config.textual_inversion.init_text:
            config.textual_inversion.init_text = subject_class
        return
    if not token:
        raise ConfigError("No token given.", "Type the rare word that will stand for your subject, e.g. 'sks', "
                                             "and its class, e.g. 'dog'.")
    phrase = f"{token} {subject_class}".strip()
    if not config.data.default_caption:
        config.data.default_caption = phrase
    if "dreambooth" in config.spec.sections:
        # A style is told apart from the content by each picture's own caption; the trigger goes in front.
        default = "[filewords]" if prior.style else f"a photo of {phrase}"
        dreambooth.instance_prompt = dreambooth.instance_prompt or default


def config_from_form(method: str, folder: str, name: str, token: str, subject_class: str,
                     fields: Sequence[OptionField], values: Sequence[Any], *, subject: bool = True) -> RunConfig:
    """`subject=False` keeps the token out of the settings (a preset must not freeze one subject's captions)."""
    if method not in METHOD_LABELS:  # a cleared dropdown sends None
        raise ConfigError("No method chosen.", "Pick a method in the Method list (LoRA if unsure).")
    nested: dict[str, Any] = {"method": method, "data": {"data": (folder or "").strip()},
                              "output": {"name": (name or "").strip()}}
    for field, value in zip(fields, values):
        nested.setdefault(field.section, {})[field.name] = field.coerce(value)
    config = config_from_dict(nested, source="the form")
    if subject:
        apply_subject(config, token, subject_class)
    return config


def form_values(config: RunConfig, fields: Sequence[OptionField]) -> list[Any]:
    """A config (a loaded preset) -> widget values in `fields` order."""
    return [getattr(getattr(config, field.section), field.name) for field in fields]
