"""Property-based tests: every input path either gives valid params / layers or a PagError naming the field.

The ranges below are written out from the documentation (README / PagParams field docs), not read
from the metadata, so they are an independent oracle.
"""

import math
import time
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lib_pag import LayerSelection, PagError, PagParams, field_names, label_of, resolve_layers, scale_for_step
from lib_pag.maps import example_catalog, layer_map_svg, schedule_svg
from lib_pag.params import ALIASES, BRANCH_FIELDS, EXEC_MODES, HIRES_MODES, METHODS, SCHEDULES

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=100)

LABELS = {label_of(n) for n in field_names()}
BRANCH_LABELS = {f"PAG {i} {label_of(n)[4:]}" for i in (2, 3) for n in field_names() if n != "mode"}
ERROR_FIELDS = LABELS | {"PAG args"}
INF = math.inf

# documented ranges: (lo, hi or None, inf allowed)
RANGES = {
    "scale": (0, 100, False), "blur_sigma": (0, None, True), "noise_scale": (0, 100, False),
    "start": (0, 1, False), "end": (0, 1, False), "sigma_start": (0, None, False), "sigma_end": (0, None, False),
    "rescale": (0, 1, False), "hires_scale": (0, 100, False),
}
CHOICES = {"method": METHODS, "schedule": SCHEDULES, "hires": HIRES_MODES, "mode": EXEC_MODES}

SD15 = example_catalog("SD1.x")  # equal to build_catalog(sd15_unet()) — see test_maps
SDXL = example_catalog("SDXL")


def assert_valid(p: PagParams):
    assert isinstance(p, PagParams)
    assert type(p.enabled) is bool
    for name, (lo, hi, inf_ok) in RANGES.items():
        v = getattr(p, name)
        assert type(v) is float, name
        assert not math.isnan(v), name
        assert lo <= v, name
        assert (v <= hi) if hi is not None else (inf_ok or math.isfinite(v)), name
    for name, choices in CHOICES.items():
        assert getattr(p, name) in choices
    assert p.start < p.end
    assert p.sigma_start == 0 or p.sigma_end < p.sigma_start
    assert p.method not in ("blur", "seg") or p.blur_sigma > 0
    assert isinstance(p.layers, str) and p.layers
    assert PagParams(layers=p.layers).layers == p.layers  # canonical text is a fixed point


def assert_pag_error(err: PagError, fields=ERROR_FIELDS):
    assert err.field in fields
    assert "allowed:" in str(err) or (err.field.endswith(" layers") and "valid:" in str(err))
    err.as_dict()  # JSON-able for the 422 body


def outcome(fn, *args, **kwargs):
    """Call fn; a PagError is returned, anything else but a result propagates (and fails the test)."""
    try:
        return fn(*args, **kwargs)
    except PagError as err:
        return err


# --- strategies --------------------------------------------------------------------------------

PARTS_WORDS = ["down", "mid", "up", "all", "input", "middle", "output", "Mid", "UP"]
PATHS = ["input_blocks.4.1", "middle_block.1", "output_blocks.3.1.transformer_blocks.0.attn1", "input_blocks.7",
         "model.diffusion_model.middle_block.1.transformer_blocks.2", "diffusion_model.output_blocks.0.1",
         "output_blocks.11.1", "input_blocks.0"]
small = st.integers(0, 12)


@st.composite
def fine_name(draw):
    letter = draw(st.sampled_from("dmu"))
    text = f"{letter}{draw(small)}"
    if draw(st.booleans()):
        text += "-" + draw(st.sampled_from(["", letter, "d", "u"])) + str(draw(small))
    if draw(st.booleans()):
        text += f".{draw(small)}"
        if draw(st.booleans()):
            text += f"-{draw(st.integers(0, 12) | st.integers(0, 2000))}"
    return text


strength_text = st.one_of(
    st.floats(0.01, 1).map(lambda f: f"{f:g}"), st.sampled_from(["1", "0.5", "0", "1.5", "-0.2", "nan", "inf", "x", "", "1e-9"]),
)


@st.composite
def entry(draw):
    target = draw(st.one_of(st.sampled_from(PARTS_WORDS), fine_name(), st.sampled_from(PATHS)))
    if draw(st.integers(0, 3)) == 0:
        target += ":" + draw(strength_text)
    return target


def mutate(text: str, draw) -> str:
    kind = draw(st.integers(0, 4))
    if not text or kind == 0:
        return text
    i = draw(st.integers(0, len(text)))
    if kind == 1:
        return text[:i] + draw(st.sampled_from(list(":-.,;x9 _éD٣"))) + text[i:]
    if kind == 2:
        return text[:i] + text[i + 1:]
    if kind == 3:
        return text.swapcase()
    return text[:i] + text[i:] * 2


@st.composite
def layer_specs(draw, mutated=True):
    entries = draw(st.lists(entry(), min_size=0, max_size=4))
    text = "".join(e + draw(st.sampled_from([",", ", ", ";", " "])) for e in entries).rstrip(", ;")
    if mutated and draw(st.booleans()):
        text = mutate(text, draw)
    return text


