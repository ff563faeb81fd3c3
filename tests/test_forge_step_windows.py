"""Step windows on the Forge 2 and reForge doubles are fractions of the model calls each pass really makes.

Sampling passes run through ``tests/forge_double/samplers.py`` (the hosts' A1111-style sampler layer: real
k-diffusion functions, A1111's DDIM/PLMS loops, ``launch_sampling``'s counters) into the patcher doubles
with ``lib_pag.forge`` installed by the ``process_before_every_sampling`` hook. The oracle is the number of
denoiser calls each pass made (the CFG denoiser's ``step`` after it); call ``k`` of ``n`` must get the
README's window over ``k/n`` (``ForgeJob.log``), and its UNet call the perturbed twin exactly when that
scale is not 0 (``unet_walk.CALLS``: 3 rows, else 2). Euler's counts are the host's own (a control).
"""

import sys
from pathlib import Path

import pytest
import torch

from lib_pag import forge
from lib_pag.params import PagParams
from tests.forge_double import samplers, unet_walk
from tests.test_forge import _purge
from tests.forge_double.webui import Forge2Denoiser, Processing, ReForgeDenoiser, SdModel
from tests.unets import sd15_unet
from tests.windows_oracle import SCALE, window

DOUBLES = Path(__file__).resolve().parent / "forge_double"


@pytest.fixture(scope="module")
def unet():
    """fp32 (test_forge's is float64 for its path comparisons; these tests count calls and rows)."""
    return sd15_unet(seed=3)


@pytest.fixture(params=["forge2", "reforge"])
def host(request, unet, monkeypatch, tmp_path):
    root = str(DOUBLES / request.param)
    _purge()
    sys.path.insert(0, root)
    try:
        assert forge.detect_host(refresh=True) == request.param
        if request.param == "forge2":
            from backend.modules.k_model import KModel
            from backend.patcher.unet import UnetPatcher
            from backend import memory_management as memory

            patcher, denoiser = UnetPatcher(KModel(unet)), Forge2Denoiser
        else:
            from ldm_patched.modules.model_base import BaseModel
            from ldm_patched.modules.model_patcher import ModelPatcher
            from ldm_patched.modules import model_management as memory

            patcher, denoiser = ModelPatcher(BaseModel(unet)), ReForgeDenoiser
        monkeypatch.setattr(memory, "FREE_MEMORY", float("inf"))
        unet_walk.CALLS.clear()
        yield patcher, denoiser
    finally:
        sys.path.remove(root)
        _purge()
        forge.detect_host(refresh=True)


def job_run(host, sampler, settings, *, steps, kinds, denoising_strength=0.5, hires_steps=0):
    """Passes of one job (``kinds``: "txt2img", "img2img", "hires"); returns (p, real calls per pass)."""
    patcher, denoiser = host
    params = PagParams(enabled=True, scale=SCALE, layers="d1,m0,u7", **settings)
    p = samplers.processing_fields(Processing(SdModel(patcher), [params.to_dict()], denoiser, steps=steps), denoiser,
                                   denoising_strength=denoising_strength, hr_second_pass_steps=hires_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    made = []
    for kind in kinds:
        x = samplers.run_pass(p, sampler, lambda pp: forge.apply(pp, pp.script_args), x, cond, uncond,
                              img2img=kind != "txt2img", hires=kind == "hires",
                              steps=(hires_steps or None) if kind == "hires" else None)
        made.append(p.sampler.model_wrap_cfg.step)
    return p, made


def check(p, made, settings):
    expected = [s for n in made for s in window(n, **settings)]
    log = forge.job_of(p).log
    assert [scale for _, _, _, scale, _ in log] == pytest.approx(expected, abs=1e-9)
    assert [total for _, total, *_ in log] == [n for n in made for _ in range(n)]
    assert unet_walk.CALLS == [3 if s else 2 for s in expected]


HALF_LINEAR = {"end": 0.5, "schedule": "linear"}
# sampler → real model calls: txt2img at 6 steps; then the hires pass of 6 steps at denoising 0.5 (t_enc 5,
# the host launches 6); img2img at 8 steps, denoising 0.5 (t_enc 4, the host launches 5)
CASES = {"Euler": (6, 6, 5), "Heun": (11, 11, 9), "DPM2": (11, 11, 9), "DDIM": (6, 4, 3), "PLMS": (7, 5, 4)}


@pytest.mark.parametrize("sampler", list(CASES))
def test_end_half_over_the_real_calls_txt2img_and_hires(host, sampler):
    p, made = job_run(host, sampler, HALF_LINEAR, steps=6, kinds=["txt2img", "hires"], hires_steps=6)
    assert made == list(CASES[sampler][:2])
    check(p, made, HALF_LINEAR)


@pytest.mark.parametrize("sampler", list(CASES))
def test_end_half_over_the_real_calls_img2img(host, sampler):
    p, made = job_run(host, sampler, HALF_LINEAR, steps=8, kinds=["img2img"])
    assert made == [CASES[sampler][2]]
    check(p, made, HALF_LINEAR)


def test_cosine_window_from_a_quarter_on_ddim_img2img(host):
    settings = {"start": 0.25, "schedule": "cosine"}
    p, made = job_run(host, "DDIM", settings, steps=12, kinds=["img2img"], denoising_strength=0.75)
    assert made == [8]  # t_enc = 9 → timesteps[:9] → 8 calls; the host launches 10
    check(p, made, settings)
