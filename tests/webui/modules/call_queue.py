"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/call_queue.py``.

How the UI runs a generation and shows its errors: ``wrap_gradio_gpu_call`` (the state's begin/end around
the call) and ``wrap_gradio_call`` / ``wrap_gradio_call_no_job``, which turns any exception of the call
into the host's error box: the ``extra_outputs`` (``[None, '', '']`` for txt2img: no images, no info) and
``<div class='error'>{type}: {message}</div>`` as the last output (the ``html_log`` under the gallery).
Left out: the FIFO lock, progress tasks, memory stats (the ``add_stats`` footer).
"""

import html
from functools import wraps

from modules import errors, shared


def wrap_gradio_gpu_call(func, extra_outputs=None):
    """Mirrors ``call_queue.wrap_gradio_gpu_call``: ``state.begin``/``end`` around ``func``."""
    @wraps(func)
    def f(*args, **kwargs):
        """Mirrors the inner ``f`` of upstream ``wrap_gradio_gpu_call`` (no task queue)."""
        shared.state.begin(job=args[0] if args and isinstance(args[0], str) else "(unknown)")
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    """Mirrors ``call_queue.wrap_gradio_call``: resets the state's flags after the call."""
    @wraps(func)
    def f(*args, **kwargs):
        """Mirrors the inner ``f`` of upstream ``wrap_gradio_call``."""
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False):
    """Mirrors ``call_queue.wrap_gradio_call_no_job``: an exception becomes the host's error box."""
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        """Mirrors the inner ``f`` of upstream ``wrap_gradio_call_no_job`` (no memory stats footer)."""
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report("Error completing request", exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, '']
            error_message = f'{type(e).__name__}: {e}'
            res = extra_outputs_array + [f"<div class='error'>{html.escape(error_message)}</div>"]
        return tuple(res)

    return f
