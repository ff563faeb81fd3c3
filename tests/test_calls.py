"""lib_pag.calls: how many model calls a sampler function makes over the schedule it is given.

The counts are the hosts' (A1111 1.10.1 ``modules/sd_samplers_timesteps_impl.py``, k-diffusion 0.0.16
``k_diffusion/sampling.py``, Forge 2 ``k_diffusion/sampling.py``); the samplers the doubles run are also
checked end to end in ``test_a1111_step_windows.py`` and ``test_forge_step_windows.py``.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from lib_pag import calls
from lib_pag.calls import PassCounter, Unknown, pass_total, sigma_schedule_calls, timesteps_calls

KARRAS_5 = [14.6, 6.1, 2.2, 0.6, 0.03, 0.0]  # 5 steps ending at 0, like every A1111 schedule but KL Optimal


@pytest.mark.parametrize("name", ["sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m",
                                  "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_lcm", "sample_deis"])
def test_first_order_samplers_call_once_per_step(name):
    assert sigma_schedule_calls(name, KARRAS_5) == 5


@pytest.mark.parametrize("name", ["sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde"])
def test_second_order_samplers_skip_the_second_call_on_the_step_to_zero(name):
    assert sigma_schedule_calls(name, KARRAS_5) == 9  # 2·5 − 1: an Euler step to sigma 0
    # KL Optimal ends at sigma_min, not 0 (modules/sd_schedulers.py kl_optimal): every step calls twice
    assert sigma_schedule_calls(name, [14.6, 6.1, 2.2, 0.6, 0.03]) == 8


def test_heunpp2_calls_three_two_one():
    assert sigma_schedule_calls("sample_heunpp2", KARRAS_5) == 3 + 3 + 3 + 2 + 1
    assert sigma_schedule_calls("sample_heunpp2", [14.6, 0.0]) == 1


def test_dpm_fast_makes_its_n_calls():
    assert sigma_schedule_calls("sample_dpm_fast", KARRAS_5, n=7) == 7
    assert sigma_schedule_calls("sample_dpm_fast", KARRAS_5) == 5


@pytest.mark.parametrize("name", ["sample_dpm_adaptive", "restart_sampler", "sample_euler_smea_dy", ""])
def test_samplers_whose_calls_are_not_known_say_why(name):
    with pytest.raises(Unknown):
        sigma_schedule_calls(name, KARRAS_5)


def test_timesteps_samplers():
    ts = list(range(1, 1000, 166))  # A1111 get_timesteps(p, 6): 7 timesteps
    assert len(ts) == 7
    assert timesteps_calls("ddim", ts) == 6 and timesteps_calls("ddim_cfgpp", ts) == 6
    assert timesteps_calls("plms", ts) == 7  # its first step calls twice
    assert timesteps_calls("unipc", ts) == 7  # UniPC.sample(steps=len(timesteps)), multistep
    with pytest.raises(Unknown):
        timesteps_calls("euler", ts)


def unipc(*args, **kwargs):
    """Named like ``sd_samplers_timesteps_impl.unipc`` (the A1111 double has no UniPC)."""


def _timesteps_sampler(func):
    def get_timesteps(p, steps):  # mirrors CompVisSampler.get_timesteps
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    return SimpleNamespace(funcname=func, get_timesteps=get_timesteps)


def test_unipc_txt2img_and_img2img_through_the_sampler_schedule(monkeypatch):
    from modules import shared

    monkeypatch.setitem(shared.opts.data, "img2img_fix_steps", False)
    sampler = _timesteps_sampler(unipc)
    p = SimpleNamespace(steps=6, is_hr_pass=False, denoising_strength=0.5, sampler_noise_scheduler_override=None)
    assert pass_total(p, sampler, SimpleNamespace(steps=6, init_latent=None))[0] == 7
    # img2img: t_enc = int(0.5·6) = 3, launched t_enc + 1 = 4 steps; UniPC runs over timesteps[:3]
    assert pass_total(p, sampler, SimpleNamespace(steps=4, init_latent=torch.zeros(1)))[0] == 3
    # a pass that launched another count than its settings give cannot be placed
    with pytest.raises(Unknown):
        pass_total(p, sampler, SimpleNamespace(steps=5, init_latent=torch.zeros(1)))


def test_counter_falls_back_to_the_host_counters_and_says_so(caplog):
    sampler = SimpleNamespace(funcname="sample_dpm_adaptive", get_sigmas=lambda p, steps: torch.tensor(KARRAS_5))
    den = SimpleNamespace(step=3, steps=5, total_steps=5, init_latent=None)
    counter = PassCounter()
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        where = counter.at(SimpleNamespace(is_hr_pass=False), sampler, den)
        counter.at(SimpleNamespace(is_hr_pass=False), sampler, den)
    assert (where.index, where.total, where.exact) == (3, 5, False)
    lines = [r.getMessage() for r in caplog.records if "cannot be known" in r.getMessage()]
    assert len(lines) == 1 and "DPM adaptive" in lines[0]  # once per pass
    assert counter.at(SimpleNamespace(), sampler, SimpleNamespace()) is None  # no call counter at all


def test_counter_never_breaks_on_a_strange_host():
    def broken(p, steps):
        raise RuntimeError("boom")

    sampler = SimpleNamespace(funcname="sample_euler", get_sigmas=broken)
    where = PassCounter().at(SimpleNamespace(is_hr_pass=False), sampler,
                             SimpleNamespace(step=0, steps=4, total_steps=4, init_latent=None))
    assert (where.total, where.exact) == (4, False) and "boom" in where.how
    assert calls.function_name(SimpleNamespace(funcname=unipc)) == "unipc"
