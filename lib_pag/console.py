"""PAG's log lines on the console under the hosts' default logging.

A1111 1.7–1.10 and Forge 2 configure Python logging only when asked (``--loglevel`` or the environment
variable ``SD_WEBUI_LOG_LEVEL``; ``modules/logging_config.py: setup_logging`` adds a root handler at that
level then). By default nothing is configured: the root level is WARNING, so an INFO line such as PAG's
per-job summary is dropped before any handler sees it — either by Python's last-resort handler or, once
some module called ``logging.warning(...)`` (which runs ``basicConfig()``; A1111's sampler autocorrection
does), by that default handler at WARNING. ``show_on_console`` fixes that for PAG's logger alone, unless
the user chose a level: then the host's configuration decides, exactly as for every other logger.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "sd_webui_pag"
FORMAT = "[sd-webui-pag] %(levelname)s: %(message)s"


class _WhileUnconfigured(logging.Filter):
    """Pass records only while the root logger has no handler of its own (else those print them)."""

    def filter(self, record) -> bool:
        return not logging.getLogger().handlers


def show_on_console(level_chosen: bool = False, logger: logging.Logger | None = None, stream=None) -> bool:
    """Show PAG's INFO and above on the console unless the user chose a log level (``level_chosen``).

    Sets the logger's level to INFO when it has none (``setLevel(logging.DEBUG)`` from a startup script still
    works) and adds a stdout handler that prints only while the root logger has no handler of its own —
    once it has one (``basicConfig``, a test's capture), the records reach the console through it instead,
    so nothing prints twice. Records always propagate (pytest's ``caplog`` sees them). Idempotent; returns
    whether it changed anything.
    """
    logger = logger or logging.getLogger(LOGGER)
    if level_chosen or any(getattr(h, "_pag_console", False) for h in logger.handlers):
        return False
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_WhileUnconfigured())
    handler._pag_console = True
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return True


__all__ = ["FORMAT", "LOGGER", "show_on_console"]
