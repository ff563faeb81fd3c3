"""Blur and noise perturbations, checked against attention written out by hand."""

import math

import pytest
import torch

from lib_pag import AttentionPatch, Perturbation, RowMarks, blur_tokens, build_catalog, resolve_layers
from lib_pag.perturbations import gaussian_blur_matrix
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from unets import sd15_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("float64")  # lib_pag's attention vs attention by hand in float64 (tests/exactness.py)


def attention(attn, q_in, kv_in, noise=None):
    h = attn.heads
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    if noise is not None:
        logits = logits + noise
    out = logits.softmax(-1) @ v
    return attn.to_out(out.transpose(1, 2).reshape(b, n, c))


@pytest.fixture(scope="module")
def attn():
    unet = to_float64(sd15_unet(seed=4))
    return unet.get_submodule("middle_block.1.transformer_blocks.0.attn1")


def tokens(attn, n=16, seed=0):
    return torch.randn(2, n, attn.to_q.in_features, generator=torch.Generator().manual_seed(seed))


def test_infinite_blur_equals_mean_query_attention(attn):
    x = tokens(attn)
    with torch.no_grad():
        out = Perturbation("blur", blur_sigma=math.inf)(attn, x, grid=(4, 4))
        # mean query: every token asks with the average query; linear to_q commutes with the mean
        q_mean = attn.to_q(x).mean(dim=1, keepdim=True).expand(-1, x.shape[1], -1)
        h = attn.heads
        b, n, c = q_mean.shape
        q = q_mean.reshape(b, n, h, c // h).transpose(1, 2)
        k = attn.to_k(x).reshape(b, n, h, c // h).transpose(1, 2)
        v = attn.to_v(x).reshape(b, n, h, c // h).transpose(1, 2)
        ref = attn.to_out(((q @ k.transpose(-1, -2) / math.sqrt(c // h)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
    assert_exact(out, ref)
    assert_visible(rel_err(attention(attn, x, x), ref), what="the blur's effect")


def test_tiny_blur_is_plain_attention_and_blur_smooths(attn):
    x = tokens(attn)
    with torch.no_grad():
        sharp = Perturbation("blur", blur_sigma=1e-3)(attn, x, grid=(4, 4))
        assert_exact(sharp, attention(attn, x, x))
    t = torch.randn(1, 16, 3)
    blurred = blur_tokens(t, 1.0, (4, 4))
    assert blurred.var(dim=1).mean() < t.var(dim=1).mean()
    # not a path comparison: without padding the blur keeps the mean only roughly (edge rows weigh less)
    torch.testing.assert_close(blurred.mean(dim=1), t.mean(dim=1), rtol=0, atol=0.2)
    g = gaussian_blur_matrix(5, 1.0, dtype=torch.float64)
    assert_exact(g.sum(1), torch.ones(5))
    assert_exact(g, g.flip(0).flip(1))


def test_blur_respects_non_square_grids(attn):
    t = torch.arange(2 * 3, dtype=torch.float64).reshape(1, 6, 1)
    out = blur_tokens(t, math.inf, (2, 3))
    assert_exact(out, torch.full_like(t, t.mean().item()))
    with pytest.raises(ValueError, match="grid"):
        blur_tokens(t, 1.0, (4, 4))


def test_noise_is_reproducible_by_seed_and_zero_noise_is_plain_attention(attn):
    x = tokens(attn)
    with torch.no_grad():
        a = Perturbation("noise", noise_scale=2.0, seed=7)(attn, x)
        b = Perturbation("noise", noise_scale=2.0, seed=7)(attn, x)
        c = Perturbation("noise", noise_scale=2.0, seed=8)(attn, x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (a - c).abs().max() > 1e-3
        g = torch.Generator().manual_seed(7)
        noise = torch.randn((2, attn.heads, 16, 16), generator=g, dtype=torch.float32).to(x.dtype)  # drawn in fp32
        assert_exact(a, attention(attn, x, x, noise=2.0 * noise))
        assert_exact(Perturbation("noise", noise_scale=0.0)(attn, x), attention(attn, x, x))
        assert_visible(rel_err(attention(attn, x, x), a), what="the noise's effect")


def test_blur_through_the_patch_finds_the_token_grid():
    unet = to_float64(sd15_unet(seed=5))
    selection = resolve_layers("mid", build_catalog(unet))
    attn = unet.get_submodule(selection.paths[0])
    seen = {}

    x, t, kw = unet_inputs(unet, batch=1, size=24)  # latent 24x24 → middle block 3x3
    perturbation = Perturbation("blur", blur_sigma=math.inf)
    original_call = Perturbation.__call__

    def spy(self, module, rows, **kwargs):
        seen["grid"] = kwargs["grid"]
        return original_call(self, module, rows, **kwargs)

    marks = RowMarks()
    Perturbation.__call__ = spy
    try:
        with torch.no_grad(), AttentionPatch(unet, selection, perturbation, marks), marks.marking([True]):
            unet(x, t, **kw)
    finally:
        Perturbation.__call__ = original_call
    assert seen["grid"] == (3, 3)
    assert not unet.middle_block[1]._forward_pre_hooks and not unet.middle_block[1]._forward_hooks


def test_blur_without_a_grid_blurs_the_token_order_and_warns_once(attn, caplog):
    """No grid (the attention is not inside a watched transformer): a 1-D blur over the flattened tokens."""
    x = tokens(attn, n=10)
    blur = Perturbation("blur", blur_sigma=1.5)
    with torch.no_grad(), caplog.at_level("WARNING", logger="sd_webui_pag"):
        a = blur(attn, x)
        b = blur(attn, x)
        # independent reference: Gaussian weights along the token order, then ordinary attention
        pos = torch.arange(10.0)
        g = torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2 * 1.5 ** 2))
        g = g / g.sum(1, keepdim=True)
        h = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q = torch.einsum("ij,bjc->bic", g, q)
        q, k, v = (t.reshape(2, 10, h, -1).transpose(1, 2) for t in (q, k, v))
        out = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        expected = attn.to_out(out.transpose(1, 2).reshape(2, 10, -1))
        plain = attention(attn, x, x)
    assert_exact(a, expected)
    assert_exact(b, expected)
    assert caplog.text.count("token grid of a 10-token attention is not known") == 1
    assert float((a - plain).abs().max()) > 1e-3
    assert_visible(rel_err(plain, expected), what="the blur's effect")
