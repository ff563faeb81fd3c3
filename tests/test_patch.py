"""The attention patch on real ldm UNets and the sgm double: exact PAG rows, untouched others, clean exit."""

import pytest
import torch

from lib_pag import AttentionPatch, PagError, RowMarks, build_catalog, resolve_layers
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from unets import assert_same_snapshot, reference_unet, sd15_unet, sd2_unet, sdxl_unet, snapshot, unet_inputs

# patched rows vs the reference, unmarked rows vs the plain model: float64, tests/exactness.py
pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(scope="module")
def sd15():
    return to_float64(sd15_unet(seed=1))


@pytest.fixture(scope="module")
def sdxl():
    return to_float64(sdxl_unet("base", seed=2))


def run(unet, inputs):
    x, t, kw = inputs
    with torch.no_grad():
        return unet(x, t, **kw)


def patched_run(unet, spec, mask, inputs):
    selection = resolve_layers(spec, build_catalog(unet))
    marks = RowMarks()
    with AttentionPatch(unet, selection, marks=marks) as patch:
        with marks.marking(mask):
            out = run(unet, inputs)
    return out, selection, patch


@pytest.mark.parametrize("spec", ["mid", "mid,up", "down", "d1-d3", "u0.0:0.5", "mid:0.25,u2-u4"])
def test_sd15_perturbed_rows_equal_independent_reference(sd15, spec):
    inputs = unet_inputs(sd15, batch=2)
    out, selection, _ = patched_run(sd15, spec, [True, True], inputs)
    ref = run(reference_unet(sd15, {l.path: s for l, s in selection.chosen}), inputs)
    assert_exact(out, ref)
    assert (out - run(sd15, inputs)).abs().max() > 1e-3  # the perturbation really changes the prediction
    assert_visible(rel_err(run(sd15, inputs), ref), what="the perturbation")


@pytest.mark.parametrize("spec", ["mid", "m0.2-9", "d2.0-1:0.5,u0"])
def test_sdxl_perturbed_rows_equal_independent_reference(sdxl, spec):
    inputs = unet_inputs(sdxl, batch=2)
    out, selection, _ = patched_run(sdxl, spec, [True, True], inputs)
    ref = run(reference_unet(sdxl, {l.path: s for l, s in selection.chosen}), inputs)
    assert_exact(out, ref)
    assert_visible(rel_err(run(sdxl, inputs), ref), what="the perturbation")


def test_sd2_perturbed_rows_equal_reference():
    unet = to_float64(sd2_unet(seed=3))
    inputs = unet_inputs(unet, batch=1)
    out, selection, _ = patched_run(unet, "mid,up", [True], inputs)
    ref = run(reference_unet(unet, {p: 1.0 for p in selection.paths}), inputs)
    assert_exact(out, ref)
    assert_visible(rel_err(run(unet, inputs), ref), what="the perturbation")


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [False, False, True]])
def test_only_marked_rows_are_perturbed(sd15, mask):
    inputs = unet_inputs(sd15, batch=3)
    out, selection, _ = patched_run(sd15, "mid,up", mask, inputs)
    plain = run(sd15, inputs)
    ref = run(reference_unet(sd15, {p: 1.0 for p in selection.paths}), inputs)
    for row, marked in enumerate(mask):
        if marked:
            assert_exact(out[row], ref[row], what=f"marked row {row}")
            assert_visible(rel_err(plain[row], ref[row]), what="the perturbation")
        else:
            assert_exact(out[row], plain[row], what=f"unmarked row {row}")


def test_no_marked_rows_is_bit_identical(sd15):
    inputs = unet_inputs(sd15, batch=2)
    plain = run(sd15, inputs)
    for mask in (None, [False, False]):
        out, _, _ = patched_run(sd15, "all", mask, inputs)
        assert torch.equal(out, plain)


def test_exit_restores_everything_and_reports(sd15):
    before = snapshot(sd15)
    inputs = unet_inputs(sd15, batch=2)
    _, _, patch = patched_run(sd15, "mid,u0-u2", [True, False], inputs)
    assert_same_snapshot(before, snapshot(sd15))
    assert not any("forward" in m.__dict__ for m in sd15.modules())
    assert patch.patched == []  # cleared on exit


def test_reports_patched_modules(sd15):
    selection = resolve_layers("mid,u0-u2", build_catalog(sd15))
    with AttentionPatch(sd15, selection) as patch:
        assert patch.patched == ["m0.0", "u0.0", "u1.0", "u2.0"]
        assert all("forward" in sd15.get_submodule(p).__dict__ for p in selection.paths)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exceptions_inside_leave_the_model_as_before(sd15, exc):
    before = snapshot(sd15)
    inputs = unet_inputs(sd15, batch=2)
    plain = run(sd15, inputs)
    selection = resolve_layers("all", build_catalog(sd15))
    marks = RowMarks()

    def explode(*_):
        raise exc

    hook = sd15.output_blocks[5].register_forward_pre_hook(explode)
    try:
        with pytest.raises(type(exc)):
            with AttentionPatch(sd15, selection, marks=marks), marks.marking([True, True]):
                run(sd15, inputs)
    finally:
        hook.remove()
    assert marks.layout is None
    assert_same_snapshot(before, snapshot(sd15))
    assert torch.equal(run(sd15, inputs), plain)


