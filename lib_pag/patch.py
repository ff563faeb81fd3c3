"""The one place that touches the model: per-instance attn1 wrappers that always undo themselves.

A host marks, per UNet call, which rows of the batch are the perturbed copies (``RowMarks.marking``);
the wrappers perturb exactly those rows and hand every other row to the module's own forward.
"""

from __future__ import annotations

import collections
import logging
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from .guidance import promote
from .layers import LayerSelection
from .layout import RowLayout, Rows, assemble, module_plan
from .perturbations import Perturbation

log = logging.getLogger("sd_webui_pag")


class RowMarks:
    """Which rows of the UNet call in progress are perturbed (a ``RowLayout``), and that call's batch.

    Everything here is host-side: the patched modules read the layout fitted to their own batch
    (``layout_for``), never a device tensor.
    """

    def __init__(self):
        self.layout: RowLayout | None = None
        self.unet_rows: int | None = None
        self.draw: tuple = ()  # this UNet call's key for random perturbations (pass, model call), set by the host adapter

    @contextmanager
    def marking(self, layout, draw: tuple | None = None):
        """Mark rows for the calls made inside the block: a ``RowLayout``, a bool sequence / CPU tensor over the
        UNet batch (True = a twin of branch 1), or None; ``draw``: the key random perturbations draw with."""
        previous = self.layout, self.draw
        if layout is not None and not isinstance(layout, RowLayout):
            layout = RowLayout.from_mask(layout)
        self.layout = layout
        if draw is not None:
            self.draw = tuple(draw)
        try:
            yield
        finally:
            self.layout, self.draw = previous

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

    def segment(self, layout: RowLayout):
        """Mark ``layout`` (a part of the UNet call's batch that runs alone: the fork's prefix and stages) as the
        whole call for the modules that run next; returns what to ``restore``."""
        saved = (self.layout, self.unet_rows)
        self.layout, self.unet_rows = layout, layout.n
        return saved

    def restore(self, saved) -> None:
        self.layout, self.unet_rows = saved

    def layout_for(self, batch: int) -> RowLayout | None:
        """The layout of a module call of ``batch`` rows (see ``RowLayout.fit``), or None when no row is perturbed."""
        layout = self.layout
        if layout is None or not layout.perturbed:
            return None
        return layout.fit(batch, self.unet_rows)


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


@dataclass(frozen=True)
class Branch:
    """One guidance branch for ``AttentionPatch``: the rows labelled ``label`` get ``perturbation`` in the
    layers of ``selection`` (at each layer's strength)."""

    label: int
    selection: LayerSelection
    perturbation: Perturbation


