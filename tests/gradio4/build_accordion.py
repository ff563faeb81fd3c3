"""Build the PAG accordion under gradio 4.40.0 (Forge HEAD's pin) and check it; run in ``.venv-gradio4``.

    .venv-gradio4/bin/python tests/gradio4/build_accordion.py

Forge's ``InputAccordion`` is a small double written here after Forge HEAD's
``modules/ui_components.py`` (lllyasviel/stable-diffusion-webui-forge ``dfdcbab6``): a *function*
returning ``InputAccordionImpl(gr.Checkbox)`` built with ``setup=True``. Of Forge's gradio shims
(``modules/gradio_extensions.py``) only the two that a ``gr.Checkbox`` subclass needs to be defined at
all are applied (no ``.pyi`` written beside the subclass, no ``updateable`` wrapper). The others are
left out on purpose, so this check is stricter than Forge: an unknown (gradio-3-only) keyword raises
instead of being dropped with a warning, ``gr.Checkbox.update``/``gr.Box`` do not exist, and ``_js=``
raises (the double itself passes ``js=``, which is what Forge's ``EventWrapper`` turns ``_js=`` into).

The accordion is built twice in one ``gr.Blocks()`` (txt2img and img2img tab, as the WebUI builds every
always-on script once per tab; the API reads those same controls). Checked for each build: the 15
controls in ``PagParams`` field order with their component types and defaults, the accordion itself,
the infotext entries on sample parsed infotext (label keys completed by ``fill_pasted_params``, plain string values;
run through Forge's paste conversion and a real gradio event), the wired events (run through
``Blocks.process_api``), and ``Blocks.get_config_file()`` serialised with ``json.dumps``.

Prints one JSON summary on stdout; exits 1 when any check failed, 2 when it could not run at all.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import traceback
import warnings
from functools import wraps
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import gradio.component_meta  # noqa: E402
from gradio.state_holder import SessionState  # noqa: E402

EXPECTED_GRADIO = "4.40.0"
TABS = ("txt2img", "img2img")

# --- the two Forge shims a gr.Checkbox subclass needs (modules/gradio_extensions.py) ---------------
_original_create_or_modify_pyi = gradio.component_meta.create_or_modify_pyi


def _create_or_modify_pyi(component_class, class_name, events):
    """Forge skips classes marked ``webui_do_not_create_gradio_pyi_thank_you`` (else gradio writes a .pyi)."""
    if hasattr(component_class, "webui_do_not_create_gradio_pyi_thank_you"):
        return
    _original_create_or_modify_pyi(component_class, class_name, events)


gradio.component_meta.create_or_modify_pyi = _create_or_modify_pyi
gradio.component_meta.updateable = lambda fn: fn  # Forge: "this function is broken"


# --- double of Forge HEAD modules/ui_components.py: InputAccordionImpl + InputAccordion ----------
class InputAccordionImpl(gr.Checkbox):
    """A hidden checkbox (the script argument: True = enabled) and the accordion it opens and closes."""

    webui_do_not_create_gradio_pyi_thank_you = True
    global_index = 0

    @wraps(gr.Checkbox.__init__)
    def __init__(self, value=None, setup=False, **kwargs):
        if not setup:
            super().__init__(value=value, **kwargs)
            return
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordionImpl.global_index}"
            InputAccordionImpl.global_index += 1
        super().__init__(value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        # Forge passes _js=...; its EventWrapper renames that to js=, which gradio 4 takes.
        self.change(fn=None, js=f'function(checked){{ inputAccordionChecked("{self.accordion_id}", checked); }}',
                    inputs=[self])
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "label": kwargs.get("label", "Accordion"),
                                         "elem_classes": ["input-accordion"], "open": value})

    def extra(self):
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"


def InputAccordion(value=None, **kwargs):  # noqa: N802 (Forge's name)
    return InputAccordionImpl(value=value, setup=True, **kwargs)


# --- checks -------------------------------------------------------------------------------------
EXPECTED_TYPES = {
    "enabled": InputAccordionImpl, "scale": gr.Slider, "layers": gr.Textbox, "method": gr.Dropdown,
    "blur_sigma": gr.Number, "noise_scale": gr.Number, "start": gr.Slider, "end": gr.Slider,
    "sigma_start": gr.Number, "sigma_end": gr.Number, "schedule": gr.Dropdown, "rescale": gr.Slider,
    "hires": gr.Dropdown, "hires_scale": gr.Slider, "mode": gr.Radio,
}
# Parsed infotext as the host hands it to the paste callables (all values are strings).
SAMPLE_INFOTEXT = {
    "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "PAG scale": "4.5", "PAG layers": "m0,u1",
    "PAG method": "blur", "PAG blur sigma": "inf", "PAG start": "0.1", "PAG end": "0.9", "PAG schedule": "linear",
    "PAG hires": "own", "PAG hires scale": "2", "PAG mode": "separate",
    "PAG 2 method": "seg", "PAG 2 scale": "2", "PAG 2 layers": "mid", "PAG 2 blur sigma": "1.5",
}
BRANCH_TYPES = {
    "enabled": gr.Checkbox, "method": gr.Dropdown, "scale": gr.Slider, "layers": gr.Textbox, "blur_sigma": gr.Number,
    "noise_scale": gr.Number, "start": gr.Slider, "end": gr.Slider, "sigma_start": gr.Number, "sigma_end": gr.Number,
    "schedule": gr.Dropdown, "rescale": gr.Slider, "hires": gr.Dropdown, "hires_scale": gr.Slider,
}
NO_PAG_INFOTEXT = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7"}


class Checks:
    def __init__(self):
        self.failures: list[str] = []
        self.count = 0

    def check(self, ok, what: str):
        self.count += 1
        if not ok:
            self.failures.append(what)
        return bool(ok)


def is_update(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str)) or (
        isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value))


def _completed(params):
    """The parsed infotext after the infotext_pasted callbacks, as Forge's paste function sees it."""
    from lib_pag.ui import fill_pasted_params

    params = dict(params)
    fill_pasted_params("", params)
    return params


