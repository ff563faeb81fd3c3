"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``scripts/xyz_grid.py`` ("X/Y/Z plot").

Load it like the host does (module name = file basename ``"xyz_grid.py"``) with
``modules.scripts.test_only_load_builtin_xyz_grid()``; that registers ``Script`` in
``modules.scripts.scripts_data`` as ``ScriptClassData(..., module=<this module>)`` so extensions can find
it with ``next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")``.

Kept: ``AxisOption``/``AxisOptionTxt2Img``/``AxisOptionImg2Img``, the module-level ``axis_options`` list
(a subset of the builtin axes), the helpers (``apply_field``, ``apply_override``, ``boolean_choice``,
``format_value_add_label``...), value parsing with the host's range syntax, and the per-cell loop:
``pc = copy(p)`` (shallow: ``pc.extra_generation_params``, ``script_args`` and ``scripts`` are the
SAME objects as ``p``'s), ``apply`` per axis, ``process_images(pc)`` with exceptions caught per cell.
Left out: grid image drawing (there are no images, only latents), saving, seeds "vary" options.
"""

import csv
import re
from copy import copy
from io import StringIO
from itertools import chain, permutations

import gradio as gr
import numpy as np

import modules.scripts as scripts
from modules import errors, processing
from modules.processing import Processed, process_images


def _shared():
    """Double-only helper (no upstream counterpart): late import of the sampling-path ``modules.shared``."""
    from modules import shared
    return shared


def apply_field(field):
    """Mirrors ``xyz_grid.apply_field``: ``setattr(p, field, x)``."""
    def fun(p, x, xs):
        """Mirrors the inner ``fun(p, x, xs)`` returned by the upstream factory."""
        setattr(p, field, x)
    return fun


def apply_prompt(p, x, xs):
    """Mirrors ``xyz_grid.apply_prompt`` (Prompt S/R)."""
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def apply_override(field, boolean: bool = False):
    """Mirrors ``xyz_grid.apply_override``: writes ``p.override_settings[field]``."""
    def fun(p, x, xs):
        """Mirrors the inner ``fun(p, x, xs)`` returned by the upstream factory."""
        if boolean:
            x = True if x.lower() == "true" else False
        p.override_settings[field] = x
    return fun


def boolean_choice(reverse: bool = False):
    """Mirrors ``xyz_grid.boolean_choice``: a ``choices`` callable for True/False axes."""
    def choice():
        """Mirrors the inner ``choice()`` of upstream ``boolean_choice``."""
        return ["False", "True"] if reverse else ["True", "False"]
    return choice


def format_value_add_label(p, opt, x):
    """Mirrors ``xyz_grid.format_value_add_label``: ``"<label>: <value>"`` (floats rounded to 8 places)."""
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_value(p, opt, x):
    """Mirrors ``xyz_grid.format_value``."""
    if type(x) == float:
        x = round(x, 8)
    return x


def format_value_join_list(p, opt, x):
    """Mirrors ``xyz_grid.format_value_join_list``."""
    return ", ".join(x)


def do_nothing(p, x, xs):
    """Mirrors ``xyz_grid.do_nothing``."""
    pass


def format_nothing(p, opt, x):
    """Mirrors ``xyz_grid.format_nothing``."""
    return ""


def str_permutations(x):
    """Mirrors ``xyz_grid.str_permutations`` (marker type: values become permutations)."""
    return x


def list_to_csv_string(data_list):
    """Mirrors ``xyz_grid.list_to_csv_string``."""
    with StringIO() as o:
        csv.writer(o).writerow(data_list)
        return o.getvalue().strip()


def csv_string_to_list_strip(data_str):
    """Mirrors ``xyz_grid.csv_string_to_list_strip``."""
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str)))))


def confirm_samplers(p, xs):
    """Mirrors ``xyz_grid.confirm_samplers`` (uses ``sd_samplers.samplers_map`` when present)."""
    from modules import sd_samplers
    samplers_map = getattr(sd_samplers, "samplers_map", None)
    if samplers_map is None:
        return
    for x in xs:
        if x.lower() not in samplers_map:
            raise RuntimeError(f"Unknown sampler: {x}")


def _sampler_choices():
    """Mirrors the ``choices=lambda: [x.name for x in sd_samplers.samplers ...]`` of upstream's Sampler axes."""
    from modules import sd_samplers
    return [x.name for x in getattr(sd_samplers, "samplers", [])]


class AxisOption:
    """Mirrors ``xyz_grid.AxisOption(label, type, apply, format_value, confirm, cost, choices, prepare)``."""

    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        """Mirrors ``scripts/xyz_grid.py: AxisOption.__init__``."""
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    """Mirrors ``xyz_grid.AxisOptionImg2Img`` (``is_img2img = True``)."""

    def __init__(self, *args, **kwargs):
        """Mirrors ``scripts/xyz_grid.py: AxisOptionImg2Img.__init__``."""
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    """Mirrors ``xyz_grid.AxisOptionTxt2Img`` (``is_img2img = False``)."""

    def __init__(self, *args, **kwargs):
        """Mirrors ``scripts/xyz_grid.py: AxisOptionTxt2Img.__init__``."""
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Var. seed", int, apply_field("subseed")),
    AxisOption("Var. strength", float, apply_field("subseed_strength")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
    AxisOption("Prompt S/R", str, apply_prompt, format_value=format_value),
    AxisOptionTxt2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value, confirm=confirm_samplers, choices=_sampler_choices),
    AxisOptionTxt2Img("Hires sampler", str, apply_field("hr_sampler_name"), confirm=confirm_samplers, choices=_sampler_choices),
    AxisOptionImg2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value, confirm=confirm_samplers, choices=_sampler_choices),
    AxisOption("Negative Guidance minimum sigma", float, apply_field("s_min_uncond")),
    AxisOption("Sigma Churn", float, apply_field("s_churn")),
    AxisOption("Sigma min", float, apply_field("s_tmin")),
    AxisOption("Sigma max", float, apply_field("s_tmax")),
    AxisOption("Sigma noise", float, apply_field("s_noise")),
    AxisOption("Eta", float, apply_field("eta")),
    AxisOption("Denoising", float, apply_field("denoising_strength")),
    AxisOption("Initial noise multiplier", float, apply_field("initial_noise_multiplier")),
    AxisOption("Always discard next-to-last sigma", str, apply_override('always_discard_next_to_last_sigma', boolean=True), choices=boolean_choice(reverse=True)),
    AxisOption("SGM noise multiplier", str, apply_override('sgm_noise_multiplier', boolean=True), choices=boolean_choice(reverse=True)),
]
"""Mirrors ``xyz_grid.axis_options`` (subset). Extensions append their own ``AxisOption`` here."""

