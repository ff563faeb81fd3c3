"""k-diffusion inpainting: A1111 blends denoised*nmask + init_latent*mask BEFORE cfg_after_cfg.
PAG's rescale then measures the std of that blended tensor, so the kept (unmasked) area's init
latent changes the PAG result inside the inpainted area."""
from types import SimpleNamespace
import torch
from lib_pag import a1111
from lib_pag.a1111 import Call, Job, JOBS
from lib_pag.guidance import rescale_guided
from lib_pag.params import PagParams
from lib_pag.perturbations import Perturbation
from tests.exactness import assert_exact, assert_visible, rel_err


def after_cfg(cfg, cond, pert, init, mask):
    den = SimpleNamespace(mask=mask, nmask=1 - mask, mask_before_denoising=False)
    job = Job(params=PagParams(enabled=True, rescale=0.7), p_ref=lambda: None, perturbations={1: Perturbation()})
    call = Call(scales={1: 3.0}, n_cond=1, conds_list=[[(0, 1.0)]], denoiser=den)
    x_out = torch.cat([cond, pert])
    job.call = call
    JOBS.current = job
    a1111.on_cfg_denoised(SimpleNamespace(x=x_out))
    params = SimpleNamespace(x=cfg * (1 - mask) + init * mask)  # the host's apply_blend result
    a1111.on_cfg_after_cfg(params)
    JOBS.current = None
    return params.x


def test_kept_area_does_not_change_the_inpainted_area(float64, monkeypatch):  # float64: tests/exactness.py
    g = torch.Generator().manual_seed(0)
    cfg, cond, pert = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1  # left half kept from the init image, right half inpainted
    init_a = torch.randn(1, 4, 8, 8, generator=g)
    init_b = init_a * 3  # a higher-contrast init image
    out_a = after_cfg(cfg, cond, pert, init_a, mask)
    out_b = after_cfg(cfg, cond, pert, init_b, mask)
    inpainted = (1 - mask).bool().expand_as(out_a)
    assert_exact(out_b[inpainted], out_a[inpainted], what="inpainted area")
    # the mistake this guards against, rescale measuring the whole blended tensor, moves it far more
    monkeypatch.setattr(a1111, "rescale_guided", lambda g, r, phi, weight=None: rescale_guided(g, r, phi))
    wrong_a = after_cfg(cfg, cond, pert, init_a, mask)
    wrong_b = after_cfg(cfg, cond, pert, init_b, mask)
    assert_visible(rel_err(wrong_b[inpainted], wrong_a[inpainted]), what="the kept area's influence")
