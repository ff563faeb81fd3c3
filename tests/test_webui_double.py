"""The A1111 1.10 sampling-path double (tests/webui/modules) behaves like the host, with real numbers.

Every CFG check compares ``CFGDenoiser.forward`` against the guidance formula evaluated on direct calls of
the real ldm UNet (one row at a time), so batching, chunking, padding and row layout are all exercised.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

_WEBUI = str(Path(__file__).resolve().parent / "webui")
if _WEBUI not in sys.path:
    sys.path.insert(0, _WEBUI)

from modules import errors, prompt_parser, script_callbacks, sd_models_double, sd_samplers, shared  # noqa: E402

import k_diffusion.external  # noqa: E402

from tests.exactness import assert_exact, assert_visible, rel_err, to_float64  # noqa: E402

# the host double's outputs vs direct UNet calls, in float64 (tests/exactness.py: error model and bound)
pytestmark = pytest.mark.usefixtures("float64")
CFG = 7.0
HW = 8


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    return to_float64(sd_models_double.make_sd15_model(0))


@pytest.fixture(scope="module")
def sd15_inpaint():
    return to_float64(sd_models_double.make_sd15_inpaint_model(1))


@pytest.fixture(autouse=True)
def clean_host(sd15):
    shared.opts.reset_to_defaults()
    script_callbacks.clear_callbacks()
    shared.state.begin("test")
    shared.sd_model = sd15
    yield
    script_callbacks.clear_callbacks()
    shared.opts.reset_to_defaults()
    shared.state.end()


def make_p(**kw):
    """A bare stand-in for StableDiffusionProcessing with the fields the sampler reads."""
    p = types.SimpleNamespace(steps=4, cfg_scale=CFG, extra_generation_params={}, scripts=None, eta=None,
                              s_min_uncond=0.0, sampler_noise_scheduler_override=None, is_hr_pass=False,
                              scheduler=None, denoising_strength=0.75, refiner_checkpoint_info=None,
                              refiner_switch_at=None)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def emb(seed, tokens, dim=32):
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))


def denoiser_for(sampler_name, model, p=None, total_steps=10, step=0):
    shared.sd_model = model
    sampler = sd_samplers.create_sampler(sampler_name, model)
    d = sampler.model_wrap_cfg
    d.p = p or make_p()
    d.total_steps = total_steps
    d.step = step
    sampler.sampler_extra_args = {}
    return sampler, d


def kd_sigma(model, t_index):
    """The k-diffusion sigma of timestep ``t_index`` (eps models): sqrt((1-ā)/ā)."""
    ac = model.alphas_cumprod[t_index]
    return float(((1 - ac) / ac).sqrt())


def direct_rows(model, sigma, rows, groups, space="x0"):
    """Expected UNet outputs, by calling the ldm UNet directly on hand-built rows.

    ``rows`` = ``[(x, context, image_cond or None), ...]`` in the host's row order; ``groups`` = the row
    counts of the UNet calls (the reference is computed in the same groups, though in float64 the batch a
    row is computed in changes it by rounding only). ``space="x0"``: k-diffusion scalings (c_in = 1/sqrt(σ²+1),
    x0 = x - σ·eps at t = sigma_to_t(σ)); ``space="eps"``: eps at timestep ``sigma``.
    """
    assert sum(groups) == len(rows), (groups, len(rows))
    unet = model.model.diffusion_model
    outs, i = [], 0
    for n in groups:
        chunk = rows[i:i + n]
        i += n
        x = torch.stack([r[0] for r in chunk])
        ctx = torch.stack([r[1] for r in chunk])
        s = torch.full((n,), sigma)
        if space == "x0":
            t = k_diffusion.external.CompVisDenoiser(model).sigma_to_t(s)
            inp = x * (1 / (s ** 2 + 1.0) ** 0.5)[:, None, None, None]
        else:
            t, inp = s, x
        if chunk[0][2] is not None:
            inp = torch.cat([inp, torch.stack([r[2] for r in chunk])], dim=1)
        eps = unet(inp, t, context=ctx)
        outs.extend(x + eps * (-s)[:, None, None, None] if space == "x0" else eps)
    return outs


def guided(uncond_out, cond_outs_weights, scale):
    """CFG on the direct rows; also checks that the CFG term is far above the exactness bound, so a missing
    term or a wrong row could not pass as rounding."""
    out = uncond_out.clone()
    for c, w in cond_outs_weights:
        out = out + (c - uncond_out) * (w * scale)
    assert_visible(rel_err(uncond_out, out), what="CFG term")
    return out


def same(got, want):
    """Equal to float64 rounding (``tests.exactness.assert_exact``)."""
    assert_exact(got, want)


class RowCounter:
    """Wraps the denoiser's inner model to record the row count of every UNet call."""

    def __init__(self, denoiser):
        self.calls = []
        inner = denoiser.inner_model
        original = inner.forward

        def counting(x, sigma, **kw):
            self.calls.append(x.shape[0])
            return original(x, sigma, **kw)

        inner.forward = counting


