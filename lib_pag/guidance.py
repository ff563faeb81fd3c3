"""PAG guidance as pure tensor functions (at least fp32 inside, cast back) and the per-step scale schedule.

All functions are linear in the model outputs, so they hold for eps, x0 or v predictions alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Conds = Sequence[Sequence[tuple[int, float]]]  # A1111 conds_list: per image [(cond row, weight), ...]


def promote(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32: half types (fp16, bf16) go up to fp32, fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def pag_delta(cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """``s·(eps_c − eps_p)``."""
    return (scale * (promote(cond) - promote(perturbed))).to(cond.dtype)


def pag_only(cond: torch.Tensor, perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """The paper's guidance without CFG: ``eps_c + s·(eps_c − eps_p)``."""
    c = promote(cond)
    return (c + scale * (c - promote(perturbed))).to(cond.dtype)


def cfg_pag(uncond: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor, cfg_scale: float, scale: float) -> torch.Tensor:
    """``eps_u + w·(eps_c − eps_u) + s·(eps_c − eps_p)``."""
    u, c, p = promote(uncond), promote(cond), promote(perturbed)
    return (u + cfg_scale * (c - u) + scale * (c - p)).to(cond.dtype)


def multicond_pag_delta(cond_rows: torch.Tensor, perturbed_rows: torch.Tensor, conds_list: Conds, scale: float) -> torch.Tensor:
    """Per image ``s·Σ_k w_k·(c_k − p_k)`` over its AND sub-prompts (A1111 weights); one output row per image.

    ``perturbed_rows[k]`` is the perturbed twin of ``cond_rows[k]``.
    """
    diff = promote(cond_rows) - promote(perturbed_rows)
    out = torch.zeros((len(conds_list),) + tuple(cond_rows.shape[1:]), dtype=diff.dtype, device=cond_rows.device)
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            out[i] += (scale * weight) * diff[row]
    return out.to(cond_rows.dtype)


def multicond_reference(cond_rows: torch.Tensor, conds_list: Conds) -> torch.Tensor:
    """The conditional prediction per image that rescale compares against (weight-averaged sub-prompts)."""
    rows = []
    for conds in conds_list:
        total = sum(w for _, w in conds)
        if len(conds) == 1 or total == 0:
            rows.append(promote(cond_rows[conds[0][0]]))
        else:
            rows.append(sum(w * promote(cond_rows[r]) for r, w in conds) / total)
    return torch.stack(rows).to(cond_rows.dtype)


def rescale_guided(guided: torch.Tensor, reference: torch.Tensor, phi: float,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Guidance rescale: bring each image's std back to the conditional prediction's, mixed by ``phi``.

    ``weight`` (broadcastable, e.g. an inpaint ``nmask``) restricts both stds to the weighted elements,
    so what lies outside (the kept init latent) cannot change the result inside.
    """
    if phi == 0:
        return guided
    g, r = promote(guided), promote(reference)
    ratio = _std(r, weight) / _std(g, weight).clamp_min(1e-12)
    return (phi * (g * ratio) + (1 - phi) * g).to(guided.dtype)


def _std(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    dims = tuple(range(1, t.ndim))
    if weight is None:
        return t.std(dim=dims, keepdim=True)
    w = torch.broadcast_to(promote(weight), t.shape)
    total = w.sum(dim=dims, keepdim=True).clamp_min(1e-12)
    mean = (w * t).sum(dim=dims, keepdim=True) / total
    return ((w * (t - mean) ** 2).sum(dim=dims, keepdim=True) / total).sqrt()


class ScaledCall:
    """A model call's guidances and their scales: ``self.scales`` maps guidance index → scale ≠ 0, in index
    order (the adapters' per-call state: A1111's ``Call``, Forge's ``Step``)."""

    scales: dict

    @property
    def labels(self) -> tuple:
        """The guidances active at this call, in order (their twin blocks follow the cond rows in this order)."""
        return tuple(self.scales)

    @property
    def scale(self) -> float:
        """The scales' sum (one guidance: its scale)."""
        return sum(self.scales.values())


# --- schedule ------------------------------------------------------------------------------------

def step_progress(step: int, total_steps: int) -> float:
    """Fraction of the pass before ``step`` (0-based): 0 at the first step, (n−1)/n at the last.

    The adapters pass model calls: ``step`` is this call's index in its sampling pass and ``total_steps``
    the calls the pass really makes (``lib_pag.calls``)."""
    return step / max(int(total_steps), 1)


def scheduled_scale(
    scale: float,
    *,
    step: int,
    total_steps: int,
    start: float = 0.0,
    end: float = 1.0,
    shape: str = "constant",
    sigma: float | None = None,
    sigma_start: float = 0.0,
    sigma_end: float = 0.0,
) -> float:
    """The PAG scale for one sampler step (one model call); exactly 0.0 outside the step or sigma window.

    Step window: active when ``start ≤ step/total < end`` (``end = 0.5``: the first ⌈n/2⌉ of n calls).
    Sigma window (bounds of 0 = none): active when ``sigma_end ≤ sigma ≤ sigma_start``. Inside the window
    the shape decays from ``scale`` at the window's start: constant, linear (to 0 at the window's end) or
    cosine (half period).
    """
    if scale == 0:
        return 0.0
    t = step_progress(step, total_steps)
    if not (start <= t < end):
        return 0.0
    if sigma is not None:
        if sigma_start and sigma > sigma_start:
            return 0.0
        if sigma_end and sigma < sigma_end:
            return 0.0
    u = (t - start) / (end - start)
    if shape == "constant":
        return float(scale)
    if shape == "linear":
        return float(scale * (1.0 - u))
    if shape == "cosine":
        return float(scale * 0.5 * (1.0 + math.cos(math.pi * u)))
    raise ValueError(f"unknown schedule shape {shape!r}")


def scale_for_step(params, *, step: int, total_steps: int, sigma: float | None = None, hires: bool = False) -> float:
    """``scheduled_scale`` driven by a ``PagParams``; the hires pass follows ``params.hires``."""
    if not params.enabled:
        return 0.0
    scale = params.scale
    if hires:
        if params.hires == "off":
            return 0.0
        if params.hires == "own":
            scale = params.hires_scale
    return scheduled_scale(
        scale, step=step, total_steps=total_steps, start=params.start, end=params.end, shape=params.schedule,
        sigma=sigma, sigma_start=params.sigma_start, sigma_end=params.sigma_end,
    )
