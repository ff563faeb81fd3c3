"""The one error type every bad PAG input is reported with."""

import json

MAX_VALUE_TEXT = 120  # a rejected value longer than this is shortened in messages and API bodies


class PagError(ValueError):
    """A rejected PAG setting.

    ``field`` is the user-facing name of the setting (``"PAG layers"``), ``value`` what was given
    and ``allowed`` a human description of what would have been accepted. ``str(err)`` is the whole
    message, ready for the UI, an HTTP 422 body and the log.
    """

    def __init__(self, field: str, value, allowed: str, problem: str = "is not allowed", allowed_label: str = "allowed"):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.problem = problem
        super().__init__(f"{field}: {short_repr(value)} {problem}; {allowed_label}: {allowed}")

    def relabeled(self, field: str) -> "PagError":
        """The same rejection for another field name (``PAG 2 layers`` for a check written for ``PAG layers``)."""
        if field == self.field:
            return self
        prefix = f"{self.field}: "
        message = str(self)
        err = PagError(field, self.value, self.allowed, self.problem)
        if message.startswith(prefix):  # keep a custom allowed-label (``valid: …``) as it was
            err.args = (f"{field}: {message[len(prefix):]}",)
        return err

    def as_dict(self) -> dict:
        """``field``, ``value`` (shortened when long) and ``allowed``, JSON-able; the message is ``str(self)``."""
        value = _jsonable(self.value)
        if len(json.dumps(value)) > MAX_VALUE_TEXT:
            value = short_repr(self.value)
        return {"field": self.field, "value": value, "allowed": self.allowed}


def short_repr(value) -> str:
    """``repr(value)``, cut to about ``MAX_VALUE_TEXT`` characters with the full length said."""
    text = repr(value)
    if len(text) <= MAX_VALUE_TEXT:
        return text
    return f"{text[:MAX_VALUE_TEXT - 20]}… ({len(text)} characters)"


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)