# ------------------------------------------------------------------------------------------------
# CFGDenoiser (k-diffusion) == uncond + cfg * (cond - uncond) on direct UNet calls
# ------------------------------------------------------------------------------------------------

def ic0(n):
    """The dummy image conditioning A1111 gives non-inpainting models (txt2img_image_conditioning)."""
    return torch.zeros(n, 5, 1, 1)


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_cfg_matches_direct_unet_batch2(sd15, batch_cond_uncond):
    shared.opts.batch_cond_uncond = batch_cond_uncond
    _, d = denoiser_for("Euler", sd15)
    counter = RowCounter(d)
    c = [emb(1, 4), emb(2, 4)]
    u = [emb(3, 4), emb(4, 4)]
    x = torch.randn(2, 4, HW, HW, generator=torch.Generator().manual_seed(5))
    sigma = kd_sigma(sd15, 400)
    out = d(x, torch.full((2,), sigma), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(c[0], 1.0)], [(c[1], 1.0)]]), cond_scale=CFG,
            s_min_uncond=0.0, image_cond=ic0(2))
    assert counter.calls == ([4] if batch_cond_uncond else [2, 2])
    c0, c1, u0, u1 = direct_rows(sd15, sigma, [(x[0], c[0], None), (x[1], c[1], None), (x[0], u[0], None), (x[1], u[1], None)], counter.calls)
    same(out[0], guided(u0, [(c0, 1.0)], CFG))
    same(out[1], guided(u1, [(c1, 1.0)], CFG))
    assert d.step == 1


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_cfg_unequal_token_lengths(sd15, batch_cond_uncond):
    """cond 2 chunks (8 tokens, "154") vs uncond 1 chunk (4 tokens, "77"), AND prompts (4 cond rows):
    cond rows in chunks of 2B (or B) rows, then the uncond rows in their own call."""
    shared.opts.batch_cond_uncond = batch_cond_uncond
    _, d = denoiser_for("Euler", sd15)
    counter = RowCounter(d)
    c = [emb(11 + j, 8) for j in range(4)]
    u = [emb(17, 4), emb(18, 4)]
    x = torch.randn(2, 4, HW, HW, generator=torch.Generator().manual_seed(6))
    sigma = kd_sigma(sd15, 600)
    out = d(x, torch.full((2,), sigma), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(c[0], 1.0), (c[1], 0.5)], [(c[2], 1.0), (c[3], 0.25)]]), cond_scale=CFG,
            s_min_uncond=0.0, image_cond=ic0(2))
    assert counter.calls == ([4, 2] if batch_cond_uncond else [2, 2, 2])
    cond_groups = counter.calls[:-1]
    rc = direct_rows(sd15, sigma, [(x[j // 2], c[j], None) for j in range(4)], cond_groups)
    ru = direct_rows(sd15, sigma, [(x[0], u[0], None), (x[1], u[1], None)], [2])
    same(out[0], guided(ru[0], [(rc[0], 1.0), (rc[1], 0.5)], CFG))
    same(out[1], guided(ru[1], [(rc[2], 1.0), (rc[3], 0.25)], CFG))
    assert d.padded_cond_uncond is False


@pytest.mark.parametrize("setting", ["pad_cond_uncond", "pad_cond_uncond_v0"])
def test_padding_settings(sd15, setting):
    setattr(shared.opts, setting, True)
    _, d = denoiser_for("Euler", sd15)
    counter = RowCounter(d)
    c, u = emb(21, 8), emb(22, 4)
    x = torch.randn(1, 4, HW, HW, generator=torch.Generator().manual_seed(7))
    sigma = kd_sigma(sd15, 300)
    out = d(x, torch.full((1,), sigma), uncond=prompt_parser.make_uncond([u]),
            cond=prompt_parser.make_multicond([[(c, 1.0)]]), cond_scale=CFG, s_min_uncond=0.0, image_cond=ic0(1))
    if setting == "pad_cond_uncond":
        u_padded = torch.cat([u, sd15.cond_stage_model_empty_prompt[0]])
        assert d.padded_cond_uncond
    else:
        u_padded = torch.cat([u, u[-1:].repeat(4, 1)])
        assert d.padded_cond_uncond_v0
    assert counter.calls == [2]  # padded -> one batched call
    rc, ru = direct_rows(sd15, sigma, [(x[0], c, None), (x[0], u_padded, None)], [2])
    same(out[0], guided(ru, [(rc, 1.0)], CFG))


def test_and_prompts_with_weights_and_stack_conds_padding(sd15):
    """Image 0: "a AND b:0.5" (b is twice as long -> a padded by repeating its last token); image 1: "c:0.8"."""
    _, d = denoiser_for("Euler", sd15)
    counter = RowCounter(d)
    a, b, c = emb(31, 4), emb(32, 8), emb(33, 8)
    u = [emb(34, 8), emb(35, 8)]
    x = torch.randn(2, 4, HW, HW, generator=torch.Generator().manual_seed(8))
    sigma = kd_sigma(sd15, 500)
    seen = {}
    script_callbacks.on_cfg_denoiser(lambda prm: seen.update(x=prm.x.shape[0], tc=prm.text_cond.shape))
    out = d(x, torch.full((2,), sigma), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(a, 1.0), (b, 0.5)], [(c, 0.8)]]), cond_scale=CFG,
            s_min_uncond=0.0, image_cond=ic0(2))
    assert seen == {"x": 5, "tc": torch.Size([3, 8, 32])}  # 3 cond rows + 2 uncond rows
    assert counter.calls == [5]
    a_padded = torch.cat([a, a[-1:].repeat(4, 1)])
    ra, rb, rc, ru0, ru1 = direct_rows(sd15, sigma, [(x[0], a_padded, None), (x[0], b, None), (x[1], c, None),
                                                     (x[0], u[0], None), (x[1], u[1], None)], [5])
    same(out[0], guided(ru0, [(ra, 1.0), (rb, 0.5)], CFG))
    same(out[1], guided(ru1, [(rc, 0.8)], CFG))


def test_prompt_schedules_follow_the_step():
    early, late = emb(41, 4), emb(42, 4)
    cond = prompt_parser.make_multicond([[([(2, early), (10, late)], 1.0)]])
    for step, want in ((0, early), (2, early), (3, late), (10, late), (11, early)):
        _, tensor = prompt_parser.reconstruct_multicond_batch(cond, step)
        assert torch.equal(tensor[0], want)
    uncond = prompt_parser.make_uncond([[(1, early), (10, late)]])
    assert torch.equal(prompt_parser.reconstruct_cond_batch(uncond, 5)[0], late)
    indexes, flat, _ = prompt_parser.get_multicond_prompt_list(["cat AND dog:0.5", "dog"])
    # like the host: the text before ":w" keeps its leading space, so " dog" and "dog" are two sub-prompts
    assert indexes == [[(0, 1.0), (1, 0.5)], [(2, 1.0)]] and list(flat) == ["cat", " dog", "dog"]


def test_ngms_skip_uncond_on_odd_step(sd15):
    _, d = denoiser_for("Euler", sd15, step=1)
    counter = RowCounter(d)
    c, u = emb(51, 4), emb(52, 4)
    x = torch.randn(1, 4, HW, HW, generator=torch.Generator().manual_seed(9))
    sigma = kd_sigma(sd15, 200)
    seen = {}
    script_callbacks.on_cfg_denoised(lambda prm: seen.update(rows=prm.x.shape[0], x=prm.x.clone()))
    args = dict(uncond=prompt_parser.make_uncond([u]), cond=prompt_parser.make_multicond([[(c, 1.0)]]), cond_scale=CFG,
                s_min_uncond=sigma + 1.0, image_cond=ic0(1))
    out = d(x, torch.full((1,), sigma), **args)
    assert counter.calls == [1]
    (cond_x0,) = direct_rows(sd15, sigma, [(x[0], c, None)], [1])
    same(out[0], cond_x0)  # scale 1 against a fake uncond
    assert seen["rows"] == 2  # fake uncond appended: the cond row again
    assert torch.equal(seen["x"][1], seen["x"][0])
    assert d.p.extra_generation_params["NGMS"] == sigma + 1.0
    d(x, torch.full((1,), sigma), **args)  # even step: full CFG
    assert counter.calls == [1, 2]
    shared.opts.s_min_uncond_all = True
    d(x, torch.full((1,), sigma), **args)  # "all steps": skipped on the odd step ...
    d(x, torch.full((1,), sigma), **args)  # ... and on the even one
    assert counter.calls == [1, 2, 1, 1]
    assert d.p.extra_generation_params["NGMS all steps"] is True


def test_skip_early_cond(sd15):
    shared.opts.skip_early_cond = 0.25
    _, d = denoiser_for("Euler", sd15, total_steps=8, step=2)
    counter = RowCounter(d)
    c, u = emb(53, 4), emb(54, 4)
    x = torch.randn(1, 4, HW, HW, generator=torch.Generator().manual_seed(10))
    args = dict(uncond=prompt_parser.make_uncond([u]), cond=prompt_parser.make_multicond([[(c, 1.0)]]), cond_scale=CFG,
                s_min_uncond=0.0, image_cond=ic0(1))
    d(x, torch.full((1,), 3.0), **args)  # 2/8 <= 0.25: skipped
    d(x, torch.full((1,), 3.0), **args)  # 3/8 > 0.25: full CFG
    assert counter.calls == [1, 2]
    assert d.p.extra_generation_params["Skip Early CFG"] == 0.25


def test_inpaint_model_with_mask_blends_after(sd15_inpaint):
    _, d = denoiser_for("Euler", sd15_inpaint)
    counter = RowCounter(d)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, HW, HW, generator=g)
    image_cond = torch.randn(2, 5, HW, HW, generator=g)
    init_latent = torch.randn(2, 4, HW, HW, generator=g)
    mask = (torch.rand(1, HW, HW, generator=g) > 0.5).float()
    d.mask, d.nmask, d.init_latent = mask, 1 - mask, init_latent
    c = [emb(61, 4), emb(62, 4)]
    u = [emb(63, 4), emb(64, 4)]
    sigma = kd_sigma(sd15_inpaint, 450)
    seen = {}
    script_callbacks.on_cfg_after_cfg(lambda prm: seen.update(x=prm.x.clone()))
    out = d(x, torch.full((2,), sigma), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(c[0], 1.0)], [(c[1], 1.0)]]), cond_scale=CFG,
            s_min_uncond=0.0, image_cond=image_cond)
    assert counter.calls == [4]
    rc0, rc1, ru0, ru1 = direct_rows(sd15_inpaint, sigma, [(x[0], c[0], image_cond[0]), (x[1], c[1], image_cond[1]),
                                                           (x[0], u[0], image_cond[0]), (x[1], u[1], image_cond[1])], [4])
    for i, (rc, ru) in enumerate(((rc0, ru0), (rc1, ru1))):
        expected = guided(ru, [(rc, 1.0)], CFG) * (1 - mask) + init_latent[i] * mask
        same(out[i], expected)
    assert torch.equal(seen["x"], out)  # cfg_after_cfg sees the blended result


