"""Full A1111 generations (WebUI double, real k-diffusion, real ldm UNet) next to other extensions.

- Soft inpainting (A1111 1.8–1.10's built-in, ``tests/webui/scripts/soft_inpainting.py``): at every step
  the denoised output equals the host's sigma-dependent blend applied to CFG + PAG term, computed
  independently; the PAG term passes through the blend exactly like CFG (before it, not after it).
- A FreeU/Deep-Shrink-style forward hook on ``middle_block``: the shared-prefix fork, the unforked batch
  and the separate pass give the same image, and the hook runs as often as in the same job without PAG.
"""

import pytest
import torch

from a1111_harness import Recorder, expected_output, img2img, load_webui, reference_model, relative_error, txt2img, unload_webui
from lib_pag import fork
from modules import processing, scripts, sd_models_double, shared
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64

pytestmark = pytest.mark.usefixtures("float64")  # every path comparison in float64 (tests/exactness.py)


def latents(processed):
    return torch.stack([torch.as_tensor(i) for i in processed.images])


def enable_builtin(p, title, *values):
    """Set the always-on script ``title``'s first args in ``p.script_args``."""
    script = next(s for s in p.scripts.alwayson_scripts if s.title() == title)
    args = list(p.script_args)
    args[script.args_from:script.args_from + len(values)] = values
    p.script_args = tuple(args)
    return script


@pytest.fixture()
def inpaint_webui(monkeypatch):
    model = to_float64(sd_models_double.make_sd15_inpaint_model(seed=8))
    load_webui(model, builtin=("soft_inpainting",))
    yield model
    unload_webui()


