"""What a perturbed self-attention computes, given the attention module and its input rows.

Each perturbation uses the module's own projections (``to_q``/``to_k``/``to_v``/``to_out``), so LoRA
and other Linear-level patches still apply.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .guidance import promote

log = logging.getLogger("sd_webui_pag")


@dataclass
class Perturbation:
    """A perturbation method with its parameters; ``noise`` draws from its own seeded generator."""

    method: str = "identity"
    blur_sigma: float = 9.0
    noise_scale: float = 1.0
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, repr=False)
    _warned_grid: bool = field(default=False, repr=False)

    @property
    def needs_grid(self) -> bool:
        """Whether this method needs the 2-D token grid of each perturbed attention call."""
        return self.method == "blur"

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = None

    def __call__(self, attn: torch.nn.Module, x: torch.Tensor, *, grid: tuple[int, int] | None = None,
                 additional_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.method == "identity":
            return identity_attention(attn, x)
        if self.method == "blur":
            if grid is None:
                grid = (1, x.shape[1])
                if not self._warned_grid:
                    self._warned_grid = True
                    log.warning("PAG blur: the token grid of a %d-token attention is not known; blurring along the "
                                "flattened token order instead (warned once per job)", x.shape[1])
            return blurred_query_attention(attn, x, self.blur_sigma, grid, additional_tokens)
        if self.method == "noise":
            if self._generator is None:
                self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
            return noisy_logit_attention(attn, x, self.noise_scale, self._generator, additional_tokens)
        raise ValueError(f"unknown perturbation {self.method!r}")


def identity_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PAG: the attention map is the identity, so the attention output is V; then the output projection."""
    return attn.to_out(attn.to_v(x))


def _heads(attn) -> int:
    return int(getattr(attn, "heads", getattr(attn, "n_heads", 1)))


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def gaussian_blur_matrix(size: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Row-normalised Gaussian weights over positions ``0..size-1`` (no padding); ``inf`` → uniform (mean)."""
    if math.isinf(sigma):
        return torch.full((size, size), 1.0 / size, device=device, dtype=dtype)
    pos = torch.arange(size, device=device, dtype=torch.promote_types(dtype, torch.float32))
    w = torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2.0 * sigma * sigma))
    return (w / w.sum(dim=1, keepdim=True)).to(dtype)


def blur_tokens(tokens: torch.Tensor, sigma: float, grid: tuple[int, int]) -> torch.Tensor:
    """Gaussian blur of ``(B, H·W, C)`` tokens over their 2-D grid, separably along rows and columns."""
    b, n, c = tokens.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    t = promote(tokens).reshape(b, h, w, c)
    gh = gaussian_blur_matrix(h, sigma, device=tokens.device, dtype=t.dtype)
    gw = gaussian_blur_matrix(w, sigma, device=tokens.device, dtype=t.dtype)
    t = torch.einsum("ij,bjwc->biwc", gh, t)
    t = torch.einsum("ij,bhjc->bhic", gw, t)
    return t.reshape(b, n, c).to(tokens.dtype)


def _with_extra(x, additional_tokens):
    if additional_tokens is None:
        return x, 0
    return torch.cat([additional_tokens, x], dim=1), additional_tokens.shape[1]


def blurred_query_attention(attn, x, sigma, grid, additional_tokens=None):
    """Smoothed-energy style: attention with the query blurred over the token grid (inf = mean query).

    ``x``: ``(B, N, C)`` image tokens; ``grid``: their ``(h, w)`` with ``h·w = N`` (``(1, N)`` blurs along
    the flattened order); ``additional_tokens`` (``(B, M, C)``, sgm) join K/V and are not blurred.
    """
    full, extra = _with_extra(x, additional_tokens)
    q, k, v = attn.to_q(full), attn.to_k(full), attn.to_v(full)
    q = torch.cat([q[:, :extra], blur_tokens(q[:, extra:], sigma, grid)], dim=1)
    heads = _heads(attn)
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return attn.to_out(_merge(out)[:, extra:])


def noisy_logit_attention(attn, x, noise_scale, generator, additional_tokens=None):
    """Attention whose logits get Gaussian noise of std ``noise_scale``, drawn from ``generator``."""
    full, extra = _with_extra(x, additional_tokens)
    q, k, v = attn.to_q(full), attn.to_k(full), attn.to_v(full)
    heads = _heads(attn)
    q, k, v = _split(q, heads), _split(k, heads), _split(v, heads)
    logits = torch.einsum("bhid,bhjd->bhij", promote(q), promote(k)) * (q.shape[-1] ** -0.5)
    noise = torch.randn(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    weights = (logits + noise_scale * noise).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", weights, promote(v)).to(v.dtype)
    return attn.to_out(_merge(out)[:, extra:])