def test_edit_model_three_blocks(sd15):
    """InstructPix2Pix (cond_stage_key "edit", image CFG != 1): rows cond, uncond (image cond), uncond (zero image cond)."""
    unet = sd_models_double.make_sd15_unet(4, in_channels=8)
    model = to_float64(sd_models_double.TinyLatentDiffusion(unet, conditioning_key="hybrid", cond_stage_key="edit", context_dim=32).eval())
    _, d = denoiser_for("Euler", model)
    d.image_cfg_scale = 1.5
    counter = RowCounter(d)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(1, 4, HW, HW, generator=g)
    image_cond = torch.randn(1, 4, HW, HW, generator=g)
    d.init_latent = image_cond
    c, u = emb(65, 4), emb(66, 4)
    sigma = kd_sigma(model, 420)
    out = d(x, torch.full((1,), sigma), uncond=prompt_parser.make_uncond([u]), cond=prompt_parser.make_multicond([[(c, 1.0)]]),
            cond_scale=CFG, s_min_uncond=0.0, image_cond=image_cond)
    assert counter.calls == [3]
    rc, ri, ru = direct_rows(model, sigma, [(x[0], c, image_cond[0]), (x[0], u, image_cond[0]), (x[0], u, torch.zeros_like(image_cond[0]))], [3])
    same(out[0], ru + CFG * (rc - ri) + 1.5 * (ri - ru))


