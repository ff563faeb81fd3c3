"""Every PAG setting in one frozen dataclass, built from UI values, an API dict or infotext.

The field order is the positional order of the script's UI controls and of the API's ``args``.
Infotext keys are the field labels (``PAG scale``, ``PAG layers``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields

from .errors import PagError, short_repr
from .layers import format_number, normalize_layer_spec

METHODS = ("identity", "blur", "noise", "seg", "tpg")
MAX_BRANCHES = 3  # perturbation guidances in one job: the first (the accordion's main settings) and 2 more
# a method's own layers where a request names the method but no layers (the papers' defaults): TPG's SDXL set
# (Rajabi et al., TaatiTeam/Token-Perturbation-Guidance: down transformers d6–d23 = this syntax's d2.2-9,d3),
# SEG's middle block (Hong, SusungHong/SEG-SDXL: seg_applied_layers=['mid'])
METHOD_LAYERS = {"tpg": "d2.2-9,d3", "seg": "mid"}
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
    # guidances 2 and 3 (``BranchParams``, only the enabled ones, in index order); not a positional field
    branches: tuple = field(default=(), metadata={"label": None})

    def __post_init__(self):
        for f in fields(self):
            if f.name != "branches":
                object.__setattr__(self, f.name, _check(f, getattr(self, f.name), strings_ok=False))
        _check_window(self, label_of)
        object.__setattr__(self, "branches", _check_branches(self.branches))

    @property
    def primary(self) -> "BranchParams":
        """The main settings as a guidance of their own (index 1)."""
        return BranchParams(1, **{name: getattr(self, name) for name in BRANCH_FIELDS})

    def guidances(self) -> tuple["BranchParams", ...]:
        """Every guidance this job runs, in index order: the main one, then the enabled extra branches; none
        when PAG is off."""
        if not self.enabled:
            return ()
        return (self.primary,) + tuple(b for b in self.branches if b.enabled)

    # --- constructors ---

    @classmethod
    def from_values(cls, *values) -> "PagParams":
        """From positional values in field order (the UI's and the API's ``args``); missing = default. After
        the 15 main values come those of guidance 2, then guidance 3, each in ``BRANCH_FIELDS`` order."""
        names = field_names()
        most = len(names) + (MAX_BRANCHES - 1) * len(BRANCH_FIELDS)
        if len(values) > most:
            raise PagError("PAG args", list(values), f"at most {most} values: {', '.join(names)}, then per extra "
                           f"guidance (2, 3) {', '.join(BRANCH_FIELDS)}", "has too many values")
        main = cls.from_dict(dict(zip(names, values)))
        rest, branches = list(values[len(names):]), []
        for index in range(2, MAX_BRANCHES + 1):
            chunk, rest = rest[:len(BRANCH_FIELDS)], rest[len(BRANCH_FIELDS):]
            if chunk:
                branches.append(BranchParams.from_dict(index, dict(zip(BRANCH_FIELDS, chunk)), defaults_by_method=False))
        return dataclasses.replace(main, branches=tuple(branches)) if branches else main

    @classmethod
    def from_dict(cls, data: dict, *, strings_ok: bool = False, base: "PagParams | None" = None) -> "PagParams":
        """From a dict keyed by field name (aliases and a ``pag_`` prefix accepted); unknown keys are errors.

        ``strings_ok`` lets numbers and booleans arrive as text (infotext, X/Y/Z); the API is strict.
        """
        if not isinstance(data, dict):
            raise PagError("PAG args", data, "an object with keys " + ", ".join(field_names() + ["branches"]),
                           "has the wrong type")
        values, spelled = {}, {}
        numbered: dict[int, dict] = {}  # "PAG 2 scale": 3 -> {2: {"scale": 3}}
        listed = None
        for key, value in data.items():
            found = numbered_key(key)
            if found is not None:
                index, name = found
                numbered.setdefault(index, {})[name] = (key, value)
                continue
            if isinstance(key, str) and "_".join(key.strip().lower().split()) in ("branches", "pag_branches", "guidances"):
                listed = (key, value)
                continue
            name = canonical_key(key)
            f = _FIELDS[name]
            checked = _check(f, value, strings_ok=strings_ok)
            if name in values and values[name] != checked:
                first = spelled[name]
                raise PagError("PAG args", {first: data[first], key: value}, "one key per setting (or equal values)",
                               f"gives {f.metadata['label']} twice, as {short_repr(first)} and {short_repr(key)}")
            values[name], spelled[name] = checked, key
        start = base or cls()
        if base is None and "method" in values and "layers" not in values and values["method"] in METHOD_LAYERS:
            values["layers"] = METHOD_LAYERS[values["method"]]  # the method's own default layers
        branches = {b.index: b for b in start.branches}
        if listed is not None:
            branches = _listed_branches(listed[1], strings_ok, base=branches if base is not None else None)
        for index, entries in sorted(numbered.items()):
            given = {name: value for name, (key, value) in entries.items()}
            if index in branches and listed is not None and base is None:
                raise PagError("PAG args", {listed[0]: "…", next(iter(entries.values()))[0]: "…"},
                               "each guidance once: in the branches list or as numbered keys",
                               f"gives guidance {index} twice")
            old = branches.get(index)
            given.setdefault("enabled", True)
            # a fresh request's guidance takes its method's own layers; an override (X/Y/Z, p.pag2_*) the job's
            branches[index] = BranchParams.from_dict(index, given, strings_ok=strings_ok, base=old,
                                                     defaults_by_method=old is None and base is None)
        values["branches"] = tuple(b for _, b in sorted(branches.items()) if b.enabled)
        return dataclasses.replace(start, **values)

    @classmethod
    def from_infotext(cls, params: dict) -> "PagParams":
        """From parsed infotext; without any ``PAG `` key PAG is off, otherwise absent keys are defaults.
        ``PAG 2 …`` / ``PAG 3 …`` keys are guidances 2 and 3 (their method, scale and layers are always written)."""
        by_label = {label_of(name): name for name in field_names()}
        found = {by_label[k]: v for k, v in params.items() if k in by_label}
        numbered = {k: v for k, v in params.items() if numbered_key(k) is not None}
        if not found and not numbered:
            return cls()
        found.setdefault("enabled", True)
        return cls.from_dict({**found, **numbered}, strings_ok=True)

    # --- output ---

    def to_infotext(self) -> dict:
        """Infotext entries for an enabled run: always enabled, scale and layers, the rest when not default;
        then each extra guidance's (``PAG 2 method``, …)."""
        if not self.enabled:
            return {}
        default = PagParams()
        out = {}
        for name in field_names():
            f = _FIELDS[name]
            value = getattr(self, name)
            relevant = _relevant(self, name)
            if relevant and (f.metadata["written"] == "always" or value != getattr(default, name)):
                out[f.metadata["label"]] = format_value(value)
        for branch in self.branches:
            out.update(branch.to_infotext())
        return out

    def to_dict(self) -> dict:
        """Named settings (the API's named form): the main ones, and ``branches`` when there are any."""
        out = {name: getattr(self, name) for name in field_names()}
        if self.branches:
            out["branches"] = [b.to_dict() for b in self.branches]
        return out

    def to_values(self) -> list:
        """Positional settings (the UI's and the API's ``args``): the main 15, then guidances 2 and 3 if any."""
        values = [getattr(self, name) for name in field_names()]
        if self.branches:
            by_index = {b.index: b for b in self.branches}
            for index in range(2, max(by_index) + 1):
                branch = by_index.get(index, BranchParams(index))
                values += [getattr(branch, name) for name in BRANCH_FIELDS]
        return values

    def with_overrides(self, **overrides) -> "PagParams":
        return self.from_dict(overrides, strings_ok=True, base=self)