def soft_mask():
    """A 16×16 latent mask: 1 inside, 0 outside, a soft band (blurred edge) between."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    distance = torch.maximum((yy - 7.5).abs(), (xx - 7.5).abs())
    return (1 - ((distance - 2.5) / 3).clamp(0, 1))[None]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_soft_inpainting_blends_the_pag_term_like_cfg(inpaint_webui, monkeypatch, sampler, rescale):
    model = inpaint_webui
    init = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = soft_mask()
    assert bool(((mask > 0.05) & (mask < 0.95)).any())
    rec = Recorder(monkeypatch)
    p = img2img([{"enabled": True, "scale": 3.0, "layers": "mid,up", "rescale": rescale}], init, mask,
                steps=4, sampler_name=sampler, denoising_strength=1.0)
    soft = enable_builtin(p, "Soft Inpainting", True)
    double = next(d.module for d in scripts.scripts_data if d.script_class is type(soft))  # as the host loaded it
    get_modified_nmask, latent_blend = double.get_modified_nmask, double.latent_blend
    processing.process_images(p)
    assert p.extra_generation_params.get("Soft inpainting enabled") is True and not p.mask_round
    assert rec.calls and rec.calls[0].sigma.max() > 10

    def host_blend(result, call):
        return latent_blend(soft.settings, call.init_latent, result, get_modified_nmask(soft.settings, call.nmask, call.sigma[0]))

    ref = reference_model(model, "mid,up")
    for call in rec.calls:
        if rescale:
            continue  # rescale is checked against the hard-mask formula below
        expected = expected_output(call, model, ref, 3.0, blend=host_blend)
        assert_exact(call.out, expected, what=f"step {call.step}")
        # the old order (PAG term after the blend, times nmask) is far from it in the soft band
        no_pag = expected_output(call, model, ref, 0.0, blend=host_blend)
        with_pag_pre_blend = expected_output(call, model, ref, 3.0, blend=lambda r, c: r)
        no_pag_pre_blend = expected_output(call, model, ref, 0.0, blend=lambda r, c: r)
        after = no_pag + (with_pag_pre_blend - no_pag_pre_blend) * call.nmask
        assert relative_error(call, after) > 1e-4
        assert_visible(relative_error(call, after), what="the old order's difference")
    if rescale:
        plain = img2img([{"enabled": True, "scale": 3.0, "layers": "mid,up"}], init, mask, steps=4,
                        sampler_name=sampler, denoising_strength=1.0)
        enable_builtin(plain, "Soft Inpainting", True)
        assert not torch.equal(latents(processing.process_images(plain)), latents(processing.process_images(p)))


def test_hard_mask_blend_unchanged(inpaint_webui, monkeypatch):
    """Without soft inpainting the blend is linear: the term before it is the term times nmask after it."""
    model = inpaint_webui
    init = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = (soft_mask() > 0.5).float()
    rec = Recorder(monkeypatch)
    processing.process_images(img2img([{"enabled": True, "scale": 3.0, "layers": "mid"}], init, mask, steps=3))
    ref = reference_model(model, "mid")
    for call in rec.calls:
        assert_exact(call.out, expected_output(call, model, ref, 3.0), what=f"step {call.step}")
    assert_visible(max(relative_error(call, expected_output(call, model, ref, 0.0)) for call in rec.calls), what="PAG term")


@pytest.fixture()
def sd15_webui(monkeypatch):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", True)
    model = to_float64(sd_models_double.make_sd15_model(seed=9))
    load_webui(model)
    yield model
    unload_webui()


def test_middle_block_hook_runs_and_fork_stays_exact(sd15_webui, monkeypatch):
    """The issue's case: Euler, 2 steps, CFG 5, PAG 3 on mid, a forward hook ×1.5 on middle_block (128², so
    the middle block has 2×2 tokens: with one token self-attention is the identity and PAG does nothing)."""
    unet = sd15_webui.model.diffusion_model
    calls = []

    def freeu_like(_m, _args, out):
        calls.append(out.shape[0])
        return out * 1.5

    handle = unet.middle_block.register_forward_hook(freeu_like)
    try:
        def job(values, **kw):
            calls.clear()
            out = latents(processing.process_images(txt2img(values, steps=2, cfg_scale=5.0, width=128, height=128, **kw)))
            return out, list(calls)

        plain, plain_calls = job([False])
        forked, forked_calls = job([{"enabled": True, "scale": 3.0, "layers": "mid"}])
        monkeypatch.setenv(fork.DISABLE_ENV, "1")
        unforked, unforked_calls = job([{"enabled": True, "scale": 3.0, "layers": "mid"}])
        monkeypatch.delenv(fork.DISABLE_ENV)
        separate, _ = job([{"enabled": True, "scale": 3.0, "layers": "mid", "mode": "separate"}])
    finally:
        handle.remove()
    assert len(forked_calls) == len(plain_calls) == len(unforked_calls) == 2  # once per step, as without PAG
    assert forked_calls == unforked_calls == [3, 3]  # cond, its twin, uncond: the hook saw every row
    assert_exact(forked, unforked, what="forked vs unforked")
    assert_exact(forked, separate, what="forked vs separate")
    assert rel_err(plain, forked) > 1e-3
    assert_visible(rel_err(plain, forked), what="PAG's effect")


# --- Dynamic Thresholding (mcmonkey4eva/sd-dynamic-thresholding): a CFG denoiser subclass -------------

class DynThreshDenoiser:
    """Mixin mirroring ``scripts/dynamic_thresholding.py: CustomCFGDenoiser.combine_denoised`` and
    ``dynthres_core.py: DynThresh.dynthresh`` (constant mimic/CFG modes, percentile 1): **every row before the
    uncond rows is a cond row** (``x_out[:-uncond rows]``, grouped per image), CFG at the mimic scale and at the
    real scale, both centred per channel, the real one clamped and rescaled to the mimic one's range."""

    mimic_scale = 3.0

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        if isinstance(uncond, dict):
            uncond = uncond["crossattn"]
        u = x_out[-uncond.shape[0]:]
        cond = x_out[:-uncond.shape[0]]
        per_image = cond.shape[0] / u.shape[0]
        assert per_image == int(per_image), "Expected # of conds per batch to be constant across batches"
        weights = torch.tensor(conds_list).select(2, 1).reshape(len(conds_list), -1, 1, 1, 1)
        relative = ((cond.reshape((-1, int(per_image)) + u.shape[1:]) - u.unsqueeze(1)) * weights).sum(1)
        mimic, real = u + relative * self.mimic_scale, u + relative * cond_scale
        mim, cfg = mimic.flatten(2), real.flatten(2)
        mim_means, cfg_means = mim.mean(2, keepdim=True), cfg.mean(2, keepdim=True)
        mim_max = (mim - mim_means).abs().max(2, keepdim=True).values
        cfg_max = (cfg - cfg_means).abs().max(2, keepdim=True).values
        actual = torch.maximum(cfg_max, mim_max)
        out = (cfg - cfg_means).clamp(-actual, actual) / actual * mim_max + cfg_means
        return out.unflatten(2, u.shape[2:])


@pytest.fixture()
def dynthresh(sd15_webui, monkeypatch):
    from modules import sd_samplers_kdiffusion

    class CustomCFGDenoiser(DynThreshDenoiser, sd_samplers_kdiffusion.CFGDenoiserKDiffusion):
        pass

    # upstream registers "<sampler>_dynthres" samplers whose model_wrap_cfg is its subclass
    monkeypatch.setattr(sd_samplers_kdiffusion, "CFGDenoiserKDiffusion", CustomCFGDenoiser)
    return sd15_webui


