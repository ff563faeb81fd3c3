"""The extension as a WebUI user and API client meet it: UI, infotext, API, X/Y/Z, safety, refusals."""

import html
import json
import re
import logging

import pytest
import torch

from a1111_harness import load_webui, pag_script, script_args, txt2img, unload_webui
from lib_pag import PagError, a1111
from modules import infotext_utils, processing, script_callbacks, scripts, shared
from modules import sd_models_double
from tests.exactness import assert_exact, assert_visible, rel_err, to_float64
from unets import assert_same_snapshot, snapshot


@pytest.fixture(scope="module")
def sd15():
    return sd_models_double.make_sd15_model(seed=7)


@pytest.fixture()
def webui(sd15):
    module, xyz = load_webui(sd15)
    yield sd15, module, xyz
    unload_webui()


def run(values, **kw):
    p = txt2img(values, **kw)
    return p, processing.process_images(p)


def unet_batches(model, monkeypatch):
    """Row counts of every UNet call."""
    sizes = []
    unet = model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def latents(processed):
    return torch.stack([torch.as_tensor(i) for i in processed.images])


# --- same image when off ---------------------------------------------------------------------------

def test_disabled_and_scale_zero_are_bit_identical_to_no_extension(sd15):
    load_webui(sd15)
    try:
        _, off = run([False, 3.0])
        _, zero = run([{"enabled": True, "scale": 0.0}])
        _, window_elsewhere = run([{"enabled": True, "start": 0.7, "end": 1.0}], steps=4)  # last step only
        _, on = run([{"enabled": True}])
    finally:
        unload_webui()
    # the same generation with no extension installed at all
    scripts.test_only_reset()
    script_callbacks.clear_callbacks()
    shared.sd_model = sd15
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", negative_prompt="blurry", width=64, height=64,
                                                    steps=4, sampler_name="Euler", seed=11, cfg_scale=5.0)
    p.scripts = scripts.scripts_txt2img
    p.script_args = ()
    bare = latents(processing.process_images(p))
    assert torch.equal(latents(off), bare)
    assert torch.equal(latents(zero), bare)
    assert (latents(on) - bare).abs().max() > 1e-3
    assert not torch.equal(latents(window_elsewhere), bare)
    assert (latents(window_elsewhere) - bare).abs().max() < (latents(on) - bare).abs().max()


def test_steps_outside_the_window_add_no_rows(webui, monkeypatch):
    model = webui[0]
    sizes, handle = unet_batches(model, monkeypatch)
    try:
        run([{"enabled": True, "start": 0.5, "end": 1.0}], steps=4, batch_size=2)
    finally:
        handle.remove()
    assert sizes == [4, 4, 6, 6]  # 2 cond + 2 uncond; + 2 perturbed twins only inside the window


@pytest.mark.parametrize("layers, prefix_rows", [("mid", 4), ("u0", 4), ("d1,mid", 4), ("d0", 6)])
def test_twins_share_the_unet_prefix_before_the_first_perturbed_layer(webui, layers, prefix_rows):
    """Shared-prefix fork: blocks before the first perturbed layer run once for a cond row and its twin
    (d1 is in input_blocks[2], so input_blocks[1] is shared; d0 is in input_blocks[1] itself)."""
    unet = webui[0].model.diffusion_model
    seen = {"in": [], "out": []}
    hooks = [unet.input_blocks[1].register_forward_pre_hook(lambda m, a: seen["in"].append(a[0].shape[0])),
             unet.output_blocks[11].register_forward_pre_hook(lambda m, a: seen["out"].append(a[0].shape[0]))]
    try:
        run([{"enabled": True, "layers": layers}], steps=2, batch_size=2)
    finally:
        for h in hooks:
            h.remove()
    assert seen["in"] == [prefix_rows] * 2 and seen["out"] == [6, 6]
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_separate_mode_keeps_the_cfg_batch_and_adds_a_call(webui, monkeypatch):
    sizes, handle = unet_batches(webui[0], monkeypatch)
    try:
        run([{"enabled": True, "mode": "separate"}], steps=2, batch_size=2)
    finally:
        handle.remove()
    assert sizes == [4, 2, 4, 2]