PRESETS = {
    "General": {"scale": 3.0, "layers": "mid,up"},
    "Portraits": {"scale": 2.5, "layers": "up"},
    "Landscapes": {"scale": 3.5, "layers": "mid,up"},
    "Abstract": {"scale": 4.0, "layers": "down,mid,up"},
}

ALIASES = {"pag_scale": "scale", "pag_applied_layers": "layers", "applied_layers": "layers", "active": "enabled"}
_FIELDS = {f.name: f for f in fields(PagParams) if f.name != "branches"}
# the settings each guidance has of its own (the job-wide ones are enabled-for-the-job and mode); an extra
# guidance's positional args are these, in this order
BRANCH_FIELDS = ("enabled", "method", "scale", "layers", "blur_sigma", "noise_scale", "start", "end", "sigma_start",
                 "sigma_end", "schedule", "rescale", "hires", "hires_scale")
_NUMBERED = re.compile(r"^pag[ _]*([23])[ _]+(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class BranchParams:
    """One perturbation guidance's own settings: guidance ``index`` 1 is the main settings (``PagParams``), 2
    and 3 the extra ones. Labels (infotext keys, messages) are ``PAG …`` for 1 and ``PAG 2 …`` / ``PAG 3 …``."""

    index: int = 2
    enabled: bool = False
    method: str = "identity"
    scale: float = 3.0
    layers: str = "mid,up"
    blur_sigma: float = 9.0
    noise_scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    sigma_start: float = 0.0
    sigma_end: float = 0.0
    schedule: str = "constant"
    rescale: float = 0.0
    hires: str = "same"
    hires_scale: float = 3.0

    def __post_init__(self):
        if self.index not in range(1, MAX_BRANCHES + 1):
            raise PagError("PAG args", self.index, f"guidance 1 to {MAX_BRANCHES}", "is not a guidance")
        for name in BRANCH_FIELDS:
            object.__setattr__(self, name, _check(_FIELDS[name], getattr(self, name), strings_ok=False,
                                                  label=self.label(name)))
        _check_window(self, self.label)

    def label(self, name: str) -> str:
        """``PAG scale`` (guidance 1), ``PAG 2 scale``, …"""
        base = label_of(name)
        return base if self.index == 1 else f"PAG {self.index} {base[len('PAG '):]}"

    @classmethod
    def from_dict(cls, index: int, data: dict, *, strings_ok: bool = False, base: "BranchParams | None" = None,
                  defaults_by_method: bool = True) -> "BranchParams":
        """Guidance ``index``'s settings from a dict keyed by setting name (aliases, ``pag_`` prefix and the
        labels with or without the number accepted); a method without layers gets its own default layers."""
        where = f"PAG {index}"
        if not isinstance(data, dict):
            raise PagError(f"{where} args", data, "an object with keys " + ", ".join(BRANCH_FIELDS), "has the wrong type")
        values = {}
        for key, value in data.items():
            found = numbered_key(key)
            if found is not None:
                if found[0] != index:
                    raise PagError(f"{where} args", key, f"the settings of guidance {index}", "names another guidance")
                name = found[1]
            else:
                name = canonical_key(key, allowed=BRANCH_FIELDS, field=f"{where} args")
            if name in values:
                raise PagError(f"{where} args", key, "one key per setting", f"gives {cls(index).label(name)} twice")
            values[name] = _check(_FIELDS[name], value, strings_ok=strings_ok, label=cls(index).label(name))
        if defaults_by_method and "layers" not in values and values.get("method") in METHOD_LAYERS:
            values["layers"] = METHOD_LAYERS[values["method"]]
        start = base if base is not None else cls(index)
        return dataclasses.replace(start, **values)

    def to_infotext(self) -> dict:
        """Always enabled, method, scale and layers; the rest when it differs from the default and changes the
        image. ``PAG n enabled`` is what ticks the guidance when the host fills the controls from an infotext
        without PAG's paste callback (the API's ``infotext`` field, ``Api.apply_infotext`` in A1111 ≥ 1.8)."""
        if not self.enabled:
            return {}
        default = BranchParams(self.index)
        out = {}
        for name in BRANCH_FIELDS:
            value = getattr(self, name)
            always = name in ("enabled", "method", "scale", "layers")
            if _relevant(self, name) and (always or value != getattr(default, name)):
                out[self.label(name)] = format_value(value)
        return out

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in BRANCH_FIELDS}


