"""The extension on the A1111 double: every CFGDenoiser row path gives exactly the PAG formula.

Each test runs real generations (real k-diffusion samplers, real ldm UNet) with the real script
loaded from ``scripts/pag.py``, records every denoiser call, and recomputes the expected output
independently (see ``a1111_harness``).
"""

import pytest
import torch

from a1111_harness import (
    Recorder, expected_output, img2img, load_webui, relative_error, reference_model, txt2img, unload_webui,
)
from modules import processing, shared
from modules import sd_models_double
from tests.exactness import assert_exact, assert_visible, to_float64

pytestmark = pytest.mark.usefixtures("float64")  # outputs vs the recomputed formula in float64 (tests/exactness.py)


@pytest.fixture(scope="module")
def sd15():
    return to_float64(sd_models_double.make_sd15_model(seed=3))


@pytest.fixture()
def webui(sd15, monkeypatch):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", True)
    load_webui(sd15)
    yield sd15
    unload_webui()


def pag(scale=3.0, layers="mid,up", **more):
    return [{"enabled": True, "scale": scale, "layers": layers, **more}]


def check_calls(recorder, model, layers, scale_at, *, skipped=lambda call: False, min_calls=1):
    ref = reference_model(model, layers)
    assert len(recorder.calls) >= min_calls
    strongest = 0.0
    for call in recorder.calls:
        expected = expected_output(call, model, ref, scale_at(call), skipped=skipped(call))
        assert_exact(call.out, expected, what=f"step {call.step}")
        if scale_at(call):
            without_pag = expected_output(call, model, ref, 0.0, skipped=skipped(call))
            strongest = max(strongest, relative_error(call, without_pag))
    # at high sigma the PAG term is a large part of the output: a missing or wrong term cannot hide in the bound
    assert strongest > 1e-2, f"PAG term too small to tell apart ({strongest})"
    assert_visible(strongest, what="PAG term")


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M"])
def test_batched_cfg_pag_matches_formula(webui, monkeypatch, sampler):
    rec = Recorder(monkeypatch)
    processing.process_images(txt2img(pag(3.0), sampler_name=sampler, steps=3))
    check_calls(rec, webui, "mid,up", lambda c: 3.0, min_calls=3)


def test_batch_cond_uncond_off_runs_chunks_and_stays_exact(webui, monkeypatch):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", False)
    rec = Recorder(monkeypatch)
    processing.process_images(txt2img(pag(2.0, "m0,u1-u3"), batch_size=2, steps=2))
    check_calls(rec, webui, "m0,u1-u3", lambda c: 2.0)


def test_unequal_token_lengths_split_path(webui, monkeypatch):
    rec = Recorder(monkeypatch)
    long_prompt = "a very long prompt with many words so that it needs two chunks of tokens"
    processing.process_images(txt2img(pag(3.0), prompt=long_prompt, negative="blurry", steps=2))
    conds, _ = __import__("modules.prompt_parser", fromlist=["x"]).reconstruct_multicond_batch(rec.calls[0].cond, 0)
    check_calls(rec, webui, "mid,up", lambda c: 3.0)


def test_and_prompts_with_weights_and_batch_two(webui, monkeypatch):
    rec = Recorder(monkeypatch)
    p = txt2img(pag(2.5), prompt="a red cat AND a blue dog :0.6 AND grass :1.3", batch_size=2, steps=2)
    processing.process_images(p)
    conds_list, _ = __import__("modules.prompt_parser", fromlist=["x"]).reconstruct_multicond_batch(rec.calls[0].cond, 0)
    assert [len(c) for c in conds_list] == [3, 3]
    check_calls(rec, webui, "mid,up", lambda c: 2.5)


@pytest.mark.parametrize("setting", ["ngms", "skip_early"])
def test_skipped_uncond_steps(webui, monkeypatch, setting):
    if setting == "ngms":
        monkeypatch.setitem(shared.opts.data, "s_min_uncond_all", True)
        kw = {"s_min_uncond": 1e6}
    else:
        monkeypatch.setitem(shared.opts.data, "skip_early_cond", 1.0)
        kw = {}
    rec = Recorder(monkeypatch)
    p = txt2img(pag(3.0), steps=2, **kw)
    processing.process_images(p)
    check_calls(rec, webui, "mid,up", lambda c: 3.0, skipped=lambda c: True)


def test_pag_alone_at_cfg_one_is_the_paper_formula(webui, monkeypatch):
    rec = Recorder(monkeypatch)
    # 128 px → 16² latent → 2×2 tokens in the middle block (at 1×1 attention is the identity already)
    processing.process_images(txt2img(pag(4.0, "m0"), cfg_scale=1.0, steps=2, width=128, height=128))
    check_calls(rec, webui, "m0", lambda c: 4.0)


def test_step_window_and_schedule(webui, monkeypatch):
    rec = Recorder(monkeypatch)
    processing.process_images(txt2img(pag(3.0, start=0.25, end=0.75, schedule="linear"), steps=4))
    assert [c.step for c in rec.calls] == [0, 1, 2, 3]
    scales = {0: 0.0, 1: 3.0, 2: 1.5, 3: 0.0}
    check_calls(rec, webui, "mid,up", lambda c: scales[c.step])


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_separate_mode_matches_the_formula(webui, monkeypatch, batch_cond_uncond):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", batch_cond_uncond)
    rec = Recorder(monkeypatch)
    processing.process_images(txt2img(pag(3.0, mode="separate"), prompt="a red cat AND a dog :0.5", batch_size=2,
                                      steps=2, negative="a long negative prompt with many words in it"))
    check_calls(rec, webui, "mid,up", lambda c: 3.0)


def test_ddim_eps_space(webui, monkeypatch):
    rec = Recorder(monkeypatch)
    processing.process_images(txt2img(pag(3.0), sampler_name="DDIM", steps=3))
    assert all(c.timesteps for c in rec.calls)
    check_calls(rec, webui, "mid,up", lambda c: 3.0, min_calls=3)


def test_inpaint_model_with_mask(monkeypatch):
    model = to_float64(sd_models_double.make_sd15_inpaint_model(seed=4))
    load_webui(model)
    try:
        rec = Recorder(monkeypatch)
        g = torch.Generator().manual_seed(5)
        init = torch.randn(4, 8, 8, generator=g)
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 2:6] = 1.0
        processing.process_images(img2img(pag(3.0, "u0-u2"), init, mask, steps=4))
        assert rec.calls and rec.calls[0].mask is not None
        check_calls(rec, model, "u0-u2", lambda c: 3.0)
    finally:
        unload_webui()


@pytest.mark.parametrize("cfg_scale", [5.0, 1.0])
def test_sdxl_dict_conds(monkeypatch, cfg_scale):
    from unets import sdxl_unet

    unet = sdxl_unet("base", seed=6)
    model = to_float64(sd_models_double.make_sdxl_model(unet, context_dim=32, adm_in_channels=unet.label_emb[0][0].in_features, seed=6))
    load_webui(model)
    try:
        rec = Recorder(monkeypatch)
        processing.process_images(txt2img(pag(3.0, "m0.2-9,u0:0.5"), steps=2, cfg_scale=cfg_scale))
        assert isinstance(prompt_tensor(rec.calls[0]), dict)
        check_calls(rec, model, "m0.2-9,u0:0.5", lambda c: 3.0)
    finally:
        unload_webui()


def prompt_tensor(call):
    from modules import prompt_parser

    return prompt_parser.reconstruct_multicond_batch(call.cond, call.step)[1]
