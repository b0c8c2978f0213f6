"""HTML for the tab's panels: progress, loss chart (inline SVG), result, errors, dataset and plan.

Plain HTML strings render the same in every gradio version (a LinePlot's API changed between 3 and 4),
and every value from a user or a file is escaped. Stable ids and data attributes let the browser test
and the JS read the state without parsing text.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

from ..run.folders import RunFolder
from ..run.manager import CANCELLED, FAILED, FINISHED, RUNNING, RunStatus

_e = html.escape


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def error_html(problem: str, fix: str = "") -> str:
    fix_part = f"<div class='sdcustom-fix'><b>Fix:</b> {_e(fix)}</div>" if fix else ""
    return (f"<div class='sdcustom-panel sdcustom-error' data-state='error'><div class='sdcustom-problem'>{_e(problem)}</div>"
            f"{fix_part}</div>")


def notice_html(text: str) -> str:
    return f"<div class='sdcustom-panel sdcustom-notice'>{_e(text)}</div>"


def progress_html(status: RunStatus | None) -> str:
    if status is None:
        return "<div class='sdcustom-progress' data-state='idle' data-step='0'>No training yet.</div>"
    total = max(status.total_steps, 1)
    percent = min(100.0, 100.0 * status.step / total) if status.total_steps else 0.0
    words = {RUNNING: "Training", FINISHED: "Finished", CANCELLED: "Cancelled", FAILED: "Stopped"}[status.state]
    if status.state == RUNNING and not status.total_steps:
        words = "Preparing (checking images, building the model)"
    loss = f"{status.loss:.4f}" if status.loss is not None else "-"
    eta = duration(status.eta_seconds) if status.state == RUNNING else duration((status.finished_at or 0) - status.started_at)
    eta_label = "ETA" if status.state == RUNNING else "took"
    details = (f"step {status.step}/{status.total_steps} &middot; loss {loss} &middot; {status.steps_per_second:.2f} it/s "
               f"&middot; {eta_label} {eta}")
    warnings = "".join(f"<li>{_e(message)}</li>" for message in status.warnings[-5:])
    origin = f", started from {_e(status.origin)}" if status.origin else ""
    return (f"<div class='sdcustom-progress' data-state='{status.state}' data-origin='{_e(status.origin)}' "
            f"data-step='{status.step}' data-total='{status.total_steps}'>"
            f"<div class='sdcustom-progress-title'>{_e(words)} <b>{_e(status.name)}</b> ({_e(status.method)})"
            f"{origin}</div>"
            f"<div class='sdcustom-bar'><div class='sdcustom-bar-fill' style='width:{percent:.1f}%'></div></div>"
            f"<div class='sdcustom-progress-details'>{details}</div>"
            f"<pre class='sdcustom-description'>{_e(status.description)}</pre>"
            + (f"<ul class='sdcustom-warnings'>{warnings}</ul>" if warnings else "") + "</div>")


def _downsample(points: Sequence[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
    if len(finite) <= limit:
        return finite
    stride = len(finite) / limit
    return [finite[int(i * stride)] for i in range(limit)] + [finite[-1]]


def _smoothed(points: Sequence[tuple[int, float]], weight: float = 0.9) -> list[tuple[int, float]]:
    """Bias-corrected exponential moving average, as TensorBoard smooths: the trend under the noise."""
    out, average = [], 0.0
    for index, (step, loss) in enumerate(points, start=1):
        average = weight * average + (1 - weight) * loss
        out.append((step, average / (1 - weight ** index)))
    return out


def loss_chart_svg(points: Sequence[tuple[int, float]], width: int = 480, height: int = 160) -> str:
    """The loss curve (raw and smoothed) as inline SVG; an empty frame before the first step."""
    pad_left, pad, bottom = 48, 8, 18
    data = _downsample(points, 400)
    frame = (f"<svg id='sdcustom_loss_svg' class='sdcustom-chart' viewBox='0 0 {width} {height}' width='100%' "
             f"role='img' aria-label='training loss' data-points='{len(points)}' xmlns='http://www.w3.org/2000/svg'>")
    axes = (f"<line x1='{pad_left}' y1='{height - bottom}' x2='{width - pad}' y2='{height - bottom}' class='axis'/>"
            f"<line x1='{pad_left}' y1='{pad}' x2='{pad_left}' y2='{height - bottom}' class='axis'/>")
    if not data:
        return frame + axes + f"<text x='{width / 2}' y='{height / 2}' text-anchor='middle'>loss</text></svg>"
    steps = [step for step, _ in data]
    losses = [loss for _, loss in data]
    low, high = min(losses), max(losses)
    span = (high - low) or max(abs(high), 1e-6)
    first, last = steps[0], steps[-1]
    step_span = (last - first) or 1

    def xy(step: int, loss: float) -> str:
        x = pad_left + (width - pad - pad_left) * (step - first) / step_span
        y = pad + (height - bottom - pad) * (1 - (loss - low) / span)
        return f"{x:.1f},{y:.1f}"

    raw = " ".join(xy(step, loss) for step, loss in data)
    smooth = " ".join(xy(step, loss) for step, loss in _smoothed(data))
    labels = (f"<text x='{pad_left - 4}' y='{pad + 8}' text-anchor='end'>{high:.3g}</text>"
              f"<text x='{pad_left - 4}' y='{height - bottom}' text-anchor='end'>{low:.3g}</text>"
              f"<text x='{pad_left}' y='{height - 4}'>step {first}</text>"
              f"<text x='{width - pad}' y='{height - 4}' text-anchor='end'>step {last}</text>")
    return (frame + axes + labels + f"<polyline class='raw' fill='none' stroke='#f97316' stroke-opacity='0.35' points='{raw}'/>"
            f"<polyline class='smooth' fill='none' stroke='#f97316' stroke-width='2' points='{smooth}'/></svg>")


def result_html(status: RunStatus | None) -> str:
    if status is None or status.state == RUNNING:
        return "<div class='sdcustom-panel' data-state='none'></div>"
    if status.state == FINISHED:
        snippet = status.snippet
        copy = ("<button class='sdcustom-copy' type='button' "
                f"onclick=\"navigator.clipboard && navigator.clipboard.writeText(this.dataset.text)\" data-text='{_e(snippet)}'>"
                "Copy</button>")
        return (f"<div class='sdcustom-panel sdcustom-done' data-state='finished' "
                f"data-file='{_e(status.result or '')}'>"
                f"<div>Saved <code class='sdcustom-file'>{_e(status.result or '-')}</code></div>"
                f"<div>Use it in a prompt: <code class='sdcustom-snippet'>{_e(snippet)}</code> {copy}</div>"
                f"{step_scores_html(status)}</div>")
    state = "cancelled" if status.state == CANCELLED else "failed"
    title = "Cancelled." if status.state == CANCELLED else "Training stopped."
    fix = f"<div class='sdcustom-fix'>{_e(status.fix)}</div>" if status.fix else ""
    return (f"<div class='sdcustom-panel sdcustom-{state}' data-state='{state}'>"
            f"<div><b>{title}</b> {_e(status.problem)}</div>{fix}</div>")


def step_scores_html(status: RunStatus) -> str:
    """Best-step selection's scores per step, the kept step marked; '' for a run without selection."""
    if not status.step_scores:
        return ""
    rows = []
    for item in sorted(status.step_scores, key=lambda item: item["step"]):
        kept = item["step"] == status.kept_step
        marker, label = (" data-kept='true'", " (kept)") if kept else ("", "")
        rows.append(f"<tr data-step='{int(item['step'])}'{marker}>"
                    f"<td>{int(item['step'])}{label}</td><td>{item['score']:.3f}</td>"
                    f"<td>{item['fidelity']:.3f}</td><td>{item['drift']:+.3f}</td><td>{item['leak']:+.3f}</td></tr>")
    return ("<table class='sdcustom-step-scores'><caption>Best step: the self-check of every saved step (higher "
            "score is better; fidelity: error on your pictures against the start, lower is better; drift: error "
            "added on class-prompt samples; leak: how much of your subject the bare class prompt has learned)"
            "</caption><tr><th>step</th><th>score</th><th>fidelity</th><th>drift</th><th>leak</th></tr>"
            f"{''.join(rows)}</table>")


def size(count: int) -> str:
    """Bytes as people read them: 512 KB, 3.4 MB, 6.5 GB."""
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} KB"


def runs_html(root: Path, folders: Sequence[RunFolder]) -> str:
    """Where run folders go, how much they take, and how much clearing the finished ones would free."""
    finished = [folder for folder in folders if folder.finished]
    total, freeable = sum(f.size for f in folders), sum(f.size for f in finished)
    return (f"<div class='sdcustom-panel sdcustom-runs' data-folders='{len(folders)}' data-bytes='{total}' "
            f"data-finished='{len(finished)}'>Run folders (resumable state, caches) are in <code>{_e(str(root))}</code>: "
            f"{len(folders)} folder(s), {size(total)}; {len(finished)} finished ({size(freeable)}) can be cleared.</div>")
