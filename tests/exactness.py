"""The bound for tests that compare two computation paths of the same numbers, and the float64 mode they run in.

Two paths here compute the same mathematical function in a different order: batched vs one row at a
time, forked vs unforked, the extension vs an independent reference, and on another machine the same
path with other vector kernels (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, ``default``).
They differ by rounding alone.

Error model: each path's result is the exact value times (1 + δ) with |δ| ≲ κ·u, u the unit roundoff
of the dtype (fp32 2⁻²⁴ ≈ 6e-8, fp64 2⁻⁵³ ≈ 1.1e-16) and κ the amplification of rounding through the
model (reductions of a few hundred terms, ~20 layers, CFG's ×5). In fp32 the tiny UNets show
differences up to 1.4e-5 relative (κ ~ 250), so a fixed fp32 bound of 1e-5 passed on one machine and
failed on another. In float64 the same κ gives ~3e-14, whatever the kernels. ``BOUND = 1e-10`` leaves
that a margin of more than 10³, and stays ≥ 10⁴ below a real mistake: a missing or doubled PAG term, a
perturbed wrong row, a skipped hook change the output by the size of what they miss, 1e-4 to 1e-1
relative in these tests. ``assert_visible`` checks that separation where a test measures the size of a
mistake (e.g. the PAG term's own size: the output with PAG against the output without it).

The errors are measured normwise: ``max |got − want| / max |want|`` over the whole tensor.

Set ``PAG_EXACTNESS_LOG=/path`` to append each measured error and mistake size (test id, kind, value).
"""

from __future__ import annotations

import contextlib
import os

import torch

BOUND = 1e-10
"""Largest relative difference two float64 paths of the same numbers may show (see the error model)."""

MARGIN = 1e4
"""A real mistake must be at least ``MARGIN × BOUND`` relative: a test that passes cannot hide one."""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got − want| / max |want|`` (normwise relative difference; 0.0 for equal tensors)."""
    got, want = got.detach(), want.detach()
    diff = float((got - want).abs().max())
    if diff == 0.0:
        return 0.0
    return diff / max(float(want.abs().max()), 1e-300)


def _log(kind: str, value: float) -> None:
    path = os.environ.get("PAG_EXACTNESS_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{kind}\t{value:.3e}\n")


def assert_exact(got: torch.Tensor, want: torch.Tensor, *, bound: float = BOUND, what: str = "") -> float:
    """Both float64, and ``rel_err(got, want) ≤ bound``; returns the error.

    float64 is asserted: a path that silently drops to fp32 would show ~1e-7 and fail anyway, but the
    message then says why.
    """
    assert got.dtype == torch.float64 and want.dtype == torch.float64, f"{what}: not float64 ({got.dtype}, {want.dtype})"
    err = rel_err(got, want)
    _log("error", err)
    assert err <= bound, f"{what + ': ' if what else ''}relative difference {err:.3g} > {bound:.3g}"
    return err


def assert_visible(size: float, *, bound: float = BOUND, what: str = "mistake") -> float:
    """``size`` (the relative size of a real mistake, e.g. the PAG term's) is ≥ ``MARGIN × bound``."""
    _log("mistake", size)
    assert size >= MARGIN * bound, f"{what} of {size:.3g} is not ≥ {MARGIN:g} × the bound {bound:.3g}"
    return size


def to_float64(module: torch.nn.Module) -> torch.nn.Module:
    """``module.double()``, and the ``dtype`` attribute of ldm's / sgm's UNet (what its forward casts ``x`` to,
    as A1111 sets it for fp16) set to float64 too."""
    module.double()
    for m in module.modules():
        if getattr(m, "dtype", None) == torch.float32 and not isinstance(m, torch.Tensor):
            m.dtype = torch.float64
    return module


@contextlib.contextmanager
def float64_mode():
    """float64 as the default dtype, and the models' fp32-only spots at least fp32 instead of exactly fp32.

    Those spots cast to fp32 to keep fp16 from overflowing; in float64 they keep float64:

    - ``GroupNorm32`` (ldm's and the sgm double's) normalises ``x.float()``;
    - ldm's ``CrossAttention`` casts q and k to fp32 when ``_ATTN_PRECISION == "fp32"`` (the default):
      set to ``"fp64"`` here;
    - ldm's ``UNetModel.forward`` feeds ``timestep_embedding`` (always fp32) to ``time_embed`` uncast; A1111
      wraps that function to cast its result to the UNet's dtype when the UNet is upcast
      (``modules/sd_hijack_unet.py``), and so does this, to the default dtype.
    """
    from ldm.modules import attention
    from ldm.modules.diffusionmodules import openaimodel, util

    from tests.doubles import sgm_unet

    original_embedding = openaimodel.timestep_embedding

    def timestep_embedding(*args, **kwargs):
        return original_embedding(*args, **kwargs).to(torch.get_default_dtype())

    def group_norm_forward(original):
        def forward(self, x):
            if x.dtype == torch.float64:
                return torch.nn.GroupNorm.forward(self, x)
            return original(self, x)
        return forward

    patches = [(openaimodel, "timestep_embedding", timestep_embedding), (attention, "_ATTN_PRECISION", "fp64")]
    patches += [(cls, "forward", group_norm_forward(cls.forward)) for cls in (util.GroupNorm32, sgm_unet.GroupNorm32)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        torch.set_default_dtype(default)
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
