"""PAG next to other extensions' patches: the shared-prefix fork never skips a foreign hook or forward.

Each foreign patch is one of the three ways WebUI extensions attach to a UNet module (a forward hook
that changes the output — FreeU style; a pre-forward hook that changes the input — Deep Shrink style;
an instance ``forward`` — ControlNet style), on the UNet itself, an input block, the middle block or an
output block. For every one: batched + fork == the unforked batch == a separate pass (cond/uncond plain,
twins perturbed on their own), and the patch runs exactly as often as in a UNet call without PAG.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lib_pag import AttentionPatch, Perturbation, RowMarks, build_catalog, resolve_layers
from lib_pag.layout import RowLayout
from lib_pag.fork import forking
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from unets import sd15_unet

pytestmark = pytest.mark.usefixtures("float64")  # every path comparison in float64 (tests/exactness.py)
MASK = RowLayout.from_mask([False, False, True, True, False, False], sources=[0, 1])  # 2 cond, their 2 twins, 2 uncond


@pytest.fixture(scope="module")
def unet():
    return to_float64(sd15_unet(seed=21))


rel = rel_err


def inputs(unet, h=16, w=16, seed=0):
    """[cond, uncond] rows for a plain call and [cond, twins, uncond] for the PAG call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, h, w, generator=g)
    t = torch.tensor([700, 300, 700, 300])
    context = torch.randn(4, 7, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features, generator=g)
    lay = lambda v: torch.cat([v[:2], v[:2], v[2:]])  # noqa: E731
    return (x, t, context), (lay(x), lay(t), lay(context))


def run(unet, selection, batch, *, mask=MASK, fork=True, perturbation=None):
    x, t, c = batch
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, perturbation, marks), marks.marking(mask):
        if not fork:
            return unet(x, t, context=c), None
        with forking(unet, selection, mask) as point:
            return unet(x, t, context=c), point


def separate(unet, selection, plain_batch, perturbation=None):
    """The separate pass: cond and uncond rows unpatched, then the cond rows again, all perturbed."""
    x, t, c = plain_batch
    with torch.no_grad():
        plain = unet(x, t, context=c)
    twins, _ = run(unet, selection, (x[:2], t[:2], c[:2]), mask=torch.ones(2, dtype=torch.bool), fork=False,
                   perturbation=perturbation)
    return torch.cat([plain[:2], twins, plain[2:]])


class Foreign:
    """One foreign patch on ``unet.get_submodule(where)`` (``""`` = the UNet), counting its calls."""

    def __init__(self, unet, where: str, kind: str):
        self.module = unet.get_submodule(where) if where else unet
        self.kind, self.calls, self.handle = kind, 0, None

    def __enter__(self):
        module = self.module
        if self.kind == "forward hook":
            def hook(_m, _args, out):
                self.calls += 1
                return out * 1.5
            self.handle = module.register_forward_hook(hook)
        elif self.kind == "pre-hook":
            def pre(_m, args):
                self.calls += 1
                return (args[0] * 0.8,) + tuple(args[1:])
            self.handle = module.register_forward_pre_hook(pre)
        else:
            def forward(*args, **kwargs):
                self.calls += 1
                return type(module).forward(module, *args, **kwargs) * 1.5
            module.forward = forward
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        else:
            del self.module.forward


WHERE = ["", "input_blocks.4", "middle_block", "output_blocks.3", "output_blocks.7"]
KINDS = ["forward hook", "pre-hook", "instance forward"]