def test_ddim_denoiser_is_eps_space_and_blends_before(sd15):
    _, d = denoiser_for("DDIM", sd15)
    assert d.mask_before_denoising
    counter = RowCounter(d)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, HW, HW, generator=g)
    init_latent = torch.randn(2, 4, HW, HW, generator=g)
    mask = (torch.rand(1, HW, HW, generator=g) > 0.5).float()
    d.mask, d.nmask, d.init_latent = mask, 1 - mask, init_latent
    c = [emb(71, 4), emb(72, 4)]
    u = [emb(73, 4), emb(74, 4)]
    out = d(x, torch.full((2,), 501.0), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(c[0], 1.0)], [(c[1], 1.0)]]), cond_scale=CFG,
            s_min_uncond=0.0, image_cond=ic0(2))
    assert counter.calls == [4]
    xb = x * (1 - mask) + init_latent * mask
    rc0, rc1, ru0, ru1 = direct_rows(sd15, 501.0, [(xb[0], c[0], None), (xb[1], c[1], None), (xb[0], u[0], None), (xb[1], u[1], None)], [4], space="eps")
    same(out[0], guided(ru0, [(rc0, 1.0)], CFG))
    same(out[1], guided(ru1, [(rc1, 1.0)], CFG))


def test_sdxl_dict_conds_reach_context_and_y():
    try:
        from tests.doubles.sgm_unet import make_sdxl_base
    except ImportError:  # tests/ itself on sys.path
        from doubles.sgm_unet import make_sdxl_base

    unet = make_sdxl_base(tiny=True, seed=3)
    model = to_float64(sd_models_double.make_sdxl_model(unet, context_dim=32, adm_in_channels=24))
    _, d = denoiser_for("Euler", model)
    g = torch.Generator().manual_seed(13)
    c = {"crossattn": torch.randn(4, 32, generator=g), "vector": torch.randn(24, generator=g)}
    u = {"crossattn": torch.randn(4, 32, generator=g), "vector": torch.randn(24, generator=g)}
    x = torch.randn(1, 4, HW, HW, generator=g)
    sigma = kd_sigma(model, 350)
    seen = {}
    script_callbacks.on_cfg_denoiser(lambda prm: seen.update(tc=type(prm.text_cond).__name__, keys=sorted(prm.text_cond)))
    out = d(x, torch.full((1,), sigma), uncond=prompt_parser.make_uncond([u]), cond=prompt_parser.make_multicond([[(c, 1.0)]]),
            cond_scale=CFG, s_min_uncond=0.0, image_cond=ic0(1))
    assert seen == {"tc": "DictWithShape", "keys": ["crossattn", "vector"]}

    s = torch.full((2,), sigma)
    t = k_diffusion.external.CompVisDenoiser(model).sigma_to_t(s)
    xx = torch.cat([x, x])
    eps = unet(xx * (1 / (s ** 2 + 1.0) ** 0.5)[:, None, None, None], timesteps=t,
               context=torch.stack([c["crossattn"], u["crossattn"]]), y=torch.stack([c["vector"], u["vector"]]))
    rc, ru = xx + eps * (-s)[:, None, None, None]
    same(out[0], guided(ru, [(rc, 1.0)], CFG))


