"""Double of Forge ``backend/sampling/sampling_function.py`` (HEAD): how one denoiser call reaches the UNet.

- ``get_area_and_mult``: an entry's input rows, ``mult`` = strength (× mask), area ``(h, w, y, x)``,
  processed conditioning (area feathering of area conds is not modelled);
- ``calc_cond_uncond_batch``: entries (cond first, then uncond) are packed into UNet calls — each call
  takes the highest-index entries that can concatenate with the first remaining one, as many as
  ``model.memory_required`` allows against ``memory_management.get_free_memory`` — with per-call
  ``transformer_options`` (``cond_or_uncond``, ``sigmas``, ``cond_mark``, ``cond_indices``,
  ``uncond_indices``), ControlNet, and ``model_options["model_function_wrapper"]`` if set; outputs are
  accumulated ``Σ out·mult / Σ mult`` per cond/uncond (so AND sub-prompts average by strength);
- ``sampling_function_inner``: cfg1 optimisation (uncond None at cond_scale 1 unless disabled),
  ``sampler_pre_cfg_function``s, CFG (× edit_strength = Σ strengths when ≠ 1), ``sampler_post_cfg_function``s
  with args {denoised, cond, uncond, model, uncond_denoised, cond_denoised, sigma, model_options, input};
- ``sampling_function(self, denoiser_params, cond_scale, cond_composition)``: the WebUI entry point.
"""

import collections
import math

import torch

from backend import memory_management
from backend.sampling.condition import Condition, compile_conditions, compile_weighted_conditions

CondObj = collections.namedtuple("cond_obj", ["input_x", "mult", "conditioning", "area", "control", "patches"])


def get_area_and_mult(conds, x_in, timestep_in):
    if "timestep_start" in conds and timestep_in[0] > conds["timestep_start"]:
        return None
    if "timestep_end" in conds and timestep_in[0] < conds["timestep_end"]:
        return None
    area = conds.get("area", (x_in.shape[2], x_in.shape[3], 0, 0))
    strength = conds.get("strength", 1.0)
    input_x = x_in[:, :, area[2]:area[0] + area[2], area[3]:area[1] + area[3]]
    if "mask" in conds:
        mask = conds["mask"][:, area[2]:area[0] + area[2], area[3]:area[1] + area[3]] * conds.get("mask_strength", 1.0)
        mask = mask.unsqueeze(1).repeat(input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1)
    else:
        mask = torch.ones_like(input_x)
    conditioning = {k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device, area=area) for k, v in conds["model_conds"].items()}
    return CondObj(input_x, mask * strength, conditioning, area, conds.get("control"), None)


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


def compute_cond_mark(cond_or_uncond, sigmas):
    return torch.Tensor([cx for cx in cond_or_uncond for _ in range(int(sigmas.shape[0]))]).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    n = int(sigmas.shape[0])
    cond = [i * n + r for i, cx in enumerate(cond_or_uncond) if cx == 0 for r in range(n)]
    uncond = [i * n + r for i, cx in enumerate(cond_or_uncond) if cx != 0 for r in range(n)]
    return cond, uncond


CALLS = []  # (rows, cond_or_uncond) of every UNet call, for tests


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37
    to_run = [(p, 0) for p in (get_area_and_mult(x, x_in, timestep) for x in cond) if p is not None]
    if uncond is not None:
        to_run += [(p, 1) for p in (get_area_and_mult(x, x_in, timestep) for x in uncond) if p is not None]

    while to_run:
        first = to_run[0][0]
        candidates = [i for i in range(len(to_run)) if can_concat_cond(to_run[i][0], first)][::-1]
        to_batch = candidates[:1]
        free = memory_management.get_free_memory(x_in.device)
        for i in range(1, len(candidates) + 1):
            amount = candidates[:len(candidates) // i]
            if model.memory_required([len(amount) * first.input_x.shape[0]] + list(first.input_x.shape[1:])) < free:
                to_batch = amount
                break
        picked = [to_run.pop(i) for i in to_batch]
        cond_or_uncond = [kind for _, kind in picked]
        chunks = len(picked)
        input_x = torch.cat([p.input_x for p, _ in picked])
        c = cond_cat([p.conditioning for p, _ in picked])
        timestep_ = torch.cat([timestep] * chunks)
        to = dict(model_options.get("transformer_options", {}))
        to["cond_or_uncond"] = cond_or_uncond[:]
        to["sigmas"] = timestep
        to["cond_mark"] = compute_cond_mark(cond_or_uncond, timestep)
        to["cond_indices"], to["uncond_indices"] = compute_cond_indices(cond_or_uncond, timestep)
        c["transformer_options"] = to
        control = picked[-1][0].control
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, dict(c), chunks)
            c["control_model"] = control
        CALLS.append((input_x.shape[0], cond_or_uncond[:]))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep_, **c)
        assert output.shape[0] == input_x.shape[0], "a model_function_wrapper returned the wrong number of rows"
        output = output.chunk(chunks)
        for o, (p, kind) in enumerate(picked):
            a = p.area
            out, count = (out_cond, out_count) if kind == 0 else (out_uncond, out_uncond_count)
            out[:, :, a[2]:a[0] + a[2], a[3]:a[1] + a[3]] += output[o] * p.mult
            count[:, :, a[2]:a[0] + a[2], a[3]:a[1] + a[3]] += p.mult
    out_cond /= out_count
    out_uncond /= out_uncond_count
    return out_cond, out_uncond


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None, return_full=False):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False) else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model,
                "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    image_cond = denoiser_params.image_cond
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == x.shape[0] and image_cond.shape[2:] == x.shape[2:]:
        for entry in uncond + cond:
            entry["model_conds"]["c_concat"] = Condition(image_cond)
    control = unet_patcher.controlnet_linked_list
    if control is not None:
        for entry in cond + uncond:
            entry["control"] = control
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, _ = modifier(model, x, timestep, uncond, cond, cond_scale, model_options, None)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, None, return_full=True)


def sampling_prepare(unet, x):
    """Mirrors ``sampling_prepare``'s loading: ``load_models_gpu([unet])`` (object patches set), once per
    sampler run (``modules/sd_samplers_kdiffusion.py`` calls it before sampling)."""
    from backend import memory_management

    memory_management.load_models_gpu(models=[unet])
