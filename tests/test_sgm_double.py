"""Tests proving tests/doubles/sgm_unet.py mirrors the real SDXL / refiner / SSD-1B layout."""

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from tests.doubles import sgm_unet as sgm
except ImportError:  # tests/ itself on sys.path (pytest rootdir-less import mode)
    from doubles import sgm_unet as sgm
from tests.exactness import assert_exact


FACTORIES = {
    "sdxl_base": (sgm.make_sdxl_base, sgm.SDXL_BASE_BLOCK_TABLE),
    "sdxl_refiner": (sgm.make_sdxl_refiner, sgm.SDXL_REFINER_BLOCK_TABLE),
    "ssd_1b": (sgm.make_ssd_1b, sgm.SSD_1B_BLOCK_TABLE),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy CPU they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unets():
    """Build each tiny UNet once per module."""
    return {name: factory() for name, (factory, _) in FACTORIES.items()}


def _paths(unet, suffix):
    return {name for name, _ in unet.named_modules() if name.endswith(suffix)}


# ---------------------------------------------------------------- tables themselves


def test_tables_state_the_known_sdxl_facts():
    base = sgm.SDXL_BASE_BLOCK_TABLE
    assert base["input_blocks"] == {4: 2, 5: 2, 7: 10, 8: 10}
    assert base["middle_block"] == 10
    assert base["output_blocks"] == {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2}
    ssd = sgm.SSD_1B_BLOCK_TABLE
    assert ssd["input_blocks"] == {4: 2, 5: 2, 7: 4, 8: 4}
    assert not ssd["middle_block"]
    assert ssd["output_blocks"] == {0: 4, 1: 4, 2: 10, 3: 2, 4: 1, 5: 1}
    ref = sgm.SDXL_REFINER_BLOCK_TABLE
    assert set(ref["input_blocks"].values()) == {4} and ref["middle_block"] == 4
    # total number of self-attention layers
    assert len(sgm.expected_transformer_paths(base)) == 70
    assert len(sgm.expected_transformer_paths(ref)) == 44
    assert len(sgm.expected_transformer_paths(ssd)) == 34


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("leaf", ["attn1", "attn2"])
def test_attention_paths_match_table(unets, name, leaf):
    unet, table = unets[name], FACTORIES[name][1]
    found = _paths(unet, "." + leaf)
    assert found == sgm.expected_transformer_paths(table, leaf)
    for path in found:
        assert isinstance(unet.get_submodule(path), sgm.CrossAttention)


@pytest.mark.parametrize("name", FACTORIES)
def test_transformer_block_children(unets, name):
    unet, table = unets[name], FACTORIES[name][1]
    blocks = {n: m for n, m in unet.named_modules() if isinstance(m, sgm.BasicTransformerBlock)}
    assert set(blocks) == sgm.expected_transformer_paths(table, leaf="")
    for block in blocks.values():
        assert isinstance(block.ff, sgm.FeedForward)
        for norm in (block.norm1, block.norm2, block.norm3):
            assert isinstance(norm, nn.LayerNorm)
        assert block.disable_self_attn is False
        for attn in (block.attn1, block.attn2):
            assert isinstance(attn.to_q, nn.Linear) and attn.to_q.bias is None
            assert attn.to_k.bias is None and attn.to_v.bias is None
            assert isinstance(attn.to_out, nn.Sequential)
            assert isinstance(attn.to_out[0], nn.Linear) and isinstance(attn.to_out[1], nn.Dropout)
            assert attn.scale == pytest.approx((attn.to_q.out_features // attn.heads) ** -0.5)
        # attn1 is self-attention: its keys read the hidden width, not the text context
        assert block.attn1.to_k.in_features == block.attn1.to_q.in_features


@pytest.mark.parametrize("name", FACTORIES)
def test_block_kinds_and_counts(unets, name):
    unet, table = unets[name], FACTORIES[name][1]
    assert [n for n, _ in unet.named_children()] == [
        "time_embed", "label_emb", "input_blocks", "middle_block", "output_blocks", "out"]
    assert isinstance(unet.input_blocks[0], sgm.TimestepEmbedSequential)
    assert isinstance(unet.input_blocks[0][0], nn.Conv2d)
    assert len(unet.input_blocks) == table["num_input_blocks"]
    assert len(unet.output_blocks) == table["num_output_blocks"]

    for i in range(1, len(unet.input_blocks)):
        block = unet.input_blocks[i]
        assert isinstance(block, sgm.TimestepEmbedSequential)
        if i in table["downsample_input_blocks"]:
            assert len(block) == 1 and isinstance(block[0], sgm.Downsample)
            continue
        assert isinstance(block[0], sgm.ResBlock)
        if i in table["input_blocks"]:
            assert len(block) == 2 and isinstance(block[1], sgm.SpatialTransformer)
            assert len(block[1].transformer_blocks) == table["input_blocks"][i]
        else:
            assert len(block) == 1

    for i, block in enumerate(unet.output_blocks):
        assert isinstance(block[0], sgm.ResBlock)
        has_attn = i in table["output_blocks"]
        has_up = i in table["upsample_output_blocks"]
        assert len(block) == 1 + has_attn + has_up
        if has_attn:
            assert isinstance(block[1], sgm.SpatialTransformer)
            assert len(block[1].transformer_blocks) == table["output_blocks"][i]
        if has_up:
            assert isinstance(block[-1], sgm.Upsample)

    middle = list(unet.middle_block)
    if table["middle_block"]:
        assert [type(m) for m in middle] == [sgm.ResBlock, sgm.SpatialTransformer, sgm.ResBlock]
        assert len(unet.middle_block[1].transformer_blocks) == table["middle_block"]
    else:
        assert [type(m) for m in middle] == [sgm.ResBlock]


def test_cross_attention_reads_context_dim(unets):
    for name, unet in unets.items():
        ctx = unet.context_dim[0] if isinstance(unet.context_dim, list) else unet.context_dim
        for path in _paths(unet, ".attn2"):
            assert unet.get_submodule(path).to_k.in_features == ctx, (name, path)


def test_real_size_parameter_counts_on_meta():
    """tiny=False gives true SDXL sizes; the base UNet has SDXL's well-known 2,567,463,684 params."""
    base = sgm.make_sdxl_base(tiny=False, device="meta")
    assert base.model_channels == 320 and base.context_dim == 2048 and base.adm_in_channels == 2816
    assert sum(p.numel() for p in base.parameters()) == 2_567_463_684
    assert base.input_blocks[7][1].transformer_blocks[0].attn1.heads == 20  # 1280 / 64
    refiner = sgm.make_sdxl_refiner(tiny=False, device="meta")
    assert refiner.model_channels == 384 and refiner.adm_in_channels == 2560
    assert refiner.input_blocks[4][1].transformer_blocks[0].attn2.to_k.in_features == 1280
    ssd = sgm.make_ssd_1b(tiny=False, device="meta")
    assert sum(p.numel() for p in ssd.parameters()) < sum(p.numel() for p in base.parameters())
    assert _paths(ssd, ".attn1") == sgm.expected_transformer_paths(sgm.SSD_1B_BLOCK_TABLE)


def test_convert_to_ssd_matches_a1111_deletions():
    unet = sgm.convert_to_ssd(sgm.make_sdxl_base())
    assert len(unet.middle_block) == 1
    for idx in (7, 8):
        assert [k for k, _ in unet.input_blocks[idx][1].transformer_blocks.named_children()] == \
            ["0", "1", "2", "3"]
    for idx, depth in ((0, 4), (1, 4), (2, 10), (3, 2), (4, 1), (5, 1)):
        assert len(unet.output_blocks[idx][1].transformer_blocks) == depth


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", FACTORIES)
def test_forward_shape_and_finite(unets, name):
    unet = unets[name]
    inputs = sgm.make_inputs(unet, batch_size=2, latent_size=16)
    with torch.no_grad():
        out = unet(**inputs)
    assert out.shape == (2, 4, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 0


def test_forward_is_fast_on_cpu(unets):
    unet = unets["sdxl_base"]
    inputs = sgm.make_inputs(unet)
    with torch.no_grad():
        unet(**inputs)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            unet(**inputs)
            best = min(best, time.perf_counter() - start)
    assert best < 1.0, best


def test_y_is_required_and_used(unets):
    unet = unets["sdxl_base"]
    inputs = sgm.make_inputs(unet)
    with torch.no_grad():
        ref = unet(**inputs)
        with pytest.raises(AssertionError):
            unet(inputs["x"], inputs["timesteps"], inputs["context"])
        other = unet(**{**inputs, "y": inputs["y"] + 1})
    assert not torch.allclose(ref, other)


def test_factories_are_seeded():
    a = sgm.make_sdxl_refiner(seed=3)
    b = sgm.make_sdxl_refiner(seed=3)
    c = sgm.make_sdxl_refiner(seed=4)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                          c.named_parameters()):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    # sgm's zero-initialised layers are re-randomised so every attention matters
    assert a.out[-1].weight.abs().sum() > 0
    assert a.input_blocks[4][1].proj_out.weight.abs().sum() > 0


def test_every_self_attention_influences_output(unets):
    """Replacing one attn1's output changes the UNet output (needed by PAG tests)."""
    unet = unets["ssd_1b"]
    inputs = sgm.make_inputs(unet)
    with torch.no_grad():
        ref = unet(**inputs)
        for path in ("input_blocks.4.1.transformer_blocks.0.attn1",
                     "output_blocks.2.1.transformer_blocks.9.attn1"):
            attn = unet.get_submodule(path)
            handle = attn.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
            try:
                changed = unet(**inputs)
            finally:
                handle.remove()
            assert not torch.allclose(ref, changed), path
        assert torch.equal(unet(**inputs), ref)


def test_cross_attention_matches_reference_math(float64):  # the double vs the math written out, in float64 (tests/exactness.py)
    torch.manual_seed(0)
    attn = sgm.CrossAttention(query_dim=16, context_dim=12, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    out = attn(x, context=ctx)

    def split(t):
        return t.reshape(2, t.shape[1], 2, 8).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
    weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert_exact(out, expected)


def test_additional_tokens_keep_output_shape(float64):  # the double vs the math written out, in float64 (tests/exactness.py)
    torch.manual_seed(0)
    attn = sgm.CrossAttention(query_dim=16, heads=2, dim_head=8)
    x, extra = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    plain = attn(x)
    with_extra = attn(x, additional_tokens=extra)
    assert with_extra.shape == plain.shape == (2, 6, 16)
    # the extra tokens take part as keys/values of self-attention
    assert not torch.allclose(plain, with_extra)
    # and equal running on the concatenation then dropping the first rows
    assert_exact(with_extra, attn(torch.cat([extra, x], 1))[:, 3:])

    cross = sgm.CrossAttention(query_dim=16, context_dim=12, heads=2, dim_head=8)
    ctx = torch.randn(2, 4, 12)
    # with a context the extra query rows are simply stripped again
    assert_exact(cross(x, context=ctx, additional_tokens=extra), cross(x, context=ctx))

    block = sgm.BasicTransformerBlock(16, 2, 8, context_dim=12)
    assert block(x, context=ctx, additional_tokens=extra).shape == x.shape


def test_crossframe_attention_shares_first_frame_kv(float64):  # the double vs the math written out, in float64 (tests/exactness.py)
    torch.manual_seed(0)
    attn = sgm.CrossAttention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(4, 5, 16)
    out = attn(x, n_times_crossframe_attn_in_self=2)
    assert out.shape == x.shape
    # frame 1 attends to frame 0's keys/values
    q1 = attn.to_q(x[1:2])
    k0, v0 = attn.to_k(x[0:1]), attn.to_v(x[0:1])
    split = lambda t: t.reshape(1, 5, 2, 8).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q1), split(k0), split(v0))
    expected = attn.to_out(ref.transpose(1, 2).reshape(1, 5, 16))
    assert_exact(out[1:2], expected)


def test_block_calls_attn1_with_sgm_arguments():
    block = sgm.BasicTransformerBlock(16, 2, 8, context_dim=12)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)
        seen["n_args"] = len(args)

    block.attn1.register_forward_pre_hook(spy, with_kwargs=True)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 3, 12)
    block(x, context=ctx)
    assert seen["n_args"] == 1
    assert seen["context"] is None
    assert seen["additional_tokens"] is None
    assert seen["n_times_crossframe_attn_in_self"] == 0


def test_spatial_transformer_accepts_context_list(float64):  # the double vs the math written out, in float64 (tests/exactness.py)
    torch.manual_seed(0)
    st = sgm.SpatialTransformer(32, 2, 8, depth=2, context_dim=[12, 12], use_linear=True)
    x, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 12)
    assert_exact(st(x, context=[ctx]), st(x, context=ctx))
    assert st(x, context=[ctx, ctx]).shape == x.shape
