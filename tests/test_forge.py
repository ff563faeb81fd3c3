"""lib_pag.forge on doubles of the Forge 2 and reForge patcher contracts, driving the real ldm UNet.

Every exactness test recomputes the expected denoised output independently: plain and perturbed
predictions come from the *native* ldm forward of the UNet and of ``tests.unets.reference_unet``
(attn1 → ``(1−a)·attn + a·to_out(to_v(x))``), combined with the host's AND rule
(``Σ w·pred / Σ w``, CFG × Σ w when ≠ 1) and the PAG formula ``denoised + s·(cond − perturbed)``.
The UNet is float64 and the ``host`` fixture runs each test in float64 mode: outputs are compared to
float64 rounding (``tests/exactness.py``).
"""

import contextlib
import math
import sys
from pathlib import Path

import pytest
import torch

from lib_pag import forge
from lib_pag.params import PagParams
from tests.forge_double import unet_walk
from tests.forge_double.webui import Forge2Denoiser, Processing, ReForgeDenoiser, SdModel, deep_equal, snapshot_options
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from tests.unets import reference_unet, sd15_unet

DOUBLES = Path(__file__).resolve().parent / "forge_double"
# 8×8 latents: the middle block sees 1 token (self-attention = identity there), so tests that need a
# visible PAG term perturb down/up layers too
TOKENS, CTX = 7, 32


def _purge():
    for name in list(sys.modules):
        if name.split(".")[0] in ("backend", "ldm_patched"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def unet():
    return to_float64(sd15_unet(seed=3))


class Host:
    def __init__(self, kind, unet):
        self.kind = kind
        self.unet = unet
        if kind == "forge2":
            from backend.modules.k_model import KModel
            from backend.patcher.unet import UnetPatcher
            from backend.sampling import sampling_function as sf
            from backend import memory_management

            self.patcher = UnetPatcher(KModel(unet))
            self.sampling, self.memory, self.denoiser = sf, memory_management, Forge2Denoiser
        else:
            from ldm_patched.modules.model_base import BaseModel
            from ldm_patched.modules.model_patcher import ModelPatcher
            from ldm_patched.modules import model_management, samplers

            self.patcher = ModelPatcher(BaseModel(unet))
            self.sampling, self.memory, self.denoiser = samplers, model_management, ReForgeDenoiser
        unet_walk.CALLS.clear()

    def attention(self, q, k, v, heads):
        return unet_walk.sdpa_attention(q, k, v, heads)

    def calc_cond_only(self, model, cond, x, sigma, model_options):
        if self.kind == "forge2":
            return self.sampling.calc_cond_uncond_batch(model, cond, None, x, sigma, model_options)[0]
        return self.sampling.calc_cond_batch(model, [cond], x, sigma, model_options)[0]


@contextlib.contextmanager
def hosted(kind, unet):
    """The ``kind`` double (``forge2`` / ``reforge``) on sys.path, detected by PAG, around ``unet``; unlimited
    free memory (one UNet call per denoiser call)."""
    root = str(DOUBLES / kind)
    _purge()
    sys.path.insert(0, root)
    try:
        assert forge.detect_host(refresh=True) == kind
        h = Host(kind, unet)
        saved = h.memory.FREE_MEMORY
        h.memory.FREE_MEMORY = float("inf")
        try:
            yield h
        finally:
            h.memory.FREE_MEMORY = saved
    finally:
        sys.path.remove(root)
        _purge()
        forge.detect_host(refresh=True)


@pytest.fixture(params=["forge2", "reforge"])
def host(request, unet, float64):
    with hosted(request.param, unet) as h:
        yield h


# --- the independent reference ------------------------------------------------------------------------

def D(model, x, sigma, ctx):
    """x0 of the eps model through its native ldm forward (the doubles' KModel/BaseModel parameterisation)."""
    return unet_walk.denoised_from_eps(x, sigma, model(unet_walk.c_in(sigma, x), unet_walk.sigma_to_t(sigma), context=ctx))


def expected(unet, ref, x, sigma, uncond, cond, conds_list, cfg, s, *, skipped=False, rescale=0.0, both=False):
    """The host's output with PAG at scale ``s`` (``both``: and without PAG, from the same forwards)."""
    groups = list(map(list, zip(*conds_list)))  # the host's AND entries: one per sub-prompt position
    weights = [g[-1][1] for g in groups]
    total = sum(weights)
    cond_pred = sum(w * D(unet, x, sigma, cond[[r for r, _ in g]]) for g, w in zip(groups, weights)) / total
    pert = sum(w * D(ref, x, sigma, cond[[r for r, _ in g]]) for g, w in zip(groups, weights)) / total if s else cond_pred
    edit = total if not math.isclose(total, 1.0) else 1.0
    if skipped or math.isclose(cfg, 1.0):
        out = cond_pred * edit
    else:
        u = D(unet, x, sigma, uncond)
        out = u + (cond_pred - u) * cfg * edit
    guided = out + s * total * (cond_pred - pert)  # Σ w·(c − p): the host's CFG is scaled by Σ w too
    if rescale:
        dims = (1, 2, 3)
        ratio = cond_pred.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return (guided, out) if both else guided


def inputs(batch=1, subprompts=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g) * 3
    cond = torch.randn(batch * subprompts, TOKENS, CTX, generator=g)
    uncond = torch.randn(batch, TOKENS, CTX, generator=g)
    return x, cond, uncond


def paths(unet, spec):
    from lib_pag.layers import build_catalog, resolve_layers

    sel = resolve_layers(spec, build_catalog(unet))
    return {layer.path: s for layer, s in sel.chosen}


def run(host, params, *, batch=1, weights=(1.0,), cfg=5.0, sigmas=(6.0, 2.5, 0.7), skipped=(), hires=False, p=None):
    """Sample ``len(sigmas)`` denoiser calls through the host double; returns (p, [(inputs, output)])."""
    p = p or Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=len(sigmas))
    den = p.sample_pass(lambda pp: forge.apply(pp, pp.script_args), hires=hires)
    den.total_steps = len(sigmas)
    x, cond, uncond = inputs(batch, len(weights))
    conds_list = [[(i * len(weights) + j, w) for j, w in enumerate(weights)] for i in range(batch)]
    out = []
    for i, s in enumerate(sigmas):
        sigma = torch.full((batch,), s)
        with torch.no_grad():
            d = den(x, sigma, uncond, cond, conds_list, cfg, skip_uncond=i in skipped)
        out.append(((x, sigma, uncond, cond, conds_list, i in skipped), d))
    return p, out


