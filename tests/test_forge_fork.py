"""The shared-prefix fork on the Forge 2 and reForge doubles (``lib_pag/forge_fork.py``).

Each test runs real jobs through the host doubles (the hosts' UNet forwards mirrored statement for
statement over a real ldm UNet) and compares the fork with the unforked twinned call
(``SD_WEBUI_PAG_NO_FORK=1``) and with the independent reference of ``tests/test_forge.py``.
"""

import logging

import pytest
import torch

from lib_pag import forge, forge_fork
from lib_pag.fork import DISABLE_ENV
from tests.forge_double.webui import Processing, SdModel, deep_equal, snapshot_options
from tests.exactness import assert_exact, assert_visible, rel_err
from tests.test_forge import check, host, pag, run, unet  # noqa: F401  (fixtures; float64: tests/exactness.py)


class Rows:
    """Forward pre-hooks on an input-block and an output-block SpatialTransformer: the rows each call had."""

    def __init__(self, unet):
        self.inputs, self.outputs = [], []
        self.handles = [
            unet.input_blocks[1][1].register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].shape[0])),
            unet.output_blocks[3][1].register_forward_pre_hook(lambda m, a: self.outputs.append(a[0].shape[0])),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def both(host, params, monkeypatch, **kw):
    """(forked results, unforked results, rows seen forked, rows seen unforked) of the same job."""
    seen = []
    outs = []
    for off in (False, True):
        if off:
            monkeypatch.setenv(DISABLE_ENV, "1")
        else:
            monkeypatch.delenv(DISABLE_ENV, raising=False)
        rows = Rows(host.unet)
        try:
            p, results = run(host, params, p=kw.get("p_factory", lambda: None)(), **{k: v for k, v in kw.items() if k != "p_factory"})
        finally:
            rows.close()
        outs.append(results)
        seen.append(rows)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return outs[0], outs[1], seen[0], seen[1]


def assert_same(a, b):
    """Step by step the same numbers (to float64 rounding: ``tests.exactness``)."""
    for (_, got), (_, want) in zip(a, b):
        assert_exact(got, want, what="forked vs unforked")


def test_fork_equals_unforked_and_the_prefix_runs_on_the_host_rows_only(host, monkeypatch):
    params = pag(layers="mid,up")
    forked, unforked, rows, rows_off = both(host, params, monkeypatch, batch=2)
    assert_same(forked, unforked)
    check(host, params, forked, 5.0, [3.0] * 3)
    # cond ×2 + uncond ×2 (+ 2 twins): the input blocks see 4 rows with the fork, 6 without; the output blocks 6
    assert rows.inputs == [4] * 3 and rows.outputs == [6] * 3
    assert rows_off.inputs == [6] * 3 and rows_off.outputs == [6] * 3


def test_fork_before_an_output_block_and_and_prompts(host, monkeypatch):
    params = pag(layers="u4,u7")  # the first perturbed layer is in output_blocks[4]
    forked, unforked, rows, _ = both(host, params, monkeypatch, weights=(0.7, 1.2))
    assert_same(forked, unforked)  # (the AND reference itself is checked in test_forge.py)
    # two AND entries + uncond = 3 host rows, 2 twins; output_blocks[3] is still in the prefix
    assert rows.inputs == [3] * 3 and rows.outputs == [3] * 3


def _patched_base(host, kind, calls):
    base = host.patcher.clone()
    to = base.model_options.setdefault("transformer_options", {})
    patches = to.setdefault("patches", {})

    def scale_input(h, options):
        calls.append((options["block"], h.shape[0]))
        return h * 1.01 if options["block"] == ("input", 4) else h

    def scale_output(h, hsp, options):
        calls.append((options["block"], h.shape[0]))
        return (h * 0.99, hsp) if options["block"] == ("output", 2) else (h, hsp)

    def modifier(h, when, options):
        if when == "after" and options["block"] == ("input", 2):
            calls.append((options["block"], h.shape[0]))
            return h + 0.01
        return h

    def emb_patch(emb, channels, options):
        calls.append(("emb", emb.shape[0]))
        return emb * 1.02

    if kind == "input_block_patch":
        patches["input_block_patch"] = [scale_input]
    elif kind == "input_block_patch_after_skip":
        patches["input_block_patch_after_skip"] = [scale_input]
    elif kind == "output_block_patch":
        patches["output_block_patch"] = [scale_output]
    elif kind == "block_modifiers":
        to["block_modifiers"] = [modifier]
    elif kind == "emb_patch":
        patches["emb_patch"] = [emb_patch]
    return base