def test_pag_alone_at_cfg_one_uses_the_uncond_slot(webui, monkeypatch):
    """At CFG 1 the uncond rows cannot change the image: they carry the twins, 2 rows instead of 3."""
    sizes, handle = unet_batches(webui[0], monkeypatch)
    try:
        run([{"enabled": True}], steps=2, batch_size=2, cfg_scale=1.0)
        run([{"enabled": True}], steps=1, batch_size=1, cfg_scale=1.0, prompt="a cat AND a dog :0.5")  # weights ≠ 1
        run([{"enabled": True}], steps=1, batch_size=1, cfg_scale=1.5)
    finally:
        handle.remove()
    assert sizes == [4, 4, 5, 3]


def test_hires_pass_setting(webui, monkeypatch):
    sizes, handle = unet_batches(webui[0], monkeypatch)
    try:
        p, _ = run([{"enabled": True, "hires": "off"}], steps=2, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2,
                   denoising_strength=0.5)
    finally:
        handle.remove()
    first, hires = sizes[:2], sizes[2:]
    assert first == [3, 3] and all(s == 2 for s in hires) and hires
    assert p.extra_generation_params["PAG hires"] == "off"


# --- the model is never left patched ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["exception", "interrupt", "skip"])
def test_fault_mid_sampling_leaves_model_clean(webui, monkeypatch, how):
    model = webui[0]
    before = snapshot(model)
    _, baseline = run([False])
    calls = {"n": 0}

    def fault(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            if how == "exception":
                raise RuntimeError("boom inside the UNet")
            setattr(shared.state, "interrupted" if how == "interrupt" else "skipped", True)

    handle = model.model.diffusion_model.output_blocks[4].register_forward_pre_hook(fault)
    try:
        if how == "exception":
            with pytest.raises(RuntimeError, match="boom"):
                run([{"enabled": True, "layers": "all"}], steps=4)
        else:
            run([{"enabled": True, "layers": "all"}], steps=4)
    finally:
        handle.remove()
        shared.state.interrupted = shared.state.skipped = False
    assert_same_snapshot(before, snapshot(model))
    assert not any("forward" in m.__dict__ for m in model.modules())
    _, after = run([False])
    assert torch.equal(latents(after), latents(baseline))


def test_jobs_do_not_leak_state(webui):
    _, a = run([{"enabled": True, "scale": 2.0}])
    _, b = run([{"enabled": True, "scale": 5.0, "layers": "u0"}])
    _, a2 = run([{"enabled": True, "scale": 2.0}])
    assert torch.equal(latents(a), latents(a2))
    assert not torch.equal(latents(a), latents(b))
    assert len(a1111.JOBS) == 0


# --- infotext ---------------------------------------------------------------------------------------

def test_infotext_written_and_pasted_back(webui):
    values = {"enabled": True, "scale": 4.5, "layers": "m0,u0-u2:0.5", "start": 0.1, "schedule": "cosine", "rescale": 0.25,
              "method": "blur", "blur_sigma": float("inf")}
    p, processed = run([values])
    text = processed.infotexts[0]
    assert "PAG enabled: True" in text and "PAG scale: 4.5" in text and 'PAG layers: "m0,u0-u2:0.5"' in text
    assert "PAG schedule: cosine" in text and "PAG blur sigma: inf" in text
    assert "PAG mode" not in text  # defaults are not repeated
    script, runner = pag_script()
    fields = list(script.infotext_fields)
    names = ["enabled", "scale", "layers", "method", "blur_sigma", "noise_scale", "start", "end", "sigma_start",
             "sigma_end", "schedule", "rescale", "hires", "hires_scale", "mode"]
    # the host's paste: parse, infotext_pasted callbacks (ours completes the PAG keys), convert per control
    infotext_utils.apply_updates(fields, infotext_utils.paste_text(fields, text))
    pasted = {name: c.value for name, (c, _) in zip(names, fields)}
    assert pasted["enabled"] is True and pasted["scale"] == 4.5 and pasted["layers"] == "m0,u0-u2:0.5"
    assert pasted["start"] == 0.1 and pasted["schedule"] == "cosine" and pasted["rescale"] == 0.25
    assert pasted["method"] == "blur" and pasted["blur_sigma"] == 1e6  # the UI's stand-in for inf
    # pasting the settings back reproduces the image
    again = processing.process_images(txt2img(list(pasted.values())))
    assert torch.equal(latents(again), latents(processed))
    # an infotext without PAG keys turns PAG off
    infotext_utils.apply_updates(fields, infotext_utils.paste_text(
        fields, "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"))
    assert fields[0][0].value is False
    assert script.paste_field_names == [label for _, label in fields]


def test_send_to_the_other_tab_copies_every_pag_control(webui):
    """A1111's "Send to img2img" copies the controls whose infotext key is in paste_field_names."""
    src, _ = pag_script(is_img2img=False)
    dst, _ = pag_script(is_img2img=True)
    copied_from = [c for c, key in src.infotext_fields if key in dst.paste_field_names]
    copied_to = [c for c, key in dst.infotext_fields if key in src.paste_field_names]
    assert len(copied_from) == len(copied_to) == 15 + 2 * 14  # the main settings, then guidances 2 and 3


def test_a_bad_pasted_value_leaves_the_controls_alone(webui, caplog):
    script, _ = pag_script()
    fields = list(script.infotext_fields)
    before = [c.value for c, _ in fields]
    with caplog.at_level(logging.ERROR, logger="sd_webui_pag"):
        updates = infotext_utils.paste_text(fields, "a cat\nSteps: 20, PAG scale: 500, PAG layers: mid")
    assert [c.value for c, _ in fields] == before and all(set(u) == {"__type__"} for u in updates), updates
    assert "PAG scale: 500.0 is out of range" in caplog.text


def test_disabled_run_writes_nothing(webui):
    _, processed = run([False, 9.0])
    assert "PAG" not in processed.infotexts[0]


# --- X/Y/Z ------------------------------------------------------------------------------------------

def test_xyz_axes_and_cells(webui):
    _, _, xyz = webui
    labels = [o.label for o in xyz.axis_options]
    for label in ("[PAG] Scale", "[PAG] Layers", "[PAG] Method", "[PAG] Start", "[PAG] End", "[PAG] Rescale", "[PAG] Enabled"):
        assert labels.count(label) == 1
    enabled_axis = next(o for o in xyz.axis_options if o.label == "[PAG] Enabled")
    scale_axis = next(o for o in xyz.axis_options if o.label == "[PAG] Scale")
    p = txt2img([False])
    results, cells = xyz.run_grid(p, enabled_axis, [True, False])
    assert "PAG scale: 3" in results[0].infotexts[0]
    assert "PAG" not in results[1].infotexts[0]  # the shared dict lost the keys again in the disabled cell
    p = txt2img([{"enabled": True}])
    results, _ = xyz.run_grid(p, scale_axis, [1.0, 6.0])
    assert "PAG scale: 1" in results[0].infotexts[0] and "PAG scale: 6" in results[1].infotexts[0]
    assert not torch.equal(latents(results[0]), latents(results[1]))
    with pytest.raises(Exception, match="PAG scale"):
        scale_axis.confirm(p, [3.0, -1.0])
    # registering twice (UI reload) adds nothing
    script_callbacks.before_ui_callback()
    assert [o.label for o in xyz.axis_options].count("[PAG] Scale") == 1


# --- API --------------------------------------------------------------------------------------------

@pytest.fixture()
def client(webui):
    from fastapi.testclient import TestClient
    from modules.api.api import create_app

    app, _ = create_app()
    return TestClient(app)


def request(client, args, **body):
    payload = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
               "sampler_name": "Euler", "seed": 3, "cfg_scale": 5, **body}
    if args is not None:
        payload["alwayson_scripts"] = {"pag": {"args": args}}
    return client.post("/sdapi/v1/txt2img", json=payload)