@pytest.mark.parametrize("batch_size,cfg_scale", [(1, 7.0), (2, 7.0), (1, 1.0)])
def test_dynamic_thresholding_sees_the_batch_it_would_see_without_pag(dynthresh, batch_size, cfg_scale):
    def job(values):
        p = txt2img(values, steps=3, cfg_scale=cfg_scale, batch_size=batch_size, width=128, height=128)
        return latents(processing.process_images(p))

    pag = {"enabled": True, "scale": 3.0, "layers": "mid,up"}
    batched = job([pag])
    separate = job([{**pag, "mode": "separate"}])
    plain = job([False])
    assert_exact(batched, separate, what="batched vs separate")
    assert rel_err(plain, batched) > 1e-3
    assert_visible(rel_err(plain, batched), what="PAG's effect")


# --- UNet engines that run no PyTorch attention (TensorRT's sd_unet) ---------------------------------

def rows_per_unet_call(unet):
    rows = []
    handle = unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_active_sd_unet_engine_is_refused_without_extra_rows(sd15_webui, monkeypatch, caplog):
    import sys
    import types

    engine = types.ModuleType("modules.sd_unet")

    class TrtUnet:  # stands for the TensorRT extension's SdUnet while it is selected
        pass

    engine.current_unet = TrtUnet()
    monkeypatch.setitem(sys.modules, "modules.sd_unet", engine)
    rows, handle = rows_per_unet_call(sd15_webui.model.diffusion_model)
    try:
        with caplog.at_level("WARNING", logger="sd_webui_pag"):
            p = txt2img([{"enabled": True, "scale": 3.0}], steps=2)
            processed = processing.process_images(p)
    finally:
        handle.remove()
    assert rows == [2, 2]  # cond + uncond only
    assert "alternative UNet (TrtUnet" in caplog.text
    assert "PAG scale" not in processed.infotexts[0] and "PAG note: \"not applied: an alternative UNet" in processed.infotexts[0]
    assert any("PAG not applied" in c for c in p.comments)


def test_unet_that_never_calls_attn1_is_refused(sd15_webui, caplog):
    """An engine in the UNet's place (here an instance forward computing with a private copy): the chosen
    attn1 modules never run, so the first perturbed call tells, PAG stops and says so."""
    import copy

    unet = sd15_webui.model.diffusion_model
    private = copy.deepcopy(unet)
    unet.forward = lambda *args, **kwargs: private(*args, **kwargs)
    rows, handle = rows_per_unet_call(unet)
    try:
        with caplog.at_level("WARNING", logger="sd_webui_pag"):
            p = txt2img([{"enabled": True, "scale": 3.0}], steps=3, width=128, height=128)
            pag = latents(processing.process_images(p))
        plain = latents(processing.process_images(txt2img([False], steps=3, width=128, height=128)))
    finally:
        handle.remove()
        del unet.forward
    assert rows[:3] == [3, 2, 2]  # one call with the twin, then none
    assert "without calling the chosen attn1 modules" in caplog.text
    assert "PAG scale" not in p.extra_generation_params and p.extra_generation_params["PAG note"].startswith("not applied")
    assert torch.equal(pag, plain)


# --- Tiled Diffusion / MultiDiffusion (pkuliyi2015/multidiffusion-upscaler-for-automatic1111) ---------

def multidiffusion_forward(original, tile=8, overlap=4, tile_batch=2):
    """Mirrors ``tile_methods/multidiffusion.py: MultiDiffusion.kdiff_forward`` / ``sample_one_step`` for grid
    tiles: an instance forward on the k-diffusion wrapper below the CFG denoiser that crops **every row** of
    the batch per tile, runs tiles ``tile_batch`` at a time **tile-major** (``cat([x[bbox] for bbox])``, sigma
    and text conds ``repeat``ed per tile) and averages the overlapping tile outputs."""

    def forward(x, sigma, cond):
        n, _, h, w = x.shape
        spots = [(y, xx) for y in range(0, h - tile + 1, tile - overlap) for xx in range(0, w - tile + 1, tile - overlap)]
        total, count = torch.zeros_like(x), torch.zeros((1, 1, h, w), dtype=x.dtype)

        def crop(t, y, xx):
            return t[:, :, y:y + tile, xx:xx + tile] if t.shape[-2:] == (h, w) else t

        for start in range(0, len(spots), tile_batch):
            group = spots[start:start + tile_batch]
            tiles = len(group)
            out = original(torch.cat([crop(x, y, xx) for y, xx in group]), sigma.repeat(tiles),
                           cond={"c_crossattn": [c.repeat(tiles, 1, 1) for c in cond["c_crossattn"]],
                                 "c_concat": [torch.cat([crop(c, y, xx) for y, xx in group]) for c in cond["c_concat"]]})
            for i, (y, xx) in enumerate(group):
                total[:, :, y:y + tile, xx:xx + tile] += out[i * n:(i + 1) * n]
                count[:, :, y:y + tile, xx:xx + tile] += 1
        return total / count

    return forward


