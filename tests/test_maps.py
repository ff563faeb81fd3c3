"""The layer map and schedule SVGs: well-formed, one box per catalog block, highlights = selection, bars = scale_for_step."""

import time
import xml.etree.ElementTree as ET

import pytest

from lib_pag import PagError, PagParams, build_catalog, resolve_layers, scale_for_step
from lib_pag.maps import ACCENT, example_catalog, layer_map_svg, schedule_svg, standalone
from unets import sd2_unet, sd15_unet, sdxl_unet

NS = "{http://www.w3.org/2000/svg}"
ON = PagParams(enabled=True)


@pytest.fixture(scope="module")
def catalogs():
    return {
        "sd15": build_catalog(sd15_unet()),
        "sdxl": build_catalog(sdxl_unet("base")),
        "ssd": build_catalog(sdxl_unet("ssd")),
        "refiner": build_catalog(sdxl_unet("refiner")),
    }


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    return root


def blocks(root):
    return [g for g in root.iter(NS + "g") if g.get("class") == "pag-block"]


def cells(root, on=None):
    found = [r for r in root.iter(NS + "rect") if "pag-cell" in (r.get("class") or "").split()]
    if on is not None:
        found = [r for r in found if (r.get("data-selected") == "1") == on]
    return found


def bars(root, which=None):
    return [r for r in root.iter(NS + "rect") if r.get("class") == "pag-bar" and which in (None, r.get("data-pass"))]


def all_text(root) -> str:
    return " ".join(t.text or "" for t in root.iter(NS + "text"))


# --- layer map ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, counts", [("sd15", (6, 1, 9)), ("sdxl", (4, 1, 6)), ("ssd", (4, 0, 6)), ("refiner", (4, 1, 6))])
def test_one_box_per_block_and_one_cell_per_transformer(catalogs, name, counts):
    catalog = catalogs[name]
    root = parse(layer_map_svg(catalog))
    found = blocks(root)
    per_part = tuple(sum(1 for g in found if g.get("data-part") == part) for part in ("down", "mid", "up"))
    assert per_part == counts
    for g in found:
        part, block = g.get("data-part"), int(g.get("data-block"))
        expected = catalog.transformers(part, block)
        assert g.get("data-name") == {"down": "d", "mid": "m", "up": "u"}[part] + str(block)
        assert int(g.get("data-count")) == len(expected)
        labels = [t.text for t in g.iter(NS + "text")]
        assert labels[:2] == [g.get("data-name"), f"×{len(expected)}"]
        assert [c.get("data-layer") for c in cells(g)] == [f"{g.get('data-name')}.{j}" for j in expected]
    assert len(cells(root)) == len(catalog.layers)
    assert cells(root, on=True) == []
    assert (root.find(f".//{NS}g[@class='pag-no-mid']") is not None) == (counts[1] == 0)
    assert catalog.arch in root.find(NS + "title").text


def test_sdxl_fine_selection_highlights_exactly_those_cells(catalogs):
    root = parse(layer_map_svg(catalogs["sdxl"], "m0.2-9"))
    on = cells(root, on=True)
    assert len(on) == 8
    assert sorted(c.get("data-layer") for c in on) == sorted(f"m0.{j}" for j in range(2, 10))
    for g in blocks(root):
        assert int(g.get("data-selected")) == (8 if g.get("data-name") == "m0" else 0)
    assert "8 of 70" in root.find(NS + "title").text


def test_strengths_below_one_are_shown(catalogs):
    svg = layer_map_svg(catalogs["sdxl"], "m0.2-9,u0:0.5")
    root = parse(svg)
    on = {c.get("data-layer"): c for c in cells(root, on=True)}
    assert len(on) == 18
    assert all(float(on[f"u0.{j}"].get("data-strength")) == 0.5 for j in range(10))
    assert all(float(on[f"m0.{j}"].get("data-strength")) == 1.0 for j in range(2, 10))
    assert float(on["u0.0"].get("fill-opacity")) < float(on["m0.2"].get("fill-opacity")) == 1.0
    texts = {g.get("data-name"): [t.text for t in g.iter(NS + "text") if t.get("class") == "pag-strength"] for g in blocks(root)}
    assert texts["u0"] == ["0.5"]
    assert texts["m0"] == []  # full strength: no number
    assert all(c.get("fill") == ACCENT for c in on.values())


def test_mixed_strengths_in_one_block_show_a_range(catalogs):
    root = parse(layer_map_svg(catalogs["sdxl"], "d2:0.25,d2.0-4:0.75"))
    (g,) = [g for g in blocks(root) if g.get("data-name") == "d2"]
    assert [t.text for t in g.iter(NS + "text") if t.get("class") == "pag-strength"] == ["0.25–0.75"]


def test_sd15_groups(catalogs):
    root = parse(layer_map_svg(catalogs["sd15"], "mid,up"))
    on = cells(root, on=True)
    assert sorted(c.get("data-layer") for c in on) == sorted(["m0.0"] + [f"u{i}.0" for i in range(9)])
    assert {g.get("data-name") for g in blocks(root) if g.get("data-selected") != "0"} == {"m0"} | {f"u{i}" for i in range(9)}


def test_selection_object_and_spec_give_the_same_svg(catalogs):
    catalog = catalogs["ssd"]
    assert layer_map_svg(catalog, resolve_layers("d2.1-3:0.3,u2", catalog)) == layer_map_svg(catalog, "d2.1-3:0.3,u2")
    assert layer_map_svg(catalog, ["d2.1-3:0.3", "u2"]) == layer_map_svg(catalog, "d2.1-3:0.3,u2")