def numbered_key(key):
    """``(index, setting)`` for a guidance-2/3 key (``PAG 2 scale``, ``pag2_scale``, ``PAG 3 blur sigma``), else None."""
    if not isinstance(key, str):
        return None
    m = _NUMBERED.match(key.strip())
    if not m:
        return None
    rest = "_".join(m.group(2).strip().lower().split())
    rest = ALIASES.get(rest, rest)
    return (int(m.group(1)), rest) if rest in BRANCH_FIELDS else None


def _check_window(p, label) -> None:
    """The cross-field rules of one guidance's settings; ``label(name)`` names the field in messages."""
    if p.start >= p.end:
        raise PagError(label("start"), p.start, f"a fraction below {label('end')} ({p.end:g})", "is not before the end")
    if p.sigma_start and p.sigma_end >= p.sigma_start:
        raise PagError(label("sigma_end"), p.sigma_end, f"a sigma below {label('sigma_start')} ({p.sigma_start:g}), "
                       "or 0 for no bound", "is not below the sigma start")
    if p.method in ("blur", "seg") and p.blur_sigma <= 0:
        raise PagError(label("blur_sigma"), p.blur_sigma, "a sigma > 0 (inf = mean query)", "is out of range")


def _check_branches(branches) -> tuple:
    if not isinstance(branches, (tuple, list)) or not all(isinstance(b, BranchParams) for b in branches):
        raise PagError("PAG branches", branches, "guidances 2 and 3 as BranchParams", "has the wrong type")
    indices = [b.index for b in branches]
    if any(i < 2 for i in indices) or len(set(indices)) != len(indices):
        raise PagError("PAG branches", indices, f"each of guidances 2 to {MAX_BRANCHES} at most once", "repeats a guidance")
    return tuple(sorted(branches, key=lambda b: b.index))


