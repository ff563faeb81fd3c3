"""Regressions from an adversarial review of the Forge 2 / reForge shared-prefix fork (lib_pag/forge_fork.py).

Each test runs the same job forked and unforked (SD_WEBUI_PAG_NO_FORK=1) through the host doubles and
asserts that the fork gives the unforked numbers (or runs the same foreign code). Each failed on 4970eff.
"""

import torch

from lib_pag import forge
from lib_pag.fork import DISABLE_ENV
from tests.forge_double.webui import Processing, SdModel
from tests.exactness import assert_visible, rel_err
from tests.test_forge_fork import assert_same, both
from tests.test_forge import host, inputs, pag, run, unet  # noqa: F401  (fixtures; float64: tests/exactness.py)


def _both(host, params, monkeypatch, factory):
    """[forked results, unforked results] of the same job, a fresh ``p`` from ``factory()`` each time."""
    forked, unforked, _, _ = both(host, params, monkeypatch, p_factory=factory)
    return [forked, unforked]


def _max_err(a, b):
    return max(rel_err(x, y) for (_, x), (_, y) in zip(a, b))


def _assert_same_and_visible(host, params, forked, unforked):
    """forked == unforked (float64 rounding), and the other extension's change is far above that bound:
    the mistakes these regressions caught (a wrong residual, lost state, a skipped patch) are of its size."""
    assert_same(forked, unforked)
    assert_visible(_max_err(forked, run(host, params)[1]), what="the other extension's effect")


# --- 1. ControlNet residual lists after an output-block fork point ----------------------------------

def _skip_shapes(ldm_unet):
    """The shapes (C, H, W) of the 12 input-block outputs for an 8x8 latent (ControlNet's 'output' list)."""
    shapes = []
    hooks = [b.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[1:]))) for b in ldm_unet.input_blocks]
    try:
        with torch.no_grad():
            ldm_unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), context=torch.zeros(1, 7, 32))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def test_controlnet_output_residuals_follow_the_popped_lists_after_an_output_fork(host, monkeypatch):
    """ControlNet's ``control`` dict is ``{'input': [...], 'middle': [m], 'output': [r0..r11]}``; the host pops
    ``output`` from the end, one per output block (Forge ``backend/nn/unet.py`` apply_control). With the fork
    before ``output_blocks[3]`` the prefix pops r11, r10, r9 from its row-subset *copy*; the suffix then pops
    from the full, unpopped lists, so ``output_blocks[3]`` gets r11 again instead of r8."""
    shapes = _skip_shapes(host.unet)
    g = torch.Generator().manual_seed(5)
    patterns = [0.05 * torch.randn(1, *s, generator=g) for s in shapes]
    middle = 0.05 * torch.randn(1, *shapes[-1], generator=g)

    def with_control(apply_model, args):  # a ControlNet-style residual source: per row, from x
        x = args["input"]
        level = x.flatten(1).mean(1).view(-1, 1, 1, 1)
        control = {"input": [], "middle": [level * middle],
                   # only the two deepest skips are controlled: every shape stays broadcast-compatible, so the
                   # mistake is silent (with all twelve, Forge 2 prints "control could not be applied" and
                   # skips the add (unet.py:48-51), reForge resizes the wrong residual (openaimodel.py:375-387))
                   "output": [None] * 10 + [level * patterns[10], level * patterns[11]]}
        return apply_model(x, args["timestep"], **{**args["c"], "control": control})

    params = pag(layers="u0")  # first perturbed attn1 in output_blocks[3]

    def factory():
        base = host.patcher.clone()
        base.set_model_unet_function_wrapper(with_control)
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    forked, unforked = _both(host, params, monkeypatch, factory)
    _assert_same_and_visible(host, params, forked, unforked)


# --- 2. A stateful block modifier (Forge 2 ControlNet tile_colorfix) ---------------------------------

def test_forge2_block_modifier_state_from_the_prefix_matches_the_suffix_rows(host, monkeypatch):
    """extensions-builtin/forge_preprocessor_tile/scripts/preprocessor_tile.py:53-73: ``block_proc`` keeps
    ``h[:, :4]`` from ('input', 0, 'before') and combines it with ``h`` at ('last', 0, 'after'). Forked, the
    first runs on the host's rows only (2) and the second on the twinned batch (3)."""
    if host.kind != "forge2":
        return  # reForge's UNet never calls block_modifiers
    state = {}

    def block_proc(h, flag, to):
        location, block_id = to["block"]
        if location == "input" and block_id == 0 and flag == "before":
            state["x"] = h[:, :4]
        if location == "last" and block_id == 0 and flag == "after":
            return 0.9 * h + 0.1 * state["x"]
        return h

    params = pag(layers="mid,up")

    def factory():
        base = host.patcher.clone()
        base.model_options["transformer_options"]["block_modifiers"] = [block_proc]
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    forked, unforked = _both(host, params, monkeypatch, factory)
    _assert_same_and_visible(host, params, forked, unforked)


# --- 3. transformer_options changed between PAG's wrapper and the UNet -------------------------------