def test_invalid_spec_is_the_callers_error(catalogs):
    with pytest.raises(PagError) as err:
        layer_map_svg(catalogs["ssd"], "mid")
    assert err.value.field == "PAG layers"


def test_deterministic_escaped_and_uses_current_color(catalogs):
    a = layer_map_svg(catalogs["sdxl"], "all:0.3", title='<b> & "x"')
    assert a == layer_map_svg(catalogs["sdxl"], "all:0.3", title='<b> & "x"')
    root = parse(a)
    assert root.find(NS + "title").text == '<b> & "x"'
    assert '<b>' not in a
    assert root.get("fill") == "currentColor"
    assert " id=" not in a and "<style" not in a  # several maps may share a page
    colours = {e.get(k) for e in root.iter() for k in ("fill", "stroke")} - {None, "none", "currentColor"}
    assert colours == {ACCENT}
    assert root.get("viewBox") == "0 0 600 260"


def test_example_catalogs_match_build_catalog(catalogs):
    for name, arch in (("sd15", "SD1.x"), ("sdxl", "SDXL"), ("ssd", "SSD-1B"), ("refiner", "SDXL refiner")):
        assert catalogs[name].arch == arch
        assert example_catalog(arch) == catalogs[name]
    sd2 = build_catalog(sd2_unet())
    assert example_catalog("SD2.x") == sd2


def test_standalone_file_is_well_formed(catalogs):
    text = standalone(layer_map_svg(catalogs["sd15"], "mid"))
    assert text.startswith("<?xml")
    root = ET.fromstring(text.encode())
    assert root.find(NS + "style") is not None
    assert "prefers-color-scheme: dark" in root.find(NS + "style").text


def _best_ms(fn, repeat=15):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def test_fast(catalogs):
    sdxl = catalogs["sdxl"]
    selection = resolve_layers("all:0.5,m0", sdxl)
    params = ON.with_overrides(schedule="cosine", start=0.1, end=0.9, hires="own", hires_scale=2)
    assert _best_ms(lambda: layer_map_svg(sdxl, selection)) < 5
    assert _best_ms(lambda: schedule_svg(params, 50, hires_steps=25)) < 5


# --- schedule ----------------------------------------------------------------------------------

def check_bars(root, params, steps, hires_steps=None):
    base = bars(root, "base")
    assert [int(b.get("data-step")) for b in base] == list(range(steps))
    for b in base:
        assert float(b.get("data-scale")) == scale_for_step(params, step=int(b.get("data-step")), total_steps=steps)
    hires = bars(root, "hires")
    if hires_steps is None:
        assert hires == []
    else:
        assert [int(b.get("data-step")) for b in hires] == list(range(hires_steps))
        for b in hires:
            assert float(b.get("data-scale")) == scale_for_step(params, step=int(b.get("data-step")), total_steps=hires_steps, hires=True)
    return base, hires


def test_constant_schedule():
    root = parse(schedule_svg(ON, 20))
    base, _ = check_bars(root, ON, 20)
    assert {float(b.get("data-scale")) for b in base} == {3.0}
    assert len({b.get("height") for b in base}) == 1
    assert root.find(f".//{NS}text[@class='pag-max']").text == "3"


def test_linear_window_is_zero_outside():
    params = ON.with_overrides(start=0.2, end=0.8, schedule="linear", scale=5)
    root = parse(schedule_svg(params, 20))
    base, _ = check_bars(root, params, 20)
    values = [float(b.get("data-scale")) for b in base]
    assert values[:4] == [0.0] * 4 and values[16:] == [0.0] * 4
    assert values[4] == 5.0 and all(a > b > 0 for a, b in zip(values[4:15], values[5:16]))
    assert [float(b.get("height")) for b in base[:4]] == [0.0] * 4
    window = root.find(f".//{NS}rect[@class='pag-window']")
    assert window is not None
    assert "max 5" in root.find(NS + "title").text


@pytest.mark.parametrize("hires, scale_hires", [("same", 3.0), ("own", 1.5), ("off", 0.0)])
def test_hires_segment(hires, scale_hires):
    params = ON.with_overrides(schedule="cosine", hires=hires, hires_scale=1.5)
    root = parse(schedule_svg(params, 20, hires_steps=10))
    _, high = check_bars(root, params, 20, 10)
    assert float(high[0].get("data-scale")) == scale_hires
    assert {"same": "same as the first pass", "own": "own scale 1.5", "off": "PAG off"}[hires] in all_text(root)


def test_hires_steps_zero_means_as_many_as_the_first_pass():
    root = parse(schedule_svg(ON.with_overrides(hires="own", hires_scale=6), 12, hires_steps=0))
    _, high = check_bars(root, ON.with_overrides(hires="own", hires_scale=6), 12, 12)
    assert root.find(f".//{NS}text[@class='pag-max']").text == "6"


def test_disabled_and_degenerate_inputs_do_not_raise():
    root = parse(schedule_svg(PagParams(), 20))
    check_bars(root, PagParams(), 20)
    assert "PAG off" in root.find(NS + "title").text
    root = parse(schedule_svg(ON.with_overrides(scale=0), 1, hires_steps=1))
    check_bars(root, ON.with_overrides(scale=0), 1, 1)
    root = parse(schedule_svg(ON, 0))  # clamps to one step
    check_bars(root, ON, 1)
    root = parse(schedule_svg(ON.with_overrides(sigma_start=10, sigma_end=1), 150))
    check_bars(root, ON.with_overrides(sigma_start=10, sigma_end=1), 150)
    assert "sigma window not drawn" in root.find(NS + "title").text
