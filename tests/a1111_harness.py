"""Shared set-up for the A1111 tests: the WebUI double with the real extension script loaded.

Also the independent reference: every denoiser call the host makes is recorded, and the expected
guided output is recomputed from scratch — one UNet call per row on the unpatched model, the
perturbed rows on a deep copy whose chosen attn1 modules compute ``to_out(to_v(x))`` — and the
formula ``u + Σ w·cfg·(c_k − u) + s·Σ w·(c_k − p_k)`` per image.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "tests" / "webui"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modules import infotext_utils, processing, prompt_parser, script_callbacks, scripts, shared  # noqa: E402
from modules import sd_samplers_cfg_denoiser  # noqa: E402

from lib_pag import build_catalog, resolve_layers  # noqa: E402
from tests.exactness import rel_err  # noqa: E402
from unets import reference_unet  # noqa: E402

SCRIPT = ROOT / "scripts" / "pag.py"


def load_webui(model, with_xyz=True, builtin=()):
    """Fresh script registry, the extension loaded from its file like the host, UI built for both tabs.

    ``builtin``: more script doubles from ``tests/webui/scripts`` to load first (e.g. ``"soft_inpainting"``).
    """
    scripts.test_only_reset()
    infotext_utils.reset()
    script_callbacks.clear_callbacks()
    shared.sd_model = model
    xyz = scripts.test_only_load_builtin_xyz_grid() if with_xyz else None
    for name in builtin:
        scripts.test_only_load_script_file(str(ROOT / "tests" / "webui" / "scripts" / f"{name}.py"), base=str(ROOT / "tests" / "webui"))
    module = scripts.test_only_load_script_file(str(SCRIPT))
    assert module is not None, "scripts/pag.py failed to load"
    script_callbacks.before_ui_callback()
    scripts.test_only_build_ui(is_img2img=False)
    scripts.test_only_build_ui(is_img2img=True)
    return module, xyz


def unload_webui():
    from lib_pag import a1111

    a1111.JOBS.clear()
    scripts.test_only_reset()
    infotext_utils.reset()
    script_callbacks.clear_callbacks()


def pag_script(is_img2img=False):
    runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
    return next(s for s in runner.alwayson_scripts if s.title() == "PAG"), runner


def script_args(runner, pag_values, is_img2img=False):
    """The full script_args tuple the UI would send: defaults, with PAG's slice replaced."""
    script, _ = pag_script(is_img2img)
    args = [None] * max(s.args_to for s in runner.alwayson_scripts)
    args[0] = 0
    for s in runner.alwayson_scripts:
        for i in range(s.args_from, s.args_to):
            args[i] = runner.inputs[i].value
    values = list(pag_values)
    args[script.args_from:script.args_from + len(values)] = values
    return tuple(args)


def txt2img(pag_values, *, prompt="a cat", negative="blurry", **kw):
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("steps", 4)
    kw.setdefault("sampler_name", "Euler")
    kw.setdefault("seed", 11)
    kw.setdefault("cfg_scale", 5.0)
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative, **kw)
    runner = scripts.scripts_txt2img
    p.scripts = runner
    p.script_args = script_args(runner, pag_values)
    return p


def img2img(pag_values, init, mask=None, *, prompt="a cat", negative="blurry", **kw):
    kw.setdefault("width", init.shape[-1] * 8)
    kw.setdefault("height", init.shape[-2] * 8)
    kw.setdefault("steps", 4)
    kw.setdefault("sampler_name", "Euler")
    kw.setdefault("seed", 11)
    kw.setdefault("cfg_scale", 5.0)
    kw.setdefault("denoising_strength", 0.75)
    p = processing.StableDiffusionProcessingImg2Img(prompt=prompt, negative_prompt=negative, init_images=[init], mask=mask, **kw)
    runner = scripts.scripts_img2img
    p.scripts = runner
    p.script_args = script_args(runner, pag_values, is_img2img=True)
    return p


# --- recording the host's denoiser calls ------------------------------------------------------------

@dataclass
class DenoiserCall:
    x: torch.Tensor
    sigma: torch.Tensor
    uncond: object
    cond: object
    cond_scale: float
    s_min_uncond: float
    image_cond: torch.Tensor
    step: int
    total_steps: int
    mask: torch.Tensor | None
    nmask: torch.Tensor | None
    init_latent: torch.Tensor | None
    timesteps: bool
    out: torch.Tensor | None = None


