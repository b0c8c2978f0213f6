"""One training at a time, watched by the tab and the API: status with step, loss, ETA and files; cancel.

A run is checked before anything is loaded or written (`RunManager.check`: `plan_run` plus the host's own
check), so a bad folder, a missing token, a name that exists or a model the method cannot train is a
message, not a half-made run folder. The manager keeps the folder's scan (`scans`) for the run that follows
the check, and the status of the last runs in memory; the files on disk are the durable record.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config import RunConfig
from ..data.scan import ScanCache
from ..errors import TrainingStopped, UserFacingError
from ..events import BestStepKept, CancelToken, Event, FileSaved, RunStarted, StepDone, StepScored, Warning_
from ..host.base import Host, output_kind, prompt_snippet
from .plan import RunPlan, plan_run

logger = logging.getLogger(__name__)

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"
_MAX_LOSS_POINTS = 20000
_KEPT_RUNS = 20


class RunnerBusy(UserFacingError):
    """Another training holds the (single) slot."""


@dataclass
class RunStatus:
    """A snapshot of one run, safe to hand to another thread or serialise as JSON."""

    id: str
    method: str
    name: str
    state: str = RUNNING
    step: int = 0
    total_steps: int = 0
    loss: Optional[float] = None
    lr: Optional[float] = None
    steps_per_second: float = 0.0
    eta_seconds: Optional[float] = None
    losses: List[Tuple[int, float]] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    result: Optional[str] = None
    snippet: str = ""
    previews: List[str] = field(default_factory=list)
    step_scores: List[Dict[str, float]] = field(default_factory=list)  # best-step selection's `StepScored` events
    kept_step: Optional[int] = None  # the step best-step selection exported as the result
    description: str = ""
    warnings: List[str] = field(default_factory=list)
    problem: str = ""
    fix: str = ""
    run_dir: str = ""
    origin: str = ""  # who started it ("the tab", "the API"), said to anyone who finds the slot taken
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    revision: int = 0  # bumped on every change, so pollers can skip identical updates

    @property
    def active(self) -> bool:
        return self.state == RUNNING

    def to_dict(self, *, with_losses: bool = True) -> Dict[str, Any]:
        data = asdict(self)
        if not with_losses:
            data.pop("losses")
        return data


class _Run:
    """The live record behind a status; updated from the training thread's events."""

    def __init__(self, config: RunConfig, cancel: CancelToken, origin: str) -> None:
        self.config = config
        self.cancel = cancel
        self.lock = threading.Lock()
        self.status = RunStatus(id=uuid.uuid4().hex[:12], method=config.method, name=config.output.name, origin=origin)
        self.done = threading.Event()

    def snapshot(self) -> RunStatus:
        with self.lock:
            copy = RunStatus(**{**self.status.__dict__})
            for name in ("losses", "files", "previews", "step_scores", "warnings"):
                setattr(copy, name, list(getattr(self.status, name)))
            return copy

    def update(self, **changes: Any) -> None:
        with self.lock:
            for key, value in changes.items():
                setattr(self.status, key, value)
            self.status.revision += 1

    def on_event(self, event: Event) -> None:
        with self.lock:
            status = self.status
            if isinstance(event, RunStarted):
                status.total_steps, status.description, status.run_dir = event.total_steps, event.description, str(event.run_dir)
            elif isinstance(event, StepDone):
                status.step, status.total_steps, status.loss, status.lr = event.step, event.total_steps, event.loss, event.lr
                status.steps_per_second, status.eta_seconds = event.steps_per_second, event.eta_seconds
                if len(status.losses) < _MAX_LOSS_POINTS:
                    status.losses.append((event.step, float(event.loss)))
            elif isinstance(event, FileSaved):
                if event.kind == "preview":
                    status.previews.append(str(event.path))
                elif event.kind != "state":
                    status.files.append(str(event.path))
                if event.kind == "result":
                    status.result = str(event.path)
            elif isinstance(event, StepScored):
                status.step_scores.append({"step": event.step, "fidelity": event.fidelity, "drift": event.drift,
                                           "leak": event.leak, "score": event.score})
            elif isinstance(event, BestStepKept):
                status.kept_step = event.step
            elif isinstance(event, Warning_):
                status.warnings.append(event.message)
            # RunFinished/SamplesRendered add nothing: the outcome is set when train() returns or raises,
            # and previews arrive as FileSaved.
            status.revision += 1


