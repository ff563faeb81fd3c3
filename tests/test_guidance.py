"""Guidance math and the scale schedule, against the formulas written out by hand."""

import math

import pytest
import torch

from lib_pag import (
    PagParams, cfg_pag, multicond_pag_delta, multicond_reference, pag_delta, pag_only, rescale_guided,
    scale_for_step, scheduled_scale,
)
from tests.exactness import assert_exact, assert_visible, rel_err


def rand(*shape, seed=0, dtype=torch.float64):
    """Inputs in float64 by default: the functions against the formulas to float64 rounding (tests/exactness.py)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


def test_cfg_pag_and_pag_only_formulas():
    u, c, p = rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2), rand(2, 4, 8, 8, seed=3)
    w, s = 7.0, 3.0
    expected = u + w * (c - u) + s * (c - p)
    assert_exact(cfg_pag(u, c, p, w, s), expected)
    assert_visible(rel_err(u + w * (c - u), expected), what="PAG term")
    assert_exact(pag_only(c, p, s), c + s * (c - p))
    assert_exact(pag_delta(c, p, s), s * (c - p))
    # CFG scale 1 with PAG is the paper's no-CFG formula
    assert_exact(cfg_pag(u, c, p, 1.0, s), pag_only(c, p, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_and_fp64_inputs_keep_their_dtype(dtype):
    """At least fp32 inside: fp32 stays fp32 and float64 stays float64 (the tests compare paths in float64)."""
    u, c, p = rand(2, 4, 8, 8, seed=1, dtype=dtype), rand(2, 4, 8, 8, seed=2, dtype=dtype), rand(2, 4, 8, 8, seed=3, dtype=dtype)
    conds_list = [[(0, 1.0)], [(1, 0.5)]]
    outs = [cfg_pag(u, c, p, 5.0, 3.0), pag_only(c, p, 3.0), pag_delta(c, p, 3.0),
            multicond_pag_delta(c, p, conds_list, 3.0), multicond_reference(c, conds_list),
            rescale_guided(u, c, 0.7), rescale_guided(u, c, 0.7, torch.ones(2, 4, 8, 8))]
    assert all(o.dtype == dtype for o in outs)
    if dtype == torch.float64:  # computed in float64 too, not rounded to fp32 on the way
        assert_exact(multicond_pag_delta(c, p, conds_list, 3.0)[1], 3.0 * 0.5 * (c[1] - p[1]))


def test_half_precision_inputs_are_computed_in_fp32_and_cast_back():
    c, p = rand(1, 4, 8, 8, seed=2, dtype=torch.float16), rand(1, 4, 8, 8, seed=3, dtype=torch.float16)
    out = pag_only(c, p, 3.0)
    assert out.dtype == torch.float16
    ref = (c.double() + 3.0 * (c.double() - p.double())).half()
    assert torch.equal(out, ref) or (out.float() - ref.float()).abs().max() <= 2e-3


def test_multicond_delta_uses_and_weights_per_image():
    cond, pert = rand(3, 4, 8, 8, seed=4), rand(3, 4, 8, 8, seed=5)
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 0.8)]]
    out = multicond_pag_delta(cond, pert, conds_list, 2.0)
    assert out.shape == (2, 4, 8, 8)
    assert_exact(out[0], 2.0 * (1.0 * (cond[0] - pert[0]) + 0.5 * (cond[1] - pert[1])))
    assert_exact(out[1], 2.0 * 0.8 * (cond[2] - pert[2]))
    ref = multicond_reference(cond, conds_list)
    assert_exact(ref[0], (cond[0] + 0.5 * cond[1]) / 1.5)
    assert torch.equal(ref[1], cond[2])  # a single sub-prompt is its cond row as it is


def test_rescale_matches_std_ratio_with_cond_reference():
    guided, cond = rand(2, 4, 8, 8, seed=6) * 3, rand(2, 4, 8, 8, seed=7)
    phi = 0.7
    out = rescale_guided(guided, cond, phi)
    for i in range(2):
        ratio = cond[i].std() / guided[i].std()
        assert_exact(out[i], phi * guided[i] * ratio + (1 - phi) * guided[i])
    assert rescale_guided(guided, cond, 0.0) is guided
    assert_exact(rescale_guided(guided, cond, 1.0)[0].std(), cond[0].std())


def test_step_window_is_exactly_zero_outside():
    scales = [scheduled_scale(3.0, step=i, total_steps=10, start=0.2, end=0.6) for i in range(10)]
    assert scales == [0.0, 0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert all(type(s) is float for s in scales)


def test_full_window_covers_every_step_and_one_step_runs_do_not_divide_by_zero():
    assert [scheduled_scale(2.0, step=i, total_steps=4) for i in range(4)] == [2.0] * 4
    assert scheduled_scale(2.0, step=0, total_steps=1) == 2.0
    assert scheduled_scale(2.0, step=0, total_steps=0) == 2.0


def test_decay_shapes():
    lin = [scheduled_scale(4.0, step=i, total_steps=4, shape="linear") for i in range(4)]
    assert lin == pytest.approx([4.0, 3.0, 2.0, 1.0])
    cos = [scheduled_scale(4.0, step=i, total_steps=4, shape="cosine") for i in range(4)]
    assert cos == pytest.approx([4.0 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    # decay runs over the window, not the whole run
    win = [scheduled_scale(4.0, step=i, total_steps=10, start=0.5, end=1.0, shape="linear") for i in range(10)]
    assert win[:5] == [0.0] * 5 and win[5] == pytest.approx(4.0) and win[9] == pytest.approx(0.8)


def test_sigma_window_uses_the_real_sigma():
    kw = dict(step=0, total_steps=10, sigma_start=10.0, sigma_end=1.0)
    assert scheduled_scale(3.0, sigma=14.6, **kw) == 0.0
    assert scheduled_scale(3.0, sigma=10.0, **kw) == 3.0
    assert scheduled_scale(3.0, sigma=1.0, **kw) == 3.0
    assert scheduled_scale(3.0, sigma=0.5, **kw) == 0.0
    assert scheduled_scale(3.0, sigma=0.5, step=0, total_steps=10, sigma_start=10.0) == 3.0  # no lower bound


def test_scale_for_step_follows_params_and_hires_setting():
    p = PagParams(enabled=True, scale=3.0, hires="own", hires_scale=1.5)
    assert scale_for_step(p, step=0, total_steps=10) == 3.0
    assert scale_for_step(p, step=0, total_steps=10, hires=True) == 1.5
    assert scale_for_step(PagParams(enabled=True, hires="off"), step=0, total_steps=10, hires=True) == 0.0
    assert scale_for_step(PagParams(enabled=True, hires="same"), step=0, total_steps=10, hires=True) == 3.0
    assert scale_for_step(PagParams(enabled=False), step=0, total_steps=10) == 0.0
    assert scale_for_step(PagParams(enabled=True, scale=0.0), step=0, total_steps=10) == 0.0


def test_weighted_rescale_ignores_what_the_weight_excludes():
    guided, cond = rand(1, 4, 8, 8, seed=8) * 3, rand(1, 4, 8, 8, seed=9)
    weight = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    weight[..., :4] = 1.0
    a = rescale_guided(guided, cond, 0.5, weight)
    changed = guided.clone()
    changed[..., 4:] += 100.0  # outside the weight
    b = rescale_guided(changed, cond, 0.5, weight)
    assert_exact(b[..., :4], a[..., :4])
    inside = guided[..., :4]
    ratio = cond[..., :4].std(unbiased=False) / inside.std(unbiased=False)
    assert_exact(a[..., :4], 0.5 * inside * ratio + 0.5 * inside)
    # unweighted, the change outside would move the inside far beyond the bound
    assert_visible(rel_err(rescale_guided(changed, cond, 0.5)[..., :4], a[..., :4]), what="the outside's influence")