junk = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.none(),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4)), max_size=3), st.just({}), st.just([]),
)
unit = st.floats(0, 1)
VALID = {
    "enabled": st.booleans(),
    "scale": st.floats(0, 100) | st.integers(0, 100),
    "layers": layer_specs(mutated=False) | st.lists(st.sampled_from(["mid", "up", "m0.2-9:0.5", "u0"]), min_size=1, max_size=3),
    "method": st.sampled_from(list(METHODS) + ["Blur", " noise "]),
    "blur_sigma": st.floats(0, 50) | st.just(INF) | st.just("inf"),
    "noise_scale": st.floats(0, 100),
    "start": unit, "end": unit,
    "sigma_start": st.floats(0, 20) | st.none(), "sigma_end": st.floats(0, 20) | st.none(),
    "schedule": st.sampled_from(SCHEDULES), "rescale": unit,
    "hires": st.sampled_from(HIRES_MODES), "hires_scale": st.floats(0, 100), "mode": st.sampled_from(list(EXEC_MODES) + ["Separate"]),
}
KEYS = {name: name for name in field_names()}
KEYS.update(ALIASES)
KEYS.update({f"pag_{n}": n for n in field_names()})
KEYS.update({f" {n.upper()} ": n for n in ("scale", "layers", "start")})
JUNK_KEYS = st.one_of(st.text(max_size=10), st.sampled_from(["pag_", "pag_pag_scale", "PAG scale", "cfg_scale", "steps"]),
                      st.integers(-2, 2), st.none())


@st.composite
def api_dicts(draw):
    data = {}
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 4)):
            key = draw(st.sampled_from(sorted(KEYS)))
            data[key] = draw(VALID[KEYS[key]] if draw(st.integers(0, 3)) else junk)
        else:
            data[draw(JUNK_KEYS)] = draw(junk)
    return data


# --- (a) API dicts -----------------------------------------------------------------------------

@SETTINGS
@given(api_dicts())
@example({"scale": 10 ** 400})  # a JSON integer too big for a float
@example({"start": 0.5, "end": 0.5})
@example({"method": "blur", "blur_sigma": 0})
def test_api_dicts_give_valid_params_or_a_pag_error(data):
    result = outcome(PagParams.from_dict, data)
    if isinstance(result, PagError):
        assert_pag_error(result)
    else:
        assert_valid(result)


# --- (b) positional args -----------------------------------------------------------------------

@st.composite
def positional(draw):
    names = field_names() + list(BRANCH_FIELDS) * 2  # the main settings, then guidances 2 and 3
    n = draw(st.integers(0, len(names) + 2))
    return [draw(VALID[names[i]] if i < len(names) and draw(st.integers(0, 4)) else junk) for i in range(n)]


@SETTINGS
@given(positional())
@example([True, 3.0, "mid,up"] + [None] * 13)
def test_positional_args_give_valid_params_or_a_pag_error(values):
    result = outcome(PagParams.from_values, *values)
    most = len(field_names()) + 2 * 14  # the main settings, then 14 for each of guidances 2 and 3
    if isinstance(result, PagError):
        assert_pag_error(result, ERROR_FIELDS | BRANCH_LABELS | {"PAG 2 args", "PAG 3 args"})
        if len(values) > most:
            assert result.field == "PAG args"
    else:
        assert_valid(result)
        assert len(values) <= most


# --- (c) infotext ------------------------------------------------------------------------------

def as_text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "None" if value is None else str(value)


@st.composite
def infotexts(draw):
    data = {}
    names = field_names()
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 4)):
            name = draw(st.sampled_from(names))
            value = draw(VALID[name] if draw(st.integers(0, 3)) else junk)
            data[label_of(name)] = draw(st.sampled_from([as_text(value), as_text(value).upper(), f" {as_text(value)} "]))
        else:
            data[draw(st.sampled_from(["Steps", "CFG scale", "PAG", "PAG foo", "pag scale"]) | st.text(max_size=8))] = draw(st.text(max_size=8))
    return data


@SETTINGS
@given(infotexts())
@example({"PAG scale": "1e400"})
@example({"PAG blur sigma": "inf", "PAG method": "blur"})
@example({"PAG start": "0.333333", "PAG end": "0.333333"})
def test_infotext_gives_valid_params_or_a_pag_error(data):
    result = outcome(PagParams.from_infotext, data)
    if isinstance(result, PagError):
        assert_pag_error(result, LABELS)
        return
    assert_valid(result)
    if not any(k in LABELS for k in data):
        assert result == PagParams()
    elif "PAG enabled" not in data:
        assert result.enabled


# --- (d) layer specs against real catalogs ------------------------------------------------------