@pytest.mark.parametrize("spec", ["mid", "up"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", WHERE)
def test_fork_is_exact_next_to_a_foreign_patch(unet, spec, kind, where):
    selection = resolve_layers(spec, build_catalog(unet))
    plain_batch, pag_batch = inputs(unet)
    with torch.no_grad():
        untouched = unet(*plain_batch[:2], context=plain_batch[2])
    with Foreign(unet, where, kind) as patch:
        with torch.no_grad():
            plain = unet(*plain_batch[:2], context=plain_batch[2])
        calls_without_pag = patch.calls
        patch.calls = 0
        forked, point = run(unet, selection, pag_batch)
        assert patch.calls == calls_without_pag == 1, (patch.calls, calls_without_pag)
        unforked, _ = run(unet, selection, pag_batch, fork=False)
        reference = separate(unet, selection, plain_batch)
    assert rel(plain, untouched) > 1e-3  # the foreign patch really changes the output
    assert_exact(forked, unforked, what="forked vs unforked")
    assert_exact(forked, reference, what="forked vs separate")
    assert rel(forked[2:4], forked[:2]) > 1e-3  # and PAG really perturbs the twins
    assert_visible(min(rel(plain, untouched), rel(forked[2:4], forked[:2])), what="patch's or PAG's effect")
    if kind == "instance forward" and where == "":
        assert point is None  # someone else's UNet forward: never walked
    else:
        assert point is not None
    assert "forward" not in unet.__dict__ and not unet._forward_hooks and not unet._forward_pre_hooks


def test_a_middle_block_hook_moves_the_fork_before_the_middle_block(unet, caplog):
    selection = resolve_layers("mid", build_catalog(unet))
    _, pag_batch = inputs(unet)
    rows = []
    probe = unet.middle_block[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        run(unet, selection, pag_batch)
        assert rows == [4]  # clean: the fork is inside the middle block, after its first ResBlock
        rows.clear()
        with Foreign(unet, "middle_block", "forward hook"), caplog.at_level("DEBUG", logger="sd_webui_pag"):
            run(unet, selection, pag_batch)
            assert rows == [6]  # hooked: the whole middle block runs on the full batch, as one call
            assert "middle_block has a forward hook; forking before middle_block" in caplog.text
            assert "PAG fork before middle_block: prefix on 4 of 6 rows" in caplog.text
        rows.clear()
        run(unet, selection, pag_batch)  # the hook is gone: the next call forks inside again
        assert rows == [4]
    finally:
        probe.remove()


def test_a_patch_added_during_the_job_is_seen(unet):
    """The check runs at every UNet call, not once per job."""
    selection = resolve_layers("mid", build_catalog(unet))
    plain_batch, pag_batch = inputs(unet)
    x, t, c = pag_batch
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, marks=marks), marks.marking(MASK), \
            forking(unet, selection, MASK):
        unet(x, t, context=c)
        with Foreign(unet, "middle_block", "instance forward") as patch:
            out = unet(x, t, context=c)
            assert patch.calls == 1
    with Foreign(unet, "middle_block", "instance forward"):
        reference = separate(unet, selection, plain_batch)
    assert_exact(out, reference)


# --- Deep Shrink (Kohya HRFix) style: hidden states resized inside the UNet ----------------------------

class DeepShrink:
    """Downscale the input of ``input_blocks[4]`` by 1/``factor`` and bring ``output_blocks[7]``'s output
    back to the size it had (the matching output block, before its concat with the unshrunk skip)."""

    def __init__(self, unet, factor=1.25):
        self.unet, self.factor, self.sizes, self.handles = unet, factor, [], []

    def __enter__(self):
        def shrink(_m, args):
            self.sizes.append(tuple(args[0].shape[-2:]))
            return (F.interpolate(args[0], scale_factor=1 / self.factor, mode="bicubic"),) + tuple(args[1:])

        def grow(_m, _args, out):
            return F.interpolate(out, size=self.sizes.pop(), mode="bicubic")

        self.handles = [self.unet.input_blocks[4].register_forward_pre_hook(shrink),
                        self.unet.output_blocks[7].register_forward_hook(grow)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class TrueGridBlur(torch.nn.Module):
    """Reference blur perturbation built without lib_pag: the query blurred with a 2-D Gaussian over the
    (h, w) that its spatial transformer really received (read by its own hook), then attention."""

    def __init__(self, attn, sigma, grid_of):
        super().__init__()
        self.attn, self.sigma, self.grid_of = attn, sigma, grid_of

    def forward(self, x, *args, **kwargs):
        a = self.attn
        h, w = self.grid_of()
        assert h * w == x.shape[1]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        gy = torch.exp(-(ys[:, None] - ys[None, :]) ** 2 / (2 * self.sigma ** 2))
        gx = torch.exp(-(xs[:, None] - xs[None, :]) ** 2 / (2 * self.sigma ** 2))
        # normalised per axis over the valid positions (no padding)
        def axis_norm(n):
            pos = torch.arange(n, dtype=x.dtype)
            return torch.exp(-(pos[:, None] - pos[None, :]) ** 2 / (2 * self.sigma ** 2)).sum(1)

        ny, nx = axis_norm(h), axis_norm(w)
        weights = gy * gx / (ny[ys.long()] * nx[xs.long()])[:, None]
        q = torch.einsum("ij,bjc->bic", weights, a.to_q(x))
        k, v = a.to_k(x), a.to_v(x)
        heads = a.heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        return a.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("spec,fork", [("mid", True), ("mid", False), ("up", True), ("d2,mid", True)])
def test_blur_under_deep_shrink_uses_the_true_grid(unet, spec, fork, caplog):
    """320×240 image (latent 40×30), shrink 1/1.25 → middle block 4×3 = 12 tokens (the latent would say 5×4)."""
    import copy

    selection = resolve_layers(spec, build_catalog(unet))
    plain_batch, pag_batch = inputs(unet, h=40, w=30)
    blur = Perturbation("blur", blur_sigma=1.5)
    with DeepShrink(unet), caplog.at_level("WARNING", logger="sd_webui_pag"):
        out, _ = run(unet, selection, pag_batch, fork=fork, perturbation=blur)
        unforked, _ = run(unet, selection, pag_batch, fork=False, perturbation=blur)
    assert "not known" not in caplog.text
    assert_exact(out, unforked, what="forked vs unforked")

    ref = copy.deepcopy(unet)
    grids = {}
    for layer, _ in selection.chosen:
        holder = layer.path.split(".transformer_blocks.")[0]
        ref.get_submodule(holder).register_forward_pre_hook(
            lambda m, args, holder=holder: grids.__setitem__(holder, tuple(args[0].shape[-2:])))
        parent, _, name = layer.path.rpartition(".")
        setattr(ref.get_submodule(parent), name,
                TrueGridBlur(ref.get_submodule(layer.path), 1.5, lambda holder=holder: grids[holder]))
    x, t, c = plain_batch
    with torch.no_grad(), DeepShrink(ref):
        expected = ref(x[:2], t[:2], context=c[:2])
    assert grids.get("middle_block.1", (4, 3)) == (4, 3)
    assert_exact(out[2:4], expected, what="twins vs the true-grid blur")
    with torch.no_grad(), DeepShrink(unet):
        plain = unet(x, t, context=c)
    assert_exact(out[:2], plain[:2], what="cond rows")
    assert_exact(out[4:], plain[2:], what="uncond rows")
    assert_visible(rel(out[2:4], plain[:2]), what="the blur's effect")


def test_a_replaced_class_forward_of_the_blocks_is_never_skipped(unet, monkeypatch, caplog):
    """AnimateDiff-style: ``TimestepEmbedSequential.forward`` replaced on the class. The fork then calls
    ``middle_block`` whole (never its children), so the replacement runs for every block, as without PAG."""
    from ldm.modules.diffusionmodules import openaimodel

    stock = openaimodel.TimestepEmbedSequential.forward
    calls = []

    def mm_tes_forward(self, x, emb, context=None):
        calls.append(type(self).__name__)
        return stock(self, x, emb, context) * 1.01

    monkeypatch.setattr(openaimodel.TimestepEmbedSequential, "forward", mm_tes_forward)
    selection = resolve_layers("mid", build_catalog(unet))
    plain_batch, pag_batch = inputs(unet)
    with torch.no_grad():
        unet(*plain_batch[:2], context=plain_batch[2])
    without_pag = len(calls)
    calls.clear()
    with caplog.at_level("DEBUG", logger="sd_webui_pag"):
        forked, point = run(unet, selection, pag_batch)
    assert point is not None and len(calls) == without_pag
    assert "TimestepEmbedSequential.forward is" in caplog.text
    unforked, _ = run(unet, selection, pag_batch, fork=False)
    assert_exact(forked, unforked, what="forked vs unforked")
    assert_exact(forked, separate(unet, selection, plain_batch), what="forked vs separate")