def test_v_model_uses_compvis_v_denoiser():
    model = sd_models_double.make_sd15_model(2, parameterization="v")
    _, d = denoiser_for("Euler", model)
    assert isinstance(d.inner_model, k_diffusion.external.CompVisVDenoiser)
    d.model_wrap = None  # what update_inner_model does (it also refreshes conds from p.get_conds)
    shared.sd_model = sd_models_double.make_sd15_model(2)
    assert type(d.inner_model) is k_diffusion.external.CompVisDenoiser  # rebuilt lazily for the new model


# ------------------------------------------------------------------------------------------------
# the row-insertion contract the extension relies on
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["batched", "chunked", "unequal_tokens", "ngms_skip"])
def test_rows_inserted_between_cond_and_uncond_come_back(sd15, layout):
    """A cfg_denoiser callback appends k rows after the cond rows (x, sigma, image_cond, text_cond; the
    uncond block untouched): they come back at x_out[n_cond:n_cond+k] in cfg_denoised and the guided
    result is still uncond + cfg * (cond - uncond)."""
    shared.opts.batch_cond_uncond = layout != "chunked"
    cond_tokens = 8 if layout == "unequal_tokens" else 4
    step = 1 if layout == "ngms_skip" else 0
    _, d = denoiser_for("Euler", sd15, step=step)
    counter = RowCounter(d)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, HW, HW, generator=g)
    c = [emb(81, cond_tokens), emb(82, cond_tokens)]
    u = [emb(83, 4), emb(84, 4)]
    sigma = kd_sigma(sd15, 550)
    k = 3
    extra_ctx = torch.randn(k, cond_tokens, 32, generator=g)
    extra_x = torch.randn(k, 4, HW, HW, generator=g)
    state = {}

    def insert(params):
        n_cond = params.text_cond.shape[0]
        state["n_cond"] = n_cond
        params.x = torch.cat([params.x[:n_cond], extra_x, params.x[n_cond:]])
        params.sigma = torch.cat([params.sigma[:n_cond], params.sigma[:1].repeat(k), params.sigma[n_cond:]])
        params.image_cond = torch.cat([params.image_cond[:n_cond], params.image_cond[:1].repeat(k, 1, 1, 1), params.image_cond[n_cond:]])
        params.text_cond = torch.cat([params.text_cond, extra_ctx])

    def grab(params):
        n = state["n_cond"]
        state["extra_out"] = params.x[n:n + k].clone()
        state["rows"] = params.x.shape[0]

    script_callbacks.on_cfg_denoiser(insert, name="insert")
    script_callbacks.on_cfg_denoised(grab, name="grab")
    out = d(x, torch.full((2,), sigma), uncond=prompt_parser.make_uncond(u),
            cond=prompt_parser.make_multicond([[(c[0], 1.0)], [(c[1], 1.0)]]), cond_scale=CFG,
            s_min_uncond=sigma + 1.0 if layout == "ngms_skip" else 0.0, image_cond=ic0(2))

    assert state["n_cond"] == 2
    assert state["rows"] == 2 + k + 2  # cond, inserted, (fake) uncond
    cond_rows = [(x[0], c[0], None), (x[1], c[1], None)] + [(extra_x[j], extra_ctx[j], None) for j in range(k)]
    uncond_rows = [(x[0], u[0], None), (x[1], u[1], None)]
    expected_calls = {"batched": [7], "chunked": [2, 2, 2, 1], "unequal_tokens": [4, 1, 2], "ngms_skip": [5]}[layout]
    assert counter.calls == expected_calls
    if layout == "unequal_tokens":
        outs = direct_rows(sd15, sigma, cond_rows, [4, 1]) + direct_rows(sd15, sigma, uncond_rows, [2])
    elif layout == "ngms_skip":
        outs = direct_rows(sd15, sigma, cond_rows, [5])
    else:
        outs = direct_rows(sd15, sigma, cond_rows + uncond_rows, expected_calls)
    for j in range(k):
        same(state["extra_out"][j], outs[2 + j])
    for i in range(2):
        expected = outs[i] if layout == "ngms_skip" else guided(outs[2 + k + i], [(outs[i], 1.0)], CFG)
        same(out[i], expected)


