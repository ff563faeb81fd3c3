"""X/Y/Z grids with PAG axes, run the way the host runs them (the X/Y/Z script selected in the runner, its
axes parsed and confirmed by ``Script.run``, every cell through ``process_images``): every cell a grid
would run is checked before the first one, against the job's own PAG settings and the other axes' values;
a PAG axis while PAG is off turns PAG on for the grid and says so — never a grid of cells silently without
PAG."""

import logging
import re

import pytest
import torch

from a1111_harness import load_webui, txt2img, unload_webui
from lib_pag import PagError
from modules import scripts, sd_models_double

NOTHING = ("Nothing", "")


@pytest.fixture(scope="module")
def sd15():
    return sd_models_double.make_sd15_model(seed=7)


@pytest.fixture()
def webui(sd15):
    load_webui(sd15)
    yield sd15
    unload_webui()


def unet_calls(model):
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls, handle


def grid(pag_values, x, y=NOTHING, z=NOTHING, **kw):
    """Generate with the X/Y/Z script selected, text inputs on: ``x``/``y``/``z`` are (axis label, values text)."""
    runner = scripts.scripts_txt2img
    script = next(s for s in runner.selectable_scripts if s.title() == "X/Y/Z plot")
    p = txt2img(pag_values, steps=2, **kw)
    args = list(p.script_args) + [None] * (script.args_to - len(p.script_args))
    args[0] = runner.selectable_scripts.index(script) + 1
    labels = [o.label for o in script.current_axis_options]
    own = []
    for label, text in (x, y, z):
        own += [labels.index(label), text, None]
    own += [True, False, False, False, False, False, False, 0, True]
    args[script.args_from:script.args_to] = own
    p.script_args = tuple(args)
    return runner.run(p, *p.script_args)


def test_a_cell_that_contradicts_the_accordion_stops_the_grid_before_it_runs(webui, caplog):
    """Issue 18.2: accordion End 0.5, axis Start 0.6 — checked against the job's End, not the default's."""
    calls, handle = unet_calls(webui)
    try:
        with caplog.at_level(logging.ERROR, logger="sd_webui_pag"), \
                pytest.raises(PagError, match=re.escape("PAG start: 0.6 is not before the end; allowed: a fraction below PAG end (0.5)")):
            grid([{"enabled": True, "end": 0.5}], ("[PAG] Start", "0.2, 0.6"))
    finally:
        handle.remove()
    assert calls == []  # no cell ran
    assert "[PAG] Start = 0.6" in caplog.text


def test_every_combination_of_the_axes_is_checked(webui):
    calls, handle = unet_calls(webui)
    try:
        with pytest.raises(PagError, match=re.escape("PAG start: 0.6 is not before the end; allowed: a fraction below PAG end (0.5)")):
            grid([{"enabled": True}], ("[PAG] Start", "0, 0.6"), ("[PAG] End", "0.9, 0.5"))
        with pytest.raises(PagError, match=re.escape("PAG layers: 'u9' does not exist in this SD1.x UNet")):
            grid([{"enabled": True}], ("[PAG] Scale", "1, 2"), ("Steps", "2"), ("[PAG] Layers", "mid, u9"))
        with pytest.raises(PagError, match="PAG layers: 'zz' is not a layer name"):  # the accordion's own value
            grid([{"enabled": True, "layers": "zz"}], ("[PAG] Scale", "1, 2"))
    finally:
        handle.remove()
    assert calls == []
    processed = grid([{"enabled": True}], ("[PAG] Start", "0, 0.4"), ("[PAG] End", "0.9, 0.5"))
    assert len(processed.images) == 4 and all(i is not None for i in processed.images)


@pytest.mark.parametrize("axis, values, key", [("[PAG] Scale", "1, 5", "PAG scale"), ("[PAG] Layers", "m0, u3", "PAG layers")])
def test_a_pag_axis_with_the_accordion_off_turns_pag_on_for_the_grid_and_says_so(webui, caplog, axis, values, key):
    """Issue 18.3: a [PAG] axis with PAG unticked used to give cells identical to the plain image, silently."""
    plain = grid([False], ("Seed", "11"))
    with caplog.at_level(logging.INFO, logger="sd_webui_pag"):
        processed = grid([False], (axis, values))
    images = [torch.as_tensor(i) for i in processed.images]
    assert len(images) == 2 and not torch.equal(images[0], images[1])
    assert not torch.equal(images[0], torch.as_tensor(plain.images[0]))
    for text, value in zip(processed.infotexts, [v.strip() for v in values.split(",")]):
        assert f"{key}: {value}" in text
        assert f"PAG note: turned on by the X/Y/Z axis {axis} (the PAG accordion is off)" in text
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PAG done:")]
    assert len(done) == 2 and all(d.endswith(f"; note: turned on by the X/Y/Z axis {axis} (the PAG accordion is off)") for d in done)


