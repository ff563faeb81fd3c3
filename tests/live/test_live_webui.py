"""Checks against a real, running WebUI (A1111 1.7–1.10, Forge, reForge) through its HTTP API.

Skipped unless ``PAG_WEBUI_URL`` names a WebUI started with ``--api`` and this extension installed,
e.g. ``PAG_WEBUI_URL=http://127.0.0.1:7860 .venv/bin/python -m pytest tests/live``. Any checkpoint
works (a random-weight one too); the images are small so the suite stays short even on a CPU.
Everything here is observable from outside: images, infotext, HTTP status, the model afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

URL = os.environ.get("PAG_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="set PAG_WEBUI_URL to a running WebUI started with --api")

SIZE = int(os.environ.get("PAG_WEBUI_SIZE", "192"))
STEPS = 4


def call(route: str, payload: dict | None = None, timeout: float = 1800) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(URL + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def txt2img(pag: dict | None = None, route: str = "/sdapi/v1/txt2img", **overrides) -> dict:
    payload = {"prompt": "a red lighthouse on a cliff", "negative_prompt": "blurry", "seed": 77,
               "steps": STEPS, "cfg_scale": 5, "width": SIZE, "height": SIZE, "sampler_name": "Euler",
               "batch_size": 1, "n_iter": 1, "save_images": False}
    payload.update(overrides)
    if pag is not None:
        payload["alwayson_scripts"] = {"pag": {"args": [pag]}}
    status, body = call(route, payload)
    assert status == 200, body
    return body


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def same(a: str, b: str) -> bool:
    """Same pixels (the PNGs' own text chunks carry the infotext, which may differ)."""
    return np.array_equal(pixels(a), pixels(b))


def infotext(body: dict, index: int = 0) -> str:
    return json.loads(body["info"])["infotexts"][index]


ON = {"enabled": True, "scale": 3.0, "layers": "m0"}


@pytest.fixture(scope="module")
def plain():
    return txt2img()["images"][0]


def test_pag_is_an_alwayson_script():
    status, body = call("/sdapi/v1/scripts")
    assert status == 200 and "pag" in body["txt2img"] and "pag" in body["img2img"]


def test_off_and_scale_zero_give_the_plain_image(plain):
    assert same(txt2img({"enabled": False, "scale": 3})["images"][0], plain)
    assert same(txt2img({"enabled": True, "scale": 0})["images"][0], plain)


def test_on_changes_the_image_and_writes_infotext(plain):
    body = txt2img(ON)
    assert not same(body["images"][0], plain)
    text = infotext(body)
    assert "PAG enabled: True" in text and "PAG scale: 3" in text and "PAG layers: m0" in text
    assert same(txt2img()["images"][0], plain)  # model left as it was


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "UniPC", "Heun"])
def test_every_sampler_path(sampler):
    base = txt2img(sampler_name=sampler)["images"][0]
    guided = txt2img(ON, sampler_name=sampler)["images"][0]
    assert not same(guided, base)
    assert same(txt2img(sampler_name=sampler)["images"][0], base)


def test_pag_alone_at_cfg_1():
    base = txt2img(cfg_scale=1)
    guided = txt2img(ON, cfg_scale=1)
    assert not same(guided["images"][0], base["images"][0])
    assert "PAG scale: 3" in infotext(guided)


def test_separate_mode_matches_batched():
    batched = pixels(txt2img(ON)["images"][0])
    separate = pixels(txt2img({**ON, "mode": "separate"})["images"][0])
    diff = np.abs(batched - separate)
    # the same guidance from a different batch composition: only rounding may differ
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_batch_of_two_and_two_iterations():
    body = txt2img(ON, batch_size=2, n_iter=2)
    assert len(body["images"]) == 4 and len({pixels(b).tobytes() for b in body["images"]}) == 4
    for i in range(4):
        assert "PAG scale: 3" in infotext(body, i)


def test_step_and_sigma_windows(plain):
    full = txt2img(ON)["images"][0]
    late = txt2img({**ON, "start": 0.5})["images"][0]
    assert not same(late, plain) and not same(late, full)
    assert same(txt2img({**ON, "sigma_start": 1e-3, "sigma_end": 1e-4})["images"][0], plain)  # no step inside