# ------------------------------------------------------------------------------------------------
# callbacks: errors are swallowed and reported; registration bookkeeping
# ------------------------------------------------------------------------------------------------

def test_callback_exceptions_are_reported_and_swallowed(sd15, capsys):
    _, d = denoiser_for("Euler", sd15)
    c, u = emb(91, 4), emb(92, 4)
    x = torch.randn(1, 4, HW, HW, generator=torch.Generator().manual_seed(15))
    args = dict(uncond=prompt_parser.make_uncond([u]), cond=prompt_parser.make_multicond([[(c, 1.0)]]), cond_scale=CFG,
                s_min_uncond=0.0, image_cond=torch.zeros(1, 5, 1, 1))
    reference = d(x, torch.full((1,), 2.0), **args)

    def boom(params):
        raise RuntimeError("boom in callback")

    script_callbacks.on_cfg_denoiser(boom)
    script_callbacks.on_cfg_after_cfg(boom)
    before = len(errors.exception_records)
    out = d(x, torch.full((1,), 2.0), **args)
    assert torch.equal(out, reference)
    err = capsys.readouterr().err
    assert "*** Error executing callback cfg_denoiser_callback for" in err
    assert "*** Error executing callback cfg_after_cfg_callback for" in err
    assert "RuntimeError: boom in callback" in err
    assert len(errors.exception_records) >= min(before + 1, 5)


