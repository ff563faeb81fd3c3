"""What a perturbed self-attention computes, given the attention module and its input rows.

Each perturbation uses the module's own projections (``to_q``/``to_k``/``to_v``/``to_out``), so LoRA
and other Linear-level patches still apply.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .guidance import promote

log = logging.getLogger("sd_webui_pag")


MASK64 = (1 << 64) - 1


def mix_seed(key) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 over the parts): the same in every process and on
    every platform, and far apart for keys that differ in any part."""
    h = 0x9E3779B97F4A7C15
    for part in key:
        h = (h ^ (int(part) & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h & 0x7FFF_FFFF_FFFF_FFFF


def generator_on(device) -> torch.Generator | None:
    """A fresh generator on ``device`` (None where the device has none, e.g. ``meta``)."""
    try:
        return torch.Generator(device=device)
    except RuntimeError:
        return None


@dataclass
class Perturbation:
    """A perturbation method with its parameters.

    Random methods (``noise``) draw per row: a row with a key (``keys[i]``, from ``patch.draw_keys``: its
    image's seed, the model call, the layer) draws from a generator seeded by that key alone, on the device
    the attention runs on — so an image's draws do not depend on what else shares its batch, and no
    random number crosses from the host. Rows without a key draw from one generator seeded by ``seed``.
    """

    method: str = "identity"
    blur_sigma: float = 9.0
    noise_scale: float = 1.0
    seed: int = 0
    _generators: dict = field(default_factory=dict, repr=False)
    _warned_grid: bool = field(default=False, repr=False)
    notes: list = field(default_factory=list, repr=False)  # how it ran differently than asked, for the PAG note

    @property
    def needs_grid(self) -> bool:
        """Whether this method needs the 2-D token grid of each perturbed attention call."""
        return self.method in ("blur", "seg")

    @property
    def level(self) -> str:
        """Where it acts: ``"attn1"`` (the self-attention of the chosen layers) or ``"block"`` (TPG: the hidden
        states entering the transformer block that holds the chosen attn1)."""
        return "block" if self.method == "tpg" else "attn1"

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators.clear()

    def _stream(self, device) -> torch.Generator | None:
        """The keyless generator of ``device``, seeded by ``seed`` at its first use in the job."""
        device = torch.device(device)
        key = ("stream", device.type, device.index)
        if key not in self._generators:
            g = generator_on(device)
            self._generators[key] = g.manual_seed(self.seed) if g is not None else None
        return self._generators[key]

    def _keyed(self, device, key) -> torch.Generator | None:
        device = torch.device(device)
        slot = ("keyed", device.type, device.index)
        if slot not in self._generators:
            self._generators[slot] = generator_on(device)
        g = self._generators[slot]
        return g.manual_seed(mix_seed(key)) if g is not None else None

    def randn_rows(self, shape: tuple, rows: int, keys, device, dtype=torch.float32) -> torch.Tensor:
        """``rows`` draws of ``shape`` (a ``(rows, *shape)`` tensor on ``device``), row ``i`` from its key."""
        if keys is None or any(k is None for k in keys):
            return torch.randn((rows,) + tuple(shape), generator=self._stream(device), device=device, dtype=dtype)
        return torch.stack([torch.randn(tuple(shape), generator=self._keyed(device, k), device=device, dtype=dtype)
                            for k in keys])

    def __call__(self, attn: torch.nn.Module, x: torch.Tensor, *, grid: tuple[int, int] | None = None,
                 additional_tokens: torch.Tensor | None = None, keys=None) -> torch.Tensor:
        """The perturbed attn1 output for the rows ``x`` (``(B, N, C)``); ``keys``: per row, its draw key."""
        if self.method == "identity":
            return identity_attention(attn, x)
        if self.method == "blur":
            if grid is None:
                grid = self._unknown_grid(x)
            return blurred_query_attention(attn, x, self.blur_sigma, grid, additional_tokens)
        if self.method == "seg":
            if grid is None:
                grid = self._unknown_grid(x)
            return seg_attention(attn, x, self.blur_sigma, grid, additional_tokens)
        if self.method == "noise":
            def noise(shape):
                return self.randn_rows(shape[1:], shape[0], keys, x.device)
            return noisy_logit_attention(attn, x, self.noise_scale, noise, additional_tokens)
        raise ValueError(f"unknown perturbation {self.method!r} for attn1")

    def _unknown_grid(self, x) -> tuple[int, int]:
        if not self._warned_grid:
            self._warned_grid = True
            log.warning("PAG %s: the token grid of a %d-token attention is not known; blurring along the flattened "
                        "token order instead (warned once per job)", self.method, x.shape[1])
            self.notes.append(f"{self.method} along the flattened token order in some layers (their token grid is "
                              "not known, e.g. an extension split the attention)")
        return (1, x.shape[1])

    def shuffle(self, x: torch.Tensor, keys=None) -> torch.Tensor:
        """TPG: ``x`` (``(B, N, C)``, the hidden states entering a transformer block) with each row's tokens in
        a random order of its own (``tpg_permutations``), not put back afterwards."""
        perms = tpg_permutations(x.shape[0], x.shape[1], keys, x.device, self)
        return x.gather(1, perms.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def tpg_permutations(rows: int, n: int, keys, device, perturbation: "Perturbation") -> torch.Tensor:
    """``(rows, n)`` long tensor: a uniformly random permutation of ``0..n-1`` per row, made on ``device`` as the
    order of ``n`` uniform draws (``argsort``) from the row's keyed generator (``Perturbation.randn_rows``'s
    keys: the image's seed, the model call, the layer). Token Perturbation Guidance (Rajabi et al., arXiv
    2506.10036; TaatiTeam/Token-Perturbation-Guidance ``shuffle_tokens``) draws one ``torch.randperm`` per call
    of a block from the global RNG for all perturbed rows; one per row, from its own key, is what makes an
    image reproducible from its seed whatever else shares its batch."""
    if keys is None or any(k is None for k in keys):
        draws = torch.rand((rows, n), generator=perturbation._stream(device), device=device, dtype=torch.float32)
    else:
        draws = torch.stack([torch.rand((n,), generator=perturbation._keyed(device, k), device=device, dtype=torch.float32)
                             for k in keys])
    return draws.argsort(dim=1)


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
    return query_blurred_attention(attn, x, lambda q: blur_tokens(q, sigma, grid), additional_tokens)


def query_blurred_attention(attn, x, blur, additional_tokens=None):
    """Self-attention whose image-token queries are ``blur(q)`` (``(B, N, C)`` → the same), keys and values from
    the unblurred hidden states, then the module's output projection; ``additional_tokens`` (``(B, M, C)``,
    sgm) join K/V and are not blurred."""
    full, extra = _with_extra(x, additional_tokens)
    q, k, v = attn.to_q(full), attn.to_k(full), attn.to_v(full)
    q = torch.cat([q[:, :extra], blur(q[:, extra:])], dim=1)
    heads = _heads(attn)
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return attn.to_out(_merge(out)[:, extra:])


SEG_INFINITE = 9999.0  # SusungHong/SEG-SDXL: a blur sigma above this is the mean query (inf_blur_threshold)


def seg_kernel_size(sigma: float, side: int) -> int:
    """SEG's kernel size for ``sigma`` on a grid side of ``side`` tokens: ``ceil(6σ) + 1 − ceil(6σ) mod 2`` (odd),
    at most ``side + 1`` for an even side and ``side`` for an odd one (SEG-SDXL ``gaussian_blur_2d``)."""
    k = math.ceil(6 * sigma)
    k = k + 1 - k % 2
    return min(k, side - (side % 2 - 1))


@functools.lru_cache(maxsize=64)
def _seg_matrix_on(side: int, sigma: float, device_type: str, device_index, dtype) -> torch.Tensor:
    """``(side, side)``: the 1-D Gaussian of ``seg_kernel_size`` taps (integer offsets, normalised to sum 1)
    over a reflect-padded axis, as a matrix (``out = M @ in``); made on the device, cached per device."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    k = seg_kernel_size(sigma, side)
    r = k // 2
    offsets = torch.arange(-r, r + 1, device=device)
    weights = torch.exp(-0.5 * (offsets.to(torch.float64) / sigma) ** 2)
    weights = weights / weights.sum()
    source = torch.arange(side, device=device)[:, None] + offsets[None, :]
    source = torch.where(source < 0, -source, source)  # reflect (the edge itself is not repeated)
    source = torch.where(source >= side, 2 * (side - 1) - source, source)
    matrix = torch.zeros((side, side), dtype=torch.float64, device=device)
    matrix.scatter_add_(1, source, weights.expand(side, k).contiguous())
    return matrix.to(dtype)


def seg_blur(q: torch.Tensor, sigma: float, grid: tuple[int, int]) -> torch.Tensor:
    """Smoothed Energy Guidance's query blur (Hong, arXiv 2408.00760; SusungHong/SEG-SDXL ``gaussian_blur_2d``):
    ``q`` (``(B, h·w, C)``, the attention's projected queries) blurred per channel over its ``(h, w)`` token
    grid by a 2-D Gaussian of ``sigma`` tokens — ``seg_kernel_size`` taps, reflect padding, i.e. the official
    depthwise ``conv2d`` with the outer product of the 1-D kernel, applied here separably (the same numbers) —
    or, for ``sigma > SEG_INFINITE`` (``inf``), every token the mean query. A non-square grid caps each axis'
    kernel by that axis (the official code supports square grids only; on a square grid this is its kernel).
    Computed in at least fp32."""
    b, n, c = q.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    t = promote(q)
    if sigma > SEG_INFINITE:
        return t.mean(dim=1, keepdim=True).expand(b, n, c).to(q.dtype)
    t = t.reshape(b, h, w, c)
    device = t.device
    mh = _seg_matrix_on(h, float(sigma), device.type, device.index, t.dtype)
    mw = _seg_matrix_on(w, float(sigma), device.type, device.index, t.dtype)
    t = torch.einsum("ij,bjwc->biwc", mh, t)
    t = torch.einsum("ij,bhjc->bhic", mw, t)
    return t.reshape(b, n, c).to(q.dtype)


def seg_attention(attn, x, sigma, grid, additional_tokens=None):
    """SEG: self-attention with the query blurred by ``seg_blur`` (keys and values from the unblurred hidden
    states), then the module's output projection. ``x``: ``(B, N, C)`` image tokens on an ``(h, w)`` grid;
    ``additional_tokens`` (``(B, M, C)``, sgm) join K/V and are not blurred."""
    return query_blurred_attention(attn, x, lambda q: seg_blur(q, sigma, grid), additional_tokens)


def noisy_logit_attention(attn, x, noise_scale, noise, additional_tokens=None):
    """Attention whose logits get Gaussian noise of std ``noise_scale``.

    ``noise``: a ``torch.Generator`` (CPU draws, moved to the device), or a function of the logits' shape
    ``(B, heads, N, N)`` returning standard normal noise of that shape on the logits' device."""
    full, extra = _with_extra(x, additional_tokens)
    q, k, v = attn.to_q(full), attn.to_k(full), attn.to_v(full)
    heads = _heads(attn)
    q, k, v = _split(q, heads), _split(k, heads), _split(v, heads)
    logits = torch.einsum("bhid,bhjd->bhij", promote(q), promote(k)) * (q.shape[-1] ** -0.5)
    if isinstance(noise, torch.Generator):
        drawn = torch.randn(logits.shape, generator=noise, dtype=torch.float32).to(logits.device)
    else:
        drawn = noise(tuple(logits.shape))
    weights = (logits + noise_scale * drawn.to(logits.dtype)).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", weights, promote(v)).to(v.dtype)
    return attn.to_out(_merge(out)[:, extra:])