def test_reentrant_and_nested_patches(sd15):
    inputs = unet_inputs(sd15, batch=2)
    selection = resolve_layers("mid", build_catalog(sd15))
    outer_marks, inner_marks = RowMarks(), RowMarks()
    outer = AttentionPatch(sd15, selection, marks=outer_marks)
    with outer:
        with outer:  # re-entering only counts depth
            assert outer.patched == ["m0.0"]
        assert outer.active
        # a nested job (ADetailer-style) patches on top with its own marks; the outer one passes through
        with AttentionPatch(sd15, selection, marks=inner_marks), inner_marks.marking([False, True]):
            out = run(sd15, inputs)
    ref = run(reference_unet(sd15, {p: 1.0 for p in selection.paths}), inputs)
    plain = run(sd15, inputs)
    assert_exact(out[1], ref[1], what="marked row")
    assert_exact(out[0], plain[0], what="unmarked row")
    assert not any("forward" in m.__dict__ for m in sd15.modules())


def test_class_forward_is_looked_up_at_call_time(sd15):
    """The WebUI swaps CrossAttention.forward at class level (optimizations); unmarked rows must follow."""
    inputs = unet_inputs(sd15, batch=2)
    selection = resolve_layers("mid", build_catalog(sd15))
    attn = sd15.get_submodule(selection.paths[0])
    cls = type(attn)
    original = cls.forward
    calls = []

    def swapped(self, x, context=None, mask=None, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, context=context, mask=mask)

    marks = RowMarks()
    with AttentionPatch(sd15, selection, marks=marks):
        cls.forward = swapped
        try:
            with marks.marking([True, False]):
                run(sd15, inputs)
        finally:
            cls.forward = original
    # every attn of that class went through the swapped forward; the patched module only with its unmarked row
    assert 1 in calls


def test_chains_to_an_existing_instance_forward_and_restores_it(sd15):
    """Hypertile-style: an instance forward installed before PAG keeps working and comes back after."""
    inputs = unet_inputs(sd15, batch=2)
    selection = resolve_layers("u0", build_catalog(sd15))
    attn = sd15.get_submodule(selection.paths[0])
    seen = []
    bound_class_forward = attn.forward

    def tiling_forward(x, *args, **kwargs):
        seen.append(x.shape[0])
        b, n, c = x.shape
        tiles = x.reshape(b * 2, n // 2, c)  # attention within two tiles, like hypertile
        return bound_class_forward(tiles, *args, **kwargs).reshape(b, n, c)

    attn.forward = tiling_forward
    try:
        plain = run(sd15, inputs)
        marks = RowMarks()
        with AttentionPatch(sd15, selection, marks=marks), marks.marking([False, True]):
            out = run(sd15, inputs)
        assert attn.__dict__["forward"] is tiling_forward
        assert seen[-1] == 1  # only the unmarked row reached the tiled forward
        assert_exact(out[0], plain[0], what="unmarked row")
        ref_model = reference_unet(sd15, {selection.paths[0]: 1.0})
        ref = run(ref_model, inputs)
        assert_exact(out[1], ref[1], what="marked row")
    finally:
        del attn.forward


def test_tiled_attention_batch_expands_the_row_mask(sd15):
    """A wrapper installed after PAG may tile the batch (b → b·k rows); the mask follows the tiles."""
    inputs = unet_inputs(sd15, batch=2)
    selection = resolve_layers("u0", build_catalog(sd15))
    attn = sd15.get_submodule(selection.paths[0])
    marks = RowMarks()
    with AttentionPatch(sd15, selection, marks=marks):
        pag_forward = attn.forward

        def tiling_after(x, *args, **kwargs):
            b, n, c = x.shape
            return pag_forward(x.reshape(b * 4, n // 4, c), *args, **kwargs).reshape(b, n, c)

        attn.forward = tiling_after
        with marks.marking([False, True]):
            out = run(sd15, inputs)
        attn.forward = pag_forward
    ref = run(reference_unet(sd15, {selection.paths[0]: 1.0}), inputs)
    assert_exact(out[1], ref[1])  # identity attention is per token, so tiling changes nothing
    assert not any("forward" in m.__dict__ for m in sd15.modules())


def test_a_wrapper_captured_by_someone_else_passes_through_after_exit(sd15):
    inputs = unet_inputs(sd15, batch=1)
    selection = resolve_layers("mid", build_catalog(sd15))
    attn = sd15.get_submodule(selection.paths[0])
    marks = RowMarks()
    with AttentionPatch(sd15, selection, marks=marks):
        captured = attn.forward
        attn.forward = lambda x, *a, **k: captured(x, *a, **k)  # another extension wraps PAG's wrapper
    plain = run(sd15, inputs)
    with marks.marking([True]):
        assert torch.equal(run(sd15, inputs), plain)  # the stale wrapper no longer perturbs
    del attn.forward


def test_sgm_attention_kwargs_are_accepted(sdxl):
    selection = resolve_layers("m0.0", build_catalog(sdxl))
    attn = sdxl.get_submodule(selection.paths[0])
    x = torch.randn(2, 16, attn.to_q.in_features)
    extra = torch.randn(2, 3, attn.to_q.in_features)
    marks = RowMarks()
    with torch.no_grad(), AttentionPatch(sdxl, selection, marks=marks), marks.marking([False, True]):
        out = attn(x, context=None, additional_tokens=extra, n_times_crossframe_attn_in_self=0)
    with torch.no_grad():
        plain = attn(x[:1], additional_tokens=extra[:1])
        assert_exact(out[0], plain[0], what="unmarked row")
        assert_exact(out[1], attn.to_out(attn.to_v(x[1:]))[0], what="marked row")


def test_mask_that_does_not_fit_the_batch_is_an_error(sd15):
    inputs = unet_inputs(sd15, batch=3)
    with pytest.raises(RuntimeError, match="does not fit"):
        patched_run(sd15, "mid", [True, False], inputs)
    assert not any("forward" in m.__dict__ for m in sd15.modules())


def test_unknown_layer_leaves_model_untouched(sd15):
    before = snapshot(sd15)
    with pytest.raises(PagError):
        resolve_layers("u9", build_catalog(sd15))
    assert_same_snapshot(before, snapshot(sd15))
