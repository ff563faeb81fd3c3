"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/infotext_utils.py``.

``quote``/``unquote``, ``parse_generation_parameters`` (prompt / negative prompt / last-line
``key: value`` pairs, ``WxH`` split into ``-1``/``-2``, host defaults for missing keys,
``opts.infotext_skip_pasting``), ``PasteField``/``paste_fields``/``add_paste_fields`` and ``paste``,
a synchronous equivalent of the ``paste_func`` that ``connect_paste`` wires to the paste button.
Also registers itself as ``modules.generation_parameters_copypaste`` like the host (1.8+).
Left out: styles extraction, hypernet prompt suffix, old hires-fix size restoration, image helpers.
"""

from __future__ import annotations

import json
import re
import sys

import gradio as gr

sys.modules['modules.generation_parameters_copypaste'] = sys.modules[__name__]

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
type_of_gr_update = type(gr.update())


def _opt(name, default):
    """Reads ``shared.opts.<name>`` with a fallback (the sampling helper owns ``modules.shared``)."""
    try:
        from modules import shared
        return getattr(shared.opts, name, default)
    except Exception:
        return default


class PasteField(tuple):
    """Mirrors ``infotext_utils.PasteField``: a ``(component, target)`` tuple with ``api``/``label``/``function``."""

    def __new__(cls, component, target, *, api=None):
        """Mirrors ``PasteField.__new__``: the tuple is ``(component, target)``."""
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        """Mirrors ``modules/infotext_utils.py: PasteField.__init__``."""
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


paste_fields: dict[str, dict] = {}
"""Mirrors ``infotext_utils.paste_fields``: tabname -> {"init_img", "fields", "override_settings_component"}."""


def reset():
    """Mirrors ``infotext_utils.reset``."""
    paste_fields.clear()


def add_paste_fields(tabname, init_img, fields, override_settings_component=None):
    """Mirrors ``infotext_utils.add_paste_fields``: wraps pairs into ``PasteField`` and stores them."""
    if fields:
        for i in range(len(fields)):
            if not isinstance(fields[i], PasteField):
                fields[i] = PasteField(*fields[i])
    paste_fields[tabname] = {"init_img": init_img, "fields": fields, "override_settings_component": override_settings_component}


def quote(text):
    """Mirrors ``infotext_utils.quote``: JSON-quote when the text contains ``,``, newline or ``:``."""
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    """Mirrors ``infotext_utils.unquote``: JSON-decode a ``"..."`` value, else return as is."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


_DEFAULTS_WHEN_MISSING = [
    ("Clip skip", "1"),
    ("Hires resize-1", 0),
    ("Hires resize-2", 0),
    ("Hires sampler", "Use same sampler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
]


def parse_generation_parameters(x: str):
    """Mirrors ``infotext_utils.parse_generation_parameters``.

    Lines before ``Negative prompt:`` are the prompt, the rest up to the last line the negative prompt;
    the last line is parsed as parameters only if it has at least 3 ``key: value`` matches. Quoted
    values are unquoted, ``WxH`` values become ``<key>-1``/``<key>-2``; all values stay strings.
    """
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False

    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''

    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")

    for key, default in _DEFAULTS_WHEN_MISSING:
        if key not in res:
            res[key] = default
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False

    skip = set(_opt("infotext_skip_pasting", []) or [])
    return {k: v for k, v in res.items() if k not in skip}


def get_override_settings(params, *, skip_fields=None):
    """Mirrors ``infotext_utils.get_override_settings``; the double has no infotext-mapped settings."""
    return []


def paste(fields, params):
    """Synchronous equivalent of the ``paste_func`` built by ``infotext_utils.connect_paste``.

    For each ``(component, key)``: ``v = key(params)`` if callable else ``params.get(key)``;
    None -> ``gr.update()`` (component unchanged); a ``gr.update`` dict is passed through; otherwise
    ``type(component.value)`` converts it (bool: ``"False"`` -> False; int: ``float(v)``), and a
    conversion error gives ``gr.update()``. Returns the list of updates, one per field.
    The host calls ``script_callbacks.infotext_pasted_callback(text, params)`` first: use
    ``paste_text`` for that.
    """
    res = []
    for output, key in fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            res.append(gr.update())
        elif isinstance(v, type_of_gr_update):
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(gr.update(value=val))
            except Exception:
                res.append(gr.update())
    return res


def paste_text(fields, text):
    """Mirrors the whole ``connect_paste.paste_func``: parse, ``infotext_pasted_callback``, convert."""
    params = parse_generation_parameters(text)
    try:
        from modules import script_callbacks
        callback = getattr(script_callbacks, "infotext_pasted_callback", None)
    except ImportError:
        callback = None
    if callback is not None:
        callback(text, params)
    return paste(fields, params)


def apply_updates(fields, updates):
    """TEST-ONLY. Applies ``paste`` results to the components' ``.value`` (what the browser would show)."""
    for (component, _), update in zip(fields, updates):
        if isinstance(update, dict) and "value" in update:
            component.value = update["value"]
    return [component.value for component, _ in fields]