def forge_paste(fields, params):
    """Forge HEAD ``infotext_utils.connect_paste.paste_func`` for callables: value → ``gr.update``."""
    out = []
    for component, key in fields:
        v = key(params) if callable(key) else params.get(key)
        if v is None:
            out.append(gr.update())
        elif is_update(v):
            out.append(v)
        else:
            valtype = type(component.value)
            try:
                val = False if valtype is bool and v == "False" else float(v) if valtype is int else valtype(v)
                out.append(gr.update(value=val))
            except Exception:  # Forge drops the value silently: a paste that never lands
                out.append({"__type__": "update", "__failed__": repr(v)})
    return out


def run_event(blocks, state, fn_index, inputs):
    return asyncio.run(blocks.process_api(block_fn=fn_index, inputs=inputs, state=state))["data"]


def main() -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c, summary = run_checks()
    # gradio warns with UserWarning (e.g. a dropdown value not among its choices); any warning raised from
    # lib_pag counts too. Others (fastapi's on_event deprecation inside gradio) are only listed.
    ours = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                   if issubclass(w.category, UserWarning) or "lib_pag" in str(w.filename)})
    other = sorted({f"{w.category.__name__} ({Path(w.filename).name}): {' '.join(str(w.message).split())}"
                    for w in caught} - set(ours))
    c.check(not ours, f"warnings: {ours}")
    summary.update(ok=not c.failures, checks=c.count, failures=c.failures, warnings=ours, other_warnings=other)
    print(json.dumps(summary, indent=1, default=repr))
    return 0 if summary["ok"] else 1


