"""A small, structurally faithful test double of Stability-AI's SDXL UNet.

The real model lives in the ``sgm`` package of github.com/Stability-AI/generative-models
(not on PyPI; AUTOMATIC1111 pins commit 45c443b316737a4ab6e40413d7794a7f5657c19f):

* ``sgm/modules/diffusionmodules/openaimodel.py`` -- ``UNetModel``, ``ResBlock``,
  ``Downsample``, ``Upsample``, ``TimestepBlock``, ``TimestepEmbedSequential``
* ``sgm/modules/diffusionmodules/util.py`` -- ``timestep_embedding``,
  ``GroupNorm32``/``normalization``, ``zero_module``
* ``sgm/modules/attention.py`` -- ``CrossAttention``, ``BasicTransformerBlock``,
  ``SpatialTransformer``, ``FeedForward``, ``GEGLU``

This module is an independent re-implementation written for tests.  What it keeps
identical to sgm is everything an attention-patching extension can observe:

* module names and nesting, so ``named_modules()`` paths are those of real SDXL
  (``input_blocks.7.1.transformer_blocks.3.attn1`` etc.);
* attribute names (``heads``, ``scale``, ``to_q``/``to_k``/``to_v``/``to_out``,
  ``norm1..3``, ``disable_self_attn``, ``transformer_blocks`` ...);
* call signatures and the call chain
  ``UNetModel.forward -> TimestepEmbedSequential -> SpatialTransformer ->
  BasicTransformerBlock.forward -> _forward -> attn1/attn2(...)``.

Differences (deliberate, all harmless for structure/behaviour tests):

* no gradient checkpointing and no xformers; ``"softmax-xformers"`` falls back to
  ``CrossAttention`` exactly as sgm does when xformers is missing;
* only ``dims=2``; the video / codebook branches are left out;
* ``GroupNorm32`` computes in fp32 with fp32 affine params so the double also runs
  in fp16 without autocast, and the timestep embedding is cast to the UNet dtype
  (as A1111's patched ``timestep_embedding`` does);
* the ``make_*`` factories re-initialise the layers that sgm zero-initialises
  (``proj_out``, the last conv of each ResBlock, the final ``out`` conv) with
  seeded random weights, so that every attention layer affects the output.

Tiny models keep the REAL block layout (same number of input/output blocks, same
transformer depths per level) but use tiny channel counts.  GroupNorm uses 32
groups as in sgm, so ``model_channels`` must be a multiple of 32.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

__all__ = [
    "GroupNorm32",
    "normalization",
    "zero_module",
    "timestep_embedding",
    "GEGLU",
    "FeedForward",
    "CrossAttention",
    "BasicTransformerBlock",
    "SpatialTransformer",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "Downsample",
    "ResBlock",
    "UNetModel",
    "convert_to_ssd",
    "randomize_zero_init_",
    "SDXL_BASE_CONFIG",
    "SDXL_REFINER_CONFIG",
    "TINY_SDXL_BASE_OVERRIDES",
    "TINY_SDXL_REFINER_OVERRIDES",
    "SDXL_BASE_BLOCK_TABLE",
    "SDXL_REFINER_BLOCK_TABLE",
    "SSD_1B_BLOCK_TABLE",
    "expected_transformer_paths",
    "make_sdxl_base",
    "make_sdxl_refiner",
    "make_ssd_1b",
    "make_inputs",
]


# --------------------------------------------------------------------------------------
# helpers (sgm/modules/diffusionmodules/util.py)
# --------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """Mirror of ``GroupNorm32`` in sgm/modules/diffusionmodules/util.py.

    Normalises in float32 and casts the result back to the input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Group-normalise ``x`` in fp32 (params upcast too) and return it in x.dtype."""
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        y = F.group_norm(x.float(), self.num_groups, w, b, self.eps)
        return y.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """Mirror of ``normalization`` in sgm/modules/diffusionmodules/util.py (32 groups)."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Mirror of ``zero_module`` in sgm/modules/diffusionmodules/util.py: zero all params."""
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
    return module


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Mirror of ``timestep_embedding`` in sgm/modules/diffusionmodules/util.py.

    Sinusoidal embedding: ``[cos(t * f_k), sin(t * f_k)]`` with
    ``f_k = max_period ** (-k / (dim // 2))``; a zero column is appended for odd ``dim``.
    With ``repeat_only`` the raw timestep is broadcast to ``dim`` columns instead.
    """
    if repeat_only:
        return repeat(timesteps, "b -> b d", d=dim)
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------
# attention (sgm/modules/attention.py)
# --------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """Mirror of ``GEGLU`` in sgm/modules/attention.py: ``proj`` -> value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        """Create ``proj``, one Linear producing value and gate halves."""
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split the projection into (value, gate) and gate the value with GELU."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Mirror of ``FeedForward`` in sgm/modules/attention.py.

    ``net`` = Sequential(GEGLU or (Linear, GELU), Dropout, Linear), so parameter
    paths are ``ff.net.0.proj`` and ``ff.net.2`` as in SDXL checkpoints.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4,
                 glu: bool = False, dropout: float = 0.0):
        """Build the projection-in / dropout / projection-out stack."""
        super().__init__()
        hidden = int(dim * mult)
        if glu:
            first = GEGLU(dim, hidden)
        else:
            first = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.net = nn.Sequential(first, nn.Dropout(dropout), nn.Linear(hidden, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward stack."""
        return self.net(x)


class CrossAttention(nn.Module):
    """Mirror of ``CrossAttention`` in sgm/modules/attention.py (the "softmax" mode).

    Attributes as in sgm: ``scale`` (= dim_head ** -0.5), ``heads``, ``to_q``,
    ``to_k``, ``to_v`` (bias-free Linear), ``to_out`` = Sequential(Linear, Dropout),
    ``backend``.  Attention itself is ``F.scaled_dot_product_attention``.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, backend=None):
        """Create the q/k/v/out projections; k and v read ``context_dim`` (default query_dim)."""
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.backend = backend

    def forward(self, x, context=None, mask=None, additional_tokens=None,
                n_times_crossframe_attn_in_self=0):
        """Attend from ``x`` to ``context`` (``x`` itself when None), as sgm does.

        ``additional_tokens`` (b, n_extra, c) are prepended to ``x`` before the
        projections (so for self-attention they are also keys/values) and their
        rows are dropped from the result before ``to_out``.  With
        ``n_times_crossframe_attn_in_self=n`` every group of frames re-uses the
        keys/values of the group's first frame (sgm's cross-frame trick).
        ``mask`` is handed to SDPA as ``attn_mask``.
        """
        n_extra = 0
        if additional_tokens is not None:
            n_extra = additional_tokens.shape[1]
            x = torch.cat([additional_tokens, x], dim=1)

        source = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(source)
        v = self.to_v(source)

        if n_times_crossframe_attn_in_self:
            step = n_times_crossframe_attn_in_self
            assert x.shape[0] % step == 0
            copies = x.shape[0] // step
            k = repeat(k[::step], "b ... -> (b n) ...", n=copies)
            v = repeat(v[::step], "b ... -> (b n) ...", n=copies)

        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = rearrange(out, "b h n d -> b n (h d)")

        if n_extra:
            out = out[:, n_extra:]
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Mirror of ``BasicTransformerBlock`` in sgm/modules/attention.py.

    Children ``attn1`` (self-attention unless ``disable_self_attn``), ``ff``,
    ``attn2`` (cross-attention), ``norm1``/``norm2``/``norm3`` (LayerNorm).
    """

    ATTENTION_MODES = {
        "softmax": CrossAttention,
        # sgm falls back to the vanilla class when xformers is not installed
        "softmax-xformers": CrossAttention,
    }

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True,
                 checkpoint: bool = True, disable_self_attn: bool = False,
                 attn_mode: str = "softmax", sdp_backend=None):
        """Build attn1/ff/attn2/norms; ``checkpoint`` is stored but not used."""
        super().__init__()
        assert attn_mode in self.ATTENTION_MODES, attn_mode
        attn_cls = self.ATTENTION_MODES[attn_mode]
        self.disable_self_attn = disable_self_attn
        self.attn1 = attn_cls(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                              context_dim=context_dim if disable_self_attn else None,
                              backend=sdp_backend)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = attn_cls(query_dim=dim, context_dim=context_dim, heads=n_heads,
                              dim_head=d_head, dropout=dropout, backend=sdp_backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None, additional_tokens=None,
                n_times_crossframe_attn_in_self=0):
        """Entry point, as sgm's ``forward`` (which only wraps ``_forward`` in checkpointing)."""
        return self._forward(x, context, additional_tokens, n_times_crossframe_attn_in_self)

    def _forward(self, x, context=None, additional_tokens=None,
                 n_times_crossframe_attn_in_self=0):
        """Pre-norm residual chain attn1 -> attn2 -> ff with sgm's exact call arguments."""
        x = self.attn1(
            self.norm1(x),
            context=context if self.disable_self_attn else None,
            additional_tokens=additional_tokens,
            n_times_crossframe_attn_in_self=(
                0 if self.disable_self_attn else n_times_crossframe_attn_in_self
            ),
        ) + x
        x = self.attn2(self.norm2(x), context=context, additional_tokens=additional_tokens) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Mirror of ``SpatialTransformer`` in sgm/modules/attention.py.

    ``norm`` (GroupNorm, 32 groups, eps 1e-6) -> ``proj_in`` (Linear when
    ``use_linear`` else 1x1 conv) -> ``transformer_blocks`` (ModuleList of
    BasicTransformerBlock) -> zero-initialised ``proj_out`` -> residual add.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim=None, disable_self_attn: bool = False,
                 use_linear: bool = False, attn_type: str = "softmax",
                 use_checkpoint: bool = True, sdp_backend=None):
        """Build the block; ``context_dim`` may be an int or a per-depth list (as in sgm)."""
        super().__init__()
        if context_dim is None:
            per_block = [None] * depth
        elif isinstance(context_dim, (list, tuple)):
            per_block = list(context_dim)
            if len(per_block) != depth:
                assert len(set(per_block)) == 1, "need homogeneous context_dim to match depth"
                per_block = [per_block[0]] * depth
        else:
            per_block = [context_dim] * depth

        inner = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout,
                                  context_dim=per_block[i], disable_self_attn=disable_self_attn,
                                  attn_mode=attn_type, checkpoint=use_checkpoint,
                                  sdp_backend=sdp_backend)
            for i in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner, in_channels, kernel_size=1))
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Run the token transformer over the (h w) positions of ``x``.

        ``context`` may be a list with one entry per block; a single tensor (or a
        one-element list) is shared by all blocks.
        """
        contexts = context if isinstance(context, list) else [context]
        _, _, height, width = x.shape
        residual = x
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            h = self.proj_in(h)
        for idx, block in enumerate(self.transformer_blocks):
            h = block(h, context=contexts[idx if len(contexts) > 1 else 0])
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width).contiguous()
        if not self.use_linear:
            h = self.proj_out(h)
        return h + residual


# --------------------------------------------------------------------------------------
# UNet parts (sgm/modules/diffusionmodules/openaimodel.py)
# --------------------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """Mirror of ``TimestepBlock``
    in sgm/modules/diffusionmodules/openaimodel.py: forward takes (x, emb).
    """

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        """Apply the module to ``x`` conditioned on the timestep embedding ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Mirror of ``TimestepEmbedSequential`` in sgm/modules/diffusionmodules/openaimodel.py.

    Dispatches per child type: TimestepBlock gets (x, emb), SpatialTransformer
    gets (x, context), anything else gets (x).
    """

    def forward(self, x, emb, context=None, *args, **kwargs):
        """Run the children in order; the extra (video) arguments of sgm are ignored."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Mirror of ``Upsample``
    in sgm/modules/diffusionmodules/openaimodel.py (2-D): nearest x2, optional 3x3 ``conv``.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: Optional[int] = None, padding: int = 1):
        """Create the optional convolution named ``conv``."""
        super().__init__()
        assert dims == 2, "the double only supports 2-D"
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Double the spatial size, then convolve if configured."""
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Mirror of ``Downsample``
    in sgm/modules/diffusionmodules/openaimodel.py (2-D): ``op`` = strided conv or avg-pool.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2,
                 out_channels: Optional[int] = None, padding: int = 1):
        """Create ``op``: a stride-2 3x3 conv (use_conv) or a 2x2 average pool."""
        super().__init__()
        assert dims == 2, "the double only supports 2-D"
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the spatial size."""
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Mirror of ``ResBlock`` in sgm/modules/diffusionmodules/openaimodel.py.

    Children: ``in_layers`` (norm, SiLU, conv), ``h_upd``/``x_upd``, ``emb_layers``
    (SiLU, Linear), ``out_layers`` (norm, SiLU, Dropout, zero conv),
    ``skip_connection`` (Identity or conv).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float,
                 out_channels: Optional[int] = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False,
                 kernel_size: int = 3):
        """Build the residual block (2-D only; checkpointing flag stored, not used)."""
        super().__init__()
        assert dims == 2, "the double only supports 2-D"
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        pad = kernel_size // 2

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, kernel_size, padding=pad),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_width = self.out_channels * (2 if use_scale_shift_norm else 1)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_width))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, kernel_size, padding=pad)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, kernel_size, padding=pad)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Entry point, as sgm's ``forward`` (which only adds optional checkpointing)."""
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """conv path + timestep bias (or FiLM scale/shift) + skip path."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        bias = self.emb_layers(emb).to(h.dtype)
        bias = bias.reshape(*bias.shape, *([1] * (h.dim() - bias.dim())))
        if self.use_scale_shift_norm:
            scale, shift = bias.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + bias)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    """Mirror of ``UNetModel`` in sgm/modules/diffusionmodules/openaimodel.py.

    Top-level children: ``time_embed``, ``label_emb`` (when ``num_classes`` is set),
    ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``.  Construction
    follows sgm's loops, so block indices and transformer depths match SDXL.
    Constructor arguments that only matter for features the double leaves out
    (checkpointing, fairscale, codebooks, AttentionBlock) are accepted and ignored.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[Union[int, str]] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim=None,
        n_embed=None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        disable_middle_transformer: bool = False,
        use_linear_in_transformer: bool = False,
        spatial_transformer_attn_type: str = "softmax",
        adm_in_channels: Optional[int] = None,
        use_fairscale_checkpoint: bool = False,
        offload_to_cpu: bool = False,
        transformer_depth_middle: Optional[int] = None,
    ):
        """Build the UNet exactly in sgm's block order (see class docstring)."""
        super().__init__()
        assert dims == 2, "the double only supports 2-D"
        assert num_heads != -1 or num_head_channels != -1, \
            "Either num_heads or num_head_channels has to be set"

        levels = len(channel_mult)
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * levels
        transformer_depth = list(transformer_depth)
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * levels
        if len(num_res_blocks) != levels:
            raise ValueError("num_res_blocks must be an int or have one entry per level")
        if disable_self_attentions is not None:
            assert len(disable_self_attentions) == levels
        if num_attention_blocks is not None:
            assert len(num_attention_blocks) == levels
            assert all(a <= r for a, r in zip(num_attention_blocks, num_res_blocks))

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = list(num_res_blocks)
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        self.context_dim = context_dim
        self.adm_in_channels = adm_in_channels

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
        )
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, emb_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, emb_dim)
            elif num_classes == "sequential":
                assert adm_in_channels is not None
                self.label_emb = nn.Sequential(nn.Sequential(
                    nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
                ))
            else:
                raise ValueError(f"unsupported num_classes={num_classes!r}")

        def heads_for(ch: int):
            """(n_heads, d_head) for width ``ch``: the head arithmetic of ``UNetModel.__init__``
            in sgm/modules/diffusionmodules/openaimodel.py.
            """
            if num_head_channels == -1:
                n, d = num_heads, ch // num_heads
            else:
                n, d = ch // num_head_channels, num_head_channels
            # sgm's ``legacy`` branch recomputes d_head to the same value whenever
            # num_head_channels is set (all SDXL configs), so it is not replicated.
            return n, d

        def make_transformer(ch: int, depth: int, disabled_sa: bool) -> SpatialTransformer:
            """The ``SpatialTransformer(...)`` call of ``UNetModel.__init__``
            in sgm/modules/diffusionmodules/openaimodel.py.
            """
            n, d = heads_for(ch)
            return SpatialTransformer(ch, n, d, depth=depth, context_dim=context_dim,
                                      disable_self_attn=disabled_sa,
                                      use_linear=use_linear_in_transformer,
                                      attn_type=spatial_transformer_attn_type,
                                      use_checkpoint=use_checkpoint)

        def make_res(ch_in: int, ch_out: Optional[int] = None, **kw) -> ResBlock:
            """The ``ResBlock(...)`` calls of ``UNetModel.__init__``
            in sgm/modules/diffusionmodules/openaimodel.py.
            """
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        # ---- encoder ------------------------------------------------------------------
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))
        ])
        skip_channels = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: List[nn.Module] = [make_res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and (
                    num_attention_blocks is None or nr < num_attention_blocks[level]
                ):
                    disabled = bool(context_dim is not None and disable_self_attentions is not None
                                    and disable_self_attentions[level])
                    layers.append(make_transformer(ch, transformer_depth[level], disabled))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                if resblock_updown:
                    down = make_res(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        # ---- bottleneck ---------------------------------------------------------------
        middle_attn = (nn.Identity() if disable_middle_transformer
                       else make_transformer(ch, transformer_depth_middle, disable_middle_self_attn))
        self.middle_block = TimestepEmbedSequential(make_res(ch, ch), middle_attn, make_res(ch))

        # ---- decoder ------------------------------------------------------------------
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = channel_mult[level]
            for i in range(self.num_res_blocks[level] + 1):
                layers = [make_res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and (
                    num_attention_blocks is None or i < num_attention_blocks[level]
                ):
                    disabled = bool(disable_self_attentions is not None
                                    and disable_self_attentions[level])
                    layers.append(make_transformer(ch, transformer_depth[level], disabled))
                if level and i == self.num_res_blocks[level]:
                    if resblock_updown:
                        layers.append(make_res(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """Mirror of sgm's ``UNetModel.forward``.

        time embedding (+ ``label_emb(y)``) -> input blocks (each output pushed on
        ``hs``) -> middle block -> output blocks (each fed ``cat([h, hs.pop()], 1)``)
        -> ``out``.  Extra keyword arguments are accepted and ignored.
        """
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h.to(x.dtype))


# --------------------------------------------------------------------------------------
# SSD-1B conversion (AUTOMATIC1111 modules/sd_hijack.py)
# --------------------------------------------------------------------------------------


def convert_to_ssd(unet: UNetModel) -> UNetModel:
    """Mirror of ``StableDiffusionModelHijack.convert_sdxl_to_ssd`` in A1111's modules/sd_hijack.py.

    Applies the same structural deletions to an SDXL-base-layout UNet (in place)
    and returns it: the middle block keeps only its first ResBlock; input blocks
    7, 8 and output blocks 0, 1 keep transformer blocks 0..3 (of 10); output
    blocks 4, 5 keep transformer block 0 (of 2).  The remaining ModuleList keys
    stay contiguous because only trailing entries are removed.
    """
    for key in ("1", "2"):
        delattr(unet.middle_block, key)
    trimmed_to_four = [unet.input_blocks[7], unet.input_blocks[8],
                       unet.output_blocks[0], unet.output_blocks[1]]
    for idx in range(9, 3, -1):
        for block in trimmed_to_four:
            delattr(block[1].transformer_blocks, str(idx))
    for block in (unet.output_blocks[4], unet.output_blocks[5]):
        delattr(block[1].transformer_blocks, "1")
    return unet


# --------------------------------------------------------------------------------------
# real configurations and layout tables
# --------------------------------------------------------------------------------------

#: UNet params of sgm's configs/inference/sd_xl_base.yaml (as loaded by A1111).
SDXL_BASE_CONFIG = dict(
    adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4,
    model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
    channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)

#: UNet params of sgm's configs/inference/sd_xl_refiner.yaml.
SDXL_REFINER_CONFIG = dict(
    adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4,
    model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True,
    transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
    spatial_transformer_attn_type="softmax-xformers",
)

#: Width overrides used by the tiny factories (layout untouched).
TINY_SDXL_BASE_OVERRIDES = dict(model_channels=32, num_head_channels=8, context_dim=32,
                                adm_in_channels=24)
TINY_SDXL_REFINER_OVERRIDES = dict(model_channels=32, num_head_channels=8,
                                   context_dim=[32, 32, 32, 32], adm_in_channels=20)

#: Real SDXL base layout: transformer depth per block index (blocks not listed have none).
SDXL_BASE_BLOCK_TABLE = {
    "num_input_blocks": 9,
    "num_output_blocks": 9,
    "input_blocks": {4: 2, 5: 2, 7: 10, 8: 10},
    "middle_block": 10,
    "output_blocks": {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2},
    "downsample_input_blocks": (3, 6),
    "upsample_output_blocks": (2, 5),
}

#: Real SDXL refiner layout (4 levels, depth 4 wherever attention exists).
SDXL_REFINER_BLOCK_TABLE = {
    "num_input_blocks": 12,
    "num_output_blocks": 12,
    "input_blocks": {4: 4, 5: 4, 7: 4, 8: 4},
    "middle_block": 4,
    "output_blocks": {3: 4, 4: 4, 5: 4, 6: 4, 7: 4, 8: 4},
    "downsample_input_blocks": (3, 6, 9),
    "upsample_output_blocks": (2, 5, 8),
}

#: SSD-1B layout = SDXL base after A1111's convert_sdxl_to_ssd (no middle attention).
SSD_1B_BLOCK_TABLE = {
    "num_input_blocks": 9,
    "num_output_blocks": 9,
    "input_blocks": {4: 2, 5: 2, 7: 4, 8: 4},
    "middle_block": 0,
    "output_blocks": {0: 4, 1: 4, 2: 10, 3: 2, 4: 1, 5: 1},
    "downsample_input_blocks": (3, 6),
    "upsample_output_blocks": (2, 5),
}


def expected_transformer_paths(table: dict, leaf: str = "attn1") -> set:
    """Module paths ``<block>.1.transformer_blocks.<j>.<leaf>`` implied by a layout table.

    Test helper with no sgm counterpart; the paths are those that ``UNetModel.__init__``
    in sgm/modules/diffusionmodules/openaimodel.py creates.  ``leaf`` may be ``"attn1"``, ``"attn2"``,
    ``"ff"``, ``"norm1"`` ...; pass ``leaf=""`` for the BasicTransformerBlock paths.
    """
    suffix = f".{leaf}" if leaf else ""
    paths = set()
    for name in ("input_blocks", "output_blocks"):
        for idx, depth in table[name].items():
            paths.update(f"{name}.{idx}.1.transformer_blocks.{j}{suffix}" for j in range(depth))
    paths.update(f"middle_block.1.transformer_blocks.{j}{suffix}"
                 for j in range(table["middle_block"] or 0))
    return paths


# --------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------


def randomize_zero_init_(unet: nn.Module) -> nn.Module:
    """Re-initialise every Linear/Conv2d whose weight is all zeros.

    Test helper with no sgm counterpart: it undoes ``zero_module`` of
    sgm/modules/diffusionmodules/util.py (used by UNetModel/ResBlock/SpatialTransformer); uses PyTorch's default init, so it draws from
    the global RNG and is deterministic under a preceding ``torch.manual_seed``.
    """
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
                module.reset_parameters()
    return unet


def _build(config: dict, overrides: dict, seed: int, dtype, device, randomize: bool) -> UNetModel:
    """Seeded construction shared by the factories (test helper, no sgm counterpart;
    stands in for instantiating ``network_config`` of sgm's configs/inference/*.yaml)."""
    params = {**config, **overrides}
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNetModel(**params)
        if randomize and str(device) != "meta":
            randomize_zero_init_(unet)
    return unet.to(dtype=dtype).eval()


def make_sdxl_base(tiny: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device=None, randomize: bool = True, **overrides) -> UNetModel:
    """SDXL base UNet (sgm configs/inference/sd_xl_base.yaml), real layout.

    ``tiny=True``: widths from TINY_SDXL_BASE_OVERRIDES (model_channels 32, head dim 8,
    context 32, adm 24).  ``tiny=False``: true SDXL sizes (320 ch, 2048 ctx, 2816 adm,
    ~2.6B params -- use ``device="cuda", dtype=torch.float16``).  Extra keyword
    arguments override UNetModel params.
    """
    sizes = dict(TINY_SDXL_BASE_OVERRIDES) if tiny else {}
    sizes.update(overrides)
    return _build(SDXL_BASE_CONFIG, sizes, seed, dtype, device, randomize)


def make_sdxl_refiner(tiny: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device=None, randomize: bool = True, **overrides) -> UNetModel:
    """SDXL refiner UNet (sgm configs/inference/sd_xl_refiner.yaml), real layout.

    ``tiny=True``: TINY_SDXL_REFINER_OVERRIDES (model_channels 32, head dim 8,
    context 32, adm 20).  ``tiny=False``: 384 ch, 1280 ctx, 2560 adm.
    """
    sizes = dict(TINY_SDXL_REFINER_OVERRIDES) if tiny else {}
    sizes.update(overrides)
    return _build(SDXL_REFINER_CONFIG, sizes, seed, dtype, device, randomize)


def make_ssd_1b(tiny: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
                device=None, randomize: bool = True, **overrides) -> UNetModel:
    """SSD-1B UNet: sgm configs/inference/sd_xl_base.yaml passed through :func:`convert_to_ssd`
    (A1111 modules/sd_hijack.py ``convert_sdxl_to_ssd``), as A1111 does."""
    unet = make_sdxl_base(tiny=tiny, seed=seed, dtype=dtype, device=device,
                          randomize=randomize, **overrides)
    return convert_to_ssd(unet)


def make_inputs(unet: UNetModel, batch_size: int = 2, latent_size: int = 16,
                n_tokens: int = 8, seed: int = 0) -> dict:
    """Seeded keyword arguments ``x, timesteps, context, y`` for ``unet(**inputs)``.

    Test helper with no sgm counterpart (the arguments of ``UNetModel.forward`` in
    sgm/modules/diffusionmodules/openaimodel.py); sizes follow the UNet's own in_channels,
    context_dim and adm_in_channels, on the UNet's device and dtype.
    """
    ref = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = unet.context_dim[0] if isinstance(unet.context_dim, (list, tuple)) else unet.context_dim

    def rand(*shape):
        """Standard-normal tensor on the UNet's device/dtype (test helper, no sgm counterpart)."""
        return torch.randn(*shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    inputs = {
        "x": rand(batch_size, unet.in_channels, latent_size, latent_size),
        "timesteps": torch.linspace(999, 1, batch_size).to(ref.device),
        "context": rand(batch_size, n_tokens, ctx_dim),
    }
    if unet.num_classes is not None:
        inputs["y"] = rand(batch_size, unet.adm_in_channels)
    return inputs