def check(host, params, results, cfg, scales, *, strengths=None, rescale=0.0):
    ref = reference_unet(host.unet, paths(host.unet, params.layers) if strengths is None else strengths)
    strongest = 0.0
    for ((x, sigma, uncond, cond, conds_list, skipped), got), s in zip(results, scales):
        with torch.no_grad():
            want, plain = expected(host.unet, ref, x, sigma, uncond, cond, conds_list, cfg, s, skipped=skipped,
                                   rescale=rescale, both=True)
        assert_exact(got, want, what=f"sigma {float(sigma[0])}")
        if s:
            strongest = max(strongest, rel_err(plain, want))
    if any(scales):  # the PAG term's own size: leaving it out (or a wrong one) would miss by that much
        assert strongest > 1e-2, f"PAG term too small to tell apart ({strongest})"
        assert_visible(strongest, what="PAG term")


def pag(**kw):
    return PagParams(enabled=True, **{"scale": 3.0, "layers": "mid,up", **kw})


# --- host detection ----------------------------------------------------------------------------------

def test_detect_host_without_doubles_is_a1111():
    _purge()
    assert forge.detect_host(refresh=True) == forge.A1111
    assert not forge.is_forge_host()


def test_detect_host_with_each_double(host):
    assert forge.is_forge_host()
    assert forge.host_api().kind == host.kind
    assert forge.host_api().gate == ("pre_cfg" if host.kind == "forge2" else "calc_cond_batch_function")


# --- exactness ----------------------------------------------------------------------------------------

def test_batched_cfg_pag_matches_formula_in_one_unet_call(host):
    params = pag()
    p, results = run(host, params)
    check(host, params, results, 5.0, [3.0] * 3)
    # one UNet call per step: cond + uncond + the perturbed twin
    assert unet_walk.CALLS == [3, 3, 3]
    assert [how for *_, how in forge.job_of(p).log] == ["batched"] * 3


def test_separate_mode_matches_formula_with_an_extra_cond_call(host):
    params = pag(mode="separate")
    p, results = run(host, params)
    check(host, params, results, 5.0, [3.0] * 3)
    assert unet_walk.CALLS == [2, 1] * 3
    assert [how for *_, how in forge.job_of(p).log] == ["separate"] * 3