@pytest.mark.parametrize("kind", ["input_block_patch", "input_block_patch_after_skip", "output_block_patch",
                                  "block_modifiers", "emb_patch"])
def test_other_extensions_unet_patches_run_once_per_call_and_stay_exact(host, monkeypatch, kind):
    if kind == "block_modifiers" and host.kind != "forge2" or kind == "emb_patch" and host.kind != "reforge":
        pytest.skip(f"{kind} is a {'Forge 2' if kind == 'block_modifiers' else 'reForge'} patch")
    calls_on, calls_off = [], []
    params = pag(layers="mid,up")
    results = []
    for calls, off in ((calls_on, False), (calls_off, True)):
        if off:
            monkeypatch.setenv(DISABLE_ENV, "1")
        base = _patched_base(host, kind, calls)
        before = snapshot_options(base.model_options)
        p, res = run(host, params, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))
        assert deep_equal(base.model_options, before)
        results.append(res)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert_same(results[0], results[1])
    assert calls_on and len(calls_on) == len(calls_off)  # each patch ran as often with the fork as without
    # the patch saw the host's own rows in the prefix (2: cond + uncond) and the twinned batch (3) after it;
    # Forge 2's block modifiers see every block and may carry state across them: no fork while one is set
    expect_prefix = kind not in ("output_block_patch", "block_modifiers")
    assert {rows for _, rows in calls_on} == ({2} if expect_prefix else {3})
    assert {rows for _, rows in calls_off} == {3}
    # and it had an effect: without it the images differ
    plain = run(host, params)[1]
    effect = max(rel_err(a, b) for (_, a), (_, b) in zip(results[0], plain))
    assert effect > 1e-4
    assert_visible(effect, what="the patch's effect")


def test_a_changed_host_forward_turns_the_fork_off(host, monkeypatch, caplog):
    dm = host.patcher.model.diffusion_model
    name = "forward" if host.kind == "forge2" else "_forward"
    original = getattr(type(dm), name)

    def other_forward(self, *args, **kwargs):  # e.g. an extension that wraps the class's forward
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(dm), name, other_forward)
    params = pag(layers="mid,up")
    rows = Rows(host.unet)
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        try:
            p, results = run(host, params)
        finally:
            rows.close()
    check(host, params, results, 5.0, [3.0] * 3)
    assert rows.inputs == [3] * 3  # no shared prefix
    assert "PAG fork off: the UNet forward is" in caplog.text and "other_forward" in caplog.text


def test_unmirrored_names_what_a_changed_forward_uses():
    namespace = {}
    exec("def forward(self, x, transformer_options={}):\n"
         "    for p in transformer_options.get('patches', {}).get('brand_new_patch', []):\n"
         "        x = p(x)\n"
         "    return self.new_part(x)\n", namespace)
    fn = namespace["forward"]
    fn.__qualname__, fn.__module__ = "IntegratedUNet2DConditionModel.forward", "backend.nn.unet"
    reason = forge_fork.unmirrored(fn, forge_fork.FORGE2_FORWARD)
    assert "brand_new_patch" in reason and "new_part" in reason
    fn2 = namespace["forward"].__class__(fn.__code__, {}, "forward")
    fn2.__qualname__, fn2.__module__ = "Other.forward", "backend.nn.unet"
    assert "not backend.nn.unet.IntegratedUNet2DConditionModel.forward" in forge_fork.unmirrored(fn2, forge_fork.FORGE2_FORWARD)


