"""Layer catalog, spec syntax and resolution on real SD1.x/SD2.x UNets and the SDXL-family double."""

import pytest

from lib_pag import PagError, build_catalog, normalize_layer_spec, parse_layer_spec, resolve_layers
from unets import sd15_unet, sd2_unet, sdxl_unet


@pytest.fixture(scope="module")
def sd15():
    return build_catalog(sd15_unet())


@pytest.fixture(scope="module")
def sdxl():
    return build_catalog(sdxl_unet("base"))


def paths(selection):
    return set(selection.paths)


def test_sd15_catalog_names_and_paths(sd15):
    assert sd15.arch == "SD1.x"
    assert sd15.summary() == "d0-d5, m0, u0-u8"
    by_name = {l.name: l.path for l in sd15.layers}
    # real SD1.x table: input blocks 1,2,4,5,7,8 and output blocks 3..11 carry a transformer at index 1
    expected_down = [1, 2, 4, 5, 7, 8]
    for i, host in enumerate(expected_down):
        assert by_name[f"d{i}.0"] == f"input_blocks.{host}.1.transformer_blocks.0.attn1"
    assert by_name["m0.0"] == "middle_block.1.transformer_blocks.0.attn1"
    for i, host in enumerate(range(3, 12)):
        assert by_name[f"u{i}.0"] == f"output_blocks.{host}.1.transformer_blocks.0.attn1"
    assert len(sd15.layers) == 16
    assert {l.host_block for l in sd15.layers if l.part == "mid"} == {("middle", 0)}


def test_sd2_is_recognised():
    cat = build_catalog(sd2_unet())
    assert cat.arch == "SD2.x"
    assert cat.summary() == "d0-d5, m0, u0-u8"


def test_sdxl_catalog_matches_real_block_table(sdxl):
    from tests.doubles.sgm_unet import SDXL_BASE_BLOCK_TABLE

    assert sdxl.arch == "SDXL"
    assert sdxl.summary() == "d0-d3, m0, u0-u5"
    expected = set()
    table = SDXL_BASE_BLOCK_TABLE
    for attr in ("input_blocks", "output_blocks"):
        for host, depth in table[attr].items():
            expected |= {f"{attr}.{host}.1.transformer_blocks.{j}.attn1" for j in range(depth)}
    expected |= {f"middle_block.1.transformer_blocks.{j}.attn1" for j in range(table["middle_block"])}
    assert {l.path for l in sdxl.layers} == expected
    assert sdxl.transformers("mid", 0) == list(range(10))
    assert sdxl.transformers("down", 0) == [0, 1] and sdxl.transformers("down", 2) == list(range(10))
    assert sdxl.transformers("up", 0) == list(range(10)) and sdxl.transformers("up", 5) == [0, 1]


def test_refiner_and_ssd1b_catalogs():
    refiner = build_catalog(sdxl_unet("refiner"))
    assert refiner.arch == "SDXL refiner"
    assert refiner.summary() == "d0-d3, m0, u0-u5"
    ssd = build_catalog(sdxl_unet("ssd"))
    assert ssd.arch == "SSD-1B"
    assert ssd.blocks("mid") == []
    with pytest.raises(PagError, match=r"'mid' does not exist in this SSD-1B UNet \(it has no middle-block attention\); valid: d0-d3, u0-u5"):
        resolve_layers("mid", ssd)


@pytest.mark.parametrize("spec, expected", [
    ("mid", {"m0.0"}),
    ("middle", {"m0.0"}),
    ("down", {f"d{i}.0" for i in range(6)}),
    (["mid", "up"], {"m0.0"} | {f"u{i}.0" for i in range(9)}),
    ("mid, up", {"m0.0"} | {f"u{i}.0" for i in range(9)}),
    ("all", None),
    ("d1-d3", {"d1.0", "d2.0", "d3.0"}),
    ("d1-3", {"d1.0", "d2.0", "d3.0"}),
    ("u0.0", {"u0.0"}),
    ("m0,u8", {"m0.0", "u8.0"}),
    ("middle_block.1", {"m0.0"}),
    ("model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1", {"u0.0"}),
    ("input_blocks.1", {"d0.0"}),  # anchored: must not pick input_blocks.10 / .11
])
def test_sd15_spec_forms(sd15, spec, expected):
    selection = resolve_layers(spec, sd15)
    if expected is None:
        expected = {l.name for l in sd15.layers}
    assert set(selection.names) == expected


@pytest.mark.parametrize("spec, expected", [
    ("m0.2-9", {f"m0.{j}" for j in range(2, 10)}),
    ("m0", {f"m0.{j}" for j in range(10)}),
    ("d0", {"d0.0", "d0.1"}),
    ("d2.0-1", {"d2.0", "d2.1"}),
    ("u3-u5.1", {"u3.1", "u4.1", "u5.1"}),
    ("middle_block.1.transformer_blocks.3", {"m0.3"}),
    ("output_blocks.5", {"u5.0", "u5.1"}),
])
def test_sdxl_spec_forms(sdxl, spec, expected):
    assert set(resolve_layers(spec, sdxl).names) == expected


def test_strengths_and_overrides(sdxl):
    selection = resolve_layers("mid, m0.3:0.5, u0:0.25", sdxl)
    strengths = {l.name: s for l, s in selection.chosen}
    assert strengths["m0.3"] == 0.5 and strengths["m0.4"] == 1.0
    assert all(strengths[f"u0.{j}"] == 0.25 for j in range(10))
    assert len(strengths) == 20
    # chosen in catalog (forward) order, first perturbed layer known for prefix sharing
    assert selection.names[0] == "m0.0"
    assert selection.first_in_forward_order().name == "m0.0"