def test_pag_alone_cfg1_and_skipped_uncond(host):
    params = pag(scale=4.0, layers="d1,u7")
    _, results = run(host, params, cfg=1.0)
    check(host, params, results, 1.0, [4.0] * 3)
    assert all(rows == 2 for rows in unet_walk.CALLS)  # cond + twin, no uncond
    unet_walk.CALLS.clear()
    _, results = run(host, params, cfg=6.0, skipped={1})  # NGMS / skip-early on the middle step
    check(host, params, results, 6.0, [4.0] * 3)
    assert unet_walk.CALLS == [3, 2, 3]


@pytest.mark.parametrize("chunked", [False, True])
def test_and_prompts_batch_two_follow_the_host_average(host, monkeypatch, chunked):
    """Three AND sub-prompts (weights 1, 0.6, 1.3) × 2 images; ``chunked``: memory for ≤ 2 entries per call."""
    if chunked:  # an entry is 2 rows × 8 × 8 = 128 units; reForge asks for 1.5× that
        monkeypatch.setattr(host.memory, "FREE_MEMORY", 300 if host.kind == "forge2" else 450)
    params = pag(scale=2.5)
    # CFG 3: the host multiplies CFG by Σ w = 2.9 here, which amplifies the rounding noise of batched vs
    # single UNet calls; the PAG term itself is not amplified
    _, results = run(host, params, batch=2, weights=(1.0, 0.6, 1.3), sigmas=(5.0, 1.5), cfg=3.0)
    check(host, params, results, 3.0, [2.5, 2.5])
    calls = unet_walk.CALLS
    if not chunked:
        assert calls == [14, 14]  # (3 cond + 1 uncond + 3 twins) × 2 images
    else:
        assert len(calls) > 2 and sum(calls) == 2 * 14


def test_layer_strengths_and_rescale(host):
    params = pag(scale=3.0, layers="m0:0.5,u1-u2", rescale=0.7)
    _, results = run(host, params)
    check(host, params, results, 5.0, [3.0] * 3, rescale=0.7)


def test_schedule_window_adds_no_rows_outside_it(host):
    """Steps 0..3 of 4: window [0.25, 0.75) → PAG (linear decay) on steps 1 and 2 only; sigma bounds respected."""
    params = pag(start=0.25, end=0.75, schedule="linear")
    _, results = run(host, params, sigmas=(8.0, 4.0, 2.0, 1.0))
    check(host, params, results, 5.0, [0.0, 3.0, 1.5, 0.0])
    assert unet_walk.CALLS == [2, 3, 3, 2]
    unet_walk.CALLS.clear()
    params = pag(sigma_start=5.0, sigma_end=1.5)
    _, results = run(host, params, sigmas=(8.0, 4.0, 2.0, 1.0))
    check(host, params, results, 5.0, [0.0, 3.0, 3.0, 0.0])


def test_hires_re_entry_does_not_stack(host):
    params = pag(hires="own", hires_scale=1.5)
    p, _ = run(host, params)
    # Forge HEAD's hires pass: the hook, a reset of forge_objects, the hook again — and a third call
    # without a reset must not add anything either
    den = p.sample_pass(lambda pp: forge.apply(pp, pp.script_args), hires=True)
    before = p.sd_model.forge_objects.unet
    forge.apply(p, p.script_args)
    assert p.sd_model.forge_objects.unet is before
    mine = [f for f in before.model_options["sampler_post_cfg_function"] if getattr(f, "__pag_job__", None)]
    assert len(mine) == 1
    den.total_steps = 2
    x, cond, uncond = inputs()
    results = []
    for s in (3.0, 1.0):
        sigma = torch.full((1,), s)
        with torch.no_grad():
            results.append(((x, sigma, uncond, cond, [[(0, 1.0)]], False), den(x, sigma, uncond, cond, [[(0, 1.0)]], 5.0)))
    check(host, params, results, p.hr_cfg, [1.5, 1.5])