@pytest.fixture()
def tiled_diffusion(sd15_webui, monkeypatch):
    from modules import sd_samplers

    create = sd_samplers.create_sampler
    unet_rows = []

    def create_sampler_hijack(name, model):  # upstream hijacks create_sampler in its process hook
        sampler = create(name, model)
        inner = sampler.model_wrap_cfg.inner_model
        inner.forward = multidiffusion_forward(inner.forward)
        return sampler

    monkeypatch.setattr(sd_samplers, "create_sampler", create_sampler_hijack)
    handle = sd15_webui.model.diffusion_model.register_forward_pre_hook(lambda m, args: unet_rows.append(args[0].shape[0]))
    yield unet_rows
    handle.remove()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_multidiffusion_tiles_keep_the_twins_in_place(tiled_diffusion, batch_size, caplog):
    """Each UNet call holds 2 tiles of the whole [cond, twins, uncond] batch, tile after tile; the fork
    shares the prefix within each tile."""
    def job(values):
        tiled_diffusion.clear()
        p = txt2img(values, steps=2, cfg_scale=5.0, batch_size=batch_size, width=128, height=128)
        return latents(processing.process_images(p)), list(tiled_diffusion)

    pag = {"enabled": True, "scale": 3.0, "layers": "mid,up"}
    with caplog.at_level("DEBUG", logger="sd_webui_pag"):
        batched, rows = job([pag])
    assert f"PAG fork before middle_block[1]: prefix on {4 * batch_size} of {6 * batch_size} rows" in caplog.text
    separate, _ = job([{**pag, "mode": "separate"}])
    plain, plain_rows = job([False])
    assert rows[0] == 2 * 3 * batch_size and plain_rows[0] == 2 * 2 * batch_size  # two tiles per call
    assert_exact(batched, separate, what="batched vs separate")
    assert rel_err(plain, batched) > 1e-3
    assert_visible(rel_err(plain, batched), what="PAG's effect")


# --- Kohya HRFix / Deep Shrink (wcde/sd-webui-kohya-hiresfix): blocks wrapped mid-job -----------------

class Scaler(torch.nn.Module):
    """Mirrors ``scripts/khrfix.py: Scaler``: resize the input, then the wrapped block."""

    def __init__(self, scale, block, calls):
        super().__init__()
        self.scale, self.block, self.calls = scale, block, calls

    def forward(self, x, *args):
        self.calls.append(self.scale)
        return self.block(torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="bicubic"), *args)


@pytest.fixture()
def deep_shrink(sd15_webui):
    """Mirrors ``KohyaHiresFix.process``'s ``denoiser_callback`` (one depth, early_out off): while the step is
    below ``s·total`` ``input_blocks[d]`` is wrapped in ``Scaler(0.5)`` and ``output_blocks[-(d+1)]`` in
    ``Scaler(2)`` — swapped into the UNet from a ``cfg_denoiser`` callback, mid-job — then unwrapped."""
    from modules import script_callbacks

    unet = sd15_webui.model.diffusion_model
    d, s, calls = 2, 0.6, []

    def denoiser_callback(params):
        if params.sampling_step < params.total_sampling_steps * s:
            if not isinstance(unet.input_blocks[d], Scaler):
                unet.input_blocks[d] = Scaler(0.5, unet.input_blocks[d], calls)
                unet.output_blocks[-(d + 1)] = Scaler(2.0, unet.output_blocks[-(d + 1)], calls)
        elif isinstance(unet.input_blocks[d], Scaler):
            unet.input_blocks[d] = unet.input_blocks[d].block
            unet.output_blocks[-(d + 1)] = unet.output_blocks[-(d + 1)].block

    script_callbacks.on_cfg_denoiser(denoiser_callback)
    yield calls
    script_callbacks.remove_callbacks_for_function(denoiser_callback)
    for blocks, i in ((unet.input_blocks, d), (unet.output_blocks, -(d + 1))):
        if isinstance(blocks[i], Scaler):
            blocks[i] = blocks[i].block