def test_api_positional_and_named_args(client):
    positional = request(client, [True, 3.5, "mid"])
    named = request(client, [{"enabled": True, "scale": 3.5, "layers": "mid"}])
    alias = request(client, [{"enabled": True, "pag_scale": 3.5, "pag_applied_layers": ["mid"]}])
    plain = request(client, None)
    for r in (positional, named, alias, plain):
        assert r.status_code == 200, r.text
    info = json.loads(named.json()["info"])
    assert info["extra_generation_params"]["PAG scale"] == "3.5"
    assert positional.json()["images"] == named.json()["images"] == alias.json()["images"]
    assert named.json()["images"] != plain.json()["images"]


@pytest.mark.parametrize("args, field, words", [
    ([{"enabled": True, "colour": 1}], "PAG args", "is not a PAG setting"),
    ([{"enabled": True, "scale": "high"}], "PAG scale", "wrong type"),
    ([True, -2.0], "PAG scale", "out of range"),
    ([{"enabled": True, "layers": "u42"}], "PAG layers", "does not exist in this SD1.x UNet; valid: d0-d5, m0, u0-u8"),
    ([{"enabled": True, "method": "dropout"}], "PAG method", "allowed: identity, blur, noise"),
    ([{"enabled": True, "start": 0.8, "end": 0.2}], "PAG start", "not before the end"),
    ({"enabled": True}, "PAG args", "a list"),
])
def test_api_rejects_bad_input_with_422_naming_the_field(client, webui, args, field, words):
    model = webui[0]
    before = snapshot(model)
    r = request(client, args)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field and words in body["detail"]
    assert_same_snapshot(before, snapshot(model))