def test_forge2_object_patch_set_while_loaded_and_put_back(host):
    if host.kind != "forge2":
        pytest.skip("Forge 2 only")
    from backend import memory_management

    dm = host.patcher.model.diffusion_model
    params = pag(layers="mid,up")
    p, results = run(host, params)
    check(host, params, results, 5.0, [3.0] * 3)
    clone = p.sd_model.forge_objects.unet
    assert forge_fork.OBJECT_PATCH in clone.object_patches and forge_fork.OBJECT_PATCH not in host.patcher.object_patches
    assert getattr(dm.__dict__.get("forward"), "__pag_fork__", False)  # set while PAG's clone is loaded
    forge.end(p)
    memory_management.load_models_gpu([host.patcher])  # the next job without PAG loads the plain patcher
    own = dm.__dict__.get("forward")
    assert own is None or own.__func__ is type(dm).forward
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 7, 32)
    with torch.no_grad():  # and the UNet is the host's own again
        assert torch.equal(dm(x, torch.tensor([500.0]), context=ctx, transformer_options={}),
                           type(dm).forward(dm, x, torch.tensor([500.0]), context=ctx, transformer_options={}))


def test_forge2_someone_elses_object_patch_is_left_alone(host, caplog):
    if host.kind != "forge2":
        pytest.skip("Forge 2 only")
    dm = host.patcher.model.diffusion_model
    seen = []

    def their_forward(*args, **kwargs):
        seen.append(args[0].shape[0])
        return type(dm).forward(dm, *args, **kwargs)

    base = host.patcher.clone()
    base.add_object_patch(forge_fork.OBJECT_PATCH, their_forward)
    params = pag(layers="mid,up")
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        p, results = run(host, params, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))
        forge.end(p)
    check(host, params, results, 5.0, [3.0] * 3)
    assert seen == [3, 3, 3]  # theirs ran on every (twinned) call
    assert p.sd_model.forge_objects.unet.object_patches[forge_fork.OBJECT_PATCH] is their_forward
    assert "no shared-prefix fork (another object patch on diffusion_model.forward)" in caplog.text  # DEBUG, per pass
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]  # the job's one console line
    assert len(summary) == 1 and summary[0].endswith("; no fork (another object patch on diffusion_model.forward)"), summary


def test_reforge_wrapper_rides_only_the_twinned_call_and_other_wrappers_run(host):
    if host.kind != "reforge":
        pytest.skip("reForge only")
    from ldm_patched.modules import patcher_extension as pe

    seen = []

    def theirs(executor, x, *args, **kwargs):
        seen.append(x.shape[0])
        return executor(x, *args, **kwargs)

    base = host.patcher.clone()
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "theirs", theirs, base.model_options, is_model_options=True)
    before = snapshot_options(base.model_options)
    params = pag(layers="mid,up")
    rows = Rows(host.unet)
    try:
        p, results = run(host, params, p=Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3))
    finally:
        rows.close()
    check(host, params, results, 5.0, [3.0] * 3)
    assert seen == [3, 3, 3] and rows.inputs == [2] * 3  # theirs ran (outside PAG's) and the prefix was shared
    assert deep_equal(base.model_options, before)
    installed = p.sd_model.forge_objects.unet.model_options["transformer_options"]["wrappers"]["diffusion_model"]
    assert list(installed) == ["theirs"]  # PAG's wrapper is per call, never in the patcher's options


def test_tiled_calls_fork_within_each_tile(host, monkeypatch):
    """A MultiDiffusion-style wrapper stacking k tiles of the twinned batch into one UNet call."""
    seen = []

    def tiles(apply_model, args):
        x = args["input"]
        k = 2
        c = dict(args["c"])
        c = {key: (torch.cat([v] * k) if torch.is_tensor(v) and v.shape[0] == x.shape[0] else v) for key, v in c.items()}
        out = apply_model(torch.cat([x] * k), torch.cat([args["timestep"]] * k), **c)
        seen.append(out.shape[0])
        return out[:x.shape[0]]

    def factory():
        base = host.patcher.clone()
        base.set_model_unet_function_wrapper(tiles)
        params = pag(layers="mid,up")
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    params = pag(layers="mid,up")
    forked, unforked, rows, _ = both(host, params, monkeypatch, p_factory=factory)
    assert_same(forked, unforked)
    check(host, params, forked, 5.0, [3.0] * 3)
    assert rows.inputs == [4] * 3 and rows.outputs == [6] * 3  # 2 tiles × (cond + uncond) in the prefix
