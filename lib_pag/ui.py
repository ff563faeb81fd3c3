"""The PAG accordion, built the same way under gradio 3.41 (A1111, reForge) and 4.40 (Forge).

``build_ui`` returns the controls in ``PagParams`` field order (the script-args / API order) and
the infotext paste entries. Only plain values or ``gr.update`` cross into gradio.
"""

from __future__ import annotations

import html
import json
import logging
import math
from contextlib import contextmanager

from .errors import PagError
from .checkpoints import ModelView, view_of_unet
from .layers import PARTS, family_unet, parse_layer_spec, resolve_layers
from .maps import layer_map_svg, schedule_svg
from .params import (
    BRANCH_FIELDS, EXEC_MODES, HIRES_MODES, MAX_BRANCHES, METHOD_LAYERS, METHODS, PRESETS, SCHEDULES, UI_INFINITY,
    BranchParams, PagParams, field_names, format_value, label_of, numbered_key, params_from_positional,
)

log = logging.getLogger("sd_webui_pag")


# Hover hints, one per control (keys: PagParams fields and the accordion's other pieces). The hosts show a
# component's ``webui_tooltip`` as the ``title`` of its element (A1111 1.10 / Forge 2
# ``modules/gradio_extens*ons.py: Block_get_config`` puts it into the page config, ``javascript/hints.js``
# sets it on the element with that ``elem_id`` at load). The attribute is set after the component is made,
# so plain gradio (no host) simply ignores it.
HINTS = {
    "enabled": "Perturbed-Attention Guidance: also predict with the self-attention of the chosen layers replaced "
               "by the identity, and steer away from that degraded prediction. Costs about a third of a UNet pass per step.",
    "preset": "Sets PAG scale and layers to a tested pair; Custom keeps what you set.",
    "scale": "PAG scale s: how strongly to steer away from the perturbed prediction (0–100, typically 2–5; 0 = no effect).",
    "groups": "Perturb whole parts of the UNet; kept in sync with the layer text.",
    "layers": "Self-attention layers to perturb: down, mid, up, all; names such as m0, u3, d1-d3, m0.2-9; module "
              "paths; ':0.5' after an entry for half strength. The line below checks it against the model the next job uses.",
    "status": "What the layer text selects on the model the next job will use, or what is wrong with it.",
    "layer_map": "The UNet's attention blocks (down, mid, up); the filled cells are perturbed.",
    "method": "identity: the paper's PAG (the attention returns V); seg: Smoothed Energy Guidance (the query blurred "
              "by a 2-D Gaussian, as in its paper); tpg: Token Perturbation Guidance (the tokens entering the chosen "
              "transformer blocks shuffled); blur: this extension's older SEG-style blur; noise: Gaussian noise on the "
              "attention logits. Picking a method while the layers hold another method's default switches them to its own.",
    "blur_sigma": "blur and seg: Gaussian sigma in tokens (≥ 1e6 means infinite: every query becomes the mean query).",
    "noise_scale": "noise only: standard deviation of the noise added to the attention logits (0–100).",
    "start": "First model call with PAG, as a fraction of the model calls of the sampling pass (0–1).",
    "end": "PAG stops at this fraction of the pass's model calls (0–1, above start).",
    "sigma_start": "PAG only while the sampler's sigma is at most this; 0 = no bound.",
    "sigma_end": "PAG only while sigma is at least this (below sigma start); 0 = no bound. About 0.7 helps "
                 "against striped noise with ancestral samplers.",
    "schedule": "The scale over the window: constant, or a linear or cosine decay to 0 at the end.",
    "rescale": "Guidance rescale (0–1): brings each image's spread back to the conditional prediction's; "
               "against over-saturated images.",
    "hires": "The hires-fix pass: same settings, its own scale, or no PAG.",
    "hires_scale": "The PAG scale of the hires pass when PAG hires is 'own' (0–100).",
    "mode": "batched: the perturbed rows join the CFG batch (fastest); separate: an extra UNet call for them (least memory).",
    "schedule_plot": "The PAG scale at each of 20 steps (and of a hires pass that has its own setting); in its place, "
                     "the first bad setting, if any.",
    "more": "Up to two more perturbation guidances in the same job (e.g. SEG and TPG beside PAG): their perturbed "
            "rows ride in the same UNet call; each has its own settings. Every setting of PAG above applies to the "
            "first guidance only; mode is the job's.",
    "branch_enabled": "Run this guidance too (PAG must be on): its term s·(cond − perturbed) adds to the others.",
    "branch_status": "What this guidance's layers select on the model the next job will use, or its first bad setting.",
}


