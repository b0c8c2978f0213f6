"""`python -m lib_sdcustom`: train from a TOML preset and flags, inspect files.

Flags are generated from the config dataclasses, so every setting of a preset is also a flag, with its
default shown in --help, and a flag given on the command line overrides the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import SECTIONS, RunConfig, load_config
from .errors import TrainingStopped, UserFacingError
from .events import CancelToken, Event, FileSaved, PhaseProgress, RunFinished, RunStarted, StepDone, Warning_

logger = logging.getLogger(__name__)


def _flag(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _config_fields() -> list[tuple[str | None, dataclasses.Field[Any], Any]]:
    """(section or None for top level, field, default) for every setting."""
    defaults = RunConfig()
    found: list[tuple[str | None, dataclasses.Field[Any], Any]] = []
    for field in dataclasses.fields(RunConfig):
        if field.name in SECTIONS:
            section = getattr(defaults, field.name)
            found += [(field.name, inner, getattr(section, inner.name)) for inner in dataclasses.fields(section)]
        else:
            found.append((None, field, getattr(defaults, field.name)))
    return found


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    groups: dict[str | None, Any] = {}
    for section, field, default in _config_fields():
        group = groups.setdefault(section, parser.add_argument_group(f"[{section}] settings" if section else "method"))
        kwargs: dict[str, Any] = {"dest": f"{section or ''}.{field.name}", "default": argparse.SUPPRESS,
                                  "help": f"{field.metadata['help']} (default: {default!r})"}
        if isinstance(default, bool):
            group.add_argument(_flag(field), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(_flag(field), type=type(default), choices=field.metadata.get("choices"),
                               metavar=field.name.upper(), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_sdcustom", description="Teach a Stable Diffusion checkpoint a new subject or style.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train a LoRA/LyCORIS network on a folder of images.")
    train.add_argument("--config", type=Path, help="TOML preset; flags given here override it.")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="Continue an interrupted run from its run folder.")
    train.add_argument("--quiet", action="store_true", help="No progress bar; one line per saved file.")
    _add_config_arguments(train)
    inspect = commands.add_parser("inspect", help="Describe a LoRA/LyCORIS file, an embedding or a checkpoint.")
    inspect.add_argument("file", type=Path)
    demo = commands.add_parser("demo", help="Run the whole pipeline on a small bundled default, no downloads (one to two minutes on a CPU).")
    demo.add_argument("--out", type=Path, default=Path("sdcustom-demo"), help="Folder for the demo's files (default: %(default)s).")
    demo.add_argument("--steps", type=int, default=0, help="Training steps (default: 0 = the benchmark recipe's).")
    demo.add_argument("--quiet", action="store_true", help="No progress bar.")
    install = commands.add_parser("install-micro-model", help="Copy the bundled micro-world model into a WebUI's "
                                  "checkpoint folder (models/Stable-diffusion) in the form the WebUI loads.")
    install.add_argument("folder", type=Path)
    install.add_argument("--overwrite", action="store_true", help="Replace differing files of the same names.")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (or the resumed run's saved config), then the flags actually given."""
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise UserFacingError(f"{args.resume} is not a run folder (no config.toml inside).",
                                  "Pass the run folder printed when the run started or was cancelled.")
        config = load_config(saved)
    elif args.config:
        config = load_config(args.config)
    else:
        config = RunConfig()
    for dest, value in vars(args).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        setattr(getattr(config, section) if section else config, name, value)
    return config


class ProgressPrinter:
    """Progress bar with loss, it/s and ETA on stderr; saved files and warnings as plain lines."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._line(event.description)
            self._line(f"Run folder: {event.run_dir}")
            if not self.quiet:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=event.total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)
        elif isinstance(event, StepDone) and self.bar is not None:
            self.bar.n = event.step
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.1e}", refresh=False)
            self.bar.refresh()
        elif isinstance(event, PhaseProgress):
            if event.done == event.total or event.done * 10 // event.total != (event.done - 1) * 10 // event.total:
                self._line(f"{event.phase}: {event.done}/{event.total}")
        elif isinstance(event, FileSaved) and event.kind != "state":
            self._line(f"Saved {event.kind}: {event.path}")
        elif isinstance(event, Warning_):
            self._line(f"Warning: {event.message}")
        elif isinstance(event, RunFinished) and self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)


#: Exit status of a run stopped by a signal: the shell's 128 + signal number (Ctrl+C 130, SIGTERM 143).
_SIGNALS = {signal.SIGINT: "Ctrl+C", signal.SIGTERM: "SIGTERM"}


class _StopOnSignal:
    """While a run trains, Ctrl+C and SIGTERM (a job scheduler, `kill`, a container stop) ask it to stop
    after the current step and save its state; the same signal a second time aborts at once. The previous
    handlers come back afterwards (`main()` may run inside another program, such as a test runner)."""

    def __init__(self, cancel: CancelToken) -> None:
        self.cancel = cancel
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in _SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:  # noqa: ARG002 - signal handler signature
        if self.cancel.cancelled:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{_SIGNALS[signal.Signals(signum)]}: stopping after this step and saving state (again to abort)...", file=sys.stderr)
        self.cancel.cancel()


def _internal_error(error: BaseException) -> int:
    """A bug, not a user error: one plain line, the traceback kept in a file for the report."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="sdcustom-error-", suffix=".txt", delete=False) as log:
        traceback.print_exception(type(error), error, error.__traceback__, file=log)
    print(f"\nError: internal error {type(error).__name__}: {error}\n  Fix: this is a bug; please report it with "
          f"the details in {log.name}.", file=sys.stderr)
    return 3


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from .formats.inspect import inspect_file

        print(inspect_file(args.file))
        return 0
    if args.command == "install-micro-model":
        from .microworld.install import install_micro_model

        print(install_micro_model(args.folder, overwrite=args.overwrite).message())
        return 0
    if args.command == "demo":
        from .demo import run_demo

        demo = run_demo(args.out, steps=args.steps, callbacks=[ProgressPrinter(args.quiet)])
        print(demo.report())
        return 0
    from .run.train import train

    config = config_from_args(args)
    cancel = CancelToken()
    with _StopOnSignal(cancel) as signals:
        try:
            result = train(config, callbacks=[ProgressPrinter(args.quiet)], cancel=cancel, resume=args.resume)
        except TrainingStopped as stopped:
            print(f"\nStopped: {stopped}", file=sys.stderr)
            return 128 + signals.received if signals.received else 1
    for path in result.outputs:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 training stopped (non-finite loss), 2 bad input, 3 internal error,
    130/143 stopped by Ctrl+C/SIGTERM (state saved where training had started)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserFacingError as error:
        print(f"\nError: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nAborted.", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:  # noqa: BLE001 - the last line of defence: no traceback at the user
        return _internal_error(error)