class RunManager:
    """Starts runs (blocking in the caller's thread, or in a background thread) and keeps their status."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._slot = threading.Lock()  # held for the whole of a run: one training at a time
        self._lock = threading.Lock()
        self._runs: Dict[str, _Run] = {}
        self._current: Optional[_Run] = None
        self.scans = ScanCache()  # the tab's Check folder, `check` and the run share one read of the images

    def check(self, config: RunConfig) -> RunPlan:
        """Every check that needs no model and writes nothing; raises UserFacingError naming the fix."""
        plan = plan_run(config, scans=self.scans)
        self.host.check_fit(plan.config)
        return plan

    # ----- starting -----
    def run(self, config: RunConfig, *, origin: str = "the tab") -> RunStatus:
        """Train in this thread (the tab's queued callback) and return the final status."""
        record = self._claim(config, origin)
        try:
            self._execute(record)
        finally:
            self._release(record)
        return record.snapshot()

    def start(self, config: RunConfig, *, origin: str = "the API") -> RunStatus:
        """Train in a background thread holding the host's GPU queue; return at once (the API)."""
        record = self._claim(config, origin)

        def work() -> None:
            try:
                self.host.exclusive(lambda: self._execute(record))
            except Exception:  # _execute records its own errors; this is the host wrapper failing
                logger.exception("training thread failed")
                if record.snapshot().active:
                    record.update(state=FAILED, problem="The host could not run the training.", fix="See the console log.")
            finally:
                self._release(record)

        threading.Thread(target=work, name=f"sdcustom-run-{record.status.id}", daemon=True).start()
        return record.snapshot()

    def _claim(self, config: RunConfig, origin: str) -> _Run:
        if not self._slot.acquire(blocking=False):
            busy = self.current()
            where = f" ({busy.name}, started from {busy.origin}, step {busy.step}/{busy.total_steps})" if busy else ""
            raise RunnerBusy(f"A training is already running{where}.", "Wait for it to finish, or cancel it first.")
        try:
            self.check(config)
        except BaseException:
            self._slot.release()
            raise
        record = _Run(config, CancelToken(probe=self.host.cancel_requested), origin)
        with self._lock:
            self._runs[record.status.id] = record
            self._current = record
            for old in list(self._runs)[:-_KEPT_RUNS]:
                self._runs.pop(old)
        return record

    def _release(self, record: _Run) -> None:
        """Free the slot before waking waiters, so whoever waited can start the next run at once."""
        self._slot.release()
        record.done.set()

    def _execute(self, record: _Run) -> None:
        from .train import train

        config = record.config
        try:
            with self.host.session(config):
                bundle = self.host.bundle_for(config)
                # Planned again, not reused from the claim: a queued run may start minutes later and its output
                # checks must hold now; the images are not read again while their folder is unchanged.
                plan = plan_run(config, scans=self.scans)
                result = train(plan, callbacks=[record.on_event, self.host.on_event], cancel=record.cancel, bundle=bundle)
            outputs = [Path(path) for path in result.outputs]
            self._refresh(config, outputs)
            record.update(state=FINISHED, finished_at=time.time(), snippet=prompt_snippet(config.method, config.output.name),
                          result=record.snapshot().result or (str(outputs[0]) if outputs else None))
        except TrainingStopped as stopped:
            state = CANCELLED if record.cancel.cancelled else FAILED
            record.update(state=state, problem=stopped.problem, fix=stopped.fix, finished_at=time.time())
        except UserFacingError as error:
            record.update(state=FAILED, problem=error.problem, fix=error.fix, finished_at=time.time())
        except Exception as error:  # a bug: keep the traceback in the log, show a plain line
            logger.exception("training failed")
            record.update(state=FAILED, problem=f"Training stopped on an internal error: {type(error).__name__}: {error}",
                          fix="This is a bug; the console log has the details.", finished_at=time.time())

    def _refresh(self, config: RunConfig, outputs: List[Path]) -> None:
        try:
            self.host.refresh(output_kind(config.method), outputs)
        except Exception:  # the file is written; a failed list refresh only means a manual refresh
            logger.exception("refreshing the host's lists failed")

    # ----- watching -----
    def cancel(self, run_id: Optional[str] = None) -> bool:
        record = self._runs.get(run_id) if run_id else self._current
        if record is None or not record.snapshot().active:
            return False
        record.cancel.cancel()
        return True

    def status(self, run_id: str) -> Optional[RunStatus]:
        record = self._runs.get(run_id)
        return record.snapshot() if record else None

    def current(self) -> Optional[RunStatus]:
        """The running run, else the latest one."""
        record = self._current
        return record.snapshot() if record else None

    def runs(self) -> List[RunStatus]:
        with self._lock:
            records = list(self._runs.values())
        return [record.snapshot() for record in records]

    def wait(self, run_id: str, timeout: Optional[float] = None) -> Optional[RunStatus]:
        record = self._runs.get(run_id)
        if record is None:
            return None
        record.done.wait(timeout)
        return record.snapshot()