def test_registration_names_and_removal():
    def f(params):
        pass

    def g(params):
        pass

    script_callbacks.on_cfg_denoiser(f, name="pag")
    script_callbacks.on_cfg_denoiser(f, name="pag")  # no de-duplication: runs twice
    script_callbacks.on_cfg_after_cfg(g)
    names = [cb.name for cb in script_callbacks.callback_map["callbacks_cfg_denoiser"]]
    assert names == ["base/test_webui_double.py/cfg_denoiser/pag", "base/test_webui_double.py/cfg_denoiser/pag-1"]
    assert script_callbacks.callback_map["callbacks_cfg_denoiser"][0].script == __file__
    assert len(script_callbacks.ordered_callbacks("cfg_denoiser")) == 2
    script_callbacks.remove_callbacks_for_function(f)
    assert script_callbacks.ordered_callbacks("cfg_denoiser") == []
    script_callbacks.on_infotext_pasted(lambda text, params: params.update(seen=text))
    params = {}
    script_callbacks.infotext_pasted_callback("hello", params)
    assert params == {"seen": "hello"}
    script_callbacks.remove_current_script_callbacks()
    assert all(not v for v in script_callbacks.callback_map.values())


# ------------------------------------------------------------------------------------------------
# full sampler runs
# ------------------------------------------------------------------------------------------------

