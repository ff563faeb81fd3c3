"""PAG's log lines on the console under the hosts' default logging.

A1111 1.7–1.10 and Forge 2 configure Python logging only when asked (``--loglevel`` or the environment
variable ``SD_WEBUI_LOG_LEVEL``; ``modules/logging_config.py: setup_logging`` adds a root handler then).
By default nothing is configured, so Python's last-resort handler prints WARNING and above only, and an
INFO line such as PAG's per-job summary would never appear. ``show_on_console`` fixes that for PAG's
logger alone, and only while the host configured nothing: once a root handler exists (the user chose a
level), the host's configuration decides, exactly as for every other logger.
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


def show_on_console(logger: logging.Logger | None = None, stream=None) -> bool:
    """Print PAG's INFO and above on stdout (like the hosts' own messages) while logging is unconfigured.

    Sets the logger's level to INFO only if it has none (``setLevel(logging.DEBUG)`` from a startup script
    still works) and the root logger has no handler at call time; idempotent. Returns whether it did.
    Records still propagate, so pytest's ``caplog`` and any handler added later see them.
    """
    logger = logger or logging.getLogger(LOGGER)
    if any(getattr(h, "_pag_console", False) for h in logger.handlers):
        return False
    if logging.getLogger().handlers:
        return False  # the host (or the user) configured logging: its level and handlers decide
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_WhileUnconfigured())
    handler._pag_console = True
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return True


__all__ = ["FORMAT", "LOGGER", "show_on_console"]