def test_script_info_lists_pag(client):
    info = client.get("/sdapi/v1/script-info").json()
    pag = [s for s in info if s["name"] == "pag"]
    assert len(pag) == 2 and all(s["is_alwayson"] for s in pag)
    labels = [a["label"] for a in pag[0]["args"]]
    assert labels[1] == "PAG scale" and labels[2] == "PAG layers"


# --- refusals and model changes ---------------------------------------------------------------------

def test_edit_model_is_refused_with_a_message(monkeypatch, caplog):
    model = sd_models_double.make_sd15_model(seed=8, cond_stage_key="edit")
    load_webui(model)
    try:
        sizes, handle = unet_batches(model, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="sd_webui_pag"):
            p, processed = run([{"enabled": True}], steps=2)
        handle.remove()
    finally:
        unload_webui()
    assert "edit models (InstructPix2Pix) are not supported" in caplog.text
    assert any("PAG not applied" in c for c in p.comments)
    assert "PAG scale" not in processed.infotexts[0]
    assert 'PAG note: "not applied: edit models (InstructPix2Pix) are not supported"' in processed.infotexts[0]
    assert all(s in (2, 3) for s in sizes)  # edit model: cond + uncond + image-uncond, never more


def test_ssd1b_without_middle_attention_refuses_mid(monkeypatch, caplog):
    from unets import sdxl_unet

    unet = sdxl_unet("ssd", seed=9)
    model = sd_models_double.make_sdxl_model(unet, context_dim=32, adm_in_channels=unet.label_emb[0][0].in_features, is_ssd=True)
    load_webui(model)
    try:
        sizes, handle = unet_batches(model, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="sd_webui_pag"), \
                pytest.raises(PagError, match=re.escape("'mid' does not exist in this SSD-1B UNet (it has no middle-block attention)")):
            run([{"enabled": True, "layers": "mid"}], steps=2)
        handle.remove()
    finally:
        unload_webui()
    assert "'mid' does not exist in this SSD-1B UNet" in caplog.text
    assert sizes == []  # the job stopped before sampling: no image without the PAG that was asked for