def _run_sampler(name, model, steps=3, seed=123, p=None):
    shared.sd_model = model
    p = p or make_p(steps=steps)
    sampler = sd_samplers.create_sampler(name, model)
    p.sampler = sampler
    cond = prompt_parser.get_multicond_learned_conditioning(model, ["a red cat", "a dog AND a hat:0.7"], steps)
    uncond = prompt_parser.get_learned_conditioning(model, ["", "blurry"], steps)
    torch.manual_seed(seed)
    noise = torch.randn(2, 4, HW, HW)
    steps_seen = []
    script_callbacks.on_cfg_denoiser(lambda prm: steps_seen.append((prm.sampling_step, prm.total_sampling_steps, prm.denoiser.step)))
    samples = sampler.sample(p, noise, cond, uncond, image_conditioning=torch.zeros(2, 5, 1, 1))
    script_callbacks.clear_callbacks()
    return samples, sampler, steps_seen


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "DDIM"])
def test_full_sampling_run_is_finite_and_deterministic(sd15, name):
    a, sampler, steps_seen = _run_sampler(name, sd15)
    b, _, _ = _run_sampler(name, sd15)
    assert a.shape == (2, 4, HW, HW)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert sampler.model_wrap_cfg.step == 3 == sampler.model_wrap_cfg.total_steps
    assert [s[2] for s in steps_seen] == [0, 1, 2]
    assert all(s[1] == 3 for s in steps_seen)
    assert steps_seen[-1][0] == 1  # state.sampling_step set by the step callback (before the last call)


def test_img2img_inpaint_run_keeps_unmasked_area(sd15):
    p = make_p(steps=4, denoising_strength=0.5)
    g = torch.Generator().manual_seed(16)
    init_latent = torch.randn(1, 4, HW, HW, generator=g)
    mask = torch.zeros(1, HW, HW)
    mask[:, :, : HW // 2] = 1.0  # 1 = keep init_latent
    p.mask, p.nmask = mask, 1 - mask
    sampler = sd_samplers.create_sampler("Euler", sd15)
    p.sampler = sampler
    cond = prompt_parser.get_multicond_learned_conditioning(sd15, ["a house"], 4)
    uncond = prompt_parser.get_learned_conditioning(sd15, [""], 4)
    noise = torch.randn(1, 4, HW, HW, generator=g)
    samples = sampler.sample_img2img(p, init_latent, noise, cond, uncond, image_conditioning=torch.zeros(1, 5, 1, 1))
    assert shared.state.sampling_steps == 3  # t_enc + 1 with t_enc = int(0.5 * 4)
    assert sampler.model_wrap_cfg.step == 3
    same(samples[..., : HW // 2], init_latent[..., : HW // 2])


def test_interrupt_returns_last_latent(sd15):
    calls = []

    def interrupt_after_first(params):
        calls.append(1)
        shared.state.interrupt()

    script_callbacks.on_cfg_after_cfg(interrupt_after_first)
    shared.sd_model = sd15
    p = make_p(steps=4)
    sampler = sd_samplers.create_sampler("Euler", sd15)
    cond = prompt_parser.get_multicond_learned_conditioning(sd15, ["x"], 4)
    uncond = prompt_parser.get_learned_conditioning(sd15, [""], 4)
    out = sampler.sample(p, torch.randn(1, 4, HW, HW), cond, uncond, image_conditioning=torch.zeros(1, 5, 1, 1))
    assert calls == [1] and out is sampler.last_latent


def test_refiner_switch_swaps_shared_model(sd15):
    refiner = to_float64(sd_models_double.make_sd15_model(5, title="tiny-refiner"))
    info = sd_models_double.CheckpointInfo("tiny-refiner", refiner)
    p = make_p(steps=4, refiner_checkpoint_info=info, refiner_switch_at=0.5)
    conds = {}

    def setup_conds():
        conds["c"] = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, ["x"], 4)
        conds["uc"] = prompt_parser.get_learned_conditioning(shared.sd_model, [""], 4)

    p.setup_conds = setup_conds
    p.get_conds = lambda: (conds["c"], conds["uc"])
    loaded = []
    script_callbacks.on_model_loaded(loaded.append)
    setup_conds()
    sampler = sd_samplers.create_sampler("Euler", sd15)
    out = sampler.sample(p, torch.randn(1, 4, HW, HW), conds["c"], conds["uc"], image_conditioning=torch.zeros(1, 5, 1, 1))
    assert shared.sd_model is refiner and loaded == [refiner]
    assert sampler.model_wrap_cfg.inner_model.inner_model is refiner
    assert p.extra_generation_params["Refiner"] == "tiny-refiner"
    assert torch.isfinite(out).all()