def test_original_patcher_untouched_and_other_extensions_chained(host):
    """Another extension's attn1 replace patch (on a chosen layer's fallback key) and UNet wrapper stay and run."""
    seen_patch, seen_wrapper = [], []

    def other_attn1(q, k, v, extra):
        seen_patch.append((q.shape[0], tuple(extra["cond_or_uncond"])))
        return host.attention(q, k, v, extra["n_heads"])

    def other_wrapper(apply_model, args):
        seen_wrapper.append(len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    base = host.patcher.clone()
    base.set_model_attn1_replace(other_attn1, "middle", 0)
    base.set_model_unet_function_wrapper(other_wrapper)
    before = snapshot_options(base.model_options)
    params = pag(layers="m0:0.5,u1")
    p, results = run(host, params, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))
    check(host, params, results, 5.0, [3.0] * 3)
    assert deep_equal(base.model_options, before)
    installed = p.sd_model.forge_objects.unet.model_options
    assert installed["transformer_options"]["patches_replace"]["attn1"][("middle", 0)] is other_attn1
    assert seen_wrapper == [3, 3, 3]  # the other wrapper saw the twinned calls (cond, uncond, twin)
    assert seen_patch and all(rows == 3 and len(cu) == 3 for rows, cu in seen_patch)


def test_other_post_cfg_unet_calls_get_no_pag_rows(host):
    """A post-CFG function installed before PAG's that runs its own cond pass (like Forge's builtin PAG/SAG)."""
    sizes = []

    def other_post_cfg(args):
        n = len(unet_walk.CALLS)
        host.calc_cond_only(args["model"], args["cond"], args["input"], args["sigma"], args["model_options"])
        sizes.append(unet_walk.CALLS[n:])
        return args["denoised"]

    base = host.patcher.clone()
    base.set_model_sampler_post_cfg_function(other_post_cfg)
    params = pag()
    _, results = run(host, params, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))
    check(host, params, results, 5.0, [3.0] * 3)
    assert sizes == [[1], [1], [1]]


def test_wrapper_replaced_later_falls_back_to_a_separate_call(host):
    """An extension that installs its UNet wrapper after PAG without chaining: PAG stays exact (separate call)."""
    params = pag()

    def hook(pp):
        forge.apply(pp, pp.script_args)
        pp.sd_model.forge_objects.unet.set_model_unet_function_wrapper(
            lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"]))

    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=2)
    den = p.sample_pass(hook)
    den.total_steps = 2
    x, cond, uncond = inputs()
    results = []
    for s in (4.0, 1.0):
        sigma = torch.full((1,), s)
        with torch.no_grad():
            results.append(((x, sigma, uncond, cond, [[(0, 1.0)]], False), den(x, sigma, uncond, cond, [[(0, 1.0)]], 5.0)))
    check(host, params, results, 5.0, [3.0, 3.0])
    assert [how for *_, how in forge.job_of(p).log] == ["separate", "separate"]
    assert forge.diffusion_model_of(p.sd_model) is host.patcher.model.diffusion_model
    assert forge.diffusion_model_of(p.sd_model).middle_block[1] is host.unet.middle_block[1]  # the same modules


def test_end_makes_installed_functions_inert(host):
    params = pag()
    p, _ = run(host, params)
    den = p.sampler.model_wrap_cfg
    forge.end(p)
    assert forge.job_of(p) is None and not hasattr(p, forge.JOB_ATTR)
    x, cond, uncond = inputs()
    sigma = torch.full((1,), 2.0)
    with torch.no_grad():
        got = den(x, sigma, uncond, cond, [[(0, 1.0)]], 5.0)
        want = expected(host.unet, host.unet, x, sigma, uncond, cond, [[(0, 1.0)]], 5.0, 0.0)
    assert_exact(got, want)


def test_bad_layer_is_refused_with_a_comment(host):
    params = pag(layers="d9")
    p, results = run(host, params)
    job = forge.job_of(p)
    assert job.refused and "d9" in job.refused
    assert any("d9" in c for c in p.comments)
    assert not any(k.startswith("PAG ") for k in p.extra_generation_params if k != "PAG note")
    assert p.extra_generation_params["PAG note"].startswith("not applied: PAG layers: 'd9'")
    assert p.sd_model.forge_objects.unet is p.sd_model.forge_objects_after_applying_lora.unet
    check(host, params, results, 5.0, [0.0] * 3, strengths={})