def run_checks():
    from lib_pag.params import BRANCH_FIELDS, PRESETS, BranchParams, PagParams, field_names, label_of
    from lib_pag.ui import BRANCH_UI_METHODS, UI_INFINITY, build_ui, default_layers, fill_pasted_params

    c = Checks()
    c.check(gr.__version__ == EXPECTED_GRADIO, f"gradio {gr.__version__} is not {EXPECTED_GRADIO}")
    heavy = sorted(m for m in ("torchvision", "k_diffusion", "ldm", "sgm") if m in sys.modules)
    c.check(not heavy, f"lib_pag.ui pulled in {heavy}")
    defaults = PagParams()
    names = field_names()
    c.check(len(names) == 15, f"PagParams has {len(names)} fields, not 15")

    builds = {}
    with gr.Blocks() as blocks:
        for tab in TABS:
            with gr.Tab(tab):
                def elem_id(item, tab=tab):
                    return f"script_{tab}_pag_{item}"
                fns_before = set(blocks.fns)
                controls, infotext_fields, paste_field_names = build_ui(gr, InputAccordion, elem_id)
                paste_button = gr.Button("paste", visible=False)
                builds[tab] = dict(controls=controls, infotext_fields=infotext_fields, paste_field_names=paste_field_names,
                                   fns=sorted(set(blocks.fns) - fns_before), paste_button=paste_button)
        # What Forge's connect_paste wires: one click setting every pasted control.
        for tab, b in builds.items():
            fields, before = b["infotext_fields"], set(blocks.fns)
            b["paste_button"].click(lambda fields=fields: forge_paste(fields, _completed(SAMPLE_INFOTEXT)), inputs=[],
                                    outputs=[f[0] for f in fields], show_progress=False)
            (b["paste_fn"],) = set(blocks.fns) - before

    state = SessionState(blocks)
    summary_tabs = {}
    for tab, b in builds.items():
        controls, fields = b["controls"], b["infotext_fields"]
        pre = f"[{tab}] "
        c.check(len(controls) == 15 + 2 * 14, pre + f"{len(controls)} controls, not 15 + 2 × 14 (guidances 2 and 3)")
        by_name = dict(zip(names, controls[:15]))
        # guidances 2 and 3: their controls after the main ones, in BRANCH_FIELDS order, off by default
        branch_names = [f"{index}.{n}" for index in (2, 3) for n in BRANCH_FIELDS]
        for k, index in enumerate((2, 3)):
            d, method = BranchParams(index), BRANCH_UI_METHODS[index]
            for n, control in zip(BRANCH_FIELDS, controls[15 + 14 * k:15 + 14 * (k + 1)]):
                want = {"method": method, "layers": default_layers(method)}.get(n, getattr(d, n))
                c.check(type(control) is BRANCH_TYPES[n], pre + f"guidance {index} {n}: {type(control).__name__}")
                c.check(control.value == want, pre + f"guidance {index} {n}: default {control.value!r}, not {want!r}")
        for name, control in by_name.items():
            want = EXPECTED_TYPES[name]
            c.check(type(control) is want, pre + f"{name}: {type(control).__name__}, not {want.__name__}")
            c.check(control.value == getattr(defaults, name), pre + f"{name}: default {control.value!r}, not {getattr(defaults, name)!r}")
            c.check(type(control.value) is type(getattr(defaults, name)),
                    pre + f"{name}: default of type {type(control.value).__name__}, not {type(getattr(defaults, name)).__name__}")
            if isinstance(control, gr.Slider):
                c.check(control.minimum <= control.value <= control.maximum, pre + f"{name}: default outside the slider")
            if isinstance(control, (gr.Dropdown, gr.Radio)):
                choices = [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in control.choices]
                c.check(control.value in choices, pre + f"{name}: default {control.value!r} not among {choices}")
        c.check(all(getattr(x, "webui_tooltip", None) for x in controls) and getattr(by_name["enabled"].accordion, "webui_tooltip", None),
                pre + "a control without its hover hint (webui_tooltip, which Forge's hints.js shows as the title)")
        enabled = by_name["enabled"]
        c.check(isinstance(enabled, gr.Checkbox) and enabled.visible is False, pre + "enabled is not a hidden gr.Checkbox")
        c.check(enabled.elem_id == f"script_{tab}_pag_enabled-checkbox", pre + f"enabled elem_id {enabled.elem_id!r}")
        acc = getattr(enabled, "accordion", None)
        c.check(isinstance(acc, gr.Accordion) and acc.open is False and acc.elem_id == f"script_{tab}_pag_enabled",
                pre + "accordion missing, open, or with the wrong elem_id")
        c.check(acc is not None and acc.label == "PAG (Perturbed-Attention Guidance)", pre + "accordion label")
        inside = set()
        stack = list(getattr(acc, "children", []))
        while stack:
            block = stack.pop()
            inside.add(block._id)
            stack.extend(getattr(block, "children", []))
        c.check(all(ctrl._id in inside for ctrl in controls[1:]), pre + "not every control sits inside the accordion")

        # infotext entries
        c.check(len(fields) == len(controls) and {id(f[0]) for f in fields} == {id(x) for x in controls},
                pre + "infotext_fields do not cover the controls")
        keys = [label_of(n) for n in names] + [BranchParams(i).label(n) for i in (2, 3) for n in BRANCH_FIELDS]
        c.check([key for _, key in fields] == keys, pre + "infotext keys are not the labels")
        c.check(b["paste_field_names"] == keys, pre + "paste_field_names")
        expected = PagParams.from_infotext(SAMPLE_INFOTEXT)
        by_index = {br.index: br for br in expected.branches}
        pasted = {}
        field_name = {id(x): n for n, x in [*by_name.items(), *zip(branch_names, controls[15:])]}
        completed = {}
        for sample, params in (("sample", SAMPLE_INFOTEXT), ("no PAG", NO_PAG_INFOTEXT)):
            completed[sample] = dict(params)
            fill_pasted_params("", completed[sample])  # the host runs infotext_pasted callbacks first
        for component, key in fields:
            name = field_name[id(component)]
            for sample in ("sample", "no PAG"):
                value = completed[sample].get(key)
                c.check(value is None or isinstance(value, str), pre + f"{name} ({sample}): {type(value).__name__}")
                if sample == "no PAG":
                    c.check((value == "False") if name.endswith("enabled") else value is None,
                            pre + f"{name} (no PAG): {value!r}")
                    continue
                if "." in name:  # guidance 2 (in the sample) or 3 (not: unticked, the rest left alone)
                    index, field = int(name.split(".")[0]), name.split(".")[1]
                    if index not in by_index:
                        c.check((value == "False") if field == "enabled" else value is None, pre + f"{name}: {value!r}")
                        if field == "enabled":
                            pasted[name] = False
                        continue
                    want = getattr(by_index[index], field)
                else:
                    want = getattr(expected, name)
                want = UI_INFINITY if isinstance(want, float) and math.isinf(want) else want
                got = value if isinstance(want, str) else (value == "True") if isinstance(want, bool) else float(value)
                c.check(got == want, pre + f"{name} ({sample}): pasted {got!r}, not {want!r}")
                pasted[name] = got
        for (component, _), update in zip(fields, forge_paste(fields, completed["sample"])):
            name = field_name[id(component)]
            c.check("__failed__" not in update, pre + f"{name}: Forge's paste conversion drops {update.get('__failed__')}")

        # events: the accordion's js toggle, presets, layers, groups, schedule plot, and the paste click
        fns = [blocks.fns[i] for i in b["fns"]]
        js_only = [f for f in fns if f.fn is None]
        toggles = [f for f in js_only if f.js and "inputAccordionChecked" in f.js]
        applies = [f for f in js_only if f.js and "JSON.parse(" in f.js]
        c.check(len(toggles) == 1, pre + "the accordion's js change event is missing")
        # each server-side check is followed by the browser-side step that applies its reply only while fresh
        c.check(len(applies) == 17 + 2 * 16 and len(js_only) == 18 + 2 * 16,
                pre + f"{len(applies)} reply-applying js events, not 49 (layers, enabled, layers retry, 13 schedule/settings "
                      "inputs, schedule retry; per extra guidance its 14 controls, enabled and its retry)")
        python_fns = [f for f in fns if f.fn is not None]
        c.check(len(python_fns) == 20 + 2 * 17, pre + f"{len(python_fns)} python events, not 54 (preset, layers, enabled → "
                                                      "map, layers retry, groups, 13 schedule/settings inputs, schedule "
                                                      "retry, method picked; per extra guidance 16 checks and method picked)")
        ran = []
        ids = {x._id: n for n, x in by_name.items()}
        for f in python_fns:
            inputs = [ids.get(x._id) or (x.elem_id or "").split("_pag_")[-1] for x in f.inputs]
            values = []
            for x in f.inputs:
                n = ids.get(x._id)
                if n is not None:
                    values.append(x.value)
                elif "preset" in (x.elem_id or ""):
                    values.append("Portraits")
                elif "groups" in (x.elem_id or ""):
                    values.append(["mid"])
                else:
                    values.append(x.value)
            try:
                data = run_event(blocks, state, f._id, values)
                ok = len(data) == len(f.outputs)
                ran.append({"trigger": [t[1] for t in f.targets], "inputs": inputs, "outputs": len(data)})
                c.check(ok, pre + f"event {f.name} returned {len(data)} outputs for {len(f.outputs)}")
            except Exception as err:  # noqa: BLE001
                c.check(False, pre + f"event {f.name} on {inputs} raised {type(err).__name__}: {err}")
        preset_fn = next((f for f in python_fns if any("preset" in (x.elem_id or "") for x in f.inputs)), None)
        if c.check(preset_fn is not None, pre + "no preset event"):
            try:
                data = run_event(blocks, state, preset_fn._id, ["Portraits"])
                got = [d.get("value") if isinstance(d, dict) else d for d in data]
                c.check(got == [PRESETS["Portraits"]["scale"], PRESETS["Portraits"]["layers"]], pre + f"preset event gave {got}")
            except Exception as err:  # noqa: BLE001
                c.check(False, pre + f"preset event raised {type(err).__name__}: {err}")
        try:
            data = run_event(blocks, state, b["paste_fn"], [])
            got = [d.get("value") if isinstance(d, dict) else d for d in data]
            want = [pasted.get(field_name[id(comp)]) for comp, _ in fields if field_name[id(comp)] in pasted]
            got = [g for g, (comp, _) in zip(got, fields) if field_name[id(comp)] in pasted]
            c.check(got == want, pre + f"paste event set {got}, not {want}")
        except Exception as err:  # noqa: BLE001
            c.check(False, pre + f"paste event raised {type(err).__name__}: {err}")

        summary_tabs[tab] = {
            "controls": [{"name": n, "type": type(x).__name__, "value": x.value, "elem_id": x.elem_id}
                         for n, x in by_name.items()],
            "infotext_pasted": pasted,
            "events": {"js": len(js_only), "python": len(python_fns), "ran": ran},
        }

    config_bytes = 0
    try:
        config = blocks.get_config_file()
        text = json.dumps(config)
        config_bytes = len(text)
        components = {comp["id"]: comp for comp in config["components"]}
        for tab, b in builds.items():
            acc_conf = components.get(b["controls"][0].accordion._id, {})
            c.check(acc_conf.get("type") == "accordion" and acc_conf.get("props", {}).get("open") is False,
                    f"[{tab}] accordion config {acc_conf.get('type')!r} open={acc_conf.get('props', {}).get('open')!r}")
            for n, x in zip(names, b["controls"]):
                conf = components.get(x._id)
                c.check(conf is not None and conf.get("type") == x.get_block_name(), f"[{tab}] {n} missing from the config")
        c.check(len(config.get("dependencies", [])) == len(blocks.fns), "config dependencies != blocks.fns")
    except Exception as err:  # noqa: BLE001
        c.check(False, f"get_config_file/json.dumps raised {type(err).__name__}: {err}")

    import torch
    summary = {
        "gradio": gr.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "field_order": names,
        "tabs": summary_tabs,
        "config_bytes": config_bytes,
        "dependencies": len(blocks.fns),
        "heavy_modules": heavy,
    }
    return c, summary


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as err:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, indent=1))
        sys.exit(2)
