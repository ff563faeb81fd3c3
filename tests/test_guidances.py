"""Several perturbation guidances in one job (issue 19), on the A1111 1.10 double and the Forge 2 / reForge doubles,
in float64 against the exactness bound (``tests/exactness.py``).

- every method (identity, blur, noise, SEG, TPG) alone, and a three-guidance job (PAG on ``mid,up``, SEG on
  ``mid``, TPG on ``d1,d3``): batched + fork == unforked == separate passes;
- the three-guidance job is the sum of its parts: its output minus plain CFG equals the sum, over its guidances,
  of the same job with only that guidance on (at its own index, so its rows draw what they draw in the job),
  minus plain CFG — ``out = CFG + Σ_b s_b·Σ_k w_k·(c_k − p_{b,k})``, each term exact because each guidance alone
  is checked against an independent reference (``tests/test_a1111_sampling.py`` for PAG,
  ``tests/test_methods.py`` for SEG and TPG);
- the fork really shares the prefix per guidance (row counts per block);
- per-image seeding for TPG (image *k* of a batch equals its seed alone);
- the infotext round trip, paste and API errors of a three-guidance job.
"""

from __future__ import annotations

import math
import pytest
import torch

from a1111_harness import Recorder, load_webui, txt2img, unload_webui
from lib_pag import PagError, PagParams
from lib_pag.fork import DISABLE_ENV
from modules import processing, sd_models_double, shared
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64

pytestmark = pytest.mark.usefixtures("float64")

MAIN = {"enabled": True, "scale": 3.0, "layers": "mid,up"}
SEG = {"method": "seg", "scale": 2.0, "layers": "mid,u1", "blur_sigma": 1.5}
TPG = {"method": "tpg", "scale": 1.5, "layers": "d1,d3"}
THREE = {**MAIN, "branches": [SEG, TPG]}


def only(index: int) -> dict:
    """The three-guidance job with just guidance ``index`` contributing (the others off, or at scale 0)."""
    if index == 1:
        return dict(MAIN)
    branches = [{**SEG, "enabled": index == 2}, {**TPG, "enabled": index == 3}]
    return {**MAIN, "scale": 0.0, "branches": branches}


@pytest.fixture(scope="module")
def sd15():
    return to_float64(sd_models_double.make_sd15_model(seed=5))


@pytest.fixture()
def webui(sd15, monkeypatch):
    monkeypatch.setitem(shared.opts.data, "batch_cond_uncond", True)
    load_webui(sd15)
    yield sd15
    unload_webui()