@pytest.mark.parametrize("args, message", [
    ([{"enabled": True, "layers": "d9"}], "PAG layers: 'd9' does not exist in this SD1.x UNet"),
    ([{"enabled": True, "layers": "zz"}], "PAG layers: 'zz' is not a layer name"),
    ([{"enabled": True, "method": "noise", "noise_scale": 250}], "PAG noise scale: 250.0 is out of range"),
    ([True, 3.0, "mid,up", "identity", 9.0, 1.0, 0.6, 0.5], "PAG start: 0.6 is not before the end"),
])
def test_a_bad_value_stops_the_job_at_process(host, args, message):
    """``process`` (Forge/reForge have loaded the job's model by then): a bad setting while PAG is on stops the
    job where the host samples (``p.sample`` raises the PagError, which the host shows as its error), before
    anything touched the patcher — never an image without the PAG that was asked for."""
    from lib_pag import PagError

    p = Processing(SdModel(host.patcher), args, host.denoiser)
    before = p.sd_model.forge_objects.unet
    job = forge.start(p, p.script_args)
    assert job is not None and not job.live
    with pytest.raises(PagError) as raised:
        p.sample()
    assert str(raised.value).startswith(message)
    assert raised.value.status_code == 422 and raised.value.body["field"] == message.split(":")[0]
    assert p.sd_model.forge_objects.unet is before and not any(k.startswith("PAG ") for k in p.extra_generation_params)


def test_process_leaves_a_good_or_disabled_job_to_sample(host):
    for args in ([pag().to_dict()], [{"enabled": False, "layers": "zz"}]):
        p = Processing(SdModel(host.patcher), args, host.denoiser)
        forge.start(p, p.script_args)
        assert "sample" not in p.__dict__
    p = Processing(SdModel(host.patcher), [pag(layers="m0").to_dict()], host.denoiser, steps=3)
    forge.start(p, p.script_args)
    p, results = run(host, pag(layers="m0"), p=p)  # apply reuses the job process started
    assert p.extra_generation_params["PAG layers"] == "m0" and forge.job_of(p).log


def test_disabled_or_no_forge_objects_does_nothing(host):
    p = Processing(SdModel(host.patcher), [PagParams().to_dict()], host.denoiser)
    p.sample_pass(lambda pp: forge.apply(pp, pp.script_args))
    assert p.sd_model.forge_objects.unet is host.patcher
    assert forge.apply(type("P", (), {"sd_model": object()})(), [pag().to_dict()]) is None


def test_infotext_and_refiner_note(host):
    params = pag(scale=2.0)
    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser)
    p.refiner_checkpoint_info, p.refiner_switch_at = object(), 0.8
    p.sample_pass(lambda pp: forge.apply(pp, pp.script_args))
    assert p.extra_generation_params["PAG scale"] == "2"
    assert p.extra_generation_params[forge.NOTE_KEY] == forge.REFINER_NOTE


@pytest.mark.parametrize("method", ["blur", "noise"])
def test_other_perturbations_run_batched(host, method):
    params = pag(method=method, layers="d0,u8", blur_sigma=2.0, noise_scale=1.0)
    p, results = run(host, params, sigmas=(4.0,))
    (inp, got), = results
    x, sigma, uncond, cond, conds_list, _ = inp
    with torch.no_grad():
        plain = expected(host.unet, host.unet, x, sigma, uncond, cond, conds_list, 5.0, 0.0)
    assert torch.isfinite(got).all() and rel_err(got, plain) > 1e-4
    assert forge.job_of(p).log[0][-1] == "batched"


def test_memory_reservation_counts_the_twin_rows(host):
    """The host reserves memory for ``[2·B, C, H, W]`` before sampling (sampling_prepare); with PAG batched
    the estimate is that of a third row per image, chained to a modifier another extension set."""
    if host.kind == "forge2":
        from backend.patcher.unet import sampling_prepare_estimate
    else:
        from ldm_patched.modules.model_patcher import sampling_prepare_estimate

    seen = []

    def other_extension(shape):  # e.g. AnimateDiff's estimator
        seen.append(list(shape))
        return 7 * host.patcher.memory_required(shape)

    host.patcher.set_memory_peak_estimation_modifier(other_extension)
    x = torch.zeros(2, 4, 8, 8)
    without = sampling_prepare_estimate(host.patcher, x)
    p, _ = run(host, PagParams(enabled=True, scale=3.0, layers="mid"))
    patched = p.sd_model.forge_objects.unet
    assert patched is not host.patcher
    with_pag = sampling_prepare_estimate(patched, x)
    assert seen[-1] == [6, 4, 8, 8] and without == 7 * host.patcher.memory_required([4, 4, 8, 8])
    assert with_pag == 7 * host.patcher.memory_required([6, 4, 8, 8]) == 1.5 * without
    assert sampling_prepare_estimate(host.patcher, x) == without  # the starting patcher is untouched
    p, _ = run(host, PagParams(enabled=True, scale=3.0, layers="mid", mode="separate"))
    assert sampling_prepare_estimate(p.sd_model.forge_objects.unet, x) == without  # separate: B rows at a time