# What the status line says in the page as built: no model is known then; opening the accordion redraws it
BUILT = ModelView(None, "unknown", "", "Open this accordion or edit the layers to check them against the model the next "
                                      "job will use.")


def _hint(component, name: str):
    """Give ``component`` the hosts' hover hint ``HINTS[name]`` (the InputAccordion's accordion too)."""
    component.webui_tooltip = HINTS[name]
    accordion = getattr(component, "accordion", None)
    if accordion is not None:
        accordion.webui_tooltip = HINTS[name]
    return component


def job_model_view(model) -> ModelView:
    """What a host lookup answered, as a ``ModelView``: a view as is, a UNet module as the loaded model,
    None as not known yet."""
    if isinstance(model, ModelView):
        return model
    if model is None:
        return ModelView(None, "unknown", "", "No model is loaded yet: the layers are checked against it when the job starts.")
    return view_of_unet(model)


def validation_message(layers: str, model=None, field: str = "PAG layers") -> str:
    """HTML for the status line: what the layer text selects on the model the next job will use
    (``model``: a ``ModelView``, a loaded UNet module, or None), or the error naming field and allowed
    values. While that model is not known, a well-formed text is said to be checked when the job starts —
    never "valid"."""
    view = job_model_view(model)
    attr = f" data-layers='{html.escape(str(layers), quote=True)}'"
    try:
        try:
            parse_layer_spec(layers)
        except PagError as err:
            raise err.relabeled(field) from None
        if view.catalog is None:
            return f"<span class='pag-pending'{attr}>{html.escape(view.reason)}</span>"
        selection = resolve_layers(layers, view.catalog, field=field)
        where = f"this {family_unet(selection.catalog.arch)}"
        if view.source == "file":
            where = f"the {family_unet(selection.catalog.arch)} of {view.name} (read from the file; it loads when the job starts)"
        return (f"<span class='pag-ok'{attr}>{len(selection.chosen)} self-attention layers on {html.escape(where)}: "
                f"{html.escape(_short(selection.names))}</span>")
    except PagError as err:
        return f"<span class='pag-error'{attr}>{html.escape(str(err))}</span>"


def _short(names, limit=12):
    return ", ".join(names) if len(names) <= limit else ", ".join(names[:limit]) + f", … (+{len(names) - limit})"


def groups_in(layers: str) -> list[str]:
    try:
        selectors = parse_layer_spec(layers)
    except PagError:
        return []
    return [part for part in PARTS if any(s.parts and part in s.parts for s in selectors)]


def with_groups(layers: str, groups: list[str]) -> str:
    """The layer text after the group boxes changed: entries keep their order and strengths, a group
    entry loses the parts that were unticked, newly ticked groups are appended at full strength."""
    try:
        selectors = parse_layer_spec(layers)
    except PagError:
        selectors = ()
    entries, covered = [], set()
    for s in selectors:
        if not s.parts:
            entries.append(s.text)
            continue
        kept = [part for part in s.parts if part in groups]
        covered.update(kept)
        suffix = s.text[s.text.index(":"):] if ":" in s.text else ""
        entries += [s.text] if kept == list(s.parts) else [part + suffix for part in kept]
    entries += [part for part in PARTS if part in groups and part not in covered]
    return ",".join(entries)


