"""The one place that touches the model: per-instance attn1 wrappers that always undo themselves.

A host marks, per UNet call, which rows of the batch are the perturbed copies (``RowMarks.marking``);
the wrappers perturb exactly those rows and hand every other row to the module's own forward.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from .guidance import promote
from .layers import LayerSelection
from .perturbations import Perturbation

log = logging.getLogger("sd_webui_pag")


def fit_rows(mask: torch.Tensor, batch: int, unet_rows: int | None = None) -> torch.Tensor:
    """The marked rows of one attention call, from the mask over the batch the host built.

    ``mask``: bool over the host's batch (``N`` rows); ``unet_rows``: the batch of the UNet call in
    progress, when known; ``batch``: the attention batch. Two things can multiply rows, each in its
    own order:

    - a UNet call of ``k·N`` rows holds ``k`` tiles of the whole batch, one tile after another (Tiled
      Diffusion / MultiDiffusion crop every row of the batch per tile): the mask repeats per tile;
    - an attention batch of ``j`` × the UNet batch splits each row into ``j`` sub-rows next to each
      other (hypertile's ``(b nh nw)``): each mask entry repeats ``j`` times.

    Raises ``RuntimeError`` when the sizes do not fit.
    """
    n = mask.numel()
    if unet_rows is not None and unet_rows != n:
        if unet_rows % n:
            raise RuntimeError(f"PAG: a UNet call of {unet_rows} rows does not fit the {n} marked rows")
        mask, n = mask.repeat(unet_rows // n), unet_rows
    if batch == n:
        return mask
    if batch % n == 0:
        return mask.repeat_interleave(batch // n)
    raise RuntimeError(f"PAG: attention batch of {batch} rows does not fit the {n} marked UNet rows")


class RowMarks:
    """Which rows of the host's batch are perturbed, and the batch of the UNet call in progress."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.unet_rows: int | None = None

    @contextmanager
    def marking(self, mask):
        """Mark rows (a bool sequence/tensor over the UNet batch) for the calls made inside the block."""
        previous = self.mask
        self.mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu()
        try:
            yield
        finally:
            self.mask = previous

    @contextmanager
    def watching(self, unet: torch.nn.Module):
        """Remember the batch of each call of ``unet`` made inside the block (a pre-forward hook)."""
        outer = []

        def enter(_module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            outer.append(self.unet_rows)
            self.unet_rows = int(x.shape[0]) if torch.is_tensor(x) and x.ndim >= 1 else None

        def leave(_module, _args, _kwargs, _out):
            self.unet_rows = outer.pop() if outer else None

        handles = [unet.register_forward_pre_hook(enter, with_kwargs=True), after_forward(unet, leave, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def rows_for(self, batch: int) -> torch.Tensor | None:
        """The perturbed rows of an attention call of ``batch`` rows (see ``fit_rows``), or None."""
        mask = self.mask
        if mask is None or not bool(mask.any()):
            return None
        return fit_rows(mask, batch, self.unet_rows)


def after_forward(module: torch.nn.Module, hook, **kwargs):
    """A forward hook that also runs when the forward raises (torch ≥ 2.1; older torch: only after success)."""
    try:
        return module.register_forward_hook(hook, always_call=True, **kwargs)
    except TypeError:
        return module.register_forward_hook(hook, **kwargs)


class TokenGrids:
    """The true ``(h, w)`` token grid of the spatial transformer that is running, from the shape reaching it.

    The grid is read from the ``(B, C, H, W)`` input of each spatial transformer holding a chosen attn1
    (forward pre-hooks, installed only inside ``watching``), so whatever resized the hidden states
    before it (Kohya HRFix / Deep Shrink, odd latent sizes, other extensions) is seen as it is.
    """

    def __init__(self):
        self._stack: list = []

    @contextmanager
    def watching(self, unet: torch.nn.Module, layers):
        """Watch the spatial transformers of the attn1 ``layers`` (``AttnLayer``) for the calls made inside the block."""
        handles = []
        try:
            for module in {id(m): m for m in (layer.spatial_transformer(unet) for layer in layers)}.values():
                handles.append(module.register_forward_pre_hook(self._enter))
                handles.append(after_forward(module, self._leave))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, _module, args):
        x = args[0] if args else None
        self._stack.append(tuple(int(v) for v in x.shape[-2:]) if torch.is_tensor(x) and x.ndim == 4 else None)

    def _leave(self, _module, _args, _out):
        if self._stack:
            self._stack.pop()

    def grid_for(self, tokens: int) -> tuple[int, int] | None:
        """The grid of ``tokens`` image tokens in the running transformer, or None when it is not known."""
        grid = self._stack[-1] if self._stack else None
        return grid if grid is not None and grid[0] * grid[1] == tokens else None


class AttentionPatch:
    """Context manager installing PAG wrappers on the selected attn1 modules of ``unet``.

    - per instance: the class's forward is looked up at call time (hosts swap it), and an instance
      forward someone installed before (hypertile) is chained to, not replaced;
    - on exit (normal, exception, KeyboardInterrupt) every module gets back exactly what it had; a
      wrapper that someone else captured meanwhile stays harmless, passing every call through;
    - entering an active patch again only counts depth.
    """

    def __init__(self, unet: torch.nn.Module, selection: LayerSelection, perturbation: Perturbation | None = None,
                 marks: RowMarks | None = None):
        self.unet = unet
        self.selection = selection
        self.perturbation = perturbation or Perturbation()
        self.marks = marks or RowMarks()
        self.grids = TokenGrids()
        self.patched: list[str] = []
        self._installed: list[tuple[torch.nn.Module, bool, object, object]] = []
        self._watch = self._watch_rows = None
        self.perturbed_calls = 0  # attn1 calls that perturbed marked rows (0 after a UNet call: the modules never ran)
        self._depth = 0
        self.active = False

    # --- lifecycle ---

    def __enter__(self) -> "AttentionPatch":
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            self._watch_rows = self.marks.watching(self.unet)
            self._watch_rows.__enter__()
            for layer, strength in self.selection.chosen:
                module = layer.module(self.unet)
                had_own = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                wrapper = self._make_wrapper(module, previous, strength)
                module.forward = wrapper
                self._installed.append((module, had_own, previous, wrapper))
                self.patched.append(layer.name)
            if self.perturbation.needs_grid:
                self._watch = self.grids.watching(self.unet, [layer for layer, _ in self.selection.chosen])
                self._watch.__enter__()
            self.active = True
        except BaseException:
            self._uninstall()
            self._depth = 0
            raise
        log.debug("PAG patched %d attn1 modules: %s", len(self.patched), ", ".join(self.patched))
        return self

    def __exit__(self, *exc) -> bool:
        self._depth -= 1
        if self._depth == 0:
            self._uninstall()
        return False

    def _uninstall(self) -> None:
        self.active = False
        for watch in (self._watch, self._watch_rows):
            if watch is not None:
                watch.__exit__(None, None, None)
        self._watch = self._watch_rows = None
        for module, had_own, previous, wrapper in reversed(self._installed):
            if module.__dict__.get("forward") is not wrapper:
                log.warning("PAG: %s's forward was replaced after PAG patched it; leaving a pass-through wrapper",
                            type(module).__name__)
                continue
            if had_own:
                module.forward = previous
            else:
                del module.forward
        self._installed.clear()
        self.patched = []

    # --- the wrapper ---

    def _make_wrapper(self, module, previous, strength: float):
        patch = self

        def own_forward(x, *args, **kwargs):
            if previous is not None:
                return previous(x, *args, **kwargs)
            return type(module).forward(module, x, *args, **kwargs)

        def pag_forward(x, *args, **kwargs):
            rows = patch.marks.rows_for(x.shape[0]) if patch.active else None
            if rows is None:
                return own_forward(x, *args, **kwargs)
            rows = rows.to(x.device)
            patch.perturbed_calls += 1
            extra = kwargs.get("additional_tokens")
            grid = patch.grids.grid_for(x.shape[1])
            if strength < 1.0:
                out = own_forward(x, *args, **kwargs)
                perturbed = patch.perturbation(module, x[rows], grid=grid, additional_tokens=_rows_of(extra, rows, x))
                mixed = (1.0 - strength) * promote(out[rows]) + strength * promote(perturbed)
                out = out.clone()
                out[rows] = mixed.to(out.dtype)
                return out
            perturbed = patch.perturbation(module, x[rows], grid=grid, additional_tokens=_rows_of(extra, rows, x))
            if bool(rows.all()):
                return perturbed
            keep = ~rows
            plain = own_forward(x[keep], *[_rows_of(a, keep, x) for a in args],
                                **{k: _rows_of(v, keep, x) for k, v in kwargs.items()})
            out = torch.empty((x.shape[0],) + tuple(plain.shape[1:]), dtype=plain.dtype, device=plain.device)
            out[keep] = plain
            out[rows] = perturbed.to(plain.dtype)
            return out

        pag_forward.__pag_wrapper__ = True
        return pag_forward


def _rows_of(value, rows, x):
    """Slice per-row tensors that travel with ``x`` (context, additional_tokens); leave the rest."""
    if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == x.shape[0]:
        return value[rows]
    return value