def test_hires_fix():
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
          "denoising_strength": 0.5,
          "hr_additional_modules": ["Use same choices"]}  # Forge 2's API fails on hires without it; others ignore it
    base = txt2img(**hr)["images"][0]
    off_in_hires = txt2img({**ON, "hires": "off"}, **hr)
    guided = txt2img(ON, **hr)
    assert not same(guided["images"][0], base) and not same(off_in_hires["images"][0], guided["images"][0])
    assert "PAG hires: off" in infotext(off_in_hires)


def test_img2img_with_mask(plain):
    init = plain
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    job = {"init_images": [init], "mask": base64.b64encode(buf.getvalue()).decode(), "denoising_strength": 0.8,
           "inpainting_fill": 1}
    base = txt2img(route="/sdapi/v1/img2img", **job)["images"][0]
    guided = txt2img(ON, route="/sdapi/v1/img2img", **job)["images"][0]
    assert not same(guided, base)
    outside = np.abs(pixels(guided)[:SIZE // 8, :SIZE // 8] - pixels(base)[:SIZE // 8, :SIZE // 8])
    assert outside.max() <= 8  # the kept corner stays (up to the VAE round trip of both)


@pytest.mark.parametrize("bad, field", [({"scale": -2}, "PAG scale"), ({"layers": "m7"}, "PAG layers"),
                                         ({"method": "wobble"}, "PAG method"), ({"sclae": 2}, "PAG args")])
def test_bad_input_is_a_422_naming_the_field(bad, field):
    payload = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
               "alwayson_scripts": {"pag": {"args": [{"enabled": True, **bad}]}}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 422 and body["field"] == field and body["allowed"], body


def test_infotext_labels_are_accepted_as_api_keys(plain):
    by_label = txt2img({"PAG enabled": True, "PAG scale": 3, "PAG layers": "m0"})["images"][0]
    assert same(by_label, txt2img(ON)["images"][0]) and not same(by_label, plain)


def test_xyz_plot_axis():
    status, info = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    assert "[PAG] Scale" in choices and "[PAG] Layers" in choices
    args = []
    for a in xyz["args"]:  # the defaults; axis types are dropdowns of type "index"
        value = a.get("value")
        args.append(a["choices"].index(value) if a.get("choices") and value in a["choices"] else value)
    args[0], args[1] = choices.index("[PAG] Scale"), "0, 3"
    labels = [a.get("label") for a in xyz["args"]]
    if "Include Sub Images" in labels:  # otherwise some hosts (reForge) return only the grid, with one infotext
        args[labels.index("Include Sub Images")] = True
    body = txt2img({"enabled": True, "layers": "m0"}, script_name="x/y/z plot", script_args=args)
    texts = json.loads(body["info"])["infotexts"]
    cells = {t: img for t, img in zip(texts, body["images"]) if "PAG scale" in t}
    zero = [img for t, img in cells.items() if "PAG scale: 0" in t]
    three = [img for t, img in cells.items() if "PAG scale: 3" in t]
    assert zero and three, texts  # each cell says its own scale ...
    assert not same(zero[0], three[0])  # ... and really ran with it


def test_interrupt_leaves_the_model_clean(plain):
    done = {}

    def long_job():
        done["body"] = txt2img(ON, steps=40)

    worker = threading.Thread(target=long_job)
    worker.start()
    time.sleep(3)
    call("/sdapi/v1/interrupt", {})
    worker.join()
    assert "body" in done
    assert same(txt2img()["images"][0], plain)
    assert not same(txt2img(ON)["images"][0], plain)


def raw_call(route: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(URL + route, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=1800) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


SMALL = {"prompt": "x", "steps": 1, "width": 64, "height": 64}


@pytest.mark.parametrize("args, infotext, field", [
    (None, "x\nSteps: 1, Sampler: Euler, PAG enabled: True, PAG scale: 500, PAG layers: mid", "PAG scale"),
    ([True], "x\nSteps: 1, Sampler: Euler, PAG end: 0", "PAG start"),
])
def test_infotext_field_is_checked(args, infotext, field):
    """A1111 ≥ 1.8 turns the request's infotext into script args: bad PAG values there are a 422 too."""
    payload = {**SMALL, "infotext": infotext}
    if args is not None:
        payload["alwayson_scripts"] = {"pag": {"args": args}}
    status, body = call("/sdapi/v1/txt2img", payload)
    if status >= 500:
        pytest.skip(f"the host fails on the infotext field itself ({status}; Forge 2 does)")
    assert status == 422 and body["field"] == field, body


@pytest.mark.parametrize("alwayson, names", [
    ('{"pag": {"args": [{"enabled": true, "scale": 2, "pag_scale": 7}]}}', ["'scale'", "'pag_scale'"]),
    ('{"pag": {"args": [{"enabled": true, "scale": 3}]}, "PAG": {"args": [{"enabled": true, "scale": -5}]}}', ["'pag'", "'PAG'"]),
    ('{"pag": {"args": [{"enabled": true, "scale": 3, "scale": 4}]}}', ["'scale'"]),
])
def test_conflicting_duplicates_are_a_422_naming_both(alwayson, names):
    body = json.dumps(SMALL)[:-1] + ', "alwayson_scripts": ' + alwayson + "}"
    status, raw = raw_call("/sdapi/v1/txt2img", body.encode())
    answer = json.loads(raw)
    assert status == 422 and answer["field"] == "PAG args" and all(n in answer["detail"] for n in names), answer


def test_error_body_is_bounded():
    status, raw = raw_call("/sdapi/v1/txt2img", json.dumps(
        {**SMALL, "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "u9" * 100_000}]}}}).encode())
    assert status == 422 and len(raw) < 2_000, (status, len(raw))


def test_layers_checked_when_the_request_names_the_loaded_checkpoint():
    status, options = call("/sdapi/v1/options")
    assert status == 200
    payload = {**SMALL, "override_settings": {"sd_model_checkpoint": options["sd_model_checkpoint"]},
               "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "u42"}]}}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 422 and body["field"] == "PAG layers", body


def test_xyz_choice_axis_without_dropdown_values_is_an_error():
    """With text inputs off, a choice axis is read from its dropdown: an API client that only filled the
    text gets the axis' error, not a grid of 0 images."""
    status, info = call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = [a.get("label") for a in xyz["args"]]
    if "Use text inputs instead of dropdowns" not in labels:
        pytest.skip("this host's X/Y/Z has no text-inputs switch")
    args = []
    for a in xyz["args"]:
        value = a.get("value")
        args.append(a["choices"].index(value) if a.get("choices") and value in a["choices"] else value)
    args[0], args[1], args[2] = xyz["args"][0]["choices"].index("[PAG] Method"), "identity, blur", []
    args[labels.index("Use text inputs instead of dropdowns")] = False
    payload = {**SMALL, "script_name": "x/y/z plot", "script_args": args,
               "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "m0"}]}}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status != 200 and "[PAG] Method" in json.dumps(body), (status, body)


@pytest.mark.skipif(not os.environ.get("PAG_WEBUI_AUTH"), reason="set PAG_WEBUI_AUTH=user:password for a host started with --api-auth")
def test_api_auth_comes_first():
    user, _, password = os.environ["PAG_WEBUI_AUTH"].partition(":")
    body = json.dumps({**SMALL, "alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "u42"}]}}}).encode()
    for credentials in (None, f"{user}:{password}x"):
        req = urllib.request.Request(URL + "/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
        if credentials:
            req.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 401 and b"PAG" not in err.value.read()
    req = urllib.request.Request(URL + "/sdapi/v1/txt2img", data=body, headers={
        "Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 422 and json.loads(err.value.read())["field"] == "PAG layers"


# --- several guidances in one job (README, "Several guidances at once" and "Reproducible") ---

LAYER = os.environ.get("PAG_WEBUI_LAYER", "m0")  # one that every checkpoint has
THREE = {"enabled": True, "scale": 3.0, "layers": LAYER,
         "branches": [{"method": "seg", "scale": 2.0, "layers": LAYER}, {"method": "tpg", "scale": 2.0, "layers": LAYER}]}


def differ(a: str, b: str) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_three_guidances_batched_equal_separate_passes(plain):
    """PAG + SEG + TPG twins ride in one UNet call; ``separate`` runs one extra call per guidance. Same
    guidance, other batch composition: at most 1 level of 255 apart at scale 20 each, while each guidance
    moves the image by far more."""
    strong = {**THREE, "scale": 20.0, "branches": [{**b, "scale": 20.0} for b in THREE["branches"]]}
    batched = txt2img(strong)
    separate = txt2img({**strong, "mode": "separate"})["images"][0]
    diff = np.abs(pixels(batched["images"][0]) - pixels(separate))
    assert diff.max() <= 1, (diff.max(), diff.mean())
    pag_only = txt2img({k: v for k, v in strong.items() if k != "branches"})["images"][0]
    pag_seg = txt2img({**strong, "branches": strong["branches"][:1]})["images"][0]
    for other in (plain, pag_only, pag_seg):
        assert differ(batched["images"][0], other) > 1.0  # each guidance is there, far above the 1 level
    text = infotext(batched)
    for piece in ("PAG scale: 20", "PAG 2 enabled: True", "PAG 2 method: seg", "PAG 2 scale: 20", "PAG 3 method: tpg", "PAG 3 scale: 20",
                  f"PAG 3 layers: {LAYER}"):
        assert piece in text, text


def test_pasted_infotext_restores_every_guidance():
    """The request's ``infotext`` field (A1111 ≥ 1.8, reForge) fills the script args as *Paste parameters*
    does: the same image without any ``alwayson_scripts``."""
    status, schema = call("/openapi.json")
    if "infotext" not in json.dumps(schema.get("components", {}).get("schemas", {})):
        pytest.skip("this host's API has no infotext field (A1111 1.7)")
    batched = txt2img(THREE)
    status, body = call("/sdapi/v1/txt2img", {"infotext": infotext(batched), "width": SIZE, "height": SIZE,
                                              "save_images": False})
    if status >= 500:
        pytest.skip(f"the host fails on the infotext field itself ({status}; Forge 2 does)")
    assert status == 200, body
    assert same(body["images"][0], batched["images"][0])


@pytest.mark.parametrize("method", ["noise", "tpg"])
def test_random_perturbations_per_image_seed(method):
    """Image k of a batch equals the same request with seed + k and batch size 1, up to the host's own
    batch rounding (1 level in a few pixels, as without PAG), while the perturbation it draws moves the
    image over 100 times more than that."""
    job = {"enabled": True, "scale": 20.0, "layers": LAYER, "method": method}
    batch = txt2img(job, seed=40, batch_size=3)["images"]
    assert len({pixels(b).tobytes() for b in batch}) == 3
    for k in (1, 2):
        alone = txt2img(job, seed=40 + k)["images"][0]
        diff = np.abs(pixels(batch[k]) - pixels(alone))
        effect = differ(alone, txt2img(seed=40 + k)["images"][0])
        assert diff.max() <= 1 and diff.mean() < 1e-3, (method, k, diff.max(), diff.mean())
        assert effect > 100 * max(diff.mean(), 1e-3), (method, k, effect)


def test_bad_input_of_guidance_2_names_it():
    payload = {**SMALL, "alwayson_scripts": {"pag": {"args": [
        {"enabled": True, "layers": LAYER, "branches": [{"method": "seg", "layers": "u42"}]}]}}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 422 and body["field"] == "PAG 2 layers" and body["allowed"], body
    payload["alwayson_scripts"]["pag"]["args"][0]["branches"] = [{"method": "swirl"}]
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 422 and body["field"] == "PAG 2 method" and "tpg" in json.dumps(body["allowed"]), body


def test_xyz_axis_of_guidance_2():
    status, info = call("/sdapi/v1/script-info")
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    assert {"[PAG 2] Scale", "[PAG 2] Method", "[PAG 3] Layers"} <= set(choices)
    args = []
    for a in xyz["args"]:
        value = a.get("value")
        args.append(a["choices"].index(value) if a.get("choices") and value in a["choices"] else value)
    args[0], args[1] = choices.index("[PAG 2] Scale"), "1, 4"
    labels = [a.get("label") for a in xyz["args"]]
    if "Include Sub Images" in labels:
        args[labels.index("Include Sub Images")] = True
    job = {**THREE, "branches": [{"method": "identity", "scale": 2.0, "layers": LAYER}]}
    body = txt2img(job, script_name="x/y/z plot", script_args=args)
    texts = json.loads(body["info"])["infotexts"]
    cells = {t: img for t, img in zip(texts, body["images"])
             if "PAG 2 scale" in t and pixels(img).shape[:2] == (SIZE, SIZE)}  # the cells, not the grid
    one = [img for t, img in cells.items() if "PAG 2 scale: 1," in t + ","]
    four = [img for t, img in cells.items() if "PAG 2 scale: 4" in t]
    assert one and four and all("PAG 2 method: identity" in t for t in cells), texts
    # each cell is the plain request with its value (up to the host's batch rounding), and the values matter
    for cell, scale in ((one[0], 1.0), (four[0], 4.0)):
        alone = txt2img({**job, "branches": [{**job["branches"][0], "scale": scale}]})["images"][0]
        assert np.abs(pixels(cell) - pixels(alone)).max() <= 1, scale
    assert differ(one[0], four[0]) > 0.05