def test_model_switch_between_jobs_follows_the_current_model(webui):
    other = sd_models_double.make_sd15_model(seed=21)
    first = webui[0]
    _, a = run([{"enabled": True}])
    shared.sd_model = other
    try:
        _, b = run([{"enabled": True}])
        # the reference: the same job on a fresh load of the other model with no history
        load_webui(other)
        _, b_fresh = run([{"enabled": True}])
    finally:
        shared.sd_model = first
    assert torch.equal(latents(b), latents(b_fresh))
    assert not any("forward" in m.__dict__ for m in first.modules())
    assert not any("forward" in m.__dict__ for m in other.modules())


def test_debug_log_names_scale_rows_and_layers(webui, caplog):
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        run([{"enabled": True, "layers": "m0,u0", "end": 0.5}], steps=4)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PAG step")]
    assert len(steps) == 4
    assert "scale 3, 1 perturbed rows (batched), layers m0.0,u0.0" in steps[0]
    assert "scale 0, no extra rows" in steps[3]
    done = [r for r in caplog.records if r.getMessage().startswith("PAG done:")]
    assert len(done) == 1 and done[0].levelno == logging.INFO
    assert done[0].getMessage() == ("PAG done: scale 3, layers m0,u0 (2 attn1 on SD1.x), identity, batched, window 0-0.5; "
                                    "2 of 4 model calls with PAG, 2 perturbed rows; fork before middle_block[1]")


def test_one_console_line_per_job_under_the_hosts_default_logging(webui, monkeypatch):
    """A1111/Forge configure logging only with --loglevel / SD_WEBUI_LOG_LEVEL; by default Python prints
    WARNING and above only. PAG's summary line must still reach the console: exactly one per job."""
    import io

    from lib_pag import console

    logger = logging.getLogger(console.LOGGER)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # the hosts' default: nothing configured
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    out = io.StringIO()
    assert console.show_on_console(stream=out) and not console.show_on_console(stream=out)
    run([{"enabled": True, "layers": "mid", "scale": 2.5}], steps=3)
    run([False])
    run([{"enabled": True, "layers": "d0", "mode": "separate"}], steps=2)
    lines = out.getvalue().splitlines()
    assert lines == [
        "[sd-webui-pag] INFO: PAG done: scale 2.5, layers mid (1 attn1 on SD1.x), identity, batched; "
        "3 of 3 model calls with PAG, 3 perturbed rows; fork before middle_block[1]",
        "[sd-webui-pag] INFO: PAG done: scale 3, layers d0 (1 attn1 on SD1.x), identity, separate; "
        "2 of 2 model calls with PAG, 2 perturbed rows; no fork (separate mode)",
    ], lines
    # a module-level logging.warning(...) ran basicConfig(): the root handler prints PAG's line, once
    root_out = io.StringIO()
    logging.getLogger().handlers.append(logging.StreamHandler(root_out))
    run([{"enabled": True}], steps=2)
    assert len(out.getvalue().splitlines()) == 2 and root_out.getvalue().count("PAG done:") == 1
    # the user chose a level (--loglevel / SD_WEBUI_LOG_LEVEL): the host's configuration decides
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    assert not console.show_on_console(level_chosen=True) and logger.level == logging.NOTSET and not logger.handlers


@pytest.mark.parametrize("values, message", [
    ([True, 3.0, "u77"], "PAG layers: 'u77' does not exist in this SD1.x UNet; valid: d0-d5, m0, u0-u8"),
    ([True, 3.0, "zz"], "PAG layers: 'zz' is not a layer name"),
    ([True, 3.0, "mid", "noise", 9.0, 250.0], "PAG noise scale: 250.0 is out of range; allowed: a number from 0 to 100"),
    ([{"enabled": True, "end": 0.5}], None),  # control: a good value runs
])
def test_a_bad_ui_value_stops_the_job_with_the_message_and_no_image(webui, caplog, monkeypatch, values, message):
    """The UI's job with a bad PAG value: no image (not one without PAG), the error the API's 422 gives, the
    model untouched and never called."""
    model = webui[0]
    before = snapshot(model)
    sizes, handle = unet_batches(model, monkeypatch)
    p = txt2img(values)
    try:
        with caplog.at_level(logging.ERROR, logger="sd_webui_pag"):
            if message is None:
                assert processing.process_images(p).images
                return
            with pytest.raises(PagError) as raised:
                processing.process_images(p)
    finally:
        handle.remove()
    assert str(raised.value).startswith(message) and message in caplog.text
    assert sizes == []
    assert_same_snapshot(before, snapshot(model))
    processed = processing.process_images(txt2img([{"enabled": True}]))  # the next job runs normally
    assert "PAG scale: 3" in processed.infotexts[0]


