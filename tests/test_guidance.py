"""Guidance math and the scale schedule, against the formulas written out by hand."""

import math

import pytest
import torch

from lib_pag import (
    PagParams, cfg_pag, multicond_pag_delta, multicond_reference, pag_delta, pag_only, rescale_guided,
    scale_for_step, scheduled_scale,
)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_cfg_pag_and_pag_only_formulas():
    u, c, p = rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2), rand(2, 4, 8, 8, seed=3)
    w, s = 7.0, 3.0
    expected = u + w * (c - u) + s * (c - p)
    torch.testing.assert_close(cfg_pag(u, c, p, w, s), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pag_only(c, p, s), c + s * (c - p), rtol=0, atol=1e-6)
    torch.testing.assert_close(pag_delta(c, p, s), s * (c - p), rtol=0, atol=1e-6)
    # CFG scale 1 with PAG is the paper's no-CFG formula
    torch.testing.assert_close(cfg_pag(u, c, p, 1.0, s), pag_only(c, p, s), rtol=0, atol=1e-5)


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
    torch.testing.assert_close(out[0], 2.0 * (1.0 * (cond[0] - pert[0]) + 0.5 * (cond[1] - pert[1])), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], 2.0 * 0.8 * (cond[2] - pert[2]), rtol=0, atol=1e-6)
    ref = multicond_reference(cond, conds_list)
    torch.testing.assert_close(ref[0], (cond[0] + 0.5 * cond[1]) / 1.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref[1], cond[2])


def test_rescale_matches_std_ratio_with_cond_reference():
    guided, cond = rand(2, 4, 8, 8, seed=6) * 3, rand(2, 4, 8, 8, seed=7)
    phi = 0.7
    out = rescale_guided(guided, cond, phi)
    for i in range(2):
        ratio = cond[i].std() / guided[i].std()
        torch.testing.assert_close(out[i], phi * guided[i] * ratio + (1 - phi) * guided[i], rtol=0, atol=1e-5)
    assert rescale_guided(guided, cond, 0.0) is guided
    torch.testing.assert_close(rescale_guided(guided, cond, 1.0)[0].std(), cond[0].std(), rtol=1e-5, atol=0)


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
    weight = torch.zeros(1, 4, 8, 8)
    weight[..., :4] = 1.0
    a = rescale_guided(guided, cond, 0.5, weight)
    changed = guided.clone()
    changed[..., 4:] += 100.0  # outside the weight
    b = rescale_guided(changed, cond, 0.5, weight)
    torch.testing.assert_close(a[..., :4], b[..., :4], rtol=0, atol=1e-5)
    inside = guided[..., :4]
    ratio = cond[..., :4].std(unbiased=False) / inside.std(unbiased=False)
    torch.testing.assert_close(a[..., :4], 0.5 * inside * ratio + 0.5 * inside, rtol=0, atol=1e-5)