@pytest.mark.parametrize("method", ["identity", "blur"])
def test_blocks_wrapped_mid_job_keep_their_attention_patched(deep_shrink, method):
    """The layers were resolved before the wrap: the patch still finds the same attn1 modules (Scaler around
    their block changes the module path, not the modules)."""
    def job(values):
        deep_shrink.clear()
        p = txt2img(values, steps=4, cfg_scale=5.0, width=256, height=256)
        return latents(processing.process_images(p)), list(deep_shrink)

    pag = {"enabled": True, "scale": 3.0, "layers": "mid,up", "method": method, "blur_sigma": 2.0}
    batched, calls = job([pag])
    separate, _ = job([{**pag, "mode": "separate"}])
    plain, _ = job([False])
    assert calls.count(0.5) >= 2 and calls.count(2.0) >= 2  # the wrappers really ran (the first steps)
    assert_exact(batched, separate, what="batched vs separate")
    assert rel_err(plain, batched) > 1e-3
    assert_visible(rel_err(plain, batched), what="PAG's effect")


# --- Regional Prompter (hako-mikan/sd-webui-regional-prompter): told apart by its infotext ------------

def regional_prompter_script(calc_mode):
    """Mirrors what ``scripts/rp.py: Script.process`` leaves for others to see when it is on: its keys in
    ``p.extra_generation_params`` ("RP Active", "RP Calc Mode", ...). Its hooks are not modelled here: the
    real extension was run beside PAG (README, compatibility table)."""
    from modules import scripts as host_scripts

    class RegionalPrompter(host_scripts.Script):
        def title(self):
            return "Regional Prompter"

        def show(self, is_img2img):
            return host_scripts.AlwaysVisible

        def process(self, p, *args):
            p.extra_generation_params.update({"RP Active": True, "RP Divide mode": "Matrix", "RP Calc Mode": calc_mode})

    return RegionalPrompter


@pytest.mark.parametrize("calc_mode", ["Attention", "Latent"])
def test_regional_prompter_switches_pag_to_separate_or_off(sd15_webui, calc_mode, caplog):
    from modules import scripts as host_scripts

    unet = sd15_webui.model.diffusion_model
    rp = regional_prompter_script(calc_mode)()
    rp.args_from = rp.args_to = 1  # no UI args of its own here
    host_scripts.scripts_txt2img.alwayson_scripts.append(rp)
    rows, handle = rows_per_unet_call(unet)
    try:
        with caplog.at_level("WARNING", logger="sd_webui_pag"):
            p = txt2img([{"enabled": True, "scale": 3.0, "layers": "mid"}], steps=2, width=128, height=128)
            out = latents(processing.process_images(p))
    finally:
        handle.remove()
        host_scripts.scripts_txt2img.alwayson_scripts.pop()
    extra = p.extra_generation_params
    if calc_mode == "Latent":
        assert rows == [2, 2]  # no PAG rows at all
        assert "PAG scale" not in extra and extra["PAG note"].startswith("not applied: Regional Prompter (Latent mode) is on")
        assert torch.equal(out, latents(processing.process_images(txt2img([False], steps=2, width=128, height=128))))
    else:
        assert rows == [2, 1, 2, 1]  # the host's cond + uncond call, then the cond row once more, perturbed
        assert extra["PAG mode"] == "separate" and extra["PAG scale"] == "3"
        assert extra["PAG note"].startswith("separate mode: Regional Prompter (Attention mode) is on")
        assert "separate mode: Regional Prompter" in caplog.text
        separate = latents(processing.process_images(
            txt2img([{"enabled": True, "scale": 3.0, "layers": "mid", "mode": "separate"}], steps=2, width=128, height=128)))
        assert torch.equal(out, separate)


def test_refusal_mid_step_still_hides_the_twins_from_the_combine_step(dynthresh):
    """PAG refuses after its first perturbed call (the attn1 modules never ran): that step's twin rows are
    already in the batch; a Dynamic-Thresholding combine step must still get the batch without them, so the
    image is the plain one its "not applied" note says it is."""
    import copy

    unet = dynthresh.model.diffusion_model
    private = copy.deepcopy(unet)
    unet.forward = lambda *args, **kwargs: private(*args, **kwargs)
    try:
        p = txt2img([{"enabled": True, "scale": 3.0}], steps=3, width=128, height=128)
        pag = latents(processing.process_images(p))
        plain = latents(processing.process_images(txt2img([False], steps=3, width=128, height=128)))
    finally:
        del unet.forward
    assert p.extra_generation_params["PAG note"].startswith("not applied")
    assert torch.equal(pag, plain)