def test_a_bad_value_of_pag_while_it_is_off_does_not_stop_the_job(webui):
    _, processed = run([False, 3.0, "zz"])
    assert processed.images and "PAG" not in processed.infotexts[0]


def test_accordion_status_shows_errors(webui):
    from lib_pag.ui import validation_message

    msg = validation_message("u77", webui[0].model.diffusion_model)
    assert "pag-error" in msg and "valid: d0-d5, m0, u0-u8" in msg
    assert "10 self-attention layers on this SD1.x UNet" in validation_message("mid,up", webui[0].model.diffusion_model)


def test_other_scripts_can_override_through_p(webui):
    p = txt2img([{"enabled": True, "scale": 3.0}])
    p.pag_scale = 1.25
    p.pag_layers = "m0"
    processed = processing.process_images(p)
    assert "PAG scale: 1.25" in processed.infotexts[0] and "PAG layers: m0" in processed.infotexts[0]


def test_fork_can_be_switched_off_for_debugging(monkeypatch, float64):
    model = to_float64(sd_models_double.make_sd15_model(seed=7))  # forked vs unforked in float64: tests/exactness.py
    load_webui(model)
    unet = model.model.diffusion_model
    seen = []
    hook = unet.input_blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    monkeypatch.setenv("SD_WEBUI_PAG_NO_FORK", "1")
    size = {"steps": 2, "width": 128, "height": 128}  # 2×2 middle-block tokens (at 1×1 PAG on mid does nothing)
    try:
        _, unforked = run([{"enabled": True, "layers": "mid"}], **size)
        monkeypatch.delenv("SD_WEBUI_PAG_NO_FORK")
        _, forked = run([{"enabled": True, "layers": "mid"}], **size)
        _, plain = run([False], **size)
    finally:
        hook.remove()
        unload_webui()
    assert seen == [3, 3, 2, 2, 2, 2]
    assert_exact(latents(forked), latents(unforked), what="forked vs unforked")
    assert_visible(rel_err(latents(plain), latents(forked)), what="PAG's effect")


def test_api_infotext_field_fills_the_pag_args(client):
    named = request(client, [{"enabled": True, "scale": 4.0, "layers": "mid", "end": 0.5}])
    assert named.status_code == 200, named.text
    infotext = json.loads(named.json()["info"])["infotexts"][0]
    assert "PAG enabled: True" in infotext
    from_infotext = request(client, None, infotext=infotext)
    plain = request(client, None)
    assert from_infotext.status_code == 200, from_infotext.text
    assert from_infotext.json()["images"] == named.json()["images"] != plain.json()["images"]


def test_ddim_cfgpp_scales_pag_like_cfg(webui, caplog):
    """DDIM CFG++ maps guidance scales by 1/12.5 (cond_scale_miltiplier); PAG's scale follows."""
    with caplog.at_level(logging.DEBUG, logger="sd_webui_pag"):
        p, processed = run([{"enabled": True, "scale": 3.0}], sampler_name="DDIM CFG++", steps=2)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PAG step")]
    assert steps and all("scale 0.24," in m for m in steps)
    assert torch.isfinite(latents(processed)).all()


