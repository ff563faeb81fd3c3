"""Double of reForge ``ldm_patched/modules/samplers.py`` (ComfyUI-era sampling code).

- ``get_area_and_mult``: area is None (whole latent) or ``[h, w, y, x]``; ``mult`` = strength (× mask);
- ``calc_cond_batch(model, conds, x, timestep, model_options)``: entries of every list in ``conds`` are
  packed into UNet calls (highest-index concat-able entries first, sized by ``memory_required × 1.5``
  against free memory); ``transformer_options`` = copy of model_options' + ``cond_or_uncond`` (the
  list index of each entry), ``uuids``, ``sigmas``; ControlNet; ``model_function_wrapper``; outputs
  accumulated per list ``Σ out·mult / Σ mult``;
- ``calc_cond_uncond_batch``: the deprecated tuple wrapper;
- ``cfg_function``: uncond None → the cond prediction; CFG × edit_strength; post-CFG args add ``cond_scale``;
- ``sampling_function``: cfg1 optimisation, ``sampler_calc_cond_batch_function`` instead of
  ``calc_cond_batch`` when set, ``sampler_pre_cfg_function``s *after* the batch, then ``cfg_function``.
Not modelled: hooks, default conds, gligen, epsilon scaling.
"""

import collections
import math

import torch

from ldm_patched.modules import model_management

CondObj = collections.namedtuple("cond_obj", ["input_x", "mult", "conditioning", "area", "control", "patches", "uuid", "hooks"])
CALLS = []


def get_area_and_mult(conds, x_in, timestep_in):
    if "timestep_start" in conds and timestep_in[0] > conds["timestep_start"]:
        return None
    if "timestep_end" in conds and timestep_in[0] < conds["timestep_end"]:
        return None
    area = list(conds["area"]) if "area" in conds else None
    strength = conds.get("strength", 1.0)
    input_x = x_in
    if area is not None:
        for i in range(2):
            input_x = input_x.narrow(i + 2, area[2 + i], area[i])
    if "mask" in conds:
        mask = conds["mask"][:input_x.shape[0]]
        if area is not None:
            for i in range(2):
                mask = mask.narrow(i + 1, area[2 + i], area[i])
        mask = (mask * conds.get("mask_strength", 1.0)).unsqueeze(1).repeat(input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1)
    else:
        mask = torch.ones_like(input_x)
    conditioning = {k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device, area=area) for k, v in conds["model_conds"].items()}
    return CondObj(input_x, mask * strength, conditioning, area, conds.get("control"), None, conds.get("uuid", 0), None)


def can_concat_cond(c1, c2):
    if c1.input_x.shape != c2.input_x.shape:
        return False
    for a, b in ((c1.control, c2.control), (c1.patches, c2.patches)):
        if (a is None) != (b is None) or (a is not None and a is not b):
            return False
    if c1.conditioning.keys() != c2.conditioning.keys():
        return False
    return all(c1.conditioning[k].can_concat(c2.conditioning[k]) for k in c1.conditioning)


def cond_cat(c_list):
    keys = {}
    for c in c_list:
        for k, v in c.items():
            keys.setdefault(k, []).append(v)
    return {k: v[0].concat(v[1:]) for k, v in keys.items()}


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = []
    for i, cond in enumerate(conds):
        for x in cond or []:
            p = get_area_and_mult(x, x_in, timestep)
            if p is not None:
                to_run.append((p, i))
    while to_run:
        first = to_run[0][0]
        candidates = [i for i in range(len(to_run)) if can_concat_cond(to_run[i][0], first)][::-1]
        to_batch = candidates[:1]
        free = model_management.get_free_memory(x_in.device)
        for i in range(1, len(candidates) + 1):
            amount = candidates[:len(candidates) // i]
            if model.memory_required([len(amount) * first.input_x.shape[0]] + list(first.input_x.shape[1:])) * 1.5 < free:
                to_batch = amount
                break
        picked = [to_run.pop(i) for i in to_batch]
        cond_or_uncond = [i for _, i in picked]
        chunks = len(picked)
        input_x = torch.cat([p.input_x for p, _ in picked])
        c = cond_cat([p.conditioning for p, _ in picked])
        timestep_ = torch.cat([timestep] * chunks)
        to = dict(model_options.get("transformer_options", {}))
        to["cond_or_uncond"] = cond_or_uncond[:]
        to["uuids"] = [p.uuid for p, _ in picked]
        to["sigmas"] = timestep
        c["transformer_options"] = to
        control = picked[-1][0].control
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, c, chunks, to)
        CALLS.append((input_x.shape[0], cond_or_uncond[:]))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        assert output.shape[0] == input_x.shape[0], "a model_function_wrapper returned the wrong number of rows"
        output = output.chunk(chunks)
        for o, (p, i) in enumerate(picked):
            out, count = out_conds[i], out_counts[i]
            if p.area is not None:
                for d in range(2):
                    out = out.narrow(d + 2, p.area[2 + d], p.area[d])
                    count = count.narrow(d + 2, p.area[2 + d], p.area[d])
            out += output[o] * p.mult
            count += p.mult
    for i in range(len(out_conds)):
        out_conds[i] /= out_counts[i]
    return out_conds


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred if uncond_pred is not None else None, "cond_scale": cond_scale,
                "timestep": timestep, "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif uncond_pred is None:
        cfg_result = cond_pred
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False) else uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {"conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x, "sigma": timestep,
                "model": model, "model_options": model_options}
        out = fn(args)
        x = args["input"]
    # uncond_ None: calc_cond_batch leaves out[1] at 0 / 1e-37 = zeros, and that is what reaches cfg_function
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond, uncond=uncond_)
