"""Every image reproducible from its own seed (issue 18): image *k* of a batch equals the same request with
that image's seed and batch size 1 — for the random method ``noise`` too, on A1111, Forge 2 and reForge,
batched and separate, with and without the shared-prefix fork.

Error model: putting rows in a batch of another size changes the order of fp32 sums, so even the plain
model gives image *k* alone a few ulps apart from image *k* in a batch. The ``identity`` method has no
randomness; its batch-vs-alone difference, measured in the same test, is that rounding. A random draw that
depends on the batch (what these tests guard against) moves the image by ~0.1–0.3; the bound is 20 × the
identity difference (and at least 1e-5), far below that.
"""

from __future__ import annotations

import pytest
import torch

from a1111_harness import load_webui, txt2img, unload_webui
from lib_pag.fork import DISABLE_ENV
from modules import processing, sd_models_double, shared

SEED = 40


def rel(a, b) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def bound(identity_error: float) -> float:
    return max(20 * identity_error, 1e-5)


@pytest.fixture(scope="module")
def sd15():
    return sd_models_double.make_sd15_model(seed=7)


def latents(values, **kw):
    p = txt2img(values, width=64, height=64, steps=3, cfg_scale=5.0, sampler_name="Euler", **kw)
    return torch.stack([torch.as_tensor(i) for i in processing.process_images(p).images]), p


def batch_vs_alone(values, batch=3, **kw):
    """Largest relative difference of image k of a batch (seed 40) from seed 40+k alone, and the batch's infotexts."""
    together, p = latents([values], seed=SEED, batch_size=batch, **kw)
    worst = 0.0
    for k in range(batch):
        alone, _ = latents([values], seed=SEED + k, batch_size=1, **kw)
        worst = max(worst, rel(together[k], alone[0]))
    return worst, together


A1111_CASES = {
    "batched+fork": ({}, {}),
    "batched": ({}, {"no_fork": True}),
    "separate": ({"mode": "separate"}, {}),
    "chunked": ({}, {"batch_cond_uncond": False}),
    "and prompt": ({}, {"prompt": "a cat AND a dog :0.5"}),
}


@pytest.mark.parametrize("case", list(A1111_CASES))
def test_a1111_noise_image_k_equals_its_seed_alone(sd15, case, monkeypatch):
    extra, how = A1111_CASES[case]
    if how.get("no_fork"):
        monkeypatch.setenv(DISABLE_ENV, "1")
    load_webui(sd15)
    saved = shared.opts.data.get("batch_cond_uncond", True)
    shared.opts.data["batch_cond_uncond"] = how.get("batch_cond_uncond", True)
    try:
        kw = {"prompt": how["prompt"]} if "prompt" in how else {}
        base = {"enabled": True, "layers": "mid,up", "scale": 3.0, **extra}
        identity, _ = batch_vs_alone(base, **kw)
        noisy, together = batch_vs_alone({**base, "method": "noise", "noise_scale": 2.0}, **kw)
        plain, _ = latents([{**base, "method": "identity"}], seed=SEED, batch_size=3, **kw)
    finally:
        shared.opts.data["batch_cond_uncond"] = saved
        unload_webui()
    assert noisy <= bound(identity), (noisy, identity)
    assert rel(together, plain) > 1e-2  # the noise really perturbs: not the identity image


def test_draw_keys_follow_the_image_seed_and_its_variation_seed():
    """Per image: its seed; with variations on (strength > 0) also its variation seed and the strength — what
    the host's own noise depends on; nothing of the other images of the batch."""
    from types import SimpleNamespace

    from lib_pag.job import image_keys

    p = SimpleNamespace(seeds=[40, 41], subseeds=[5, 6], subseed_strength=0.0)
    assert image_keys(p) == ((40,), (41,))
    p.subseed_strength = 0.3
    assert image_keys(p) == ((40, 5, 300000), (41, 6, 300000))
    assert image_keys(p, seeds=[41], subseeds=[6]) == ((41, 6, 300000),)  # image 1 alone: the same key
    assert image_keys(SimpleNamespace()) == ()


# --- Forge 2 / reForge -------------------------------------------------------------------------------

def forge_denoised(host, params, x, cond, uncond, seeds):
    from lib_pag import forge
    from tests.forge_double.webui import Processing, SdModel

    p = Processing(SdModel(host.patcher), [params.to_dict()], host.denoiser, steps=3, seed=seeds[0])
    p.seeds = list(seeds)
    den = p.sample_pass(lambda pp: forge.apply(pp, pp.script_args))
    den.total_steps = 3
    conds_list = [[(i, 1.0)] for i in range(x.shape[0])]
    outs = []
    for s in (6.0, 2.5, 0.7):
        with torch.no_grad():
            outs.append(den(x, torch.full((x.shape[0],), s), uncond, cond, conds_list, 5.0))
    return torch.stack(outs)


@pytest.mark.parametrize("kind", ["forge2", "reforge"])
@pytest.mark.parametrize("mode,no_fork", [("batched", False), ("batched", True), ("separate", False)],
                         ids=["batched+fork", "batched", "separate"])
def test_forge_noise_row_k_equals_its_seed_alone(kind, mode, no_fork, monkeypatch):
    from lib_pag.params import PagParams
    from tests.test_forge import hosted, inputs
    from tests.unets import sd15_unet

    if no_fork:
        monkeypatch.setenv(DISABLE_ENV, "1")
    with hosted(kind, sd15_unet(seed=3)) as host:
        x, cond, uncond = inputs(batch=2, seed=5)
        errors = {}
        for method in ("identity", "noise"):
            params = PagParams(enabled=True, scale=3.0, layers="d1,mid,up", method=method, noise_scale=2.0, mode=mode)
            together = forge_denoised(host, params, x, cond, uncond, [7, 8])
            alone = forge_denoised(host, params, x[1:], cond[1:], uncond[1:], [8])
            errors[method] = rel(together[:, 1], alone[:, 0])
        other_seed = forge_denoised(host, params, x[1:], cond[1:], uncond[1:], [9])
    assert errors["noise"] <= bound(errors["identity"]), errors
    assert rel(other_seed[:, 0], alone[:, 0]) > 1e-3  # the draw really follows the seed