def test_next_to_an_enabled_axis_its_values_decide(webui):
    processed = grid([False], ("[PAG] Enabled", "True, False"), ("[PAG] Scale", "2"))
    on, off = processed.infotexts
    assert "PAG scale: 2" in on and "PAG note" not in on
    assert "PAG" not in off
    plain = grid([False], ("Seed", "11"))
    assert torch.equal(torch.as_tensor(processed.images[1]), torch.as_tensor(plain.images[0]))


def test_with_the_accordion_on_no_note(webui):
    processed = grid([{"enabled": True, "layers": "mid"}], ("[PAG] Scale", "1, 4"))
    assert all("PAG note" not in t for t in processed.infotexts)
    assert "PAG scale: 1" in processed.infotexts[0] and "PAG scale: 4" in processed.infotexts[1]


def test_through_the_api_a_bad_cell_is_a_422_with_the_same_message(webui):
    """The host's API runs the X/Y/Z script the same way; its error handler answers the PagError the axis
    check raises with the status it carries (the same 422 message as a bad alwayson_scripts arg)."""
    from fastapi.testclient import TestClient
    from modules.api.api import create_app

    client = TestClient(create_app()[0])
    script = next(s for s in scripts.scripts_txt2img.selectable_scripts if s.title() == "X/Y/Z plot")
    labels = [o.label for o in script.current_axis_options]

    def post(pag_args, label, values):
        xyz_args = [labels.index(label), values, None, 0, "", None, 0, "", None, True, False, False, False, False,
                    False, False, 0, True]
        return client.post("/sdapi/v1/txt2img", json={
            "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 3,
            "script_name": "x/y/z plot", "script_args": xyz_args, "alwayson_scripts": {"pag": {"args": pag_args}}})

    r = post([{"enabled": True, "end": 0.5}], "[PAG] Start", "0.2, 0.6")
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "PagError" and body["detail"] == "PAG start: 0.6 is not before the end; allowed: a fraction below PAG end (0.5)"
    assert body["body"] == {"field": "PAG start", "value": 0.6, "allowed": "a fraction below PAG end (0.5)"}
    r = post([{"enabled": False}], "[PAG] Scale", "1, 5")
    assert r.status_code == 200, r.text
    assert r.json()["info"].count("turned on by the X/Y/Z axis [PAG] Scale") >= 1


# --- guidances 2 and 3 (issue 19) ----------------------------------------------------------------------

def test_guidance_axes_run_each_cell_with_its_own_guidance(webui):
    """[PAG 2] Method × [PAG 2] Scale: each cell runs guidance 2 with its values (turned on by the axis), the
    infotext says so, and a cell's values really change its image."""
    labels = [o.label for o in next(s for s in scripts.scripts_txt2img.selectable_scripts
                                    if s.title() == "X/Y/Z plot").current_axis_options]
    for label in ("[PAG 2] Method", "[PAG 2] Scale", "[PAG 2] Layers", "[PAG 3] Method", "[PAG 3] Scale", "[PAG 3] Layers"):
        assert labels.count(label) == 1
    processed = grid([{"enabled": True, "layers": "mid"}], ("[PAG 2] Method", "seg, tpg"), ("[PAG 2] Scale", "1, 4"),
                     ("[PAG 2] Layers", "mid"), width=128, height=128)
    texts = processed.infotexts
    assert len(texts) == 4
    for text, (method, scale) in zip(texts, [("seg", "1"), ("tpg", "1"), ("seg", "4"), ("tpg", "4")]):
        assert f"PAG 2 method: {method}" in text and f"PAG 2 scale: {scale}" in text and "PAG 2 layers: mid" in text
    images = [torch.as_tensor(i) for i in processed.images]
    assert all(not torch.equal(images[a], images[b]) for a in range(4) for b in range(a + 1, 4))


def test_a_bad_guidance_cell_stops_the_grid_naming_the_guidance(webui):
    calls, handle = unet_calls(webui)
    try:
        with pytest.raises(PagError, match=re.escape("PAG 3 layers: 'u9' does not exist in this SD1.x UNet")):
            grid([{"enabled": True}], ("[PAG 3] Method", "tpg"), ("[PAG 3] Layers", "d1, u9"))
        with pytest.raises(PagError, match=re.escape("PAG 2 method: 'dropout' is not a choice")):
            grid([{"enabled": True}], ("[PAG 2] Method", "seg, dropout"))
    finally:
        handle.remove()
    assert calls == []