class Recorder:
    """Records every ``CFGDenoiser.forward`` call (inputs cloned before, output after)."""

    def __init__(self, monkeypatch):
        self.calls: list[DenoiserCall] = []
        original = sd_samplers_cfg_denoiser.CFGDenoiser.forward
        recorder = self

        def forward(den, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            call = DenoiserCall(
                x.clone(), sigma.clone(), uncond, cond, cond_scale, s_min_uncond,
                None if image_cond is None else image_cond.clone(), den.step, den.total_steps,
                den.mask, den.nmask, getattr(den, "init_latent", None),
                bool(getattr(den, "mask_before_denoising", False)),
            )
            out = original(den, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
            call.out = out.detach().clone()
            recorder.calls.append(call)
            return out

        monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", forward)


def reference_model(model, layers: str):
    selection = resolve_layers(layers, build_catalog(model.model.diffusion_model))
    ref = copy.deepcopy(model)
    ref.model.diffusion_model = reference_unet(model.model.diffusion_model, {l.path: s for l, s in selection.chosen})
    return ref


def _row(t, i):
    if isinstance(t, dict):
        return {k: v[i:i + 1] for k, v in t.items()}
    return t[i:i + 1]


def _predict(model, call: DenoiserCall, x, sigma, text, image_cond):
    """One UNet evaluation the way A1111's inner model does it: x0 (k-diffusion) or eps (timesteps)."""
    if isinstance(text, dict):
        cond = {**text, "c_concat": [image_cond]}
    else:
        cond = {"c_crossattn": [text], "c_concat": [image_cond]}
    if call.timesteps:
        return model.apply_model(x, sigma, cond)
    import k_diffusion.external

    wrapper_cls = k_diffusion.external.CompVisVDenoiser if model.parameterization == "v" else k_diffusion.external.CompVisDenoiser
    return wrapper_cls(model)(x, sigma, cond=cond)


def expected_output(call: DenoiserCall, model, ref_model, pag_scale: float, *, skipped: bool = False,
                    uncond_image_cond_zero: bool = False, blend=None):
    """The guided output of one recorded call, built row by row from unpatched and reference models.

    Inpainting (k-diffusion): the host's blend of that output, ``blend(result, call)`` when given, else
    the plain ``result·nmask + init_latent·mask``.
    """
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(call.cond, call.step)
    uncond = prompt_parser.reconstruct_cond_batch(call.uncond, call.step)
    outs = []
    with torch.no_grad():
        for i, conds in enumerate(conds_list):
            x, sigma = call.x[i:i + 1], call.sigma[i:i + 1]
            ic = call.image_cond[i:i + 1]
            cond_pred = {k: _predict(model, call, x, sigma, _row(tensor, k), ic) for k, _ in conds}
            pert_pred = {k: _predict(ref_model, call, x, sigma, _row(tensor, k), ic) for k, _ in conds} if pag_scale else {}
            if skipped:
                u, cfg = cond_pred[conds[0][0]], 1.0
            else:
                u, cfg = _predict(model, call, x, sigma, _row(uncond, i), torch.zeros_like(ic) if uncond_image_cond_zero else ic), call.cond_scale
            out = u.clone()
            for k, w in conds:
                out = out + w * cfg * (cond_pred[k] - u)
                if pag_scale:
                    out = out + w * pag_scale * (cond_pred[k] - pert_pred[k])
            outs.append(out)
    result = torch.cat(outs)
    if call.mask is not None and not call.timesteps:
        result = blend(result, call) if blend is not None else result * call.nmask + call.init_latent * call.mask
    return result


def relative_error(call: DenoiserCall, expected: torch.Tensor) -> float:
    """``tests.exactness.rel_err`` of the recorded output: max |out − expected| / max |expected|.

    The tests that use it run in float64 (``tests/exactness.py``: the error model and ``BOUND``); in fp32
    the host's own CFG path differs from the row-by-row recomputation by up to ~1e-5 relative, depending
    on the machine's vector kernels."""
    return rel_err(call.out, expected)