@pytest.mark.parametrize("spec, message", [
    ("u9", "PAG layers: 'u9' does not exist in this SDXL UNet; valid: d0-d3, m0, u0-u5"),
    ("m0.12", "PAG layers: 'm0.12' does not exist in this SDXL UNet; m0 has transformers 0-9; valid: d0-d3, m0, u0-u5"),
    ("d0.2", "d0 has transformers 0-1"),
    ("d2-d7", "'d2-d7' does not exist"),
    ("input_blocks.1", "'input_blocks.1' does not exist in this SDXL UNet"),
])
def test_sdxl_errors_name_field_value_and_valid_range(sdxl, spec, message):
    with pytest.raises(PagError) as info:
        resolve_layers(spec, sdxl)
    assert message in str(info.value)
    assert info.value.field == "PAG layers"


@pytest.mark.parametrize("spec, problem", [
    ("", "selects no layer"),
    (" , ", "selects no layer"),
    ([], "selects no layer"),
    ("x1", "is not a layer name"),
    ("mid:0", "bad strength"),
    ("mid:1.5", "bad strength"),
    ("mid:nan", "bad strength"),
    ("u0:abc", "bad strength"),
    ("d1-u3", "mixes parts"),
    ("d3-d1", "runs backwards"),
    ("m0.9-2", "runs backwards"),
    (3, "wrong type"),
    (["mid", 2], "wrong type"),
    ("input_blocks.1;drop table", "is not a layer name"),
])
def test_syntax_errors(spec, problem):
    with pytest.raises(PagError) as info:
        parse_layer_spec(spec)
    assert problem in str(info.value)
    assert str(info.value).startswith("PAG layers: ")
    assert "allowed: " in str(info.value)


def test_normalized_spec_is_stable():
    assert normalize_layer_spec(["Mid", "UP"]) == "mid,up"
    assert normalize_layer_spec("m0.2-9:0.50 ; u0") == "m0.2-9:0.5,u0"
    assert normalize_layer_spec(normalize_layer_spec("d1-d3, mid")) == "d1-d3,mid"


def test_unknown_family_is_not_named_twice():
    """A UNet of no known family (1 res block per level, as a tiny test checkpoint): "this UNet", not "UNet UNet"."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=1, channel_mult=[1, 2, 4, 4], num_heads=4, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, legacy=False)
    catalog = build_catalog(unet)
    assert catalog.arch == "UNet"
    with pytest.raises(PagError) as info:
        resolve_layers("u42", catalog)
    assert str(info.value) == "PAG layers: 'u42' does not exist in this UNet; valid: d0-d2, m0, u0-u5"


@pytest.mark.parametrize("spec,problem", [
    ("u0:", "has an empty strength"),
    ("mid,u0:", "has an empty strength"),
    ("u\u0663", "is not a layer name"),  # Arabic-Indic digit three
    ("u0:\u0660.5", "has a bad strength"),
    ("u0:0.5\u0665", "has a bad strength"),
    ("u\uff10", "is not a layer name"),  # fullwidth zero
    ("u0:1_0", "has a bad strength"),
])
def test_layer_syntax_takes_ascii_digits_and_a_strength_after_every_colon(spec, problem):
    with pytest.raises(PagError, match=problem):
        parse_layer_spec(spec)


@pytest.mark.parametrize("spec,canonical", [
    ("mid,mid", "mid"),
    ("mid, up ,mid", "up,mid"),
    ("MID,m0:0.5,mid", "m0:0.5,mid"),
    ("u0:0.50,u0:.5", "u0:0.5"),
    ("u0:1e-1", "u0:0.1"),
])
def test_canonical_layer_text_merges_repeats_without_changing_the_meaning(sd15, spec, canonical):
    assert normalize_layer_spec(spec) == canonical
    assert resolve_layers(spec, sd15).chosen == resolve_layers(canonical, sd15).chosen


def test_catalog_sees_through_a_block_wrapper_and_follows_the_modules():
    """Kohya HRFix wraps ``input_blocks[d]`` / ``output_blocks[-(d+1)]`` in a ``Scaler`` (the block kept as
    ``.block``) mid-job and unwraps it later: the same names resolve to the same attn1 modules either way."""
    import torch

    class Scaler(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, *args):
            return self.block(x, *args)

    unet = sd15_unet(seed=2)
    plain = build_catalog(unet)
    unet.input_blocks[4] = Scaler(unet.input_blocks[4])
    unet.output_blocks[7] = Scaler(unet.output_blocks[7])
    wrapped = build_catalog(unet)
    assert [l.name for l in wrapped.layers] == [l.name for l in plain.layers] and wrapped.arch == plain.arch
    moved = {l.name: l.path for l in wrapped.layers if l.path != next(p.path for p in plain.layers if p.name == l.name)}
    assert moved == {"d2.0": "input_blocks.4.block.1.transformer_blocks.0.attn1",
                     "u4.0": "output_blocks.7.block.1.transformer_blocks.0.attn1"}
    for layer in wrapped.layers:
        assert layer.module(unet) is unet.get_submodule(layer.path)
    unet.input_blocks[4] = unet.input_blocks[4].block  # unwrapped: the path is gone, the module is not
    layer = next(l for l in wrapped.layers if l.name == "d2.0")
    assert layer.module(unet) is unet.input_blocks[4][1].transformer_blocks[0].attn1
    assert layer.spatial_transformer(unet) is unet.input_blocks[4][1]
