"""The shared-prefix fork: same output as the batched call, fewer rows before the fork, safe fallbacks."""

import sys
import types

import pytest
import torch

from lib_pag import AttentionPatch, Perturbation, RowMarks, build_catalog, resolve_layers
from lib_pag.layout import RowLayout
from lib_pag.fork import (
    ForkChecks, ForkPoint, first_perturbed_stage, fork_stages, forked_forward, forking, original_forward,
    register_original_forward,
)
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from unets import sd15_unet, sdxl_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("float64")  # forked vs batched compared in float64 (tests/exactness.py)
MASK = torch.tensor([False, False, True, True, False, False])  # 2 cond, 2 twins, 2 uncond
SOURCE = torch.tensor([0, 1])
LAYOUT = RowLayout.from_mask(MASK, sources=SOURCE)


@pytest.fixture(scope="module", autouse=True)
def sgm_double_is_known():
    from tests.doubles import sgm_unet

    register_original_forward(sgm_unet.UNetModel.forward, "sgm")


@pytest.fixture(scope="module")
def sd15():
    return to_float64(sd15_unet(seed=3))


@pytest.fixture(scope="module")
def sdxl():
    return to_float64(sdxl_unet("base", seed=4))


def twin_batch(unet, seed=0):
    """The extension's row layout: [cond, twins of cond, uncond], twins bitwise copies of the cond rows."""
    x, t, kw = unet_inputs(unet, batch=4, seed=seed)
    t = torch.tensor([700, 300, 700, 300])

    def lay(v):
        return torch.cat([v[:2], v[:2], v[2:]])

    return lay(x), lay(t), {k: lay(v) for k, v in kw.items()}


rel = rel_err


def batched(unet, selection, inputs, perturbation=None):
    x, t, kw = inputs
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, perturbation, marks), marks.marking(MASK):
        return unet(x, t, **kw)


def forked_direct(unet, selection, inputs, source=SOURCE):
    x, t, kw = inputs
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, marks=marks), marks.marking(MASK):
        return forked_forward(unet, x, t, kw.get("context"), kw.get("y"), perturbed=MASK, source=source,
                              first_block=first_perturbed_stage(selection))


def forked_call(unet, selection, inputs, perturbation=None):
    """Through the context manager, the way the A1111 inner wrapper would use it."""
    x, t, kw = inputs
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, perturbation, marks), marks.marking(MASK):
        with forking(unet, selection, LAYOUT) as point:
            assert point is not None
            with forking(unet, selection, LAYOUT) as nested:
                assert nested is None  # an inner block leaves the outer fork alone
            rows = []
            hook = unet.input_blocks[0].register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
            try:
                out = unet(x, t, **kw)
            finally:
                hook.remove()
            assert rows == [4]  # it really forked
            return out


CASES = [("sd15", "mid"), ("sd15", "up"), ("sd15", "u0"), ("sd15", "mid,up:0.5"),
         ("sdxl", "mid"), ("sdxl", "up"), ("sdxl", "m0.2-9"), ("sdxl", "u0")]


@pytest.mark.parametrize("model,spec", CASES)
def test_fork_equals_batched(model, spec, request):
    unet = request.getfixturevalue(model)
    selection = resolve_layers(spec, build_catalog(unet))
    inputs = twin_batch(unet)
    expected = batched(unet, selection, inputs)
    direct = forked_direct(unet, selection, inputs)
    wrapped = forked_call(unet, selection, inputs)
    assert direct is not None
    assert forked_direct(unet, selection, inputs, source=None) is None  # nothing may be shared without sources
    for out in (direct, wrapped):
        assert out.shape == expected.shape
        assert_exact(out, expected, what="forked vs batched")
    # the twins really are perturbed, and differently from their cond rows: forking a wrong row would show
    assert rel(expected[2:4], expected[0:2]) > 1e-3
    assert_visible(rel(expected[2:4], expected[0:2]), what="PAG's perturbation")
    assert "forward" not in unet.__dict__


