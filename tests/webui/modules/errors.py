"""Double of ``modules/errors.py`` (A1111 1.10): how the host reports exceptions it swallows.

The host prints ``*** <message>`` lines to stderr, then the indented traceback and ``---``, and keeps
the last few exceptions in ``exception_records``. Tests check swallowed hook/callback errors through
``capsys``/``capfd`` or through ``exception_records``.
"""
from __future__ import annotations

import sys
import textwrap
import traceback

exception_records = []
"""Mirrors ``errors.exception_records``: recent exceptions, newest last (at most 5 kept)."""

already_displayed = {}


def format_traceback(tb):
    """Mirrors ``errors.format_traceback``: ``[[filename, line, function, code], ...]``."""
    return [[f"{x.filename}, line {x.lineno}, {x.name}", x.line] for x in traceback.extract_tb(tb)]


def format_exception(e, tb):
    """Mirrors ``errors.format_exception``."""
    return {"exception": str(e), "traceback": format_traceback(tb)}


def get_exceptions():
    """Mirrors ``errors.get_exceptions``: newest first."""
    try:
        return list(reversed(exception_records))
    except Exception as e:  # pragma: no cover - same guard as the host
        return str(e)


def record_exception():
    """Mirrors ``errors.record_exception``: remember the exception being handled (if any)."""
    _, e, tb = sys.exc_info()
    if e is None:
        return
    if exception_records and exception_records[-1] == e:
        return
    exception_records.append(format_exception(e, tb))
    if len(exception_records) > 5:
        exception_records.pop(0)


def report(message: str, *, exc_info: bool = False) -> None:
    """Mirrors ``errors.report``: print ``*** message`` lines to stderr, plus the traceback if asked."""
    record_exception()
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


def print_error_explanation(message):
    """Mirrors ``errors.print_error_explanation``: a boxed explanation on stderr."""
    record_exception()
    lines = message.strip().split("\n")
    max_len = max(len(x) for x in lines)
    print("=" * max_len, file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print("=" * max_len, file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    """Mirrors ``errors.display``: ``<task>: <ExceptionType>`` and the traceback on stderr."""
    record_exception()
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    te = traceback.TracebackException.from_exception(e)
    if full_traceback:
        te.stack = traceback.StackSummary(traceback.extract_stack()[:-2] + te.stack)
    print(*te.format(), sep="", file=sys.stderr)


def display_once(e: Exception, task):
    """Mirrors ``errors.display_once``: like ``display`` but once per task."""
    record_exception()
    if task in already_displayed:
        return
    display(e, task)
    already_displayed[task] = 1


def run(code, task):
    """Mirrors ``errors.run``: call ``code()`` and display any exception under ``task``."""
    try:
        code()
    except Exception as e:
        display(e, task)
