"""Fake `modules.call_queue`: the host's GPU queue lock and its wrapper, with the same contract
(docs/host-formats.md#extension-loading)."""

import html
import threading

from modules import shared

queue_lock = threading.Lock()
WRAPPED = []  # functions our code wrapped


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    WRAPPED.append(func)

    def f(*args, **kwargs):
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        shared.CALLS.append(("wrap_gradio_gpu_call", id_task))
        try:
            with queue_lock:
                shared.state.begin(job=id_task or "(unknown)")
                try:
                    res = list(func(*args, **kwargs))
                finally:
                    shared.state.end()
        except Exception as error:  # the host prints the traceback and shows the error as the last output
            res = list(extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(f'{type(error).__name__}: {error}')}</div>"]
        shared.state.skipped = shared.state.interrupted = False
        shared.state.job_count = 0
        res[-1] += "<div class='performance'><p class='time'>Time taken: 0.1s</p></div>"  # fails unless the last output is text
        return tuple(res)

    f.sdcustom_fake_wrapped = func
    return f
