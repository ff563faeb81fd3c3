"""Step windows on the A1111 double are fractions of the model calls each sampling pass really makes.

Real generations (the double's samplers run the real k-diffusion functions and A1111's DDIM/PLMS loops)
with the real script. The oracle counts the CFG denoiser calls each pass makes (``CFGDenoiser.forward``,
a pass = one run of a denoiser object from its step 0); the expected PAG scale of call ``k`` of ``n`` is
the README's window over ``k/n``, and a UNet call carries the perturbed row exactly when that scale is
not 0. Host facts behind the differing counts (A1111 1.10.1): DDIM makes ``len(timesteps) − 1`` calls
(``sd_samplers_timesteps_impl.ddim``), over ``timesteps[:t_enc]`` in img2img and the hires pass
(``CompVisSampler.sample_img2img``) while ``launch_sampling(t_enc + 1)`` sets ``total_steps``; PLMS one
call more (its first step calls twice); Heun/DPM++ SDE skip the second call on the step to sigma 0 while
``total_steps`` is ``2·steps``. Euler's count is the host's own (a control).
"""

import logging

import pytest
import torch

from a1111_harness import img2img, load_webui, txt2img, unload_webui
from modules import processing, sd_samplers_cfg_denoiser, shared
from modules import sd_models_double

import lib_pag.a1111 as a1111
from windows_oracle import SCALE, window


@pytest.fixture(scope="module")
def sd15():
    return sd_models_double.make_sd15_model(seed=3)


@pytest.fixture()
def webui(sd15, monkeypatch):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", True)
    monkeypatch.setitem(shared.opts.data, "img2img_fix_steps", False)
    load_webui(sd15)
    yield sd15
    unload_webui()


class Watch:
    """Per CFG denoiser call: its pass, PAG's scale (``a1111.scale_for_step``) and the rows of its UNet call."""

    def __init__(self, monkeypatch, model):
        self.calls, self.scales, self.rows = [], [], []
        original, watch = sd_samplers_cfg_denoiser.CFGDenoiser.forward, self

        def forward(den, *args, **kwargs):
            watch.calls.append((id(den), den.step))
            return original(den, *args, **kwargs)

        monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", forward)
        scale_for_step = a1111.scale_for_step

        def recording(*args, **kwargs):
            value = scale_for_step(*args, **kwargs)
            watch.scales.append(value)
            return value

        monkeypatch.setattr(a1111, "scale_for_step", recording)
        self.handle = model.model.diffusion_model.register_forward_pre_hook(lambda mod, args: watch.rows.append(args[0].shape[0]))

    def passes(self) -> list[int]:
        """The number of denoiser calls of each pass, in order."""
        sizes = []
        for i, (den, step) in enumerate(self.calls):
            if i == 0 or step == 0 or den != self.calls[i - 1][0]:
                sizes.append(0)
            sizes[-1] += 1
        return sizes


@pytest.fixture()
def watch(webui, monkeypatch):
    w = Watch(monkeypatch, webui)
    yield w
    w.handle.remove()


def check(watch, expected_passes, settings):
    passes = watch.passes()
    assert passes == expected_passes
    expected = [s for n in passes for s in window(n, **settings)]
    assert watch.scales == pytest.approx(expected, abs=1e-9)
    # the perturbed twin rides in the UNet call exactly where the scale is not 0 (1 image, CFG: 2 rows + 1)
    assert watch.rows == [3 if s else 2 for s in expected]
    for n in passes:  # the last call in the window gets the smallest scale: 3·(1 − k_last/(n·end))
        active = [s for s in window(n, **settings) if s]
        assert active == sorted(active, reverse=True)


HALF_LINEAR = {"end": 0.5, "schedule": "linear"}

# sampler → the model calls it really makes: txt2img at 6 steps; img2img at 8 steps, denoising 0.5 (t_enc 4,
# the host launches 5 steps); the hires pass of 6 steps at denoising 0.5 (t_enc 5, the host launches 6)
CASES = {
    "Euler": (6, 5, 6),  # the host's counts: a control
    "Heun": (11, 9, 11),  # 2·steps − 1
    "DPM++ SDE": (11, 9, 11),
    "DDIM": (6, 3, 4),  # get_timesteps(p, 6): 7 timesteps → 6 calls; img2img t_enc − 1
    "PLMS": (7, 4, 5),
}


def pag(**window_settings):
    return [{"enabled": True, "scale": SCALE, "layers": "m0", **window_settings}]


@pytest.mark.parametrize("sampler", list(CASES))
def test_end_half_is_the_first_half_of_the_real_calls_txt2img_and_hires(watch, sampler):
    txt_calls, _, hires_calls = CASES[sampler]
    p = txt2img(pag(**HALF_LINEAR), sampler_name=sampler, steps=6, enable_hr=True, hr_scale=2.0,
                hr_second_pass_steps=6, denoising_strength=0.5)
    processing.process_images(p)
    check(watch, [txt_calls, hires_calls], HALF_LINEAR)


@pytest.mark.parametrize("sampler", list(CASES))
def test_end_half_is_the_first_half_of_the_real_calls_img2img(watch, sampler):
    _, img_calls, _ = CASES[sampler]
    processing.process_images(img2img(pag(**HALF_LINEAR), torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)),
                                      sampler_name=sampler, steps=8, denoising_strength=0.5))
    check(watch, [img_calls], HALF_LINEAR)


def test_cosine_window_from_the_middle_over_the_real_calls(watch):
    settings = {"start": 0.25, "end": 1.0, "schedule": "cosine"}
    processing.process_images(img2img(pag(**settings), torch.randn(4, 8, 8), sampler_name="DDIM", steps=12,
                                      denoising_strength=0.75))
    check(watch, [8], settings)  # t_enc = int(0.75·12) = 9 → timesteps[:9] → 8 DDIM calls (the host says 10)


def test_a_schedule_the_sampler_cannot_report_falls_back_to_the_host_counters(watch, caplog):
    """A script's own noise schedule (``p.sampler_noise_scheduler_override``): PAG does not call it; the step
    window counts the host's ``step / total_steps`` (Heun: 2·steps) and a DEBUG line says so."""
    import k_diffusion.sampling

    p = txt2img(pag(**HALF_LINEAR), sampler_name="Heun", steps=4)
    p.sampler_noise_scheduler_override = lambda steps: k_diffusion.sampling.get_sigmas_karras(steps, 0.03, 14.6)
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        processing.process_images(p)
    assert watch.passes() == [7]
    assert watch.scales == pytest.approx([SCALE * (1 - k / 4) if k < 4 else 0.0 for k in range(7)])
    assert any("cannot be known in advance" in r.getMessage() and "noise schedule" in r.getMessage() for r in caplog.records)