def test_fork_says_where_it_forked(sd15, caplog):
    selection = resolve_layers("mid", build_catalog(sd15))
    with caplog.at_level("DEBUG", logger="sd_webui_pag"):
        assert forked_direct(sd15, selection, twin_batch(sd15)) is not None
    assert "PAG fork before middle_block[1]: prefix on 4 of 6 rows" in caplog.text


def test_fork_with_blur_uses_the_true_grid(sd15):
    """Forked, the spatial transformers still run as modules, so blur's grid probe sees their input."""
    selection = resolve_layers("mid,u0", build_catalog(sd15))
    inputs = twin_batch(sd15)
    blur = Perturbation("blur", blur_sigma=2.0)
    assert_exact(forked_call(sd15, selection, inputs, blur), batched(sd15, selection, inputs, blur))


def test_fork_points():
    sd15 = build_catalog(sd15_unet(seed=0))
    sdxl = build_catalog(sdxl_unet("base", seed=0))
    assert first_perturbed_stage(resolve_layers("mid", sd15)) == ForkPoint("middle", 1)
    assert first_perturbed_stage(resolve_layers("up", sd15)) == ForkPoint("output", 3)
    assert first_perturbed_stage(resolve_layers("u2,mid", sd15)) == ForkPoint("middle", 1)
    assert first_perturbed_stage(resolve_layers("m0.2-9", sdxl)) == ForkPoint("middle", 1)
    assert first_perturbed_stage(resolve_layers("u0", sdxl)) == ForkPoint("output", 0)
    assert first_perturbed_stage(resolve_layers("u3", sdxl)) == ForkPoint("output", 3)
    for spec in ("down", "d0,mid,up", "all"):
        assert first_perturbed_stage(resolve_layers(spec, sd15)) == ForkPoint("input", 1)
    assert first_perturbed_stage(resolve_layers("d1", sd15)) == ForkPoint("input", 2)
    assert first_perturbed_stage(resolve_layers("d2.2-9,d3", sdxl)) == ForkPoint("input", 7)
    assert first_perturbed_stage(None) is None
    assert str(ForkPoint("output", 3)) == "output_blocks[3]" and str(ForkPoint("middle", 1)) == "middle_block[1]"
    assert str(ForkPoint("input", 7)) == "input_blocks[7]" and str(ForkPoint("middle", 0)) == "middle_block"
    # several branches: one stage per join point, in forward order; the same point joins them together
    stages = fork_stages({1: resolve_layers("mid,up", sdxl), 2: resolve_layers("m0", sdxl), 3: resolve_layers("d2.2-9,d3", sdxl)})
    assert stages == ((ForkPoint("input", 7), (3,)), (ForkPoint("middle", 1), (1, 2)))


def test_down_selection_forks_before_its_input_block(sd15):
    """d1 lives in input_blocks[2]: blocks 0 and 1 are shared, the twins join before block 2."""
    selection = resolve_layers("d1,mid", build_catalog(sd15))
    inputs = twin_batch(sd15)
    expected = batched(sd15, selection, inputs)
    with CountRows(sd15) as counter:
        with forking(sd15, selection, LAYOUT) as point:
            assert point == ForkPoint("input", 2)
            marks = RowMarks()
            x, t, kw = inputs
            with torch.no_grad(), AttentionPatch(sd15, selection, marks=marks), marks.marking(LAYOUT):
                out = sd15(x, t, **kw)
    assert counter.rows["input_blocks.1"] == [4] and counter.rows["input_blocks.2"] == [6]
    assert_exact(out, expected, what="forked before an input block vs batched")
    assert "forward" not in sd15.__dict__