def denoised(values, monkeypatch, *, no_fork=False, **kw):
    """Every denoiser output of a txt2img job (batch 2, an AND prompt, 3 Euler steps)."""
    if no_fork:
        monkeypatch.setenv(DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(DISABLE_ENV, raising=False)
    rec = Recorder(monkeypatch)
    kw.setdefault("prompt", "a cat AND a dog :0.5")
    processing.process_images(txt2img([values], steps=3, batch_size=2, width=128, height=128, **kw))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return [c.out for c in rec.calls]


def same(a, b, what):
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert_exact(x, y, what=f"{what}, call {k}")


METHODS = {
    "identity": {**MAIN},
    "blur": {**MAIN, "method": "blur", "blur_sigma": 2.0},
    "noise": {**MAIN, "method": "noise", "noise_scale": 2.0},
    "seg": {**MAIN, **SEG},
    "tpg": {**MAIN, **TPG},
    "three": THREE,
}


@pytest.mark.parametrize("name", list(METHODS))
def test_a1111_batched_forked_unforked_and_separate_agree(webui, monkeypatch, name):
    values = METHODS[name]
    forked = denoised(values, monkeypatch)
    unforked = denoised(values, monkeypatch, no_fork=True)
    separate = denoised({**values, "mode": "separate"}, monkeypatch)
    plain = denoised({"enabled": False}, monkeypatch)
    same(forked, unforked, "forked vs unforked")
    same(forked, separate, "batched vs separate")
    assert_visible(rel_err(forked[0], plain[0]), what=f"{name}'s effect")


def test_a1111_three_guidances_alone_at_cfg_1_use_the_uncond_rows_place(webui, monkeypatch):
    """CFG 1: the last guidance's twins take the uncond rows' place, the others' go between; 4 rows an image."""
    unet = webui.model.diffusion_model
    sizes = []
    hook = unet.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        forked = denoised(THREE, monkeypatch, prompt="a cat", cfg_scale=1.0)
    finally:
        hook.remove()
    assert sizes == [2 * 4] * 3  # batch 2: cond + 3 twin blocks, no uncond rows
    unforked = denoised(THREE, monkeypatch, prompt="a cat", cfg_scale=1.0, no_fork=True)
    separate = denoised({**THREE, "mode": "separate"}, monkeypatch, prompt="a cat", cfg_scale=1.0)
    cond = denoised({**MAIN, "scale": 0.0}, monkeypatch, prompt="a cat", cfg_scale=1.0)
    same(forked, unforked, "forked vs unforked")
    same(forked, separate, "uncond slot vs separate")
    assert_visible(rel_err(forked[0], cond[0]), what="the three terms at CFG 1")


def test_a1111_three_guidances_are_the_sum_of_their_terms(webui, monkeypatch):
    """Only the first call has the same input in every job (later ones follow each job's own trajectory)."""
    cfg = denoised({"enabled": False}, monkeypatch)[0]
    three = denoised(THREE, monkeypatch)[0]
    terms = [denoised(only(i), monkeypatch)[0] - cfg for i in (1, 2, 3)]
    for i, term in enumerate(terms, start=1):
        assert_visible(rel_err(cfg + term, cfg), what=f"guidance {i}'s term")
    assert_exact(three, cfg + sum(terms), what="three guidances vs the sum of their terms")


def test_a1111_rescale_of_each_guidance_follows_its_term(webui, monkeypatch):
    """Guidance 2's rescale φ applies to the output after its term, guidance 1's (0) changes nothing."""
    from lib_pag.guidance import rescale_guided

    cfg = denoised({"enabled": False}, monkeypatch, prompt="a cat")[0]
    t1 = denoised(only(1), monkeypatch, prompt="a cat")[0] - cfg
    t2 = denoised(only(2), monkeypatch, prompt="a cat")[0] - cfg
    two = {**MAIN, "branches": [{**SEG, "rescale": 0.6}]}
    out = denoised(two, monkeypatch, prompt="a cat")[0]
    cond = denoised({**MAIN, "scale": 0.0}, monkeypatch, prompt="a cat", cfg_scale=1.0)[0]  # the cond prediction
    assert_exact(out, rescale_guided(cfg + t1 + t2, cond, 0.6), what="rescale after guidance 2's term")


def test_a1111_the_fork_shares_the_prefix_per_guidance(webui, monkeypatch):
    """TPG on d1 (input_blocks[2]) joins before input_blocks[2]; PAG and SEG join inside the middle block."""
    unet = webui.model.diffusion_model
    rows = {}
    hooks = [unet.input_blocks[i].register_forward_pre_hook(lambda m, a, i=i: rows.setdefault(f"in{i}", []).append(a[0].shape[0]))
             for i in (1, 2, 8)]
    hooks += [unet.output_blocks[0].register_forward_pre_hook(lambda m, a: rows.setdefault("out0", []).append(a[0].shape[0]))]
    try:
        denoised(THREE, monkeypatch, prompt="a cat")
    finally:
        for h in hooks:
            h.remove()
    # batch 2: cond 2 + uncond 2 = 4 rows; + TPG's 2 twins from input_blocks[2]; + PAG's and SEG's 2 each from mid
    assert rows["in1"] == [4] * 3 and rows["in2"] == [6] * 3 and rows["in8"] == [6] * 3 and rows["out0"] == [10] * 3


def test_a1111_tpg_image_k_equals_its_seed_alone(webui, monkeypatch):
    def latents(seed, batch):
        p = txt2img([{**MAIN, "scale": 0.0, "branches": [None, TPG]}], seed=seed, batch_size=batch, steps=3,
                    width=128, height=128)
        return torch.stack([torch.as_tensor(i) for i in processing.process_images(p).images])

    together = latents(40, 3)
    for k in range(3):
        assert_exact(together[k], latents(40 + k, 1)[0], what=f"image {k} of the batch vs its seed alone")
    other = latents(41, 1)[0]
    assert_visible(rel_err(together[0], other), what="another seed's shuffle")


# --- Forge 2 / reForge --------------------------------------------------------------------------------

@pytest.fixture(params=["forge2", "reforge"])
def forge_host(request):
    from tests.test_forge import hosted
    from tests.unets import sd15_unet

    with hosted(request.param, to_float64(sd15_unet(seed=3))) as host:
        yield host


def forge_outputs(host, values, monkeypatch, *, no_fork=False):
    from tests.test_forge import run

    if no_fork:
        monkeypatch.setenv(DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(DISABLE_ENV, raising=False)
    p, results = run(host, PagParams.from_dict(values), batch=2, weights=(1.0, 0.5))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return [out for _, out in results], p


@pytest.mark.parametrize("name", ["seg", "tpg", "three"])
def test_forge_batched_forked_unforked_and_separate_agree(forge_host, monkeypatch, name):
    from lib_pag import forge

    values = METHODS[name]
    forked, p = forge_outputs(forge_host, values, monkeypatch)
    assert [how for *_, how in forge.job_of(p).log] == ["batched"] * 3
    unforked, _ = forge_outputs(forge_host, values, monkeypatch, no_fork=True)
    separate, p = forge_outputs(forge_host, {**values, "mode": "separate"}, monkeypatch)
    assert [how for *_, how in forge.job_of(p).log] == ["separate"] * 3
    plain, _ = forge_outputs(forge_host, {"enabled": False}, monkeypatch)
    same(forked, unforked, "forked vs unforked")
    same(forked, separate, "batched vs separate")
    assert_visible(rel_err(forked[0], plain[0]), what=f"{name}'s effect")


def test_forge_three_guidances_are_the_sum_of_their_terms(forge_host, monkeypatch):
    cfg, _ = forge_outputs(forge_host, {"enabled": False}, monkeypatch)
    three, _ = forge_outputs(forge_host, THREE, monkeypatch)
    terms = [[o - c for o, c in zip(forge_outputs(forge_host, only(i), monkeypatch)[0], cfg)] for i in (1, 2, 3)]
    for k in range(len(cfg)):  # the doubles' run feeds every call the same x: every call is comparable
        assert_exact(three[k], cfg[k] + sum(t[k] for t in terms), what=f"call {k}")
        for i, t in enumerate(terms, start=1):
            assert_visible(rel_err(cfg[k] + t[k], cfg[k]), what=f"guidance {i}'s term")


# --- settings -----------------------------------------------------------------------------------------

def test_three_guidances_round_trip_through_the_infotext_and_positional_args():
    p = PagParams.from_dict({**THREE, "end": 0.8, "branches": [{**SEG, "schedule": "cosine", "start": 0.1},
                                                               {**TPG, "hires": "own", "hires_scale": 1.0}]})
    text = p.to_infotext()
    assert text["PAG 2 method"] == "seg" and text["PAG 2 blur sigma"] == "1.5" and text["PAG 2 schedule"] == "cosine"
    assert text["PAG 3 method"] == "tpg" and text["PAG 3 hires scale"] == "1" and "PAG 3 blur sigma" not in text
    assert PagParams.from_infotext({k: str(v) for k, v in text.items()}) == p
    assert PagParams.from_values(*p.to_values()) == p
    assert len(p.to_values()) == 15 + 2 * 14
    # the old 15-value form, every old key and infotext key keep working byte for byte
    old = PagParams.from_values(True, 3.0, "mid,up", "blur", 2.0)
    assert old.branches == () and old.to_infotext() == {"PAG enabled": "True", "PAG scale": "3", "PAG layers": "mid,up",
                                                        "PAG method": "blur", "PAG blur sigma": "2"}


def test_method_defaults_and_numbered_keys():
    assert PagParams.from_dict({"enabled": True, "method": "tpg"}).layers == "d2.2-9,d3"
    assert PagParams.from_dict({"enabled": True, "method": "seg"}).layers == "mid"
    p = PagParams.from_dict({"enabled": True, "PAG 2 method": "tpg", "pag3_scale": 2})
    assert [(b.index, b.method, b.layers, b.scale) for b in p.branches] == [(2, "tpg", "d2.2-9,d3", 3.0), (3, "identity", "mid,up", 2.0)]


@pytest.mark.parametrize("data, field, problem", [
    ({"branches": [{"scale": -1}]}, "PAG 2 scale", "out of range"),
    ({"branches": [{}, {"method": "dropout"}]}, "PAG 3 method", "not a choice"),
    ({"branches": [{"layers": "zz"}]}, "PAG 2 layers", "not a layer name"),
    ({"branches": [{"start": 0.6, "end": 0.5}]}, "PAG 2 start", "not before the end"),
    ({"branches": [{"method": "seg", "blur_sigma": 0}]}, "PAG 2 blur sigma", "out of range"),
    ({"branches": [{"colour": 1}]}, "PAG 2 args", "not a PAG setting"),
    ({"branches": [{}, {}, {}]}, "PAG branches", "too many guidances"),
    ({"branches": {"scale": 1}}, "PAG branches", "wrong type"),
    ({"PAG 2 hires": "twice"}, "PAG 2 hires", "not a choice"),
    ({"branches": [{"mode": "separate"}]}, "PAG 2 args", "not a PAG setting"),
])
def test_every_new_field_names_the_guidance_in_its_error(data, field, problem):
    with pytest.raises(PagError) as info:
        PagParams.from_dict({"enabled": True, **data})
    assert info.value.field == field and problem in str(info.value), str(info.value)


def test_api_422_names_the_guidance_and_its_field(webui):
    import json

    from fastapi.testclient import TestClient
    from modules.api.api import create_app

    app, _ = create_app()
    client = TestClient(app)
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 3}
    bad = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"pag": {"args": [
        {**MAIN, "branches": [{"layers": "u99"}]}]}}})
    assert bad.status_code == 422, bad.text
    assert bad.json()["field"] == "PAG 2 layers" and "does not exist in this SD1.x UNet" in bad.json()["detail"]
    good = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"pag": {"args": [THREE]}}})
    assert good.status_code == 200, good.text
    extra = json.loads(good.json()["info"])["extra_generation_params"]
    assert extra["PAG 2 method"] == "seg" and extra["PAG 3 method"] == "tpg" and extra["PAG 3 layers"] == "d1,d3"
    positional = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"pag": {"args": PagParams.from_dict(THREE).to_values()}}})
    assert positional.status_code == 200 and positional.json()["images"] == good.json()["images"]


