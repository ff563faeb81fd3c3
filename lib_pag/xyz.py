"""X/Y/Z plot axes: each sets ``p.pag_<field>``, which the script reads as an override."""

from __future__ import annotations

import logging

from .errors import PagError
from .params import METHODS, PagParams

log = logging.getLogger("sd_webui_pag")
LABEL_PREFIX = "[PAG] "


def _text(value):
    return str(value).strip()


def _bool(value):
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"[PAG] Enabled: {value!r} is not a choice; allowed: True, False")
    return text == "true"


def axis_specs():
    """(label, value type, p attribute, choices) for each axis."""
    return [
        ("Enabled", _bool, "pag_enabled", lambda: ["True", "False"]),
        ("Scale", float, "pag_scale", None),
        ("Layers", _text, "pag_layers", None),
        ("Method", _text, "pag_method", lambda: list(METHODS)),
        ("Start", float, "pag_start", None),
        ("End", float, "pag_end", None),
        ("Rescale", float, "pag_rescale", None),
    ]


def _confirm(label, attribute, has_choices):
    """Reject a bad axis value before the grid starts, with the same message as everywhere else; an axis
    without values (the X/Y/Z script reads a choice axis' dropdown, not its text, while "use text inputs"
    is off — an API client that filled only the text gets no cell at all) is an error too."""
    field = attribute[len("pag_"):]

    def confirm(p, values):
        if not values:
            where = (" (with text inputs off, a choice axis takes its values from the dropdown: the API's "
                     "*_values_dropdown argument)") if has_choices else ""
            raise PagError(LABEL_PREFIX + label, values, "at least one value", f"has no values{where}")
        for value in values:
            PagParams(enabled=True).with_overrides(**{field: value})
    return confirm


def add_axes(xyz_module) -> int:
    """Append the PAG axes to the X/Y/Z script's list (once; the list outlives UI reloads)."""
    options = xyz_module.axis_options
    if any(getattr(o, "label", "").startswith(LABEL_PREFIX) for o in options):
        return 0
    added = 0
    for label, kind, attribute, choices in axis_specs():
        options.append(xyz_module.AxisOption(
            LABEL_PREFIX + label, kind, xyz_module.apply_field(attribute),
            confirm=_confirm(label, attribute, choices is not None), choices=choices,
        ))
        added += 1
    return added


def find_xyz_module(scripts_module):
    for data in getattr(scripts_module, "scripts_data", []):
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def register(scripts_module) -> bool:
    module = find_xyz_module(scripts_module)
    if module is None:
        log.debug("PAG: X/Y/Z plot script not found; no axes added")
        return False
    add_axes(module)
    return True
