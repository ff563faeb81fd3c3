"""X/Y/Z plot axes: each sets ``p.pag_<field>``, which the script reads as an override.

Before the grid starts, every axis value is checked against the settings its cells will really have
(``check_grid``): the job's own PAG args (the accordion's, or the API's), the other scripts' ``p.pag_*``
and the values of the other PAG axes — every combination of them — and the layers against the model the
job will use. A bad combination stops the grid with the same message the API's 422 gives. A PAG axis
while PAG is off turns PAG on for the grid (a ``PAG note`` in each cell's infotext and a log line say so),
except next to a ``[PAG] Enabled`` axis, whose values decide.

The host (A1111 1.10 / Forge 2 ``scripts/xyz_grid.py: Script.run``) calls each axis' ``confirm(p, values)``
with the job's ``p`` (``p.script_args`` holds every script's args), for X, then Y, then Z, before the
first cell; each cell is ``copy(p)`` with the axes applied in the same order, so attributes set on ``p``
here reach every cell.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

from .errors import PagError
from .job import XYZ_ENABLED_BY, asks_for_pag, for_host, params_from_script_args, resolve_guidances
from .params import MAX_BRANCHES, METHODS, PagParams

log = logging.getLogger("sd_webui_pag")
LABEL_PREFIX = "[PAG] "
AXES_ATTR = "_pag_xyz_axes"  # p attribute: [(label, field, values)] of the PAG axes confirmed so far
MAX_COMBINATIONS = 100_000  # more cells than any grid a host draws; past it only each axis alone is checked


def _text(value):
    return str(value).strip()


def _bool(value):
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"[PAG] Enabled: {value!r} is not a choice; allowed: True, False")
    return text == "true"


def axis_specs():
    """(label, value type, p attribute, choices) for each axis: the main settings (``[PAG] Scale`` sets
    ``p.pag_scale``), then guidances 2 and 3 (``[PAG 2] Scale`` sets ``p.pag2_scale``; a value turns that
    guidance on in its cell)."""
    specs = [
        ("Enabled", _bool, "pag_enabled", lambda: ["True", "False"]),
        ("Scale", float, "pag_scale", None),
        ("Layers", _text, "pag_layers", None),
        ("Method", _text, "pag_method", lambda: list(METHODS)),
        ("Start", float, "pag_start", None),
        ("End", float, "pag_end", None),
        ("Rescale", float, "pag_rescale", None),
    ]
    for index in range(2, MAX_BRANCHES + 1):
        specs += [(f"{index}] Method", _text, f"pag{index}_method", lambda: list(METHODS)),
                  (f"{index}] Scale", float, f"pag{index}_scale", None),
                  (f"{index}] Layers", _text, f"pag{index}_layers", None)]
    return specs


def full_label(label: str) -> str:
    """``[PAG] Scale``, and for guidances 2 and 3 ``[PAG 2] Scale`` (their specs' labels start ``2] ``)."""
    return f"[PAG {label}" if label[:1].isdigit() else LABEL_PREFIX + label


def field_of(attribute: str) -> str:
    """The override key of a ``p`` attribute: ``pag_scale`` → ``scale``; ``pag2_scale`` stays (a numbered key)."""
    return attribute[len("pag_"):] if attribute.startswith("pag_") else attribute


def check_grid(p, axes: list, args, catalog=None) -> None:
    """Check every cell a grid will run, before it runs; raises the first ``PagError``.

    ``axes``: ``[(label, field, values)]`` in the order the host applies them (a later axis wins for the
    same field); ``args``: the job's PAG script args (``None`` when they cannot be found: the defaults);
    ``catalog``: the ``LayerCatalog`` of the model the cells will use, or None (layers are then checked by
    each cell's job). Sets or clears ``p.<XYZ_ENABLED_BY>``: a PAG axis while PAG is off turns it on.
    """
    args = tuple(args or ())
    with_enabled_axis = any(field == "enabled" for _, field, _ in axes)
    turn_on = not with_enabled_axis and not asks_for_pag(args, p, xyz=False)
    if turn_on:
        setattr(p, XYZ_ENABLED_BY, axes[0][0])
    elif getattr(p, XYZ_ENABLED_BY, None):
        delattr(p, XYZ_ENABLED_BY)
    choices = [[(label, field, value) for value in values] for label, field, values in axes]
    count = 1
    for values in choices:
        count *= len(values)
    cells = itertools.product(*choices) if count <= MAX_COMBINATIONS else ([c] for axis in choices for c in axis)
    resolved = {}
    for cell in cells:
        overrides = {field: value for _, field, value in cell}
        wants = overrides.get("enabled", True if turn_on else None)
        try:
            params = params_from_script_args(args, p, overrides, xyz=False) if wants is not False else None
            if wants is None and params is not None and not params.enabled:
                params = None
            if params is not None and catalog is not None:
                layers = tuple(g.layers for g in params.guidances())
                if layers not in resolved:
                    resolve_guidances(params, catalog)
                    resolved[layers] = True
        except PagError as err:
            if wants is None and not asks_for_pag(args, p):
                continue  # PAG stays off in this cell: its values are not used
            where = ", ".join(f"{label} = {value!r}" for label, _, value in cell)
            log.error("PAG X/Y/Z: the cell %s cannot run with the job's PAG settings: %s", where, err)
            raise


def _confirm(label, attribute, has_choices, job_args: Callable, job_catalog: Callable):
    """Reject a bad axis value before the grid starts, with the same message as everywhere else; an axis
    without values (the X/Y/Z script reads a choice axis' dropdown, not its text, while "use text inputs"
    is off — an API client that filled only the text gets no cell at all) is an error too."""
    field = field_of(attribute)
    label_text = full_label(label)

    def confirm(p, values):
        try:
            if not values:
                where = (" (with text inputs off, a choice axis takes its values from the dropdown: the API's "
                         "*_values_dropdown argument)") if has_choices else ""
                raise PagError(label_text, values, "at least one value", f"has no values{where}")
            for value in values:  # each value on its own first: the message names the value, not a combination
                PagParams(enabled=True).with_overrides(**{field: value})
            axes = [entry for entry in getattr(p, AXES_ATTR, []) if entry[0] != label_text]
            axes.append((label_text, field, list(values)))
            setattr(p, AXES_ATTR, axes)
            check_grid(p, axes, _ask(job_args, p), _ask(job_catalog, p))
        except PagError as err:
            raise for_host(err)  # the UI's error box; through the API, the host answers 422 with the message
    return confirm


def _ask(lookup, p):
    if lookup is None:
        return None
    try:
        return lookup(p)
    except Exception:  # a host lookup failing leaves the check to each cell's job
        log.debug("PAG X/Y/Z: lookup %s failed", getattr(lookup, "__name__", lookup), exc_info=True)
        return None


def add_axes(xyz_module, job_args: Callable | None = None, job_catalog: Callable | None = None) -> int:
    """Append the PAG axes to the X/Y/Z script's list (once; the list outlives UI reloads).

    ``job_args(p)``: the job's PAG script args (a tuple), or None; ``job_catalog(p)``: the ``LayerCatalog``
    of the model the grid's cells will use, or None when it is not known before they run."""
    options = xyz_module.axis_options
    if any(getattr(o, "label", "").startswith(LABEL_PREFIX) for o in options):
        return 0
    added = 0
    for label, kind, attribute, choices in axis_specs():
        options.append(xyz_module.AxisOption(
            full_label(label), kind, xyz_module.apply_field(attribute),
            confirm=_confirm(label, attribute, choices is not None, job_args, job_catalog), choices=choices,
        ))
        added += 1
    return added


def find_xyz_module(scripts_module):
    for data in getattr(scripts_module, "scripts_data", []):
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def register(scripts_module, job_args: Callable | None = None, job_catalog: Callable | None = None) -> bool:
    module = find_xyz_module(scripts_module)
    if module is None:
        log.debug("PAG: X/Y/Z plot script not found; no axes added")
        return False
    add_axes(module, job_args, job_catalog)
    return True
