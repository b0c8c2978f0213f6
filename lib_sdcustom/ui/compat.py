"""The few gradio calls whose spelling differs between 3.41 (AUTOMATIC1111 1.10) and 4.x+ (Forge, current)."""

from __future__ import annotations

from typing import Any


def gradio_major() -> int:
    import gradio as gr

    return int(gr.__version__.split(".")[0])


def js_kwargs(js: str | None) -> dict[str, Any]:
    """An event's browser-side function: `_js=` in gradio 3, `js=` from 4 on."""
    if not js:
        return {}
    return {"_js": js} if gradio_major() < 4 else {"js": js}


def blocks_kwargs(css: str) -> dict[str, Any]:
    """gr.Blocks arguments; gradio 6 takes the style sheet in launch() instead (see launch_kwargs)."""
    kwargs: dict[str, Any] = {"analytics_enabled": False}
    if css and gradio_major() < 6:
        kwargs["css"] = css
    return kwargs


def launch_kwargs(css: str) -> dict[str, Any]:
    return {"css": css} if css and gradio_major() >= 6 else {}


def enable_queue(demo: Any, concurrency: int) -> None:
    """A queue that lets the progress poll run while a training call is in flight."""
    if gradio_major() < 4:
        demo.queue(concurrency_count=concurrency)
    else:
        demo.queue(default_concurrency_limit=concurrency)


def labelled_choices(labels: dict[str, str]) -> list[Any]:
    """Dropdown choices showing `labels` and returning their keys: (label, key) pairs from gradio 4 on;
    gradio 3 takes plain strings only, so there the keys are shown."""
    return list(labels) if gradio_major() < 4 else [(label, key) for key, label in labels.items()]