def test_options_changed_inside_pags_wrapper_reach_the_prefix(host, monkeypatch):
    """A model_function_wrapper set before PAG's runs inside it (PAG chains ``previous``) and may hand the
    UNet a changed ``transformer_options`` (here: an extra input_block_patch). The prefix runs on
    ``plan.prefix_options``, a snapshot taken before, so the patch never runs on the input blocks."""
    calls = []

    def scale(h, to):
        calls.append(h.shape[0])
        return h * 1.05 if to["block"] == ("input", 4) else h

    def theirs(apply_model, args):
        c = dict(args["c"])
        to = dict(c["transformer_options"])
        patches = dict(to.get("patches", {}))
        patches["input_block_patch"] = list(patches.get("input_block_patch", [])) + [scale]
        to["patches"] = patches
        c["transformer_options"] = to
        return apply_model(args["input"], args["timestep"], **c)

    params = pag(layers="mid,up")

    def factory():
        base = host.patcher.clone()
        base.set_model_unet_function_wrapper(theirs)
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    forked, unforked = _both(host, params, monkeypatch, factory)
    _assert_same_and_visible(host, params, forked, unforked)


def test_reforge_outer_diffusion_model_wrapper_options_reach_the_prefix(host, monkeypatch):
    """The same through reForge's own route: an outer DIFFUSION_MODEL wrapper that passes the executor a
    changed ``transformer_options``."""
    if host.kind != "reforge":
        return
    from ldm_patched.modules import patcher_extension as pe

    def scale(h, to):
        return h * 1.05 if to["block"] == ("input", 4) else h

    def theirs(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        to = dict(transformer_options)
        to["patches"] = {**to.get("patches", {}), "input_block_patch": [scale]}
        return executor(x, timesteps, context, y, control, to, **kwargs)

    params = pag(layers="mid,up")

    def factory():
        base = host.patcher.clone()
        pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "theirs", theirs, base.model_options, is_model_options=True)
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    forked, unforked = _both(host, params, monkeypatch, factory)
    _assert_same_and_visible(host, params, forked, unforked)


# --- 4. a replaced forward the fork does not see ------------------------------------------------------

def test_reforge_instance__forward_is_not_bypassed(host, monkeypatch):
    """reForge's UNetModel.forward runs ``self._forward`` (the executor's ``original``); an instance
    ``_forward`` (e.g. an object patch 'diffusion_model._forward') must run. PAG's wrapper checks only
    ``type(unet)._forward`` and walks the class code instead."""
    if host.kind != "reforge":
        return
    dm = host.patcher.model.diffusion_model
    seen = []

    def their_forward(x, *args, **kwargs):
        seen.append(x.shape[0])
        return type(dm)._forward(dm, x, *args, **kwargs)

    dm._forward = their_forward
    try:
        monkeypatch.setenv(DISABLE_ENV, "1")
        run(host, pag(layers="mid,up"))
        assert seen == [3, 3, 3]  # unforked: theirs runs on every call
        monkeypatch.delenv(DISABLE_ENV)
        seen.clear()
        run(host, pag(layers="mid,up"))
    finally:
        del dm._forward
    assert seen == [3, 3, 3]


def test_forge2_instance_forward_set_after_pag_installs_still_runs(host, monkeypatch):
    """Forge 2: PAG checks for an instance ``forward`` when it adds its object patch (process_before_every_sampling),
    but Forge sets object patches at load time (``forge_patch_model``, backend/patcher/base.py:257-265), and
    PAG's pass-through calls the *class* forward. A forward wrapped by a script that runs after PAG's is
    silently dropped for the whole job; without the fork it runs."""
    if host.kind != "forge2":
        return
    dm = host.patcher.model.diffusion_model
    seen = {}

    def go(off):
        if off:
            monkeypatch.setenv(DISABLE_ENV, "1")
        else:
            monkeypatch.delenv(DISABLE_ENV, raising=False)
        calls = seen.setdefault(off, [])
        original = dm.forward

        def their_forward(x, *args, **kwargs):
            calls.append(x.shape[0])
            return original(x, *args, **kwargs)

        params = pag(layers="mid,up")
        p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=3)

        def hook(pp):
            forge.apply(pp, pp.script_args)
            dm.forward = their_forward  # a later script's process_before_every_sampling wraps the UNet

        den = p.sample_pass(hook)
        den.total_steps = 3
        x, cond, uncond = inputs()
        try:
            with torch.no_grad():
                for s in (6.0, 2.5, 0.7):
                    den(x, torch.full((1,), s), uncond, cond, [[(0, 1.0)]], 5.0)
        finally:
            forge.end(p)
            host.memory.load_models_gpu([host.patcher])
            dm.__dict__.pop("forward", None)
            host.memory.current_loaded_models.clear()

    go(True)
    go(False)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert seen[True] == [3, 3, 3]
    assert seen[False] == seen[True]


# --- 5. aliasing of h and hs[-1] at a middle fork (Forge 2 block modifiers) -------------------------

def test_forge2_in_place_middle_before_modifier_keeps_the_skip_alias(host, monkeypatch):
    """Unforked, ``h`` entering ('middle', 0) *is* ``hs[-1]`` (no input_block_patch_after_skip), so an in-place
    'before' modifier also changes the skip output_blocks[0] pops. The fork gathers h and hs separately."""
    if host.kind != "forge2":
        return

    def modifier(h, flag, to):
        if to["block"] == ("middle", 0) and flag == "before":
            h.mul_(1.1)
        return h

    params = pag(layers="mid,up")

    def factory():
        base = host.patcher.clone()
        base.model_options["transformer_options"]["block_modifiers"] = [modifier]
        return Processing(SdModel(base), [params.to_dict()], host.denoiser, steps=3)

    forked, unforked = _both(host, params, monkeypatch, factory)
    _assert_same_and_visible(host, params, forked, unforked)