def test_api_infotext_field_restores_every_guidance(webui):
    """The request's ``infotext`` (A1111 ≥ 1.8) fills the controls by label without PAG's paste callback, as
    ``Api.apply_infotext`` does: a three-guidance image's infotext alone gives the same image. A hand-written
    infotext that gives a guidance's settings without its enabled key is a 422 naming that key, not a job that
    runs without the guidance (real A1111 1.10.1 left guidances 2 and 3 off before)."""
    import json

    from fastapi.testclient import TestClient
    from modules.api.api import create_app

    client = TestClient(create_app()[0])
    body = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "seed": 3, "cfg_scale": 5}
    good = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"pag": {"args": [THREE]}}})
    assert good.status_code == 200, good.text
    text = json.loads(good.json()["info"])["infotexts"][0]
    assert "PAG 2 enabled: True" in text and "PAG 3 enabled: True" in text
    pasted = client.post("/sdapi/v1/txt2img", json={**body, "infotext": text})  # (the double pastes PAG's fields)
    assert pasted.status_code == 200, pasted.text
    assert json.loads(pasted.json()["info"])["infotexts"][0] == text
    assert pasted.json()["images"] == good.json()["images"]

    for missing, field in (("PAG 2 enabled: True, ", "PAG 2 enabled"), ("PAG enabled: True, ", "PAG enabled")):
        bad = client.post("/sdapi/v1/txt2img", json={**body, "infotext": text.replace(missing, "")})
        assert bad.status_code == 422 and bad.json()["field"] == field, bad.text
        assert f"'{field}: True'" in bad.json()["allowed"]
    # the enabled value given in the args instead is fine
    args = PagParams.from_dict(THREE).to_values()[:16]
    ok = client.post("/sdapi/v1/txt2img", json={**body, "infotext": text.replace("PAG 2 enabled: True, ", ""),
                                                "alwayson_scripts": {"pag": {"args": args}}})
    assert ok.status_code == 200 and ok.json()["images"] == good.json()["images"], ok.text