def raw_request(client, alwayson: str):
    """A request whose ``alwayson_scripts`` is given as raw JSON text (repeated keys survive)."""
    payload = json.dumps({"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
                          "sampler_name": "Euler", "seed": 3, "cfg_scale": 5})
    body = payload[:-1] + ', "alwayson_scripts": ' + alwayson + "}"
    return client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("alwayson, both", [
    ('{"pag": {"args": [{"enabled": true, "scale": 2, "pag_scale": 7, "PAG scale": 4}]}}', ("'scale'", "'pag_scale'")),
    ('{"pag": {"args": [{"enabled": true, "scale": 3}]}, "PAG": {"args": [{"enabled": true, "scale": -5}]}}', ("'pag'", "'PAG'")),
    ('{"pag": {"args": [{"enabled": true, "scale": 3}]}, "pag": {"args": [{"enabled": true, "scale": 9}]}}', ("'pag'",)),
    ('{"pag": {"args": [{"enabled": true, "scale": 3, "scale": 4}]}}', ("'scale'",)),
    ('{"pag": {"args": [true], "args": [false]}}', ("'args'",)),
])
def test_conflicting_duplicates_are_an_error_naming_both(client, webui, alwayson, both):
    r = raw_request(client, alwayson)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "PAG args" and all(name in body["detail"] for name in both), body["detail"]


def test_equal_duplicates_are_fine(client):
    r = raw_request(client, '{"pag": {"args": [{"enabled": true, "scale": 3, "PAG scale": 3}]}, "PAG": {"args": '
                            '[{"enabled": true, "scale": 3, "PAG scale": 3}]}}')
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["extra_generation_params"]["PAG scale"] == "3"


def test_error_body_is_bounded(client):
    r = request(client, [{"enabled": True, "layers": "u9" * 100_000}])
    assert r.status_code == 422
    assert len(r.content) < 2_000, len(r.content)
    body = r.json()
    assert body["field"] == "PAG layers" and "(200002 characters)" in body["detail"]
    assert "message" not in body


@pytest.mark.parametrize("args, infotext, field, words", [
    (None, "a cat\nSteps: 2, Sampler: Euler, PAG enabled: True, PAG scale: 500, PAG layers: mid", "PAG scale", "out of range"),
    ([True], "a cat\nSteps: 2, Sampler: Euler, PAG end: 0", "PAG start", "not before the end"),
    (None, "a cat\nSteps: 2, Sampler: Euler, PAG enabled: True, PAG layers: u42", "PAG layers", "does not exist"),
    (None, "a cat\nSteps: 2, Sampler: Euler, PAG enabled: True, PAG scale: lots", "PAG scale", "is not a number"),
])
def test_api_infotext_field_is_checked_like_the_args(client, webui, args, infotext, field, words):
    """The host turns the request's ``infotext`` into script args after the ``alwayson_scripts`` check would
    have looked: the check reads it the same way (positions the args give win, as in the host)."""
    before = snapshot(webui[0])
    r = request(client, args, infotext=infotext)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["detail"]
    assert_same_snapshot(before, snapshot(webui[0]))


def test_api_infotext_values_under_given_args_are_not_judged(client):
    """Positions the args give replace the infotext's: a bad infotext scale under a good args scale runs."""
    r = request(client, [True, 3.0], infotext="a cat\nSteps: 2, Sampler: Euler, PAG scale: 500")
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["extra_generation_params"]["PAG scale"] == "3"


def test_api_checks_layers_when_the_named_checkpoint_is_the_loaded_one(client, webui):
    title = webui[0].sd_checkpoint_info.title
    r = request(client, [{"enabled": True, "layers": "u42"}], override_settings={"sd_model_checkpoint": title})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "PAG layers"


def test_api_auth_comes_first(webui, monkeypatch):
    """With ``--api-auth`` a client without valid credentials gets the host's own 401, never a PAG judgement."""
    from fastapi.testclient import TestClient
    from modules import shared
    from modules.api.api import create_app

    monkeypatch.setattr(shared.cmd_opts, "api_auth", "ann:secret,bob:hunter2")
    app, _ = create_app()
    auth_client = TestClient(app)
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
            "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "u42"}]}}}
    for auth in (None, ("ann", "wrong"), ("eve", "secret")):
        r = auth_client.post("/sdapi/v1/txt2img", json=body, auth=auth)
        assert r.status_code == 401, r.text
        assert "PAG" not in r.text and "u0-u8" not in r.text
    r = auth_client.post("/sdapi/v1/txt2img", json=body, auth=("bob", "hunter2"))
    assert r.status_code == 422 and r.json()["field"] == "PAG layers"