class CountRows:
    def __init__(self, unet):
        self.rows = {}
        self.handles = []
        blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
        blocks += [(f"middle_block.{i}", b) for i, b in enumerate(unet.middle_block)]
        blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
        for name, block in blocks:
            self.handles.append(block.register_forward_pre_hook(
                lambda m, args, name=name: self.rows.setdefault(name, []).append(args[0].shape[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("model,spec,fork_at", [("sd15", "mid", "middle_block.1"), ("sd15", "up", "output_blocks.3"),
                                                ("sdxl", "u0", "output_blocks.0")])
def test_prefix_runs_on_fewer_rows(model, spec, fork_at, request):
    unet = request.getfixturevalue(model)
    selection = resolve_layers(spec, build_catalog(unet))
    inputs = twin_batch(unet)
    with CountRows(unet) as counter:
        forked_call(unet, selection, inputs)
    names = list(counter.rows)
    at = names.index(fork_at)
    assert at > 0
    assert all(counter.rows[n] == [4] for n in names[:at]), counter.rows
    assert all(counter.rows[n] == [6] for n in names[at:]), counter.rows
    with CountRows(unet) as counter:
        batched(unet, selection, inputs)
    assert all(r == [6] for r in counter.rows.values())


def test_instance_forward_turns_the_fork_off(sd15, caplog):
    """ControlNet-style: an instance forward on the UNet is someone else's; run it untouched."""
    selection = resolve_layers("mid", build_catalog(sd15))
    x, t, kw = twin_batch(sd15)
    calls = []

    def controlnet_forward(*args, **kwargs):
        calls.append(args[0].shape[0])
        return type(sd15).forward(sd15, *args, **kwargs)

    sd15.forward = controlnet_forward
    try:
        with caplog.at_level("DEBUG", logger="sd_webui_pag"):
            assert original_forward(sd15) is None
        assert "instance forward" in caplog.text
        assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, first_block=ForkPoint("middle", 1)) is None
        with forking(sd15, selection, LAYOUT) as point:
            assert point is None
            assert sd15.forward is controlnet_forward
            with torch.no_grad():
                sd15(x, t, **kw)
        assert calls == [6]
        assert sd15.forward is controlnet_forward
    finally:
        del sd15.forward


def test_restored_bound_forward_is_not_a_replacement(sd15):
    """sd-webui-controlnet restores ``unet.forward = unet._original_forward`` (a bound method of the class forward)."""
    selection = resolve_layers("mid", build_catalog(sd15))
    inputs = twin_batch(sd15)
    expected = batched(sd15, selection, inputs)
    sd15.forward = sd15.forward
    try:
        bound = sd15.__dict__["forward"]
        assert original_forward(sd15) is not None
        assert_exact(forked_call(sd15, selection, inputs), expected)
        assert sd15.__dict__["forward"] is bound
    finally:
        del sd15.forward


def test_nothing_to_share_installs_nothing(sd15):
    selection = resolve_layers("mid", build_catalog(sd15))
    for mask in (torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), None):
        with forking(sd15, selection, mask) as point:
            assert point is None
            assert "forward" not in sd15.__dict__


def test_replaced_class_forward_turns_the_fork_off(caplog):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    class TensorRTLike(UNetModel):
        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            return super().forward(x, timesteps, context, y, **kwargs)

    unet = sd15_unet(seed=5)
    unet.__class__ = TensorRTLike
    with caplog.at_level("DEBUG", logger="sd_webui_pag"):
        assert original_forward(unet) is None
    assert "not ldm's/sgm's" in caplog.text
    selection = resolve_layers("mid", build_catalog(unet))
    with forking(unet, selection, LAYOUT) as point:
        assert point is None


def _a1111_wrapper(original):
    """The shape of A1111's modules/sd_unet.create_unet_forward (which sd_hijack puts on UNetModel)."""
    def create_unet_forward(original_forward):
        def UNetModel_forward(self, x, timesteps=None, context=None, *args, **kwargs):
            if sys.modules["modules.sd_unet"].current_unet is not None:
                return sys.modules["modules.sd_unet"].current_unet.forward(x, timesteps, context, *args, **kwargs)
            return original_forward(self, x, timesteps, context, *args, **kwargs)
        UNetModel_forward.__module__ = "modules.sd_unet"
        return UNetModel_forward
    return create_unet_forward(original)


def test_a1111_sd_unet_dispatcher_is_seen_through(monkeypatch, sd15):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    fake = types.ModuleType("modules.sd_unet")
    fake.current_unet = None
    monkeypatch.setitem(sys.modules, "modules.sd_unet", fake)
    monkeypatch.setattr(UNetModel, "forward", _a1111_wrapper(UNetModel.forward))
    plain = original_forward(sd15)
    assert plain is not None and plain.flavor == "ldm"
    selection = resolve_layers("mid", build_catalog(sd15))
    inputs = twin_batch(sd15)
    assert_exact(forked_call(sd15, selection, inputs), batched(sd15, selection, inputs))
    fake.current_unet = object()  # e.g. TensorRT's UNet is active: not ours to walk
    assert original_forward(sd15) is None


def test_twins_whose_inputs_differ_are_reported_after_the_call(sd15):
    """The fork trusts the layout (PAG built the twins as copies) and reads no device data inside the call;
    a twin whose inputs were changed afterwards is caught by the deferred check the adapter reads per step."""
    selection = resolve_layers("mid", build_catalog(sd15))
    x, t, kw = twin_batch(sd15)
    point = first_perturbed_stage(selection)
    checks = ForkChecks()
    with torch.no_grad():
        assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, source=SOURCE, first_block=point,
                              checks=checks) is not None
        assert len(checks.pending) == 1 and not checks.failed() and not checks.pending
        for changed in ("x", "context"):
            x2, c2 = x.clone(), kw["context"].clone()
            (x2 if changed == "x" else c2)[2] += 1e-3
            assert forked_forward(sd15, x2, t, c2, perturbed=MASK, source=SOURCE, first_block=point,
                                  checks=checks) is not None
            assert checks.failed(), changed
        # once failed, forking() stays off for the job
        checks.failed_at = "model call 3"
        with forking(sd15, selection, LAYOUT, checks=checks) as off:
            assert off is None and "forward" not in sd15.__dict__


def test_layouts_with_nothing_to_share_are_not_forked(sd15):
    selection = resolve_layers("mid", build_catalog(sd15))
    x, t, kw = twin_batch(sd15)
    point = first_perturbed_stage(selection)
    # no source rows, a source row that is itself perturbed, or the wrong count
    assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, first_block=point) is None
    assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, source=[2, 1], first_block=point) is None
    assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, source=[0], first_block=point) is None
    # all rows perturbed (separate mode) or none: nothing to share
    assert forked_forward(sd15, x, t, kw["context"], perturbed=torch.ones(6, dtype=torch.bool), source=[0] * 6,
                          first_block=point) is None
    assert forked_forward(sd15, x, t, kw["context"], perturbed=torch.zeros(6, dtype=torch.bool), source=[],
                          first_block=point) is None
    # unknown keyword arguments (ControlNet's control=...) are not walked
    assert forked_forward(sd15, x, t, kw["context"], perturbed=MASK, source=SOURCE, first_block=point, control=[]) is None


