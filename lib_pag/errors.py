"""The one error type every bad PAG input is reported with."""


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
        super().__init__(f"{field}: {value!r} {problem}; {allowed_label}: {allowed}")

    def as_dict(self) -> dict:
        return {"field": self.field, "value": _jsonable(self.value), "allowed": self.allowed, "message": str(self)}


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)
