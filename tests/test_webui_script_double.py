"""Checks that the A1111 1.10 script/infotext/UI/API/X-Y-Z double behaves like the host.

Uses a tiny always-on dummy script (not the real extension). Sampling goes through the sampling-path
double's real ``modules.sd_samplers.create_sampler`` with the tiny model from ``modules.sd_models_double``.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_WEBUI = str(Path(__file__).resolve().parent / "webui")
if _WEBUI not in sys.path:
    sys.path.insert(0, _WEBUI)

import gradio as gr  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from modules import infotext_utils, processing, script_callbacks, scripts, shared  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402

LOG = []


def _rec(script, hook, p, args, **kw):
    LOG.append((script, hook, tuple(args), bool(getattr(p, "is_hr_pass", False)), kw))


class DummyScript(scripts.Script):
    """Always-on dummy: an InputAccordion (enabled) and a slider (scale)."""

    fail_in = set()

    def title(self):
        return "Dummy PAGish"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with InputAccordion(False, label="Dummy") as enabled:
            scale = gr.Slider(minimum=0.0, maximum=10.0, step=0.5, value=3.0, label="Dummy scale")
        self.infotext_fields = [(enabled, lambda d: "Dummy scale" in d), (scale, "Dummy scale")]
        self.paste_field_names = ["Dummy scale"]
        return [enabled, scale]

    def _hook(self, name, p, args, **kw):
        _rec("dummy", name, p, args, **kw)
        if name in DummyScript.fail_in:
            raise RuntimeError(f"dummy failure in {name}")

    def setup(self, p, *args):
        self._hook("setup", p, args)

    def before_process(self, p, *args):
        self._hook("before_process", p, args)

    def process(self, p, enabled, scale):
        self._hook("process", p, (enabled, scale))
        if enabled:
            p.extra_generation_params["Dummy scale"] = scale
        else:
            p.extra_generation_params.pop("Dummy scale", None)

    def before_process_batch(self, p, *args, **kw):
        self._hook("before_process_batch", p, args, batch_number=kw["batch_number"])

    def after_extra_networks_activate(self, p, *args, **kw):
        self._hook("after_extra_networks_activate", p, args)

    def process_batch(self, p, *args, **kw):
        self._hook("process_batch", p, args, batch_number=kw["batch_number"])

    def process_before_every_sampling(self, p, *args, **kw):
        self._hook("process_before_every_sampling", p, args, x_shape=tuple(kw["x"].shape), keys=tuple(sorted(kw)))

    def before_hr(self, p, *args):
        self._hook("before_hr", p, args)

    def post_sample(self, p, ps, *args):
        self._hook("post_sample", p, args)

    def postprocess_batch(self, p, *args, **kw):
        self._hook("postprocess_batch", p, args, n=len(kw["images"]))

    def postprocess_image(self, p, pp, *args):
        self._hook("postprocess_image", p, args)

    def postprocess(self, p, processed, *args):
        self._hook("postprocess", p, args, images=len(processed.images))


class SecondScript(scripts.Script):
    """A second always-on script with one textbox arg, to check args slicing."""

    def title(self):
        return "Second Dummy"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(value="hello", label="Second text")]

    def process(self, p, *args):
        _rec("second", "process", p, args)

    def process_before_every_sampling(self, p, *args, **kw):
        _rec("second", "process_before_every_sampling", p, args)


HOOKS = {"before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
         "process_before_every_sampling", "before_hr", "post_sample", "postprocess_batch", "postprocess_image",
         "postprocess"}


@pytest.fixture()
def webui(monkeypatch):
    """Fresh script registry with both dummies, UI built for both tabs, tiny model as shared.sd_model."""
    from modules import sd_models_double

    LOG.clear()
    DummyScript.fail_in = set()
    scripts.test_only_reset()
    infotext_utils.reset()
    script_callbacks.clear_callbacks()
    scripts.test_only_register_script_class(DummyScript)
    scripts.test_only_register_script_class(SecondScript)
    scripts.test_only_build_ui(is_img2img=False)
    scripts.test_only_build_ui(is_img2img=True)
    monkeypatch.setattr(shared, "sd_model", _model(sd_models_double))
    yield scripts
    scripts.test_only_reset()
    infotext_utils.reset()
    script_callbacks.clear_callbacks()


_MODEL = []


def _model(sd_models_double):
    if not _MODEL:
        _MODEL.append(sd_models_double.make_sd15_model(seed=0))
    return _MODEL[0]


def _cond(batch, tokens=4):
    dim = shared.sd_model.context_dim
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)


def _txt2img(runner, args, **kw):
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    kw.setdefault("steps", 3)
    kw.setdefault("sampler_name", "Euler")
    kw.setdefault("seed", 7)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", negative_prompt="blurry", **kw)
    p.c, p.uc = _cond(p.batch_size)
    p.scripts = runner
    p.script_args = tuple(args)
    return p


def _sequence(who="dummy"):
    return [(hook, hr) for script, hook, _, hr, _ in LOG if script == who and hook in HOOKS]


def test_ui_assigns_args_ranges_and_dropdown(webui):
    runner = scripts.scripts_txt2img
    assert isinstance(runner.inputs[0], gr.Dropdown) and runner.inputs[0].label == "Script"
    dummy, second = runner.alwayson_scripts
    assert (dummy.args_from, dummy.args_to) == (1, 3)
    assert (second.args_from, second.args_to) == (3, 4)
    assert dummy.name == "dummy pagish" and dummy.tabname == "txt2img" and dummy.alwayson
    enabled, scale = runner.inputs[1:3]
    assert isinstance(enabled, InputAccordion) and enabled.value is False and enabled.visible is False
    assert enabled.elem_id.endswith("-checkbox") and enabled.accordion.open is False
    assert scale.value == 3.0
    assert dummy.api_info.args[1].minimum == 0.0 and dummy.api_info.args[1].value == 3.0
    assert dummy.elem_id("scale") == "script_txt2img_dummy_pagish_scale"
    # each tab has its own instances
    assert scripts.scripts_img2img.alwayson_scripts[0] is not dummy
    assert scripts.scripts_img2img.alwayson_scripts[0].is_img2img


def test_hook_order_and_counts_batch_count_2(webui):
    p = _txt2img(scripts.scripts_txt2img, [0, True, 2.5, "x"], n_iter=2)
    processed = processing.process_images(p)
    per_batch = ["before_process_batch", "after_extra_networks_activate", "process_batch",
                 "process_before_every_sampling", "post_sample", "postprocess_batch", "postprocess_image"]
    assert [h for h, _ in _sequence()] == ["before_process", "process"] + per_batch * 2 + ["postprocess"]
    assert [kw["batch_number"] for _, h, _, _, kw in LOG if h == "process_batch"] == [0, 1]
    assert len(processed.images) == 2 and processed.images[0].shape == (4, 8, 8)
    assert not any(hr for _, hr in _sequence())
    pbes = [kw for s, h, _, _, kw in LOG if s == "dummy" and h == "process_before_every_sampling"]
    assert pbes[0]["keys"] == ("c", "noise", "uc", "x")
    # setup ran once, when script_args was assigned
    assert [h for s, h, *_ in LOG if s == "dummy"].count("setup") == 1


def test_hook_order_with_hires_fix_new_sampler_per_pass(webui, monkeypatch):
    from modules import sd_samplers
    created = []
    real = sd_samplers.create_sampler

    def counting(name, model):
        created.append(name)
        return real(name, model)

    monkeypatch.setattr(sd_samplers, "create_sampler", counting)
    p = _txt2img(scripts.scripts_txt2img, [0, True, 2.5, "x"], n_iter=2, enable_hr=True, hr_scale=2.0,
                 hr_second_pass_steps=2, denoising_strength=0.5)
    processed = processing.process_images(p)
    seq = _sequence()
    per_batch = [("before_process_batch", False), ("after_extra_networks_activate", False), ("process_batch", False),
                 ("process_before_every_sampling", False), ("after_extra_networks_activate", True), ("before_hr", True),
                 ("process_before_every_sampling", True), ("post_sample", False), ("postprocess_batch", False),
                 ("postprocess_image", False)]
    assert seq == [("before_process", False), ("process", False)] + per_batch * 2 + [("postprocess", False)]
    shapes = [kw["x_shape"] for s, h, _, _, kw in LOG if s == "dummy" and h == "process_before_every_sampling"]
    assert shapes == [(1, 4, 8, 8), (1, 4, 16, 16)] * 2
    assert created == ["Euler"] * 4  # one per first pass and one per hires pass
    assert processed.images[0].shape == (4, 16, 16)
    assert "Hires upscale: 2.0" in processed.infotexts[0] and "Denoising strength: 0.5" in processed.infotexts[0]


def test_args_slicing_two_alwayson_scripts(webui):
    p = _txt2img(scripts.scripts_txt2img, [0, True, 4.5, "second-arg"])
    processing.process_images(p)
    dummy_args = {args for s, h, args, _, _ in LOG if s == "dummy" and h == "process"}
    second_args = {args for s, h, args, _, _ in LOG if s == "second" and h in ("process", "process_before_every_sampling")}
    assert dummy_args == {(True, 4.5)}
    assert second_args == {("second-arg",)}
    assert p.extra_generation_params["Dummy scale"] == 4.5


def test_failing_hook_is_logged_and_processing_continues(webui, capsys):
    DummyScript.fail_in = {"process", "process_before_every_sampling"}
    p = _txt2img(scripts.scripts_txt2img, [0, True, 2.0, "x"])
    processed = processing.process_images(p)
    err = capsys.readouterr().err
    assert "*** Error running process: " in err and "dummy failure in process" in err
    assert "*** Error running process_before_every_sampling: " in err
    assert len(processed.images) == 1
    # the other script's hooks and the later hooks still ran
    assert ("second", "process_before_every_sampling") in {(s, h) for s, h, *_ in LOG}
    assert _sequence()[-1] == ("postprocess", False)


def test_postprocess_is_not_in_a_finally(webui, monkeypatch):
    from modules import sd_samplers

    def boom(name, model):
        raise MemoryError("fake OOM")

    monkeypatch.setattr(sd_samplers, "create_sampler", boom)
    p = _txt2img(scripts.scripts_txt2img, [0, True, 2.0, "x"])
    with pytest.raises(MemoryError):
        processing.process_images(p)
    assert "postprocess" not in [h for h, _ in _sequence()]


def test_img2img_sampler_once_mask_blend_and_hook_x(webui, monkeypatch):
    from modules import sd_samplers
    created = []
    real = sd_samplers.create_sampler
    monkeypatch.setattr(sd_samplers, "create_sampler", lambda n, m: created.append(n) or real(n, m))
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1.0
    p = processing.StableDiffusionProcessingImg2Img(prompt="a cat", init_images=[init], mask=mask, denoising_strength=0.6,
                                                    width=64, height=64, steps=5, sampler_name="Euler", seed=3, n_iter=2)
    p.c, p.uc = _cond(1)
    p.scripts = scripts.scripts_img2img
    p.script_args = (0, True, 1.0, "y")
    processed = processing.process_images(p)
    assert created == ["Euler"]
    assert torch.equal(processed.images[0][:, :, :4], init[:, :, :4])
    assert not torch.allclose(processed.images[0][:, :, 4:], init[:, :, 4:])
    assert "Denoising strength: 0.6" in processed.infotexts[0]
    shapes = [kw["x_shape"] for s, h, _, _, kw in LOG if s == "dummy" and h == "process_before_every_sampling"]
    assert shapes == [(1, 4, 8, 8)] * 2


def test_seeds_are_deterministic(webui):
    a = processing.process_images(_txt2img(scripts.scripts_txt2img, [0, False, 3.0, "x"], batch_size=2))
    b = processing.process_images(_txt2img(scripts.scripts_txt2img, [0, False, 3.0, "x"], batch_size=2))
    assert torch.equal(a.images[0], b.images[0]) and not torch.equal(a.images[0], a.images[1])
    assert a.all_seeds == [7, 8]
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(8))
    assert torch.equal(processing.ImageRNG((4, 8, 8), [7, 8]).next()[1], expected)


def test_infotext_create_and_parse_round_trip(webui):
    p = _txt2img(scripts.scripts_txt2img, [0, False, 3.0, "x"])
    p.setup_prompts()
    p.all_seeds, p.all_subseeds = [7], [7]
    p.extra_generation_params.update({
        "Dummy scale": 2.5,
        "Dummy layers": "input, middle",
        "Dummy map": {"a": 1},
        "Dummy none": None,
        "Dummy flag": "Dummy flag",
        "Dummy quote": 'say "hi": now',
    })
    text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds)
    assert text.startswith("a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.0, Seed: 7, Size: 64x64")
    assert 'Dummy layers: "input, middle"' in text
    assert "Dummy none" not in text
    assert ", Dummy flag," in text + ","
    params = infotext_utils.parse_generation_parameters(text)
    assert params["Prompt"] == "a cat" and params["Negative prompt"] == "blurry"
    assert params["Dummy scale"] == "2.5" and params["Dummy layers"] == "input, middle"
    assert params["Dummy quote"] == 'say "hi": now'
    assert params["Size-1"] == "64" and params["Size-2"] == "64" and params["Steps"] == "3"
    assert params["Clip skip"] == "1" and params["RNG"] == "GPU"
    assert "Dummy flag" not in params  # a bare key is not a "key: value" pair
    assert infotext_utils.quote("a:b") == '"a:b"' and infotext_utils.quote(3) == 3
    assert infotext_utils.unquote('"x, y"') == "x, y" and infotext_utils.unquote('"bad') == '"bad'


def test_infotext_list_and_callable_values(webui):
    p = _txt2img(scripts.scripts_txt2img, [0, False, 3.0, "x"], batch_size=2)
    p.setup_prompts()
    p.all_seeds, p.all_subseeds = [7, 8], [7, 8]
    p.extra_generation_params["Per image"] = ["first", "second"]
    p.extra_generation_params["Computed"] = lambda p, index, **kw: f"idx{index}"
    text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=1)
    assert "Per image: second" in text and "Computed: idx1" in text and "Seed: 8" in text


def test_paste_conversion_rules(webui, monkeypatch):
    runner = scripts.scripts_txt2img
    enabled, scale = runner.inputs[1:3]
    text_box = runner.inputs[3]
    fields = [(enabled, lambda d: "Dummy scale" in d), (scale, "Dummy scale"), (text_box, "Second text")]
    params = infotext_utils.parse_generation_parameters("p\nSteps: 3, Sampler: Euler, Dummy scale: 4.5, Second text: hey")
    upd = infotext_utils.paste(fields, params)
    assert upd[0]["value"] is True and upd[1]["value"] == 4.5 and upd[2]["value"] == "hey"
    # missing key -> gr.update() (unchanged); callable key may decide False
    upd = infotext_utils.paste(fields, infotext_utils.parse_generation_parameters("p\nSteps: 3, Sampler: Euler, CFG scale: 7"))
    assert upd[0]["value"] is False and "value" not in upd[1] and "value" not in upd[2]
    # bool "False" -> False, other strings -> bool(v); int via float; bad conversion swallowed
    cb = gr.Checkbox(value=True)
    num = gr.Number(value=3, precision=0)
    assert isinstance(num.value, int)
    upd = infotext_utils.paste([(cb, "A"), (num, "B"), (scale, "C")], {"A": "False", "B": "5", "C": "abc"})
    assert upd[0]["value"] is False and upd[1]["value"] == 5.0 and isinstance(upd[1]["value"], float)
    assert "value" not in upd[2]
    assert infotext_utils.paste([(cb, "A")], {"A": "no"})[0]["value"] is True
    # opts.infotext_skip_pasting drops keys before conversion
    monkeypatch.setitem(shared.opts.data, "infotext_skip_pasting", ["Dummy scale"])
    params = infotext_utils.parse_generation_parameters("p\nSteps: 3, Sampler: Euler, Dummy scale: 4.5")
    assert "Dummy scale" not in params
    assert infotext_utils.paste(fields, params)[0]["value"] is False


def test_paste_text_runs_infotext_pasted_callback(webui):
    seen = []
    script_callbacks.on_infotext_pasted(lambda text, params: seen.append(params.get("Dummy scale")))
    enabled, scale = scripts.scripts_txt2img.inputs[1:3]
    upd = infotext_utils.paste_text([(scale, "Dummy scale")], "p\nSteps: 3, Sampler: Euler, Dummy scale: 1.5")
    assert seen == ["1.5"] and upd[0]["value"] == 1.5


# ------------------------------------------------------------------------------------------ API ---

@pytest.fixture()
def client(webui):
    from fastapi.testclient import TestClient
    from modules.api import api as api_module

    started = []

    def on_started(demo, app):
        started.append(app)

        @app.get("/dummy-ext/ping")
        def ping():
            return {"ok": True}

    script_callbacks.on_app_started(on_started)
    app, api = api_module.create_app()
    assert started == [app]
    with TestClient(app) as c:
        c.api = api
        yield c


def _req(**kw):
    body = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64,
            "seed": 5, "sampler_name": "Euler"}
    body.update(kw)
    return body


def test_api_alwayson_scripts_mapping(client):
    assert client.get("/dummy-ext/ping").json() == {"ok": True}
    assert client.api.default_script_arg_txt2img == [0, False, 3.0, "hello"]
    r = client.post("/sdapi/v1/txt2img", json=_req(alwayson_scripts={"dummy pagish": {"args": [True, 6.5, "ignored-extra"]}}))
    assert r.status_code == 200, r.text
    args = [a for s, h, a, _, _ in LOG if s == "dummy" and h == "process"]
    assert args == [(True, 6.5)]
    assert [a for s, h, a, _, _ in LOG if s == "second" and h == "process"] == [("hello",)]
    body = r.json()
    info = json.loads(body["info"])
    assert info["extra_generation_params"]["Dummy scale"] == 6.5
    assert "Dummy scale: 6.5" in info["infotexts"][0]
    assert len(body["images"]) == 1 and len(body["images"][0]) == 4  # latent [C][h][w]
    # partial args keep defaults; raw JSON values are passed as-is (no type validation)
    LOG.clear()
    r = client.post("/sdapi/v1/txt2img", json=_req(alwayson_scripts={"DUMMY PAGISH": {"args": ["yes"]}}))
    assert r.status_code == 200
    assert [a for s, h, a, _, _ in LOG if s == "dummy" and h == "process"] == [("yes", 3.0)]
    setup_calls = [h for s, h, *_ in LOG if s == "dummy" and h == "setup"]
    assert setup_calls == ["setup"]


def test_api_unknown_script_is_422(client):
    r = client.post("/sdapi/v1/txt2img", json=_req(alwayson_scripts={"No Such Script": {"args": []}}))
    assert r.status_code == 422
    assert r.json()["detail"] == "Script 'No Such Script' not found"


def test_api_exception_inside_processing_is_500(client, monkeypatch):
    from modules import sd_samplers

    def boom(name, model):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(sd_samplers, "create_sampler", boom)
    r = client.post("/sdapi/v1/txt2img", json=_req())
    assert r.status_code == 500
    assert r.json()["error"] == "RuntimeError" and r.json()["errors"] == "sampler exploded"


def test_api_script_info_and_infotext_request(client):
    info = client.get("/sdapi/v1/script-info").json()
    names = [(x["name"], x["is_img2img"], x["is_alwayson"]) for x in info]
    assert ("dummy pagish", False, True) in names and ("dummy pagish", True, True) in names
    dummy = next(x for x in info if x["name"] == "dummy pagish")
    assert [a["label"] for a in dummy["args"]] == ["Dummy", "Dummy scale"]
    # request "infotext" fills the script args through infotext_fields (1.8+)
    r = client.post("/sdapi/v1/txt2img", json=_req(infotext="a cat\nSteps: 3, Sampler: Euler, Dummy scale: 1.5"))
    assert r.status_code == 200, r.text
    assert [a for s, h, a, _, _ in LOG if s == "dummy" and h == "process"] == [(True, 1.5)]


def test_api_img2img(client):
    init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2)).tolist()
    r = client.post("/sdapi/v1/img2img", json=_req(init_images=[init], denoising_strength=0.5,
                                                   alwayson_scripts={"Dummy PAGish": {"args": [True, 2.0]}}))
    assert r.status_code == 200, r.text
    assert [kw["x_shape"] for s, h, _, _, kw in LOG if s == "dummy" and h == "process_before_every_sampling"] == [(1, 4, 8, 8)]


# ------------------------------------------------------------------------------------- X/Y/Z ---

def test_xyz_grid_module_registration_and_cells(webui):
    module = scripts.test_only_load_builtin_xyz_grid()
    found = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    assert found is module and module.__name__ == "xyz_grid.py"
    assert module.format_value_add_label(None, module.axis_options[6], 2.5) == "CFG Scale: 2.5"
    assert module.boolean_choice(reverse=True)() == ["False", "True"]
    axis = module.AxisOption("[Dummy] Scale", float, module.apply_field("dummy_scale"))
    module.axis_options.append(axis)
    try:
        assert module.process_axis(None, axis, "1-2 (+0.5)") == [1.0, 1.5, 2.0]
        assert module.process_axis(None, module.axis_options[4], "1-3, 10") == [1, 2, 3, 10]

        p = _txt2img(scripts.scripts_txt2img, [0, True, 2.0, "x"])
        results, cells = module.run_grid(p, axis, [1.0, 2.0])
        assert [c.dummy_scale for c in cells] == [1.0, 2.0]
        assert all(c.extra_generation_params is p.extra_generation_params for c in cells[1:])
        assert [h for h, _ in _sequence()].count("process") == 2
        assert all(len(r.images) == 1 for r in results)
        assert "X Type: [Dummy] Scale" in module.run_grid.last_grid_infotext[1]
    finally:
        module.axis_options.remove(axis)


def test_xyz_script_run_through_runner(webui):
    module = scripts.test_only_load_builtin_xyz_grid()
    runner = scripts.test_only_build_ui(is_img2img=False)
    xyz = next(s for s in runner.selectable_scripts if s.title() == "X/Y/Z plot")
    assert xyz.args_from == 4  # after both always-on scripts
    args = [None] * xyz.args_to
    args[0] = runner.selectable_scripts.index(xyz) + 1
    args[1:4] = [True, 2.0, "x"]
    labels = [o.label for o in xyz.current_axis_options]
    args[xyz.args_from:xyz.args_to] = [labels.index("Steps"), "2, 3", None, 0, "", None, 0, "", None,
                                        True, False, False, False, False, False, False, 0, True]
    p = _txt2img(runner, args)
    processed = runner.run(p, *p.script_args)
    assert len(processed.images) == 2 and module is not None
    assert [h for h, _ in _sequence()].count("process") == 2