@pytest.mark.parametrize("label", ["[PAG] Method", "[PAG] Enabled"])
def test_xyz_choice_axis_without_values_is_an_error(webui, label):
    """An API client with text inputs off that filled only the text of a choice axis: the X/Y/Z script
    reads the (empty) dropdown; instead of a grid of 0 images, the axis' confirm says why."""
    _, _, xyz = webui
    axis = next(o for o in xyz.axis_options if o.label == label)
    p = txt2img([{"enabled": True}])
    with pytest.raises(PagError, match=re.escape(label) + ".*has no values.*dropdown"):
        xyz.process_axis(p, axis, "identity, blur" if "Method" in label else "True, False", vals_dropdown=[], csv_mode=False)
    assert xyz.process_axis(p, axis, "identity, blur" if "Method" in label else "True, False", csv_mode=True)


def test_api_checks_layers_unless_the_request_really_loads_another_checkpoint(client, webui, monkeypatch):
    """A1111 drops a checkpoint override it cannot resolve and keeps the loaded model; an alias of the loaded
    model keeps it too: both are checked now. Only a different, known checkpoint is left to the job."""
    import sys
    import types

    loaded = webui[0].sd_checkpoint_info
    other = types.SimpleNamespace(filename="other.safetensors")
    fake = types.ModuleType("modules.sd_models")
    fake.checkpoint_aliases = {"tiny [0123abcd]": loaded, "other.safetensors": other}
    monkeypatch.setitem(sys.modules, "modules.sd_models", fake)
    bad = [{"enabled": True, "layers": "u42"}]
    for name in ("tiny [0123abcd]", "no-such-checkpoint"):
        r = request(client, bad, override_settings={"sd_model_checkpoint": name})
        assert r.status_code == 422 and r.json()["field"] == "PAG layers", (name, r.text)
    r = request(client, bad, override_settings={"sd_model_checkpoint": "other.safetensors"})
    # judged by the job on the model it loads (the double keeps this one): the job stops, and the host's
    # API error handler answers with the status and message the error carries
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "PagError" and body["detail"].startswith("PAG layers: 'u42' does not exist")
    assert body["body"]["field"] == "PAG layers" and body["errors"] == body["detail"]


def test_long_keys_are_shortened_in_the_body(client):
    r = raw_request(client, '{"pag": {"args": [{"enabled": true, "PAG' + " " * 5000 + 'scale": 3, "scale": 2}]}}')
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)
    r = raw_request(client, '{"pag": {"args": [{"enabled": true, "' + "k" * 5000 + '": 1, "' + "k" * 5000 + '": 2}]}}')
    assert r.status_code == 422 and len(r.content) < 2_000, len(r.content)


def test_the_ui_shows_a_bad_value_as_the_hosts_error_box_with_no_image(webui):
    """What Generate does with a bad PAG value: the host's ``wrap_gradio_call`` turns the job's PagError into
    its error box under an empty gallery (the doubles of modules/call_queue.py and modules/txt2img.py)."""
    from modules import call_queue, txt2img as txt2img_module

    runner = scripts.scripts_txt2img
    generate = call_queue.wrap_gradio_gpu_call(txt2img_module.txt2img, extra_outputs=[None, '', ''])
    images, info_js, info, log_html = generate("task(1)", None, "a cat", "blurry",
                                               *script_args(runner, [True, 3.0, "zz"]))
    assert images is None and info_js == "" and info == ""
    from lib_pag.layers import SYNTAX_HELP

    message = f"PAG layers: 'zz' is not a layer name; allowed: {SYNTAX_HELP}"  # the API's 422 detail
    assert log_html == f"<div class='error'>{html.escape('PagError: ' + message)}</div>"
    images, info_js, info, log_html = generate("task(2)", None, "a cat", "blurry", *script_args(runner, [True, 3.0, "mid"]))
    assert len(images) == 1 and "PAG layers: mid" in info and "error" not in log_html