class AttentionPatch:
    """Context manager installing PAG wrappers on the attn1 modules the branches chose in ``unet``.

    - per instance: the class's forward is looked up at call time (hosts swap it), and an instance
      forward someone installed before (hypertile) is chained to, not replaced;
    - on exit (normal, exception, KeyboardInterrupt) every module gets back exactly what it had; a
      wrapper that someone else captured meanwhile stays harmless, passing every call through;
    - entering an active patch again only counts depth;
    - inside a call nothing reads device data: the rows come from ``marks`` (host-side, see
      ``lib_pag.layout``), contiguous row runs are views, and index tensors are made once per layout.

    ``AttentionPatch(unet, selection, perturbation, marks)`` is one branch (label 1);
    ``AttentionPatch(unet, branches=[Branch(...), ...], marks=marks)`` several.
    """

    def __init__(self, unet: torch.nn.Module, selection: LayerSelection | None = None,
                 perturbation: Perturbation | None = None, marks: RowMarks | None = None, *,
                 branches: Sequence[Branch] | None = None, levels: tuple = ("attn1", "block"), layout_of=None):
        if branches is None:
            branches = [Branch(1, selection, perturbation or Perturbation())]
        self.unet = unet
        self.branches = tuple(branches)
        self.levels = tuple(levels)  # Forge patches attn1 through its own replace patches: ("block",) there
        # where a wrapped module finds its rows: ``marks`` (A1111), or ``layout_of(x, args, kwargs)`` →
        # ``(RowLayout, draw key)`` or None (Forge: the call's ``transformer_options``)
        self.layout_of = layout_of
        self.marks = marks or RowMarks()
        self.grids = TokenGrids()
        self.patched: list[str] = []
        self._installed: list[tuple[torch.nn.Module, bool, object, object]] = []
        self._watch = self._watch_rows = None
        self.perturbed_calls = 0  # module calls that perturbed marked rows (0 after a UNet call: the modules never ran)
        self.calls_by_label = collections.Counter()  # the same per guidance
        self._depth = 0
        self.active = False

    @property
    def selection(self) -> LayerSelection:
        return self.branches[0].selection

    @property
    def perturbation(self) -> Perturbation:
        return self.branches[0].perturbation

    def _targets(self):
        """``(level, layer, ((label, strength), ...), {label: perturbation})`` per module to wrap: the attn1
        modules of attention perturbations, the transformer blocks of TPG (``Perturbation.level``)."""
        found: dict[tuple, list] = {}
        for branch in self.branches:
            level = branch.perturbation.level
            if level not in self.levels:
                continue
            for layer, strength in branch.selection.chosen:
                entry = found.setdefault((level, layer.path), [layer, [], {}])
                entry[1].append((branch.label, float(strength)))
                entry[2][branch.label] = branch.perturbation
        return [(level, layer, tuple(strengths), perturbations)
                for (level, _), (layer, strengths, perturbations) in found.items()]

    # --- lifecycle ---

    def __enter__(self) -> "AttentionPatch":
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            self._watch_rows = self.marks.watching(self.unet)
            self._watch_rows.__enter__()
            grid_layers = []
            for level, layer, strengths, perturbations in self._targets():
                block = level == "block"
                module = layer.transformer_block(self.unet) if block else layer.module(self.unet)
                had_own = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                make = self._make_block_wrapper if block else self._make_wrapper
                wrapper = make(module, previous, strengths, perturbations, layer_key(layer.path))
                module.forward = wrapper
                self._installed.append((module, had_own, previous, wrapper))
                self.patched.append(layer.name + (" block" if block else ""))
                if any(p.needs_grid for p in perturbations.values()):
                    grid_layers.append(layer)
            if grid_layers:
                self._watch = self.grids.watching(self.unet, grid_layers)
                self._watch.__enter__()
            self.active = True
        except BaseException:
            self._uninstall()
            self._depth = 0
            raise
        log.debug("PAG patched %d modules: %s", len(self.patched), ", ".join(self.patched))
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

    # --- the wrappers ---

    def count(self, plan) -> None:
        self.perturbed_calls += 1
        for branch in plan.branches:
            self.calls_by_label[branch.label] += 1

    def rows(self, x, args, kwargs) -> tuple:
        """``(layout of this module call, draw key)``, or ``(None, ())`` when nothing here is perturbed."""
        if not self.active:
            return None, ()
        if self.layout_of is not None:
            found = self.layout_of(x, args, kwargs)
            return found if found is not None else (None, ())
        return self.marks.layout_for(x.shape[0]), self.marks.draw

    def plan(self, x, args, kwargs, strengths) -> tuple:
        """``(layout, draw key, ModulePlan)`` of a wrapped module's call (counted), or None when nothing in it is
        perturbed."""
        layout, draw = self.rows(x, args, kwargs)
        plan = module_plan(layout, strengths) if layout is not None else None
        if plan is None:
            return None
        self.count(plan)
        return layout, draw, plan

    def _make_wrapper(self, module, previous, strengths, perturbations, layer_key: int):
        patch = self
        own_forward = _own_forward(module, previous)

        def pag_forward(x, *args, **kwargs):
            found = patch.plan(x, args, kwargs, strengths)
            if found is None:
                return own_forward(x, *args, **kwargs)
            layout, draw, plan = found
            n = x.shape[0]
            extra = kwargs.get("additional_tokens")
            grid = patch.grids.grid_for(x.shape[1])
            outputs = [None]
            if plan.own is not None:
                rows = plan.own
                outputs[0] = own_forward(rows.take(x), *[take_rows(a, rows, n) for a in args],
                                         **{k: take_rows(v, rows, n) for k, v in kwargs.items()})
            for branch in plan.branches:
                rows = branch.rows
                perturbed = perturbations[branch.label](
                    module, rows.take(x), grid=grid, additional_tokens=take_rows(extra, rows, n),
                    keys=draw_keys(layout, rows, draw, layer_key))
                if branch.strength < 1.0:
                    a = branch.strength
                    mixed = (1.0 - a) * promote(branch.in_own.take(outputs[0])) + a * promote(perturbed)
                    perturbed = mixed.to(outputs[0].dtype)
                outputs.append(perturbed)
            dtype = outputs[0].dtype if outputs[0] is not None else outputs[1].dtype
            return assemble(plan, [o if o is None or o.dtype == dtype else o.to(dtype) for o in outputs])

        pag_forward.__pag_wrapper__ = True
        return pag_forward

    def _make_block_wrapper(self, module, previous, strengths, perturbations, layer_key: int):
        """TPG: the marked rows enter the transformer block with their tokens shuffled (``Perturbation.shuffle``),
        and are not put back. At strength ``a < 1`` those rows get ``(1−a)·block(x) + a·block(shuffled x)``
        (the block runs once more on them)."""
        patch = self
        own_forward = _own_forward(module, previous)

        def tpg_forward(x, *args, **kwargs):
            found = patch.plan(x, args, kwargs, strengths)
            if found is None:
                return own_forward(x, *args, **kwargs)
            layout, draw, plan = found
            n = x.shape[0]
            shuffled = [perturbations[b.label].shuffle(b.rows.take(x), draw_keys(layout, b.rows, draw, layer_key))
                        for b in plan.branches]
            full = [b for b in plan.branches if b.strength >= 1.0]
            if full:  # the rows at full strength enter the block shuffled, in the same call as the others
                pieces = [plan.own.take(x) if plan.own is not None else None]
                pieces += [s if b.strength >= 1.0 else b.rows.take(x) for b, s in zip(plan.branches, shuffled)]
                x_in = assemble(plan, pieces)
            else:
                x_in = x
            out = own_forward(x_in, *args, **kwargs)
            partial = [(b, s) for b, s in zip(plan.branches, shuffled) if b.strength < 1.0]
            if not partial:
                return out
            pieces = [plan.own.take(out) if plan.own is not None else None]
            for b, s in zip(plan.branches, shuffled):
                mine = b.rows.take(out)
                if b.strength < 1.0:
                    again = own_forward(s, *[take_rows(a, b.rows, n) for a in args],
                                        **{k: take_rows(v, b.rows, n) for k, v in kwargs.items()})
                    mine = ((1.0 - b.strength) * promote(mine) + b.strength * promote(again)).to(out.dtype)
                pieces.append(mine)
            return assemble(plan, pieces)

        tpg_forward.__pag_wrapper__ = True
        return tpg_forward


