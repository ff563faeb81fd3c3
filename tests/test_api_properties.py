"""Property test over whole API requests (WebUI 1.10 API double, the real script, real sampling).

Each request combines ``alwayson_scripts`` args (named with any spelling of keys and title, or positional),
the ``infotext`` field and ``override_settings`` naming the loaded checkpoint. The oracle is written here from
the README, by construction of the values: every drawn value is known valid or invalid. Then either the
answer is a 422 naming a PAG field, or it is a 200 whose image infotext holds exactly the PAG settings the
job should have run with (none when PAG ends up off).
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a1111_harness import load_webui, unload_webui
from lib_pag import field_names, label_of
from modules import sd_models_double

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ERROR_FIELDS = {label_of(n) for n in field_names()} | {"PAG args"}

# (value as sent, valid, value as the infotext writes it)
SCALES = [(3.0, True, "3"), (0.5, True, "0.5"), (150.0, False, None), (-1.0, False, None)]
# "unknown": well-formed, but a layer this model lacks (checked against the model only while PAG is on)
LAYERS = [("mid", True, "mid"), ("u0,mid", True, "u0,mid"), ("mid,mid", True, "mid"), ("u42", "unknown", None),
          ("u0:", False, None)]
ENDS = [(1.0, True, None), (0.5, True, "0.5"), (0.0, False, None)]
KEY_SPELLINGS = {"scale": ["scale", "pag_scale", "PAG scale"], "layers": ["layers", "PAG layers", "pag_applied_layers"],
                 "end": ["end", "PAG end"]}


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient
    from modules.api.api import create_app

    model = sd_models_double.make_sd15_model(seed=3)
    load_webui(model)
    app, _ = create_app()
    yield TestClient(app), model
    unload_webui()


@st.composite
def requests(draw):
    scale, layers, end = draw(st.sampled_from(SCALES)), draw(st.sampled_from(LAYERS)), draw(st.sampled_from(ENDS))
    enabled = draw(st.booleans())
    form = draw(st.sampled_from(["named", "positional", "infotext", "positional+infotext"]))
    body, valid = {}, True
    asked = {"enabled": enabled, "scale": scale, "layers": layers, "end": end}
    if form in ("named", "positional", "positional+infotext"):
        title = draw(st.sampled_from(["pag", "PAG", "Pag"]))
        if form == "named":
            args = [{draw(st.sampled_from(KEY_SPELLINGS.get(k, [k]))): v[0] if isinstance(v, tuple) else v
                     for k, v in asked.items()}]
        else:
            args = [enabled, scale[0], layers[0]]
            if form == "positional":
                args += ["identity", 9.0, 1.0, 0.0, end[0]]
        body["alwayson_scripts"] = {title: {"args": args}}
    if form in ("infotext", "positional+infotext"):
        pieces = ["Steps: 2", "Sampler: Euler"]
        if form == "infotext":
            pieces += [f"PAG enabled: {enabled}", f"PAG scale: {scale[0]}", f"PAG layers: {layers[0]}"]
        pieces.append(f"PAG end: {end[0]}")
        body["infotext"] = "a cat\n" + ", ".join(pieces)
    if draw(st.booleans()):
        body["override_settings"] = {"sd_model_checkpoint": "@loaded"}
    # the oracle: what the job gets, and whether it is valid
    if form == "infotext":
        enabled = True  # the host turns the text "False" into bool("False") == True for the checkbox
    effective_end = end
    # bad values are errors whether PAG is on or off; a layer the model lacks only while it is on
    valid = all(v[1] is True or (v[1] == "unknown" and not enabled) for v in (scale, layers, effective_end))
    expected = None
    if enabled and valid:
        expected = {"PAG enabled": "True", "PAG scale": scale[2], "PAG layers": layers[2]}
        if effective_end[2] is not None:
            expected["PAG end"] = effective_end[2]
    return body, valid, expected


@given(requests())
@SETTINGS
def test_a_request_gives_a_422_naming_a_field_or_the_pag_it_asked_for(client, drawn):
    http, model = client
    body, valid, expected = drawn
    payload = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
               "sampler_name": "Euler", "seed": 3, "cfg_scale": 5, **body}
    if "override_settings" in payload:
        payload["override_settings"] = {"sd_model_checkpoint": model.sd_checkpoint_info.title}
    r = http.post("/sdapi/v1/txt2img", json=payload)
    if not valid:
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] in ERROR_FIELDS
        return
    assert r.status_code == 200, (body, r.text)
    extra = json.loads(r.json()["info"])["extra_generation_params"]
    got = {k: v for k, v in extra.items() if k.startswith("PAG ")}
    assert got == (expected or {}), (body, got)