def test_multidiffusion_style_wrapper_tiles_keep_the_twins_in_place(host):
    """Forge's MultiDiffusion holds the UNet function wrapper slot and runs each call as tiles of the whole
    batch, tile after tile, without re-tiling ``transformer_options``: PAG (chained outside it) perturbs the
    twin rows of every tile; batched == separate."""
    tile_rows = []

    def tiled(apply_model, args):  # two "tiles": the latent and its mirror image, tile-major
        x = args["input"]
        n = x.shape[0]
        tile_rows.append(2 * n)

        def two(v):
            if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n:
                return torch.cat([v, v.flip(-1) if v.ndim == 4 else v])
            return v

        c = {k: (v if k == "transformer_options" else two(v)) for k, v in args["c"].items()}
        out = apply_model(two(x), two(args["timestep"]), **c)
        return (out[:n] + out[n:].flip(-1)) / 2

    def sample(params):
        base = host.patcher.clone()
        base.set_model_unet_function_wrapper(tiled)
        return run(host, params, batch=2, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))[1]

    batched, separate = sample(pag(layers="mid,up")), sample(pag(layers="mid,up", mode="separate"))
    assert 2 * 6 in tile_rows  # 2 tiles × (2 cond + 2 uncond + 2 twins)
    plain = sample(PagParams())
    for (_, got), (_, want), (_, off) in zip(batched, separate, plain):
        assert_exact(got, want, what="batched vs separate")
        assert rel_err(off, want) > 1e-3
        assert_visible(rel_err(off, want), what="PAG term")


@pytest.mark.parametrize("calc_mode", ["Attention", "Latent"])
def test_regional_prompter_switches_pag_to_separate_or_off(host, calc_mode):
    """As on A1111: Regional Prompter's keys in the job's infotext (its process hook ran before
    process_before_every_sampling) switch PAG to separate mode (Attention) or off (Latent)."""
    params = pag()
    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=3)
    p.extra_generation_params.update({"RP Active": True, "RP Calc Mode": calc_mode})
    p, results = run(host, params, p=p)
    job = forge.job_of(p)
    extra = p.extra_generation_params
    if calc_mode == "Latent":
        assert job.refused and "Regional Prompter (Latent mode)" in job.refused
        assert "PAG scale" not in extra and extra["PAG note"].startswith("not applied")
        check(host, params, results, 5.0, [0.0] * 3, strengths={})
    else:
        assert forge._mode(job) == "separate" and extra["PAG mode"] == "separate"
        assert extra["PAG note"].startswith("separate mode: Regional Prompter (Attention mode)")
        assert all(how == "separate" for *_, how in job.log)
        check(host, params, results, 5.0, [3.0] * 3)


def test_one_info_line_per_job_says_what_pag_did(host, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        p, _ = run(host, pag(layers="m0", end=0.6), batch=2, hires=True)
        forge.end(p)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == [f"PAG done: scale 3, layers m0 (1 attn1 on SD1.x), identity, batched, window 0-0.6; 2 of 3 model calls "
                    f"with PAG, 4 perturbed rows; fork before middle_block"], info
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        caplog.clear()
        p, _ = run(host, pag(layers="d1", mode="separate"))
        forge.end(p)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 1 and "separate; 3 of 3 model calls with PAG, 3 perturbed rows; no fork (separate mode)" in info[0], info


def test_forges_own_pag_next_to_this_one_is_said_in_the_log_and_the_infotext(host, caplog):
    """Forge 2's "PerturbedAttentionGuidance Integrated" (sorting priority 13: its hook runs before PAG's)
    writes pagi_enabled; ticking both applies PAG twice — allowed, but never silently."""
    import logging

    params = pag()
    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=3)
    p.extra_generation_params.update({"pagi_enabled": True, "pagi_scale": 3.0})
    with caplog.at_level(logging.WARNING, logger="sd_webui_pag"):
        p, results = run(host, params, p=p)
    note = p.extra_generation_params["PAG note"]
    assert note.startswith("Forge's PerturbedAttentionGuidance Integrated is on too") and "applied twice" in note
    assert p.extra_generation_params["PAG scale"] == "3"  # PAG ran as asked
    assert "applied twice" in caplog.text
    check(host, params, results, 5.0, [3.0] * 3)
    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=3)
    p.extra_generation_params.update({"pagi_enabled": False})
    p, _ = run(host, params, p=p)
    assert "PAG note" not in p.extra_generation_params