@SETTINGS
@given(layer_specs())
@example("m0.2-9:0.5, u0")
@example("d0-d5")
@example("m0.10")
@example("d0-u3")
@example("all:0.000001")
@example("u0:0.81258125")  # the canonical text must keep the strength exactly
def test_layer_specs_resolve_to_layers_or_a_pag_error(spec):
    for catalog in (SD15, SDXL):
        result = outcome(resolve_layers, spec, catalog)
        if isinstance(result, PagError):
            assert result.field == "PAG layers"
            assert_pag_error(result, {"PAG layers"})
            continue
        assert isinstance(result, LayerSelection)
        assert result.chosen
        assert {layer for layer, _ in result.chosen} <= set(catalog.layers)
        assert all(0 < s <= 1 for _, s in result.chosen)
        # the canonical text selects the same layers with the same strengths
        assert resolve_layers(PagParams(layers=spec).layers, catalog).chosen == result.chosen
        # and the map draws exactly that selection
        root = ET.fromstring(layer_map_svg(catalog, result))
        on = [r.get("data-layer") for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("data-selected") == "1"]
        assert on == result.names


def test_huge_transformer_range_is_rejected_quickly():
    """A spec from the API or a pasted infotext must not make resolve_layers allocate per number in the range."""
    t0 = time.perf_counter()
    err = outcome(resolve_layers, "u0.0-20000000", SDXL)
    assert isinstance(err, PagError) and err.field == "PAG layers"
    assert time.perf_counter() - t0 < 0.1


# --- (e) infotext round trip ---------------------------------------------------------------------

finite = st.floats(0, 100, allow_subnormal=False)


@st.composite
def valid_params(draw):
    start, end = sorted(draw(st.lists(unit, min_size=2, max_size=2, unique=True)))
    sigma_end, sigma_start = sorted(draw(st.lists(st.floats(0, 30), min_size=2, max_size=2, unique=True)))
    if draw(st.booleans()):
        sigma_start = sigma_end = 0.0
    layers = draw(st.sampled_from(["mid,up", "up", "m0", "d0-d1,u0:0.5", "all:0.25", "m0.2-9:0.5,u0", "middle_block.1"]))
    return PagParams(
        enabled=True, scale=draw(finite), layers=layers, method=draw(st.sampled_from(METHODS)),
        blur_sigma=draw(st.floats(0.01, 50) | st.just(INF)), noise_scale=draw(finite), start=start, end=end,
        sigma_start=sigma_start, sigma_end=sigma_end, schedule=draw(st.sampled_from(SCHEDULES)), rescale=draw(unit),
        hires=draw(st.sampled_from(HIRES_MODES)), hires_scale=draw(finite), mode=draw(st.sampled_from(EXEC_MODES)),
    )


def effective(p: PagParams) -> PagParams:
    """What an infotext is meant to carry: settings that do not apply are left at their defaults."""
    d = PagParams()
    return PagParams(**{**p.to_dict(),
                        "blur_sigma": p.blur_sigma if p.method in ("blur", "seg") else d.blur_sigma,
                        "noise_scale": p.noise_scale if p.method == "noise" else d.noise_scale,
                        "hires_scale": p.hires_scale if p.hires == "own" else d.hires_scale})


@SETTINGS
@given(valid_params())
@example(PagParams(enabled=True, scale=3.14159265))
@example(PagParams(enabled=True, start=0.3333331, end=0.3333334))
def test_infotext_round_trip(p):
    text = p.to_infotext()
    assert all(isinstance(v, str) for v in text.values())
    assert PagParams.from_infotext({k: str(v) for k, v in text.items()}) == effective(p)


# --- maps on random valid input -------------------------------------------------------------------

@FEW
@given(valid_params(), st.integers(1, 150), st.none() | st.integers(0, 60))
def test_schedule_svg_plots_scale_for_step(p, steps, hires_steps):
    root = ET.fromstring(schedule_svg(p, steps, hires_steps=hires_steps))
    got = {}
    for r in root.iter("{http://www.w3.org/2000/svg}rect"):
        if r.get("class") == "pag-bar":
            got[(r.get("data-pass"), int(r.get("data-step")))] = float(r.get("data-scale"))
    want = {("base", i): scale_for_step(p, step=i, total_steps=steps) for i in range(steps)}
    if hires_steps is not None:
        n = hires_steps or steps
        want.update({("hires", i): scale_for_step(p, step=i, total_steps=n, hires=True) for i in range(n)})
    assert got == want
    assert all(v == 0 for (which, i), v in want.items() if which == "base" and not p.start <= i / steps < p.end)


@pytest.mark.parametrize("catalog", [SD15, SDXL, example_catalog("SSD-1B")], ids=lambda c: c.arch)
def test_layer_map_never_raises_on_resolvable_specs(catalog):
    @FEW
    @given(layer_specs())
    def check(spec):
        selection = outcome(resolve_layers, spec, catalog)
        if isinstance(selection, PagError):
            return
        ET.fromstring(layer_map_svg(catalog, selection))

    check()
