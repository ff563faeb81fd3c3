"""PagParams: construction from UI values, API dicts and infotext; every rejection names the field."""

import math

import pytest

from lib_pag import PRESETS, PagError, PagParams, field_names
from lib_pag.params import label_of


def test_defaults_are_the_seed_defaults():
    p = PagParams()
    assert (p.enabled, p.scale, p.layers, p.method, p.start, p.end) == (False, 3.0, "mid,up", "identity", 0.0, 1.0)


def test_positional_values_follow_field_order():
    p = PagParams.from_values(True, 4.5, "m0", "blur", math.inf)
    assert (p.enabled, p.scale, p.layers, p.method, p.blur_sigma) == (True, 4.5, "m0", "blur", math.inf)
    assert field_names()[:4] == ["enabled", "scale", "layers", "method"]
    with pytest.raises(PagError, match="too many values"):
        PagParams.from_values(*([True] * (len(field_names()) + 2 * 14 + 1)))


def test_named_dict_and_aliases():
    p = PagParams.from_dict({"enabled": True, "pag_scale": 5, "pag_applied_layers": ["mid", "up"], "Schedule": "Cosine"})
    assert (p.scale, p.layers, p.schedule) == (5.0, "mid,up", "cosine")
    assert PagParams.from_dict({"pag_rescale": 0.5}).rescale == 0.5
    assert PagParams.from_dict({"sigma_start": None}).sigma_start == 0.0


def test_infotext_labels_are_api_keys():
    p = PagParams.from_dict({"PAG enabled": True, "PAG scale": 4, "PAG blur sigma": 2, "PAG method": "blur",
                             "pag  sigma   start": 3})
    assert (p.enabled, p.scale, p.blur_sigma, p.method, p.sigma_start) == (True, 4.0, 2.0, "blur", 3.0)
    for name in field_names():
        assert PagParams.from_dict({label_of(name): getattr(p, name)}) == PagParams.from_dict({name: getattr(p, name)})
    with pytest.raises(PagError, match="infotext labels"):
        PagParams.from_dict({"PAG sclae": 3})


@pytest.mark.parametrize("data, field, problem", [
    ({"scale": float("nan")}, "PAG scale", "not a finite number"),
    ({"scale": float("inf")}, "PAG scale", "not a finite number"),
    ({"scale": -1}, "PAG scale", "out of range"),
    ({"scale": 101}, "PAG scale", "out of range"),
    ({"scale": "3"}, "PAG scale", "wrong type"),
    ({"scale": True}, "PAG scale", "wrong type"),
    ({"enabled": "yes"}, "PAG enabled", "wrong type"),
    ({"enabled": 1}, "PAG enabled", "wrong type"),
    ({"method": "dropout"}, "PAG method", "not a choice"),
    ({"method": 2}, "PAG method", "wrong type"),
    ({"start": 0.6, "end": 0.5}, "PAG start", "not before the end"),
    ({"start": 0.5, "end": 0.5}, "PAG start", "not before the end"),
    ({"end": 1.2}, "PAG end", "out of range"),
    ({"sigma_start": 1.0, "sigma_end": 2.0}, "PAG sigma end", "not below the sigma start"),
    ({"rescale": 1.5}, "PAG rescale", "out of range"),
    ({"hires": "twice"}, "PAG hires", "not a choice"),
    ({"mode": "fast"}, "PAG mode", "not a choice"),
    ({"layers": "u99x"}, "PAG layers", "not a layer name"),
    ({"colour": "red"}, "PAG args", "not a PAG setting"),
    ({"method": "blur", "blur_sigma": 0}, "PAG blur sigma", "out of range"),
])
def test_rejections_name_field_value_and_allowed(data, field, problem):
    with pytest.raises(PagError) as info:
        PagParams.from_dict(data)
    err = info.value
    assert err.field == field
    assert str(err).startswith(field + ": ")
    assert problem in str(err)
    assert "allowed: " in str(err)
    assert err.as_dict()["field"] == field


def test_allowed_values_are_listed():
    with pytest.raises(PagError) as info:
        PagParams.from_dict({"method": "dropout"})
    assert str(info.value) == "PAG method: 'dropout' is not a choice; allowed: identity, blur, noise, seg, tpg"
    with pytest.raises(PagError) as info:
        PagParams.from_dict({"scale": -1})
    assert str(info.value) == "PAG scale: -1.0 is out of range; allowed: a number from 0 to 100"


def test_non_dict_rejected():
    with pytest.raises(PagError, match="PAG args"):
        PagParams.from_dict(["scale", 3])


def test_infotext_round_trip_for_every_setting():
    p = PagParams(enabled=True, scale=4.5, layers="m0.2-9:0.5,u0", method="blur", blur_sigma=math.inf, start=0.1,
                  end=0.8, sigma_start=14.0, sigma_end=0.7, schedule="linear", rescale=0.3, hires="own",
                  hires_scale=1.5, mode="separate")
    text = p.to_infotext()
    assert text["PAG scale"] == "4.5" and text["PAG layers"] == "m0.2-9:0.5,u0" and text["PAG blur sigma"] == "inf"
    assert PagParams.from_infotext(text) == p
    # what infotext parsing hands back is strings; other keys are ignored
    assert PagParams.from_infotext({**{k: str(v) for k, v in text.items()}, "Steps": "20"}) == p


def test_infotext_writes_only_what_matters():
    assert PagParams(enabled=False).to_infotext() == {}
    assert PagParams(enabled=True).to_infotext() == {"PAG enabled": "True", "PAG scale": "3", "PAG layers": "mid,up"}
    # a parameter of another method, or hires scale without "own", does not change the image
    assert "PAG blur sigma" not in PagParams(enabled=True, blur_sigma=2.0).to_infotext()
    assert "PAG hires scale" not in PagParams(enabled=True, hires_scale=2.0).to_infotext()


def test_infotext_without_pag_keys_turns_pag_off():
    assert PagParams.from_infotext({"Steps": "20", "CFG scale": "7"}).enabled is False


def test_bad_infotext_value_is_reported():
    with pytest.raises(PagError, match="PAG scale: 'abc' is not a number"):
        PagParams.from_infotext({"PAG scale": "abc"})


def test_presets_are_valid_and_as_seeded():
    assert PRESETS == {
        "General": {"scale": 3.0, "layers": "mid,up"},
        "Portraits": {"scale": 2.5, "layers": "up"},
        "Landscapes": {"scale": 3.5, "layers": "mid,up"},
        "Abstract": {"scale": 4.0, "layers": "down,mid,up"},
    }
    for values in PRESETS.values():
        PagParams.from_dict({"enabled": True, **values})


def test_overrides_accept_text_and_validate():
    p = PagParams(enabled=True).with_overrides(scale="2.5", pag_layers="m0")
    assert (p.scale, p.layers) == (2.5, "m0")
    with pytest.raises(PagError, match="PAG end"):
        p.with_overrides(end="2")


def test_params_are_frozen():
    with pytest.raises(Exception):
        PagParams().scale = 1.0