def _listed_branches(value, strings_ok: bool, base: dict | None = None) -> dict:
    """The API's ``branches`` list: up to 2 objects, guidance 2 and 3 in order (``{}`` or null keeps a place)."""
    if not isinstance(value, (list, tuple)):
        raise PagError("PAG branches", value, f"a list of at most {MAX_BRANCHES - 1} objects (guidances 2, 3)", "has the wrong type")
    if len(value) > MAX_BRANCHES - 1:
        raise PagError("PAG branches", value, f"at most {MAX_BRANCHES - 1} extra guidances ({MAX_BRANCHES} in all)",
                       "has too many guidances")
    out = dict(base or {})
    for k, entry in enumerate(value):
        index = k + 2
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise PagError(f"PAG {index} args", entry, "an object with keys " + ", ".join(BRANCH_FIELDS), "has the wrong type")
        entry = dict(entry)
        entry.setdefault("enabled", True)  # a listed guidance is on unless it says otherwise
        out[index] = BranchParams.from_dict(index, entry, strings_ok=strings_ok, base=out.get(index) if base else None)
    return out


def params_from_positional(args) -> PagParams:
    """Positional UI/API values in field order; the UI's stand-in for an infinite blur sigma becomes inf."""
    values = list(args)
    index = field_names().index("blur_sigma")
    if len(values) > index and isinstance(values[index], (int, float)) and values[index] >= UI_INFINITY:
        values[index] = math.inf
    return PagParams.from_values(*values)


def field_names() -> list[str]:
    """The main settings in positional order (the UI's controls, the API's ``args``; not ``branches``)."""
    return [f.name for f in fields(PagParams) if f.name != "branches"]


def label_of(name: str) -> str:
    return _FIELDS[name].metadata["label"]


def canonical_key(key, allowed=None, field: str = "PAG args") -> str:
    """Map an API/XYZ key (``scale``, ``pag_scale``, ``pag_applied_layers``, the infotext label
    ``PAG scale``) to a field name (one of ``allowed``, default the main settings)."""
    allowed = tuple(allowed or field_names())
    if isinstance(key, str):
        k = "_".join(key.strip().lower().split())
        k = ALIASES.get(k, k)
        if k not in allowed and k.startswith("pag_"):
            k = ALIASES.get(k[4:], k[4:])
        if k in allowed:
            return k
    extra = "; guidances 2 and 3: 'branches': [{...}, {...}] or keys like 'PAG 2 scale'" if field == "PAG args" else ""
    raise PagError(field, key, "keys " + ", ".join(allowed) + " (also the infotext labels, e.g. 'PAG scale'; aliases: "
                   + ", ".join(ALIASES) + ")" + extra, "is not a PAG setting")


def _relevant(p, name: str) -> bool:
    if name == "blur_sigma":
        return p.method in ("blur", "seg")
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


def _check(f, value, *, strings_ok: bool, label: str | None = None):
    meta = f.metadata
    label, kind = label or meta["label"], meta["kind"]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if strings_ok and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise PagError(label, value, "true or false", "has the wrong type")
    if kind == "layers":
        return normalize_layer_spec(value, field=label)
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