def layer_map_html(layers: str, model=None) -> str:
    """The layer map of the model the next job will use; empty while that model is not known, or on a bad spec
    (the status line says why)."""
    view = job_model_view(model)
    if view.catalog is None:
        return ""
    try:
        return layer_map_svg(view.catalog, layers)
    except PagError:
        return ""


SETTINGS_CHECKED = ("method", "blur_sigma", "noise_scale", "sigma_start", "sigma_end", "rescale", "mode")


def schedule_html(scale, start, end, schedule, hires, hires_scale, steps: int = 20, **settings) -> str:
    """The scale curve over ``steps`` (and an illustrative hires pass unless it runs the same settings), or —
    in its place — the error of the first bad setting among these and ``settings`` (UI values of
    ``SETTINGS_CHECKED``; the layers have their own status line): every bad value shows before Generate."""
    values = {"enabled": True, "layers": "mid", "scale": scale, "start": start, "end": end, "schedule": schedule,
              "hires": hires, "hires_scale": hires_scale, **settings}
    try:
        params = params_from_positional([values.get(name, getattr(PagParams(), name)) for name in field_names()])
    except PagError as err:
        return f"<span class='pag-error'>{html.escape(str(err))}</span>"
    return schedule_svg(params, steps, hires_steps=None if hires == "same" else steps // 2)


def reply_json(for_values, **outputs) -> str:
    """A server-side check's reply: the input values it was computed for (as received) and its outputs."""
    return json.dumps({"for": for_values, **outputs})


# The browser applies a reply only while the inputs still hold the values it was computed for; a stale one
# is dropped and asks again (a new nonce in the retry box, whose change reruns the check with the current
# values). gradio 3.41 drops an event fired while the same event is still running (Blocks.svelte:
# trigger_api_call returns on "pending"), and the host's queue runs events concurrently: without this,
# typing fast left the status and the schedule on an early keystroke.
_FRESH_JS = """(r, now) => {
  const norm = (v) => (Array.isArray(v) ? v : [v]).map((x) =>
      (typeof x === "number" || (typeof x === "string" && x.trim() !== "" && !isNaN(Number(x)))) ? String(Number(x)) : String(x));
  return JSON.stringify(norm(r.for)) === JSON.stringify(norm(now));
}"""
_NONCE_JS = "String(Date.now()) + '-' + Math.random()"
APPLY_LAYERS_JS = f"""(reply, text, status, groups, map, retry) => {{
  let r = null;
  try {{ r = JSON.parse(reply); }} catch (e) {{ r = null; }}
  if (!r) return [status, groups, map, retry];
  if (!({_FRESH_JS})(r, text)) return [status, groups, map, {_NONCE_JS}];
  return [r.status, r.groups, r.map, retry];
}}"""
APPLY_SCHEDULE_JS = f"""(...args) => {{
  const [plot, retry] = args.slice(-2);
  let r = null;
  try {{ r = JSON.parse(args[0]); }} catch (e) {{ r = null; }}
  if (!r) return [plot, retry];
  if (!({_FRESH_JS})(r, args.slice(1, -2))) return [plot, {_NONCE_JS}];
  return [r.plot, retry];
}}"""


def _wire_replies(gr, check, inputs, triggers, reply, retry, outputs, apply_js) -> None:
    """``check(*inputs)`` runs on the server whenever a trigger (or the retry box) changes and writes its
    reply; then ``apply_js`` in the browser copies the reply into ``outputs`` if it is still fresh."""
    js = {"js" if int(gr.__version__.split(".")[0]) >= 4 else "_js": apply_js}
    for trigger in [*triggers, retry]:
        trigger.change(check, inputs=inputs, outputs=[reply], show_progress=False).then(
            None, inputs=[reply, *inputs], outputs=[*outputs, retry], show_progress=False, **js)


def _ui_text(value) -> str:
    """A setting as the text the host's paste converts into the control's value (inf: the UI's stand-in)."""
    return format_value(UI_INFINITY if isinstance(value, float) and math.isinf(value) else value)


def fill_pasted_params(_infotext: str, params: dict) -> None:
    """``on_infotext_pasted``: complete the parsed infotext the way the PAG controls need it.

    Like the host's own defaults for missing keys: with PAG keys present, every PAG key gets its value
    (absent ones their default, ``PAG enabled: True``); without any, ``PAG enabled: False``. Guidances 2 and 3
    likewise: with any of their keys (``PAG 2 method``, …) every one of their controls gets its value and the
    guidance is ticked; without, it is unticked. A bad PAG value is reported and the PAG keys dropped, so the
    controls stay as they are.
    """
    labels = [label_of(name) for name in field_names()]
    present = {k: params[k] for k in labels if k in params}
    numbered = {k: params[k] for k in params if numbered_key(k) is not None}
    if not present and not numbered:
        params[label_of("enabled")] = "False"
        for index in range(2, MAX_BRANCHES + 1):
            params[BranchParams(index).label("enabled")] = "False"
        return
    try:
        parsed = PagParams.from_infotext({**present, **numbered})
    except PagError as err:
        log.error("PAG infotext not pasted: %s", err)
        for key in [*present, *numbered]:
            del params[key]
        return
    params.update({label_of(name): _ui_text(getattr(parsed, name)) for name in field_names()})
    branches = {b.index: b for b in parsed.branches}
    for index in range(2, MAX_BRANCHES + 1):
        branch = branches.get(index)
        if branch is None:
            params[BranchParams(index).label("enabled")] = "False"
            continue
        params.update({branch.label(name): _ui_text(getattr(branch, name)) for name in BRANCH_FIELDS})


def default_layers(method: str) -> str:
    """The layers a method starts from: its paper's (``METHOD_LAYERS``), else PAG's ``mid,up``."""
    return METHOD_LAYERS.get(method, PagParams().layers)


def on_method(method, layers):
    """A method picked by hand: layers that hold the previous method's default become the new method's."""
    if str(layers).strip() in {PagParams().layers, *METHOD_LAYERS.values()}:
        return default_layers(method)
    return layers


def branch_check(index: int, model, *values) -> str:
    """HTML for guidance ``index``'s status line: its first bad setting, or what its layers select on the model the
    next job will use (``values``: its controls in ``BRANCH_FIELDS`` order)."""
    settings = dict(zip(BRANCH_FIELDS, values))
    if not settings.get("enabled"):
        return "<span class='pag-pending'>Off: tick it to run this guidance too.</span>"
    try:
        blur = settings.get("blur_sigma")
        if isinstance(blur, (int, float)) and blur >= UI_INFINITY:
            settings["blur_sigma"] = math.inf
        BranchParams.from_dict(index, settings, defaults_by_method=False)
    except PagError as err:
        return f"<span class='pag-error'>{html.escape(str(err))}</span>"
    return validation_message(settings.get("layers"), model, field=BranchParams(index).label("layers"))


def fallback_accordion(gr):
    """For hosts without ``InputAccordion``: an accordion holding an explicit enable checkbox."""
    @contextmanager
    def accordion(value, label, elem_id):
        with gr.Accordion(label, open=False, elem_id=elem_id):
            yield gr.Checkbox(value=value, label="Enable PAG", elem_id=f"{elem_id}-checkbox")
    return accordion


def build_ui(gr, input_accordion, elem_id, job_model=lambda: None):
    """Create the controls; returns (controls in field order, infotext_fields, paste_field_names).

    ``job_model()``: the model the next job will use — a ``checkpoints.ModelView``, a loaded UNet module, or
    None while it is not known; asked each time the status line and layer map are redrawn.
    """
    d = PagParams()
    input_accordion = input_accordion or fallback_accordion(gr)
    with input_accordion(False, label="PAG (Perturbed-Attention Guidance)", elem_id=elem_id("enabled")) as enabled:
        with gr.Row(elem_classes=["pag-row"]):
            preset = gr.Dropdown(label="Preset", choices=["Custom"] + list(PRESETS), value="Custom", elem_id=elem_id("preset"))
            scale = gr.Slider(label=label_of("scale"), minimum=0.0, maximum=20.0, step=0.1, value=d.scale, elem_id=elem_id("scale"))
        with gr.Row(elem_classes=["pag-row"]):
            groups = gr.CheckboxGroup(label="Layer groups", choices=list(PARTS), value=groups_in(d.layers), elem_id=elem_id("groups"))
            layers = gr.Textbox(label=label_of("layers"), value=d.layers, lines=1, elem_id=elem_id("layers"),
                                placeholder="mid,up · m0 · d1-d3 · m0.2-9:0.5 · u0:0.5")
        # drawn for the model the next job uses when the accordion opens (the page is built before any model loads)
        status = gr.HTML(value=validation_message(d.layers, BUILT), elem_id=elem_id("status"), elem_classes=["pag-status"])
        layer_map = gr.HTML(value="", elem_id=elem_id("layer_map"), elem_classes=["pag-map"])
        with gr.Row(elem_classes=["pag-row"]):
            method = gr.Dropdown(label=label_of("method"), choices=list(METHODS), value=d.method, elem_id=elem_id("method"))
            blur_sigma = gr.Number(label=label_of("blur_sigma") + f" (≥{UI_INFINITY:g} = mean)", value=d.blur_sigma, elem_id=elem_id("blur_sigma"))
            noise_scale = gr.Number(label=label_of("noise_scale"), value=d.noise_scale, elem_id=elem_id("noise_scale"))
        with gr.Row(elem_classes=["pag-row"]):
            start = gr.Slider(label=label_of("start") + " (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01, value=d.start, elem_id=elem_id("start"))
            end = gr.Slider(label=label_of("end") + " (fraction of steps)", minimum=0.0, maximum=1.0, step=0.01, value=d.end, elem_id=elem_id("end"))
        with gr.Row(elem_classes=["pag-row"]):
            sigma_start = gr.Number(label=label_of("sigma_start") + " (0 = off)", value=d.sigma_start, elem_id=elem_id("sigma_start"))
            sigma_end = gr.Number(label=label_of("sigma_end") + " (0 = off)", value=d.sigma_end, elem_id=elem_id("sigma_end"))
            schedule = gr.Dropdown(label=label_of("schedule"), choices=list(SCHEDULES), value=d.schedule, elem_id=elem_id("schedule"))
            rescale = gr.Slider(label=label_of("rescale"), minimum=0.0, maximum=1.0, step=0.05, value=d.rescale, elem_id=elem_id("rescale"))
        with gr.Row(elem_classes=["pag-row"]):
            hires = gr.Dropdown(label=label_of("hires") + " pass", choices=list(HIRES_MODES), value=d.hires, elem_id=elem_id("hires"))
            hires_scale = gr.Slider(label=label_of("hires_scale"), minimum=0.0, maximum=20.0, step=0.1, value=d.hires_scale, elem_id=elem_id("hires_scale"))
            mode = gr.Radio(label=label_of("mode"), choices=list(EXEC_MODES), value=d.mode, elem_id=elem_id("mode"))
        schedule_plot = gr.HTML(value=schedule_html(d.scale, d.start, d.end, d.schedule, d.hires, d.hires_scale),
                                elem_id=elem_id("schedule_plot"), elem_classes=["pag-map"])
        # guidances 2 and 3: closed until needed; their controls follow the 15 main ones in the script args
        branch_controls = {}
        with gr.Accordion("More guidances: SEG, TPG, … beside PAG", open=False, elem_id=elem_id("more")) as more:
            for index in range(2, MAX_BRANCHES + 1):
                branch_controls[index] = _branch_controls(gr, index, elem_id)
        # replies of the server-side checks, and the "ask again" nonces (see _wire_replies); never script args
        names = ["layers_reply", "layers_retry", "schedule_reply", "schedule_retry"]
        names += [f"branch{i}_{kind}" for i in range(2, MAX_BRANCHES + 1) for kind in ("reply", "retry")]
        replies = {name: gr.Textbox(value="", visible=False, elem_id=elem_id(name), elem_classes=["pag-reply"])
                   for name in names}

    controls = {"enabled": enabled, "scale": scale, "layers": layers, "method": method, "blur_sigma": blur_sigma,
                "noise_scale": noise_scale, "start": start, "end": end, "sigma_start": sigma_start,
                "sigma_end": sigma_end, "schedule": schedule, "rescale": rescale, "hires": hires,
                "hires_scale": hires_scale, "mode": mode}
    for name, component in {**controls, "preset": preset, "groups": groups, "status": status, "layer_map": layer_map,
                            "schedule_plot": schedule_plot, "more": more}.items():
        _hint(component, name)
    ordered = [controls[name] for name in field_names()]
    for index in range(2, MAX_BRANCHES + 1):
        ordered += [branch_controls[index][name] for name in BRANCH_FIELDS]

    def on_preset(name):
        values = PRESETS.get(name)
        if not values:
            return gr.update(), gr.update()
        return gr.update(value=values["scale"]), gr.update(value=values["layers"])

    def layers_reply(text):
        try:
            view = job_model_view(job_model())
        except Exception:  # a host lookup failing must not break the page: say it is not known yet
            log.debug("PAG: the job-model lookup failed", exc_info=True)
            view = job_model_view(None)
        return reply_json(text, status=validation_message(text, view), groups=groups_in(text), map=layer_map_html(text, view))

    def schedule_reply(*values):
        return reply_json(list(values), plot=schedule_html(*values[:6], **dict(zip(SETTINGS_CHECKED, values[6:]))))

    preset.change(on_preset, inputs=[preset], outputs=[scale, layers], show_progress=False)
    schedule_inputs = [scale, start, end, schedule, hires, hires_scale, *(controls[name] for name in SETTINGS_CHECKED)]
    # the page outlives model switches, and is built before any model loads: redraw on opening as well
    _wire_replies(gr, layers_reply, [layers], [layers, enabled], replies["layers_reply"], replies["layers_retry"],
                  [status, groups, layer_map], APPLY_LAYERS_JS)
    _wire_replies(gr, schedule_reply, schedule_inputs, schedule_inputs, replies["schedule_reply"],
                  replies["schedule_retry"], [schedule_plot], APPLY_SCHEDULE_JS)
    if hasattr(groups, "input"):  # user ticks only; .change would also fire on the programmatic update above
        groups.input(lambda g, text: gr.update(value=with_groups(text, g)), inputs=[groups, layers], outputs=[layers],
                     show_progress=False)
    if hasattr(method, "input"):  # a method picked by hand (not a paste, which sets method and layers together)
        method.input(on_method, inputs=[method, layers], outputs=[layers], show_progress=False)

    def model_view():
        try:
            return job_model_view(job_model())
        except Exception:
            log.debug("PAG: the job-model lookup failed", exc_info=True)
            return job_model_view(None)

    for index, branch in branch_controls.items():
        inputs = [branch[name] for name in BRANCH_FIELDS]

        def branch_reply(*values, index=index):
            return reply_json(list(values), plot=branch_check(index, model_view(), *values))

        _wire_replies(gr, branch_reply, inputs, [*inputs, enabled], replies[f"branch{index}_reply"],
                      replies[f"branch{index}_retry"], [branch["status"]], APPLY_SCHEDULE_JS)
        if hasattr(branch["method"], "input"):
            branch["method"].input(on_method, inputs=[branch["method"], branch["layers"]], outputs=[branch["layers"]],
                                   show_progress=False)

    # plain label keys: the host pastes them (completed by fill_pasted_params) and copies them between tabs
    infotext_fields = [(control, label_of(name)) for name, control in controls.items()]
    paste_field_names = [label_of(name) for name in field_names()]
    for index, branch in branch_controls.items():
        labels = BranchParams(index)
        infotext_fields += [(branch[name], labels.label(name)) for name in BRANCH_FIELDS]
        paste_field_names += [labels.label(name) for name in BRANCH_FIELDS]
    return ordered, infotext_fields, paste_field_names


# what guidances 2 and 3 start as in the UI: SEG on its default layers, TPG on the paper's SDXL set
BRANCH_UI_METHODS = {2: "seg", 3: "tpg"}


def _branch_controls(gr, index: int, elem_id) -> dict:
    """Guidance ``index``'s controls (``BRANCH_FIELDS`` and a status line), labelled ``PAG 2 …`` like its infotext keys."""
    d = BranchParams(index)
    method = BRANCH_UI_METHODS.get(index, d.method)
    label = d.label

    def eid(name):
        return elem_id(f"g{index}_{name}")

    with gr.Group(elem_id=eid("group"), elem_classes=["pag-guidance"]):
        with gr.Row(elem_classes=["pag-row"]):
            c = {"enabled": gr.Checkbox(label=f"Guidance {index}", value=False, elem_id=eid("enabled"))}
            c["method"] = gr.Dropdown(label=label("method"), choices=list(METHODS), value=method, elem_id=eid("method"))
            c["scale"] = gr.Slider(label=label("scale"), minimum=0.0, maximum=20.0, step=0.1, value=d.scale, elem_id=eid("scale"))
            c["layers"] = gr.Textbox(label=label("layers"), value=default_layers(method), lines=1, elem_id=eid("layers"))
        c["status"] = gr.HTML(value="<span class='pag-pending'>Off: tick it to run this guidance too.</span>",
                              elem_id=eid("status"), elem_classes=["pag-status"])
        with gr.Row(elem_classes=["pag-row"]):
            c["blur_sigma"] = gr.Number(label=label("blur_sigma") + f" (≥{UI_INFINITY:g} = mean)", value=d.blur_sigma,
                                        elem_id=eid("blur_sigma"))
            c["noise_scale"] = gr.Number(label=label("noise_scale"), value=d.noise_scale, elem_id=eid("noise_scale"))
            c["start"] = gr.Slider(label=label("start"), minimum=0.0, maximum=1.0, step=0.01, value=d.start, elem_id=eid("start"))
            c["end"] = gr.Slider(label=label("end"), minimum=0.0, maximum=1.0, step=0.01, value=d.end, elem_id=eid("end"))
        with gr.Row(elem_classes=["pag-row"]):
            c["sigma_start"] = gr.Number(label=label("sigma_start") + " (0 = off)", value=d.sigma_start, elem_id=eid("sigma_start"))
            c["sigma_end"] = gr.Number(label=label("sigma_end") + " (0 = off)", value=d.sigma_end, elem_id=eid("sigma_end"))
            c["schedule"] = gr.Dropdown(label=label("schedule"), choices=list(SCHEDULES), value=d.schedule, elem_id=eid("schedule"))
            c["rescale"] = gr.Slider(label=label("rescale"), minimum=0.0, maximum=1.0, step=0.05, value=d.rescale, elem_id=eid("rescale"))
        with gr.Row(elem_classes=["pag-row"]):
            c["hires"] = gr.Dropdown(label=label("hires") + " pass", choices=list(HIRES_MODES), value=d.hires, elem_id=eid("hires"))
            c["hires_scale"] = gr.Slider(label=label("hires_scale"), minimum=0.0, maximum=20.0, step=0.1, value=d.hires_scale,
                                         elem_id=eid("hires_scale"))
    for name, component in c.items():
        if name == "enabled":
            _hint(component, "branch_enabled")
        elif name == "status":
            _hint(component, "branch_status")
        else:
            component.webui_tooltip = f"Guidance {index}: " + HINTS[name]
    return c


__all__ = ["HINTS", "branch_check", "build_ui", "default_layers", "fill_pasted_params", "groups_in", "job_model_view",
           "layer_map_html", "on_method", "reply_json", "schedule_html", "validation_message", "with_groups"]
