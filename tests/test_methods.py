"""SEG and TPG against independent references of their papers' operators (issue 19), in float64.

- SEG (Hong, arXiv 2408.00760; SusungHong/SEG-SDXL): the query of the chosen self-attentions blurred by a 2-D
  Gaussian — kernel size ``ceil(6σ) + 1 − ceil(6σ) mod 2`` capped by the grid side, integer offsets, normalised,
  the 2-D kernel the outer product, reflect padding, a depthwise ``conv2d`` — or, above σ = 9999 (∞), every
  query the mean query. The reference below is that formula written with ``F.pad`` + ``F.conv2d``; the product
  computes it separably with matrices.
- TPG (Rajabi et al., arXiv 2506.10036; TaatiTeam/Token-Perturbation-Guidance): the hidden states entering the
  chosen transformer blocks have their tokens shuffled (``x[:, perm]``), not put back. The reference wraps the
  blocks of a deep copy of the UNet so that each permutes its input; the permutations are the product's own
  draws for each row's key (their randomness is tested separately: per row, per layer, per call).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lib_pag import AttentionPatch, Perturbation, RowMarks, build_catalog, resolve_layers
from lib_pag.layout import RowLayout
from lib_pag.patch import layer_key
from lib_pag.perturbations import SEG_INFINITE, mix_seed, seg_attention, seg_blur, seg_kernel_size, tpg_permutations
from tests.exactness import BOUND, assert_exact, assert_visible, to_float64
from unets import sd15_unet, sdxl_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("float64")  # every comparison in float64 (tests/exactness.py)
TOL = 1e-12  # the operators alone (no UNet): rounding of sums of a few dozen terms


def rel(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# --- SEG ---------------------------------------------------------------------------------------------

def reference_seg_blur(q, sigma, h, w):
    """The official ``gaussian_blur_2d`` on ``(B, C, H, W)`` (a non-square grid caps each axis by its own side)."""
    b, n, c = q.shape
    img = q.transpose(1, 2).reshape(b, c, h, w)
    if sigma > 9999.0:
        return img.mean(dim=(-2, -1), keepdim=True).expand_as(img).reshape(b, c, n).transpose(1, 2)

    def kernel(side):
        k = math.ceil(6 * sigma)
        k = k + 1 - k % 2
        k = min(k, side - (side % 2 - 1))
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        return pdf / pdf.sum()

    kh, kw = kernel(h), kernel(w)
    k2 = torch.mm(kh[:, None], kw[None, :]).expand(c, 1, kh.numel(), kw.numel())
    padded = F.pad(img, [kw.numel() // 2, kw.numel() // 2, kh.numel() // 2, kh.numel() // 2], mode="reflect")
    out = F.conv2d(padded, k2.to(img.dtype), groups=c)
    return out.reshape(b, c, n).transpose(1, 2)


@pytest.mark.parametrize("side", [2, 3, 4, 7, 8, 16, 32])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 9.0, 100.0])
def test_seg_blur_is_the_official_2d_gaussian(side, sigma):
    q = torch.randn(2, side * side, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(side))
    got, want = seg_blur(q, sigma, (side, side)), reference_seg_blur(q, sigma, side, side)
    assert rel(got, want) <= TOL
    if side > 2 and sigma < 9:
        assert rel(got, q) > 1e-3  # it blurs


@pytest.mark.parametrize("h,w", [(4, 6), (5, 8), (16, 9), (1, 7)])
def test_seg_blur_on_a_non_square_grid_caps_each_axis_by_its_side(h, w):
    q = torch.randn(1, h * w, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    assert rel(seg_blur(q, 3.0, (h, w)), reference_seg_blur(q, 3.0, h, w)) <= TOL


def test_seg_kernel_size_follows_the_official_rule():
    assert seg_kernel_size(1.0, 128) == 7 and seg_kernel_size(0.5, 128) == 3 and seg_kernel_size(2.0, 128) == 13
    assert seg_kernel_size(10.0, 32) == 33 and seg_kernel_size(10.0, 31) == 31  # capped: side + 1 even, side odd
    assert all(seg_kernel_size(s, 64) % 2 == 1 for s in (0.3, 1.7, 4.2, 9.0))


@pytest.mark.parametrize("sigma", [math.inf, 1e6, SEG_INFINITE + 1])
def test_seg_infinite_sigma_is_the_mean_query(sigma):
    q = torch.randn(2, 12, 5, dtype=torch.float64)
    out = seg_blur(q, sigma, (3, 4))
    assert torch.allclose(out, q.mean(dim=1, keepdim=True).expand_as(q), rtol=0, atol=1e-15)


def test_seg_blur_keeps_half_precision_inputs_in_their_dtype():
    q = torch.randn(1, 16, 4).half()
    out = seg_blur(q, 1.0, (4, 4))
    assert out.dtype == torch.float16
    assert rel(out.double(), reference_seg_blur(q.double(), 1.0, 4, 4)) < 1e-3


class ReferenceSEG(torch.nn.Module):
    """attn1 with the query blurred by ``reference_seg_blur`` on a known grid; keys and values unblurred."""

    def __init__(self, original, sigma, grid):
        super().__init__()
        self.original, self.sigma, self.grid = original, sigma, grid

    def forward(self, x, *args, **kwargs):
        a = self.original
        q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
        q = reference_seg_blur(q, self.sigma, *self.grid)
        heads = a.heads
        b, n, c = q.shape
        q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * (c // heads) ** -0.5).softmax(dim=-1)
        return a.to_out((weights @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("spec,sigma", [("mid", 2.0), ("u2,u3", 1.0), ("d1", math.inf)])
def test_seg_in_the_unet_equals_a_reference_unet(spec, sigma):
    unet = to_float64(sd15_unet(seed=41))
    x, t, kw = unet_inputs(unet, batch=2, size=16)
    x, kw = x.double(), {k: v.double() for k, v in kw.items()}
    selection = resolve_layers(spec, build_catalog(unet))
    ref = copy.deepcopy(unet)
    for layer, _ in selection.chosen:
        parent, _, name = layer.path.rpartition(".")
        side = next(v for k, v in SD15_SIDE.items() if layer.path.startswith(k + "."))
        setattr(ref.get_submodule(parent), name, ReferenceSEG(getattr(ref.get_submodule(parent), name), sigma, (side, side)))
    marks = RowMarks()
    with torch.no_grad():
        with AttentionPatch(unet, selection, Perturbation("seg", blur_sigma=sigma), marks), marks.marking([True, True]):
            got = unet(x, t, **kw)
        want = ref(x, t, **kw)
        plain = unet(x, t, **kw)
    assert_exact(got, want, what="SEG in the UNet vs the reference UNet")
    assert_visible(rel(got, plain), what="SEG's effect")


def test_seg_attention_with_sgm_additional_tokens_blurs_only_the_image_tokens():
    unet = to_float64(sdxl_unet("base", seed=42))
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    x = torch.randn(1, 16, attn.to_q.in_features, dtype=torch.float64)
    extra = torch.randn(1, 3, attn.to_q.in_features, dtype=torch.float64)
    with torch.no_grad():
        got = seg_attention(attn, x, 1.0, (4, 4), extra)
        full = torch.cat([extra, x], dim=1)
        q, k, v = attn.to_q(full), attn.to_k(full), attn.to_v(full)
        q = torch.cat([q[:, :3], reference_seg_blur(q[:, 3:], 1.0, 4, 4)], dim=1)
        out = F.scaled_dot_product_attention(*(t.reshape(1, 19, attn.heads, -1).transpose(1, 2) for t in (q, k, v)))
        want = attn.to_out(out.transpose(1, 2).reshape(1, 19, -1)[:, 3:])
    assert rel(got, want) <= TOL


# --- TPG ---------------------------------------------------------------------------------------------

class ShuffledInput(torch.nn.Module):
    """A transformer block whose input tokens are permuted row by row (``perms``), and not put back."""

    def __init__(self, block, perms):
        super().__init__()
        self.block, self.perms = block, perms

    def forward(self, x, *args, **kwargs):
        index = self.perms[:, :, None].expand(-1, -1, x.shape[2])
        return self.block(torch.gather(x, 1, index), *args, **kwargs)


def tpg_reference(unet, selection, keys, draw, rows, tokens_of):
    """A deep copy of ``unet`` whose chosen blocks shuffle their input with the product's draws for each row's
    key (image key + draw + layer, as ``patch.draw_keys`` composes them)."""
    ref = copy.deepcopy(unet)
    helper = Perturbation("tpg")
    for layer, _ in selection.chosen:
        path = layer.path.rsplit(".attn1", 1)[0]
        parent, _, name = path.rpartition(".")
        row_keys = tuple(k + draw + (layer_key(layer.path),) for k in keys)
        perms = tpg_permutations(rows, tokens_of(layer.path), row_keys, torch.device("cpu"), helper)
        getattr(ref.get_submodule(parent), name)  # exists
        ref.get_submodule(parent)._modules[name] = ShuffledInput(getattr(ref.get_submodule(parent), name), perms)
    return ref


# the token grid side of each attention-bearing block of the sd15 layout at a 16² latent (÷2 per level down,
# ×2 per level up; the middle block at the lowest level)
SD15_SIDE = {"input_blocks.1": 16, "input_blocks.2": 16, "input_blocks.4": 8, "input_blocks.5": 8,
             "input_blocks.7": 4, "input_blocks.8": 4, "middle_block": 2, "output_blocks.3": 4, "output_blocks.4": 4,
             "output_blocks.5": 4, "output_blocks.6": 8, "output_blocks.7": 8, "output_blocks.8": 8,
             "output_blocks.9": 16, "output_blocks.10": 16, "output_blocks.11": 16}
SD15_TOKENS = {k: v * v for k, v in SD15_SIDE.items()}


def tokens_at(path):
    return next(v for k, v in SD15_TOKENS.items() if path.startswith(k + "."))


@pytest.mark.parametrize("spec", ["d1", "d2,d3", "mid,u0"])
def test_tpg_shuffles_the_hidden_states_entering_the_chosen_blocks(spec):
    unet = to_float64(sd15_unet(seed=43))
    x, t, kw = unet_inputs(unet, batch=2, size=16)
    x, kw = x.double(), {k: v.double() for k, v in kw.items()}
    selection = resolve_layers(spec, build_catalog(unet))
    keys, draw = ((40, 0, 1), (41, 0, 1)), (0, 3)
    layout = RowLayout((1, 1), None, keys)
    marks = RowMarks()
    with torch.no_grad():
        with AttentionPatch(unet, selection, Perturbation("tpg"), marks) as patch, marks.marking(layout, draw):
            got = unet(x, t, **kw)
        want = tpg_reference(unet, selection, keys, draw, 2, tokens_at)(x, t, **kw)
        plain = unet(x, t, **kw)
    assert patch.calls_by_label[1] == len(selection.chosen)
    assert_exact(got, want, what="TPG in the UNet vs the reference UNet")
    assert_visible(rel(got, plain), what="TPG's effect")  # not undone: the shuffle changes the prediction


def test_tpg_rows_other_than_the_twins_are_untouched():
    unet = to_float64(sd15_unet(seed=44))
    x, t, kw = unet_inputs(unet, batch=3, size=16)
    x, kw = x.double(), {k: v.double() for k, v in kw.items()}
    selection = resolve_layers("d1,mid", build_catalog(unet))
    marks = RowMarks()
    with torch.no_grad():
        with AttentionPatch(unet, selection, Perturbation("tpg"), marks), marks.marking(RowLayout((0, 1, 0), None, (None, (7,), None))):
            got = unet(x, t, **kw)
        plain = unet(x, t, **kw)
    assert_exact(got[[0, 2]], plain[[0, 2]], what="rows without TPG")
    assert_visible(rel(got[1], plain[1]), what="TPG's effect on its twin")


class MixedShuffle(torch.nn.Module):
    """``(1−a)·block(x) + a·block(x shuffled)``: TPG at layer strength ``a``."""

    def __init__(self, block, perms, a):
        super().__init__()
        self.block, self.perms, self.a = block, perms, a

    def forward(self, x, *args, **kwargs):
        index = self.perms[:, :, None].expand(-1, -1, x.shape[2])
        return (1 - self.a) * self.block(x, *args, **kwargs) + self.a * self.block(torch.gather(x, 1, index), *args, **kwargs)


def test_tpg_strength_mixes_the_block_outputs():
    """``d1:0.25``: the block gives ``0.75·block(x) + 0.25·block(shuffled x)`` for the twin rows."""
    unet = to_float64(sd15_unet(seed=45))
    x, t, kw = unet_inputs(unet, batch=1, size=16)
    selection = resolve_layers("d1:0.25", build_catalog(unet))
    layer = selection.chosen[0][0]
    keys, draw = ((9,),), (0, 0)
    marks = RowMarks()
    with torch.no_grad():
        with AttentionPatch(unet, selection, Perturbation("tpg"), marks), marks.marking(RowLayout((1,), None, keys), draw):
            got = unet(x, t, **kw)
        perms = tpg_permutations(1, tokens_at(layer.path), tuple(k + draw + (layer_key(layer.path),) for k in keys),
                                 torch.device("cpu"), Perturbation("tpg"))
        ref = copy.deepcopy(unet)
        path = layer.path.rsplit(".attn1", 1)[0]
        parent, _, name = path.rpartition(".")
        ref.get_submodule(parent)._modules[name] = MixedShuffle(getattr(ref.get_submodule(parent), name), perms, 0.25)
        want = ref(x, t, **kw)
        full = tpg_reference(unet, resolve_layers("d1", build_catalog(unet)), keys, draw, 1, tokens_at)(x, t, **kw)
    assert_exact(got, want, what="TPG at strength 0.25 vs the reference mix")
    assert_visible(rel(got, full), what="strength 0.25 against full strength")


def test_tpg_permutations_are_per_row_per_layer_and_per_call():
    helper = Perturbation("tpg")
    cpu = torch.device("cpu")
    a = tpg_permutations(2, 64, ((40, 0, 1, 0, 3, 11), (41, 0, 1, 0, 3, 11)), cpu, helper)
    again = tpg_permutations(2, 64, ((40, 0, 1, 0, 3, 11), (41, 0, 1, 0, 3, 11)), cpu, helper)
    alone = tpg_permutations(1, 64, ((41, 0, 1, 0, 3, 11),), cpu, helper)
    other_layer = tpg_permutations(1, 64, ((40, 0, 1, 0, 3, 12),), cpu, helper)
    other_call = tpg_permutations(1, 64, ((40, 0, 1, 0, 4, 11),), cpu, helper)
    for perm in (a[0], a[1], other_layer[0], other_call[0]):
        assert sorted(perm.tolist()) == list(range(64))
    assert torch.equal(a, again)  # the same key, the same permutation
    assert torch.equal(a[1], alone[0])  # a row's permutation does not depend on the other rows
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], other_layer[0]) and not torch.equal(a[0], other_call[0])
    assert mix_seed((1, 2)) != mix_seed((2, 1)) and 0 <= mix_seed((2 ** 70, -5)) < 2 ** 63


def test_tpg_permutations_are_uniform():
    """Every position is equally likely to receive every token (χ²-style check over many keys)."""
    helper = Perturbation("tpg")
    n, draws = 6, 3000
    perms = tpg_permutations(draws, n, tuple((k,) for k in range(draws)), torch.device("cpu"), helper)
    counts = torch.zeros(n, n)
    counts.scatter_add_(1, perms.T.contiguous(), torch.ones(n, draws))
    expected = draws / n
    assert float(((counts - expected) ** 2 / expected).sum()) < 2 * n * n  # df = (n-1)², mean ≈ 25