_int = r"[+-]?\s*\d+"
_flt = r"[+-]?\s*\d+(?:.\d*)?"
re_range = re.compile(rf"\s*({_int})\s*-\s*({_int})(?:\s*\(([+-]\d+)\s*\))?\s*")
re_range_float = re.compile(rf"\s*({_flt})\s*-\s*({_flt})(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
re_range_count = re.compile(rf"\s*({_int})\s*-\s*({_int})(?:\s*\[(\d+)\s*\])?\s*")
re_range_count_float = re.compile(rf"\s*({_flt})\s*-\s*({_flt})(?:\s*\[(\d+(?:.\d*)?)\s*\])?\s*")


def process_axis(p, opt, vals, vals_dropdown=None, csv_mode=True):
    """Mirrors ``Script.run.process_axis``: text (or dropdown) values -> typed list.

    int/float axes accept ``a-b``, ``a-b (+step)`` and ``a-b [count]``; ``str_permutations`` yields
    permutations; ``confirm(p, values)`` runs last.
    """
    if opt.label == 'Nothing':
        return [0]

    if opt.choices is not None and not csv_mode:
        valslist = list(vals_dropdown or [])
    elif opt.prepare is not None:
        valslist = opt.prepare(vals)
    else:
        valslist = csv_string_to_list_strip(vals)

    if opt.type in (int, float):
        is_int = opt.type == int
        caster = (lambda v: int(v.replace(" ", ""))) if is_int else (lambda v: float(v.replace(" ", "")))
        ext = []
        for val in valslist:
            if isinstance(val, str) and val.strip() == '':
                continue
            m = (re_range if is_int else re_range_float).fullmatch(str(val))
            mc = (re_range_count if is_int else re_range_count_float).fullmatch(str(val))
            if m is not None:
                start, end = caster(m.group(1)), caster(m.group(2))
                step = caster(m.group(3)) if m.group(3) is not None else 1
                if is_int:
                    ext += list(range(start, end + 1, step))
                else:
                    ext += np.arange(start, end + step, step).tolist()
            elif mc is not None:
                start, end = caster(mc.group(1)), caster(mc.group(2))
                num = int(mc.group(3)) if mc.group(3) is not None else 1
                ext += [opt.type(x) for x in np.linspace(start=start, stop=end, num=num).tolist()]
            else:
                ext.append(val)
        valslist = ext
    elif opt.type == str_permutations:
        valslist = list(permutations(valslist))

    valslist = [opt.type(x) for x in valslist]
    if opt.confirm:
        opt.confirm(p, valslist)
    return valslist


def run_grid(p, x_opt, xs, y_opt=None, ys=None, z_opt=None, zs=None, title="X/Y/Z plot"):
    """TEST-ONLY. Mirrors the per-cell loop of ``Script.run``/``draw_xyz_grid`` (z outer, y, x inner).

    For every cell: ``pc = copy(p)``, ``pc.styles = pc.styles[:]``, ``x_opt.apply(pc, x, xs)`` (then y,
    z), ``process_images(pc)``; an exception is shown with ``errors.display`` and the cell gets an
    empty ``Processed``. The extra_generation_params dict is shared by ``p`` and every ``pc`` during
    processing, exactly like the host (it is only copied afterwards for the sub-grid infotext).
    Returns ``(results, cells)``: the ``Processed`` per cell and the ``pc`` objects, in run order.
    """
    nothing = axis_options[0]
    y_opt, ys = (y_opt or nothing), (ys if ys is not None else [0])
    z_opt, zs = (z_opt or nothing), (zs if zs is not None else [0])

    results, cells = [], []
    grid_infotext = [None] * (1 + len(zs))
    state = _shared().state
    for iz, z in enumerate(zs):
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                if getattr(state, "interrupted", False):
                    results.append(Processed(p, [], p.seed, ""))
                    cells.append(None)
                    continue
                pc = copy(p)
                pc.styles = pc.styles[:]
                x_opt.apply(pc, x, xs)
                y_opt.apply(pc, y, ys)
                z_opt.apply(pc, z, zs)
                try:
                    res = process_images(pc)
                except Exception as e:
                    errors.display(e, "generating image for xyz plot")
                    res = Processed(p, [], p.seed, "")

                subgrid_index = 1 + iz
                if grid_infotext[subgrid_index] is None and ix == 0 and iy == 0 and pc.all_prompts:
                    pc.extra_generation_params = copy(pc.extra_generation_params)
                    pc.extra_generation_params['Script'] = title
                    if x_opt.label != 'Nothing':
                        pc.extra_generation_params["X Type"] = x_opt.label
                        pc.extra_generation_params["X Values"] = ", ".join(str(v) for v in xs)
                    if y_opt.label != 'Nothing':
                        pc.extra_generation_params["Y Type"] = y_opt.label
                        pc.extra_generation_params["Y Values"] = ", ".join(str(v) for v in ys)
                    grid_infotext[subgrid_index] = processing.create_infotext(pc, pc.all_prompts, pc.all_seeds, pc.all_subseeds)

                results.append(res)
                cells.append(pc)
    run_grid.last_grid_infotext = grid_infotext
    return results, cells


class Script(scripts.Script):
    """Mirrors ``xyz_grid.Script`` ("X/Y/Z plot", a selectable script) with a compact UI."""

    def title(self):
        """Mirrors ``Script.title``."""
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        """Mirrors ``Script.ui`` (same argument order as ``run``; fewer widgets)."""
        self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]
        labels = [x.label for x in self.current_axis_options]
        controls = []
        for axis, default in (("x", 1), ("y", 0), ("z", 0)):
            controls.append(gr.Dropdown(label=f"{axis.upper()} type", choices=labels, value=labels[default], type="index", elem_id=self.elem_id(f"{axis}_type")))
            controls.append(gr.Textbox(label=f"{axis.upper()} values", lines=1, elem_id=self.elem_id(f"{axis}_values")))
            controls.append(gr.Dropdown(label=f"{axis.upper()} values", multiselect=True, elem_id=self.elem_id(f"{axis}_values_dropdown")))
        controls.append(gr.Checkbox(label='Draw legend', value=True, elem_id=self.elem_id("draw_legend")))
        controls.append(gr.Checkbox(label='Include Sub Images', value=False, elem_id=self.elem_id("include_lone_images")))
        controls.append(gr.Checkbox(label='Include Sub Grids', value=False, elem_id=self.elem_id("include_sub_grids")))
        controls.append(gr.Checkbox(label='Keep -1 for seeds', value=False, elem_id=self.elem_id("no_fixed_seeds")))
        controls.append(gr.Checkbox(label='Vary seeds for X', value=False, elem_id=self.elem_id("vary_seeds_x")))
        controls.append(gr.Checkbox(label='Vary seeds for Y', value=False, elem_id=self.elem_id("vary_seeds_y")))
        controls.append(gr.Checkbox(label='Vary seeds for Z', value=False, elem_id=self.elem_id("vary_seeds_z")))
        controls.append(gr.Slider(label="Grid margins (px)", minimum=0, maximum=500, value=0, step=2, elem_id=self.elem_id("margin_size")))
        controls.append(gr.Checkbox(label='Use text inputs instead of dropdowns', value=False, elem_id=self.elem_id("csv_mode")))
        return controls

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode):
        """Mirrors ``Script.run``: parse the three axes, run every cell, return one ``Processed``.

        The returned ``images`` are the cells' first latents (no grid image is drawn).
        """
        if not hasattr(self, "current_axis_options"):
            self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == self.is_img2img]
        x_opt = self.current_axis_options[x_type or 0]
        y_opt = self.current_axis_options[y_type or 0]
        z_opt = self.current_axis_options[z_type or 0]
        xs = process_axis(p, x_opt, x_values or "", x_values_dropdown, csv_mode)
        ys = process_axis(p, y_opt, y_values or "", y_values_dropdown, csv_mode)
        zs = process_axis(p, z_opt, z_values or "", z_values_dropdown, csv_mode)

        processing.fix_seed(p)
        results, _ = run_grid(p, x_opt, xs, y_opt, ys, z_opt, zs, title=self.title())

        first = next((r for r in results if r.images), None)
        if first is None:
            return Processed(p, [])
        out = copy(first)
        out.images = [r.images[0] if r.images else None for r in results]
        out.infotexts = [r.infotexts[0] if r.images else "" for r in results]
        out.all_prompts = [r.prompt for r in results]
        out.all_seeds = [r.seed for r in results]
        return out
