"""Every PAG setting in one frozen dataclass, built from UI values, an API dict or infotext.

The field order is the positional order of the script's UI controls and of the API's ``args``.
Infotext keys are the field labels (``PAG scale``, ``PAG layers``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from .errors import PagError, short_repr
from .layers import format_number, normalize_layer_spec

METHODS = ("identity", "blur", "noise")
SCHEDULES = ("constant", "linear", "cosine")
HIRES_MODES = ("same", "own", "off")
EXEC_MODES = ("batched", "separate")
MAX_SCALE = 100.0
UI_INFINITY = 1e6  # gradio cannot carry inf through JSON; this blur sigma is a mean query to 1e-9


def _meta(label, kind, lo=None, hi=None, choices=None, infinite_ok=False, written="changed"):
    """``written``: "always" = in every infotext while enabled, "changed" = only when not the default."""
    return {"label": label, "kind": kind, "lo": lo, "hi": hi, "choices": choices, "infinite_ok": infinite_ok, "written": written}


@dataclass(frozen=True)
class PagParams:
    enabled: bool = field(default=False, metadata=_meta("PAG enabled", bool, written="always"))
    scale: float = field(default=3.0, metadata=_meta("PAG scale", float, 0.0, MAX_SCALE, written="always"))
    layers: str = field(default="mid,up", metadata=_meta("PAG layers", "layers", written="always"))
    method: str = field(default="identity", metadata=_meta("PAG method", str, choices=METHODS))
    blur_sigma: float = field(default=9.0, metadata=_meta("PAG blur sigma", float, 0.0, None, infinite_ok=True))
    noise_scale: float = field(default=1.0, metadata=_meta("PAG noise scale", float, 0.0, MAX_SCALE))
    start: float = field(default=0.0, metadata=_meta("PAG start", float, 0.0, 1.0))
    end: float = field(default=1.0, metadata=_meta("PAG end", float, 0.0, 1.0))
    sigma_start: float = field(default=0.0, metadata=_meta("PAG sigma start", float, 0.0, None))
    sigma_end: float = field(default=0.0, metadata=_meta("PAG sigma end", float, 0.0, None))
    schedule: str = field(default="constant", metadata=_meta("PAG schedule", str, choices=SCHEDULES))
    rescale: float = field(default=0.0, metadata=_meta("PAG rescale", float, 0.0, 1.0))
    hires: str = field(default="same", metadata=_meta("PAG hires", str, choices=HIRES_MODES))
    hires_scale: float = field(default=3.0, metadata=_meta("PAG hires scale", float, 0.0, MAX_SCALE))
    mode: str = field(default="batched", metadata=_meta("PAG mode", str, choices=EXEC_MODES))

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name), strings_ok=False))
        if self.start >= self.end:
            raise PagError("PAG start", self.start, f"a fraction below PAG end ({self.end:g})", "is not before the end")
        if self.sigma_start and self.sigma_end >= self.sigma_start:
            raise PagError("PAG sigma end", self.sigma_end, f"a sigma below PAG sigma start ({self.sigma_start:g}), or 0 for no bound",
                           "is not below the sigma start")
        if self.method == "blur" and self.blur_sigma <= 0:
            raise PagError("PAG blur sigma", self.blur_sigma, "a sigma > 0 (inf = mean query)", "is out of range")

    # --- constructors ---

    @classmethod
    def from_values(cls, *values) -> "PagParams":
        """From positional values in field order (the UI's and the API's ``args``); missing = default."""
        names = field_names()
        if len(values) > len(names):
            raise PagError("PAG args", list(values), f"at most {len(names)} values in the order {', '.join(names)}", "has too many values")
        return cls.from_dict(dict(zip(names, values)))

    @classmethod
    def from_dict(cls, data: dict, *, strings_ok: bool = False, base: "PagParams | None" = None) -> "PagParams":
        """From a dict keyed by field name (aliases and a ``pag_`` prefix accepted); unknown keys are errors.

        ``strings_ok`` lets numbers and booleans arrive as text (infotext, X/Y/Z); the API is strict.
        """
        if not isinstance(data, dict):
            raise PagError("PAG args", data, "an object with keys " + ", ".join(field_names()), "has the wrong type")
        values, spelled = {}, {}
        for key, value in data.items():
            name = canonical_key(key)
            f = _FIELDS[name]
            checked = _check(f, value, strings_ok=strings_ok)
            if name in values and values[name] != checked:
                first = spelled[name]
                raise PagError("PAG args", {first: data[first], key: value}, "one key per setting (or equal values)",
                               f"gives {f.metadata['label']} twice, as {short_repr(first)} and {short_repr(key)}")
            values[name], spelled[name] = checked, key
        return dataclasses.replace(base or cls(), **values)

    @classmethod
    def from_infotext(cls, params: dict) -> "PagParams":
        """From parsed infotext; without any ``PAG `` key PAG is off, otherwise absent keys are defaults."""
        by_label = {f.metadata["label"]: f.name for f in fields(cls)}
        found = {by_label[k]: v for k, v in params.items() if k in by_label}
        if not found:
            return cls()
        found.setdefault("enabled", True)
        return cls.from_dict(found, strings_ok=True)

    # --- output ---

    def to_infotext(self) -> dict:
        """Infotext entries for an enabled run: always enabled, scale and layers, the rest when not default."""
        if not self.enabled:
            return {}
        default = PagParams()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            relevant = _relevant(self, f.name)
            if relevant and (f.metadata["written"] == "always" or value != getattr(default, f.name)):
                out[f.metadata["label"]] = format_value(value)
        return out

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, **overrides) -> "PagParams":
        return self.from_dict(overrides, strings_ok=True, base=self)


PRESETS = {
    "General": {"scale": 3.0, "layers": "mid,up"},
    "Portraits": {"scale": 2.5, "layers": "up"},
    "Landscapes": {"scale": 3.5, "layers": "mid,up"},
    "Abstract": {"scale": 4.0, "layers": "down,mid,up"},
}

ALIASES = {"pag_scale": "scale", "pag_applied_layers": "layers", "applied_layers": "layers", "active": "enabled"}
_FIELDS = {f.name: f for f in fields(PagParams)}


def params_from_positional(args) -> PagParams:
    """Positional UI/API values in field order; the UI's stand-in for an infinite blur sigma becomes inf."""
    values = list(args)
    index = field_names().index("blur_sigma")
    if len(values) > index and isinstance(values[index], (int, float)) and values[index] >= UI_INFINITY:
        values[index] = math.inf
    return PagParams.from_values(*values)


