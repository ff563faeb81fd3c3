import json

import pytest
from lib_pag.ui import with_groups, groups_in
from lib_pag.layers import resolve_layers, build_catalog
from lib_pag import api
from modules import sd_models_double


def strengths(spec, unet):
    return {l.name: s for l, s in resolve_layers(spec, build_catalog(unet)).chosen}


def test_ticking_an_unrelated_group_keeps_existing_strengths():
    unet = sd_models_double.make_sd15_model(seed=1).model.diffusion_model
    for spec in ("mid:0.5", "u0:0.5,up", "all:0.5"):
        ticked = groups_in(spec) + (["down"] if "down" not in groups_in(spec) else [])
        new = with_groups(spec, ticked)
        before, after = strengths(spec, unet), strengths(new, unet)
        changed = {k: (before[k], after[k]) for k in before if after.get(k) != before[k]}
        print(repr(spec), "+ tick down ->", repr(new), "changed:", changed)
        assert not changed, (spec, new, changed)


def test_api_checks_layers_against_the_model_the_request_will_use():
    """A request that switches to SDXL (override_settings) with an SDXL-only layer name."""
    sd15_unet = sd_models_double.make_sd15_model(seed=1).model.diffusion_model
    body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0"},
            "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "m0.5"}]}}}
    import json
    err = api._check(json.dumps(body).encode(), "PAG", api.HostLookups(current_unet=lambda: sd15_unet))
    print(err)
    assert err is None


@pytest.mark.parametrize("spec, groups, expected", [
    ("all:0.5", ["mid", "up"], "mid:0.5,up:0.5"),
    ("mid,u0", [], "u0"),
    ("u0:0.5", ["up"], "u0:0.5,up"),
    ("mid:0.5,m0.3", ["mid", "down"], "mid:0.5,m0.3,down"),
])
def test_group_boxes_edit_the_text_in_place(spec, groups, expected):
    assert with_groups(spec, groups) == expected


def test_api_without_a_checkpoint_switch_still_checks_the_loaded_model():
    import json

    sd15_unet = sd_models_double.make_sd15_model(seed=1).model.diffusion_model
    body = {"prompt": "x", "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "m0.5"}]}}}
    err = api._check(json.dumps(body).encode(), "PAG", api.HostLookups(current_unet=lambda: sd15_unet))
    assert err is not None and err.field == "PAG layers"
    body["alwayson_scripts"]["pag"]["args"][0]["layers"] = "m0.x"  # syntax is checked either way
    body["override_settings"] = {"sd_model_checkpoint": "sd_xl_base_1.0"}
    assert api._check(json.dumps(body).encode(), "PAG", api.HostLookups(current_unet=lambda: sd15_unet)).field == "PAG layers"


def test_opening_the_accordion_redraws_the_map_for_the_loaded_model():
    """The page is built before the checkpoint loads (A1111 loads it in the background): the first map is
    an SD1.x example; ticking/opening the accordion must redraw it for the model now in memory."""
    import gradio as gr
    from lib_pag.ui import build_ui
    from unets import sdxl_unet

    loaded = {"unet": None}
    with gr.Blocks() as demo:
        controls, _, _ = build_ui(gr, None, lambda name: f"pag_{name}", lambda: loaded["unet"])
    enabled = controls[0]
    handlers = [demo.fns[i] for i, dep in enumerate(demo.dependencies)
                if enabled._id in dep["targets"] and dep["trigger"] == "change" and dep["backend_fn"]  # gradio 3.41's layout
                and demo.fns[i].fn.__name__ == "layers_reply"]  # (guidances 2 and 3 redraw their own status too)
    assert len(handlers) == 1
    before = json.loads(handlers[0].fn("mid"))
    assert before["for"] == "mid" and before["map"] == "" and "pag-pending" in before["status"]
    loaded["unet"] = sdxl_unet("base", seed=0)
    reply = json.loads(handlers[0].fn("mid"))  # the reply the browser copies into status, groups and map
    assert reply["for"] == "mid" and reply["groups"] == ["mid"]
    assert "SDXL" in reply["map"] and "SD1.x" not in reply["map"]
    assert "SDXL" in reply["status"]


def test_every_pag_control_has_a_hover_hint():
    """The hosts show ``webui_tooltip`` as the element's title (hints.js); every control and the accordion get one."""
    import gradio as gr
    from lib_pag.params import field_names
    from lib_pag.ui import HINTS, build_ui

    with gr.Blocks() as demo:
        controls, _, _ = build_ui(gr, None, lambda name: f"pag_{name}")
    assert [c.webui_tooltip for c in controls[:15]] == [HINTS[name] for name in field_names()]
    from lib_pag.params import BRANCH_FIELDS

    for k, index in enumerate((2, 3)):  # guidances 2 and 3: the same hints, said to be theirs
        branch = controls[15 + 14 * k:15 + 14 * (k + 1)]
        assert branch[0].webui_tooltip == HINTS["branch_enabled"]
        assert [c.webui_tooltip for c in branch[1:]] == [f"Guidance {index}: " + HINTS[n] for n in BRANCH_FIELDS[1:]]
    hinted = {c.elem_id for c in demo.blocks.values() if getattr(c, "webui_tooltip", None)}
    assert {f"pag_{n}" for n in ("preset", "groups", "status", "layer_map", "schedule_plot", "scale", "layers")} <= hinted
    assert all(len(text) > 20 for text in HINTS.values())