def test_a_chunk_without_its_source_rows_runs_the_normal_forward(sd15):
    """A chunked call that holds twins but not their cond rows (batch cond/uncond off): no sources, no fork."""
    selection = resolve_layers("mid", build_catalog(sd15))
    x, t, kw = twin_batch(sd15)
    chunk = RowLayout((1, 1, 0, 0))  # twins first, their cond rows in another call
    x, t, kw = x[2:], t[2:], {k: v[2:] for k, v in kw.items()}
    expected = batched_with(sd15, selection, (x, t, kw), chunk)
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(sd15, selection, marks=marks), marks.marking(chunk):
        with forking(sd15, selection, chunk) as point:
            assert point is None
            with CountRows(sd15) as counter:
                out = sd15(x, t, **kw)
    assert all(r == [4] for r in counter.rows.values())
    assert torch.equal(out, expected)


def batched_with(unet, selection, inputs, layout):
    x, t, kw = inputs
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(unet, selection, marks=marks), marks.marking(layout):
        return unet(x, t, **kw)


def test_an_exception_inside_the_block_removes_the_fork(sd15):
    selection = resolve_layers("up", build_catalog(sd15))
    with pytest.raises(KeyboardInterrupt):
        with forking(sd15, selection, LAYOUT) as point:
            assert point is not None and "forward" in sd15.__dict__
            raise KeyboardInterrupt
    assert "forward" not in sd15.__dict__
