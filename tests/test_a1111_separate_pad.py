import pytest, torch
from a1111_harness import load_webui, unload_webui, txt2img
from modules import processing, shared, sd_models_double
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64


@pytest.fixture()
def webui(monkeypatch, float64):  # batched vs separate in float64: tests/exactness.py
    model = to_float64(sd_models_double.make_sd15_model(seed=3))
    load_webui(model)
    yield model
    unload_webui()


def lat(pr):
    return torch.stack([torch.as_tensor(i) for i in pr.images])


def run(mode, **kw):
    p = txt2img([{"enabled": True, "scale": 3.0, "mode": mode}], **kw)
    return lat(processing.process_images(p))


@pytest.mark.parametrize("pad", [False, True])
def test_separate_equals_batched_with_long_negative(webui, monkeypatch, pad):
    monkeypatch.setitem(shared.opts.data, "pad_cond_uncond", pad)
    kw = dict(prompt="a cat", negative="blurry ugly bad low quality deformed extra", steps=3)
    batched = run("batched", **kw)
    separate = run("separate", **kw)
    assert_exact(batched, separate, what="batched vs separate")
    plain = lat(processing.process_images(txt2img([False], **kw)))
    assert_visible(rel_err(plain, batched), what="PAG's effect")