def field_names() -> list[str]:
    return [f.name for f in fields(PagParams)]


def label_of(name: str) -> str:
    return _FIELDS[name].metadata["label"]


def canonical_key(key) -> str:
    """Map an API/XYZ key (``scale``, ``pag_scale``, ``pag_applied_layers``, the infotext label
    ``PAG scale``) to a field name."""
    if isinstance(key, str):
        k = "_".join(key.strip().lower().split())
        k = ALIASES.get(k, k)
        if k not in _FIELDS and k.startswith("pag_"):
            k = ALIASES.get(k[4:], k[4:])
        if k in _FIELDS:
            return k
    raise PagError("PAG args", key, "keys " + ", ".join(field_names()) + " (also the infotext labels, e.g. 'PAG scale'; aliases: " + ", ".join(ALIASES) + ")", "is not a PAG setting")


def _relevant(p: PagParams, name: str) -> bool:
    if name == "blur_sigma":
        return p.method == "blur"
    if name == "noise_scale":
        return p.method == "noise"
    if name == "hires_scale":
        return p.hires == "own"
    return True


def format_value(value) -> str:
    """A setting as infotext text: ``True``, ``3``, ``0.25``, ``inf``, ``mid,up``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def _check(f, value, *, strings_ok: bool):
    meta = f.metadata
    label, kind = meta["label"], meta["kind"]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if strings_ok and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise PagError(label, value, "true or false", "has the wrong type")
    if kind == "layers":
        return normalize_layer_spec(value)
    if kind is str:
        if isinstance(value, str) and value.strip().lower() in meta["choices"]:
            return value.strip().lower()
        raise PagError(label, value, ", ".join(meta["choices"]), "is not a choice" if isinstance(value, str) else "has the wrong type")
    return _check_number(label, value, meta, strings_ok)


def _check_number(label, value, meta, strings_ok):
    lo, hi = meta["lo"], meta["hi"]
    allowed = f"a number from {lo:g} to {hi:g}" if hi is not None else f"a number ≥ {lo:g}" + (" (inf allowed)" if meta["infinite_ok"] else "")
    if value is None and label in ("PAG sigma start", "PAG sigma end"):
        return 0.0  # null = no bound
    if isinstance(value, str) and meta["infinite_ok"] and value.strip().lower() in ("inf", "infinity"):
        value = math.inf
    if isinstance(value, str) and strings_ok:
        try:
            value = float(value.strip())
        except ValueError:
            raise PagError(label, value, allowed, "is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PagError(label, value, allowed, "has the wrong type")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise PagError(label, value, allowed, "is out of range") from None
    if math.isnan(value) or (math.isinf(value) and not meta["infinite_ok"]):
        raise PagError(label, value, allowed, "is not a finite number")
    if value < lo or (hi is not None and value > hi):
        raise PagError(label, value, allowed, "is out of range")
    return value