def _own_forward(module, previous):
    """What a wrapped module did before PAG: an instance forward someone installed (chained to), else its
    class's forward, looked up at call time (hosts swap it)."""
    def own_forward(x, *args, **kwargs):
        if previous is not None:
            return previous(x, *args, **kwargs)
        return type(module).forward(module, x, *args, **kwargs)

    return own_forward


def take_rows(value, rows: Rows, n: int):
    """``rows`` of a per-row tensor that travels with the batch of ``n`` rows (context, additional_tokens);
    anything else (None, numbers, tensors of another batch) as it is."""
    if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n:
        return rows.take(value)
    return value


def layer_key(path: str) -> int:
    """A stable number for a layer (the same in every process), for seeding random perturbations."""
    return zlib.crc32(path.encode("utf-8"))


def draw_keys(layout: RowLayout, rows: Rows, draw: tuple, layer_key: int) -> tuple | None:
    """Per perturbed row, the seed key its random draws use: the row's own key (its image's seed, …), the UNet
    call's ``draw`` key and the layer — so a row draws the same whatever else shares its batch. None when the
    layout has no keys."""
    keys = layout.keys
    if keys is None:
        return None
    return tuple(None if keys[i] is None else keys[i] + tuple(draw) + (layer_key,) for i in rows.index)
