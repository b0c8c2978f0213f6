"""What the tab, the run manager and the API need from whoever hosts them, and a host over plain folders.

The WebUI adapter (`a1111.py`) and `StandaloneHost` below implement the same small interface, so the
tab and the API are written once and tested without the WebUI: the tab gets a `HostFacts` dataclass and
never reaches for the host's globals.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

from ..config import RunConfig
from ..errors import ConfigError
from ..events import Event
from ..methods.registry import OutputKind, method_spec
from ..models.bundle import ModelBundle, ModelFamily
from .access import PathRoots

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def output_kind(method: str) -> OutputKind:
    return method_spec(method).output


def trained_in_place(method: str) -> frozenset[str]:
    """Base components a method changes in place: a host must hand these over as copies, never shared."""
    return method_spec(method).trained_in_place


def prompt_snippet(method: str, name: str, weight: float = 0.8) -> str:
    """What the user types in txt2img to use the result."""
    return method_spec(method).prompt_snippet(name, weight)


#: The folder of run folders beside the output folders (`RunConfig.run_path`'s default for outputs in models/).
RUNS_FOLDER = "sdcustom-runs"


@dataclass
class HostFacts:
    """Everything the tab shows or defaults from its host; built by the host, injected into the tab."""

    name: str  # "AUTOMATIC1111" or "standalone", shown in the tab
    output_dirs: dict[OutputKind, Path]
    presets_dir: Path
    checkpoints: list[str] = field(default_factory=list)  # standalone: the base models to pick from
    default_clip_skip: int = 1
    preview_every: int = 0
    queue_note: str = ""  # e.g. "Generation waits while a training runs."
    train_js: str | None = None  # JS function run in the browser before the Train callback
    after_train_js: str | None = None  # JS run after it (refresh the extra-networks cards)
    allowed_roots: list[Path] = field(default_factory=list)  # where API requests may point
    missing_requirements: list[str] = field(default_factory=list)
    runs_dir: Path | None = None  # where the host puts run folders (shown in the tab, with their size)
    gradio_css: str = ""  # standalone: the style sheet the host would otherwise load


class Host:
    """The interface; defaults are the plain-folder behaviour, the WebUI adapter overrides what differs."""

    def facts(self) -> HostFacts:
        raise NotImplementedError

    def prepare(self, config: RunConfig, checkpoint: str = "") -> None:
        """Fill what the host decides: the base model and the output folder for the method."""
        raise NotImplementedError

    def check_paths(self, config: RunConfig) -> None:
        """Refuse a config naming a path the page's users may not reach. The WebUI lets its users name any
        path in its own fields, so by default every path is allowed; the standalone server confines."""

    def model_label(self) -> str:
        """The model a run trains on when the host decides it (the WebUI's loaded checkpoint); '' if the user picks."""
        return ""

    def base_parameters(self, checkpoint: str = "") -> int | None:
        """Parameter count of the base a run would train (for the memory estimate); None if unknown."""
        return None

    def model_kind(self, checkpoint: str = "") -> ModelKind | None:
        """Family and prediction type of the base a run would train (for the plan and estimate); None if unknown."""
        return None

    def loaded_model_digest(self) -> str | None:
        """sha256 of the model the host holds in memory (`hashing.state_digest`), so anyone can check that a run
        left it exactly as it was; None when the host holds none."""
        return None

    def check_fit(self, config: RunConfig) -> None:
        """Raise ModelLoadError when the method cannot train the chosen or loaded model (cheap, no load)."""

    def bundle_for(self, config: RunConfig) -> ModelBundle | None:
        """The model to train on; None lets `train()` load `config.model.base` itself."""
        return None

    @contextlib.contextmanager
    def session(self, config: RunConfig) -> Iterator[None]:
        """Host state around one run (progress fields, model parking); restored however the run ends."""
        yield

    def on_event(self, event: Event) -> None:
        """Mirror training events in the host's own progress display."""

    def cancel_requested(self) -> bool:
        """The host's own Interrupt button."""
        return False

    def refresh(self, kind: OutputKind, outputs: Sequence[Path]) -> None:
        """Make the host list new files without a restart."""

    def exclusive(self, work: Callable[[], Any]) -> Any:
        """Run `work` holding the host's GPU queue (for runs started outside a queued UI call)."""
        return work()

    def wrap_tab_call(self, function: Callable[..., list[Any]], extra_outputs: list[Any]) -> Callable[..., list[Any]]:
        """Wrap the Train button's callback in the host's GPU queue call."""
        return function


@dataclass(frozen=True)
class ModelKind:
    """What is known of a base before loading it: the family, and the prediction type where a YAML, the file's
    metadata or the host's loaded model tells it (None: not known without loading)."""

    family: ModelFamily
    prediction_type: str | None = None


def _header_state(path: Path) -> dict[str, Any]:
    """Keys and shapes of a .safetensors file without reading its tensors (family checks are by keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: SimpleNamespace(shape=tuple(handle.get_slice(key).get_shape())) for key in handle.keys()}


class StandaloneHost(Host):
    """Plain folders under one models directory, the WebUI's layout: Stable-diffusion/, Lora/, embeddings/ ..."""

    FOLDERS = {OutputKind.LORA: "Lora", OutputKind.EMBEDDING: "embeddings", OutputKind.CHECKPOINT: "Stable-diffusion",
               OutputKind.HYPERNETWORK: "hypernetworks"}

    def __init__(self, models_dir: Path, *, data_roots: Sequence[Path] = ()) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.data_roots = [Path(root).resolve() for root in data_roots]
        self.roots = PathRoots([self.models_dir, *self.data_roots])

    @property
    def checkpoint_dir(self) -> Path:
        return self.models_dir / self.FOLDERS[OutputKind.CHECKPOINT]

    def checkpoints(self) -> list[str]:
        folder = self.checkpoint_dir
        if not folder.is_dir():
            return []
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                      if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file())

    def facts(self) -> HostFacts:
        from ..deps import missing_runtime

        return HostFacts(
            name="standalone",
            output_dirs={kind: self.models_dir / folder for kind, folder in self.FOLDERS.items()},
            presets_dir=self.models_dir / "sdcustom-presets",
            checkpoints=self.checkpoints(),
            allowed_roots=list(self.roots.roots),
            missing_requirements=missing_runtime(),
            runs_dir=self.models_dir / RUNS_FOLDER,  # OUT/../sdcustom-runs for every output folder here
        )

    def prepare(self, config: RunConfig, checkpoint: str = "") -> None:
        if checkpoint:
            path = (self.checkpoint_dir / checkpoint).resolve()
            if self.checkpoint_dir.resolve() not in path.parents:
                raise ConfigError(f"The checkpoint {checkpoint!r} is not in {self.checkpoint_dir}.",
                                  "Pick a checkpoint from the list.")
            config.model.base = str(path)
        if not config.model.base:
            raise ConfigError(f"No base checkpoint chosen (none found in {self.checkpoint_dir}).",
                              f"Put an SD1 .safetensors checkpoint into {self.checkpoint_dir} and pick it.")
        if not config.output.out:
            config.output.out = str(self.facts().output_dirs[output_kind(config.method)])
        if method_spec(config.method).bundles_word and not config.output.embeddings_dir:
            config.output.embeddings_dir = str(self.facts().output_dirs[OutputKind.EMBEDDING])
        self.check_paths(config)

    def check_paths(self, config: RunConfig) -> None:
        """The page and the API of this server reach only the models folder and the --data-root folders."""
        self.roots.confine_config(config)

    def base_parameters(self, checkpoint: str = "") -> int | None:
        path = self.checkpoint_dir / checkpoint
        if not checkpoint or path.suffix.lower() != ".safetensors" or not path.is_file():
            return None
        total = 0
        for value in _header_state(path).values():
            count = 1
            for size in value.shape:
                count *= size
            total += count
        return total

    def model_kind(self, checkpoint: str = "") -> ModelKind | None:
        from ..errors import UserFacingError
        from ..models.checkpoint_io import read_metadata
        from ..models.ldm_config import configs_for_checkpoint

        if not checkpoint:
            return None
        path = self.checkpoint_dir / checkpoint
        try:
            family = self._family_of(path)
        except UserFacingError:  # not a model we train: the Train button says why
            return None
        if family is None:
            return None
        try:  # the YAML beside it or the file's metadata; an SD2 file with neither cannot tell
            prediction_type: str | None = configs_for_checkpoint(path, family, read_metadata(path))[0].prediction_type
        except UserFacingError:
            prediction_type = None
        return ModelKind(family, prediction_type)

    @staticmethod
    def _family_of(path: Path) -> ModelFamily | None:
        """The family from a .safetensors header's keys (None for other files, read after loading)."""
        from ..models.detect import detect_family

        if path.suffix.lower() != ".safetensors" or not path.is_file():
            return None
        try:
            state = _header_state(path)
        except Exception as error:  # a damaged file: the loader reports it with its own words
            logger.debug("header read of %s failed: %s", path, error)
            return None
        return detect_family(state, path)  # raises for inpainting models and files that are no model

    def check_fit(self, config: RunConfig) -> None:
        # Inpainting models and files that are no model fail here, from the header alone; other file kinds
        # are checked by train() after loading, still before anything is written.
        self._family_of(Path(config.model.base))

