"""Shared-prefix fork: the perturbed twins skip the UNet blocks before their branch's first perturbed layer.

A perturbed twin has the same ``x``, timestep, context and ``y`` as its source row (the host adapter built
it as a copy and says which row it copies: ``RowLayout.sources``), and no layer before its branch's first
perturbed layer treats it differently, so everything up to that point is the same for both.
``forked_forward`` runs that prefix on the plain rows only; at each branch's join point (``fork_stages``:
before an input block, a child of the middle block or an output block) it copies ``h``, every skip tensor
in ``hs`` and ``emb`` of each source row into its twin's place, and the batch grows; the rest runs on the
full batch. All of that bookkeeping is host-side and made once per layout (``fork_plan``): the call reads
no device data. That the twins' inputs really equal their sources' is checked on the device without
waiting (``inputs_differ``), and read by the adapter once per step (``ForkChecks``).

The walker mirrors ``UNetModel.forward`` of ``ldm`` (SD1.x/SD2.x) and ``sgm`` (SDXL) block by block
and only runs on a UNet whose forward is one of those (A1111's ``sd_unet`` dispatcher around them
included, while no alternative UNet such as TensorRT is active). Anything else (an instance
``forward`` from ControlNet, another class forward, extra keyword arguments, a layout without source
rows) makes it answer None, and the caller runs the normal forward.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from .layers import LayerSelection
from .layout import PLAIN, RowLayout, Rows

log = logging.getLogger("sd_webui_pag")

_ORIGINAL_MODULES = {
    "ldm.modules.diffusionmodules.openaimodel": "ldm",
    "sgm.modules.diffusionmodules.openaimodel": "sgm",
}
_REGISTERED: dict = {}  # forward function -> flavor, for UNet classes that mirror ldm/sgm (test doubles)


PART_ORDER = {"input": 0, "middle": 1, "output": 2}


@dataclass(frozen=True)
class ForkPoint:
    """Where twins join the batch: before ``input_blocks[i]`` / ``middle_block[i]`` / ``output_blocks[i]``."""

    part: str  # "input" | "middle" | "output"
    index: int

    def __str__(self):
        if self.part == "middle" and self.index == 0:
            return "middle_block"
        return f"{self.part}_block{'' if self.part == 'middle' else 's'}[{self.index}]"

    @property
    def order(self) -> tuple[int, int]:
        return PART_ORDER[self.part], self.index


@dataclass(frozen=True)
class PlainForward:
    """The recognised original forward of a UNet: its function, flavor and defining module."""

    function: object
    flavor: str  # "ldm" | "sgm"
    module: object


def register_original_forward(function, flavor: str = "sgm") -> None:
    """Declare a UNetModel.forward that mirrors ldm's/sgm's block for block (e.g. a test double)."""
    if flavor not in ("ldm", "sgm"):
        raise ValueError(f"unknown flavor {flavor!r}")
    _REGISTERED[function] = flavor


# --- where to fork -------------------------------------------------------------------------------

def first_perturbed_stage(selection: LayerSelection | None) -> ForkPoint | None:
    """Where a branch's twins join: before the block holding its first perturbed layer (inside the middle
    block: before the child holding it). None for no layers."""
    if selection is None or not selection.chosen:
        return None
    first = selection.first_in_forward_order()
    if first.part == "mid":
        # "middle_block.<child>.transformer_blocks.<j>.attn1": the children before it are shared too
        pieces = first.path.split(".")
        child = int(pieces[1]) if len(pieces) > 1 and pieces[1].isdigit() else 0
        return ForkPoint("middle", child)
    return ForkPoint(HOST_PART[first.part], int(first.host_block[1]))


HOST_PART = {"down": "input", "up": "output"}


def fork_stages(selections) -> tuple[tuple[ForkPoint, tuple[int, ...]], ...] | None:
    """``((point, labels joining there), ...)`` in forward order for the branches' selections (a
    ``LayerSelection`` = branch 1, or ``{label: LayerSelection}``); None when the fork is off
    (``SD_WEBUI_PAG_NO_FORK``) or a branch has no layers."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    if not isinstance(selections, dict):
        selections = {1: selections}
    joins: dict[ForkPoint, list[int]] = {}
    for label, selection in selections.items():
        point = first_perturbed_stage(selection)
        if point is None:
            return None
        joins.setdefault(point, []).append(int(label))
    return tuple((point, tuple(labels)) for point, labels in sorted(joins.items(), key=lambda kv: kv[0].order))


@dataclass(frozen=True)
class Stage:
    """One join: before ``point``, the batch grows from the rows computed so far to ``active`` (rows of the
    full call, in order); ``gather`` picks, for each of them, its row in the batch so far (a twin: its source's);
    ``layout``: the layout of the grown batch (what the patched modules after the join see)."""

    point: ForkPoint
    labels: tuple[int, ...]
    active: Rows
    gather: Rows
    layout: RowLayout


@dataclass(frozen=True)
class ForkPlan:
    """The host-side bookkeeping of one forked call, made once per layout: the prefix rows (the plain ones,
    ``prefix_layout``) and the stages; ``twins``/``sources``: every twin row and its source row (for the input
    check)."""

    prefix: Rows
    stages: tuple[Stage, ...]
    twins: Rows
    sources: Rows
    prefix_layout: RowLayout


def sub_layout(layout: RowLayout, rows: Sequence[int]) -> RowLayout:
    """The layout of a batch made of ``layout``'s ``rows`` (in that order; a twin's source must be among them)."""
    position = {row: k for k, row in enumerate(rows)}
    sources = None
    if layout.sources is not None:
        sources = tuple(position.get(layout.sources[r], -1) for r in rows)
        if any(s < 0 for s in sources):
            sources = None
    keys = None if layout.keys is None else tuple(layout.keys[r] for r in rows)
    return RowLayout(tuple(layout.labels[r] for r in rows), sources, keys)


@functools.lru_cache(maxsize=256)
def fork_plan(layout: RowLayout, stages: tuple) -> ForkPlan | None:
    """The plan for ``layout`` (with sources) and ``stages`` (``fork_stages``), or None when there is nothing
    to share (no plain row, no twin of a forking branch, a twin without a known source)."""
    if layout.sources is None:
        return None
    labels = layout.labels
    plain = [i for i, lab in enumerate(labels) if lab == PLAIN]
    stage_of = {label: k for k, (_, joining) in enumerate(stages) for label in joining}
    if not plain or any(lab != PLAIN and lab not in stage_of for lab in labels):
        return None  # a twin whose branch has no fork point: it must run the whole UNet
    active, built = list(plain), []
    for k, (point, joining) in enumerate(stages):
        joined = [i for i, lab in enumerate(labels) if lab in joining]
        if not joined:
            continue
        position = {row: j for j, row in enumerate(active)}
        grown = sorted(active + joined)
        gather = [position[i] if i in position else position[layout.sources[i]] for i in grown]
        built.append(Stage(point, tuple(joining), Rows(grown), Rows(gather), sub_layout(layout, grown)))
        active = grown
    if not built:
        return None
    twins = [i for i, lab in enumerate(labels) if lab != PLAIN]
    return ForkPlan(Rows(plain), tuple(built), Rows(twins), Rows([layout.sources[i] for i in twins]),
                    sub_layout(layout, plain))


# --- which forward the UNet has ------------------------------------------------------------------

def original_forward(unet: torch.nn.Module) -> PlainForward | None:
    """The ldm/sgm forward this UNet runs, or None (with a debug line) when someone replaced it."""
    own = unet.__dict__.get("forward")
    if own is not None and not getattr(own, "__pag_fork__", False) and not _is_own_bound_forward(unet, own):
        log.debug("PAG fork off: %s has an instance forward (%s), e.g. ControlNet", type(unet).__name__,
                  getattr(own, "__qualname__", type(own).__name__))
        return None
    function = _unwrap_a1111(type(unet).forward)
    if function is None:
        return None
    flavor = _REGISTERED.get(function)
    if flavor is None and getattr(function, "__qualname__", "") == "UNetModel.forward":
        flavor = _ORIGINAL_MODULES.get(getattr(function, "__module__", ""))
    if flavor is None:
        log.debug("PAG fork off: %s.forward is %s.%s, not ldm's/sgm's", type(unet).__name__,
                  getattr(function, "__module__", "?"), getattr(function, "__qualname__", function))
        return None
    module = sys.modules.get(function.__module__)
    if module is None or not hasattr(module, "timestep_embedding"):
        log.debug("PAG fork off: cannot find the module of %s", function.__module__)
        return None
    return PlainForward(function, flavor, module)


def _is_own_bound_forward(module, own) -> bool:
    """``m.forward = m.forward``: what a hook leaves behind after restoring (sd-webui-controlnet)."""
    return getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).forward


def _unwrap_a1111(function):
    """A1111's ``sd_unet.create_unet_forward`` wrapper -> the function it wraps, if no other UNet is active."""
    if getattr(function, "__name__", "") != "UNetModel_forward" or getattr(function, "__module__", "") != "modules.sd_unet":
        return function
    sd_unet = sys.modules.get("modules.sd_unet")
    if sd_unet is not None and getattr(sd_unet, "current_unet", None) is not None:
        log.debug("PAG fork off: an alternative UNet (%s) is active", type(sd_unet.current_unet).__name__)
        return None
    code, cells = function.__code__, function.__closure__ or ()
    if "original_forward" not in code.co_freevars:
        log.debug("PAG fork off: unknown layout of A1111's UNetModel_forward")
        return None
    return cells[code.co_freevars.index("original_forward")].cell_contents


# --- the input check (deferred: no sync inside the call) -------------------------------------------

def inputs_differ(inputs, n: int, plan: ForkPlan) -> torch.Tensor | None:
    """A device bool: whether any twin's inputs differ from its source row's (every per-row tensor in
    ``inputs``, also inside lists/dicts). Computed without waiting for the device; the host adapter reads it
    once per step, after the UNet ran (``ForkChecks.failed``). None when there is nothing to compare."""
    flags = [(plan.twins.take(t) != plan.sources.take(t)).flatten().any()
             for t in _tensors(inputs) if t.ndim >= 1 and t.shape[0] == n]
    if not flags:
        return None
    return torch.stack([f.to(flags[0].device) for f in flags]).any()


class ForkChecks:
    """The deferred input checks of one job's forked calls: the fork trusts that a twin's inputs are its
    source row's (PAG built them so); each forked call leaves a device flag here, and the adapter asks once
    per step, after the UNet calls (one host–device sync per step, none inside a call)."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.failed_at: str | None = None  # set once a check failed: the fork stays off for the job

    def add(self, flag: torch.Tensor | None) -> None:
        if flag is not None:
            self.pending.append(flag)

    def failed(self) -> bool:
        """Whether a forked call since the last question had a twin whose inputs differed (reads the device)."""
        pending, self.pending = self.pending, []
        if not pending:
            return False
        return bool(torch.stack([f.to(pending[0].device) for f in pending]).any())


# --- the forked forward ----------------------------------------------------------------------------

def forked_forward(unet: torch.nn.Module, x: torch.Tensor, timesteps=None, context=None, y=None, *,
                   layout: RowLayout | None = None, stages=None, perturbed=None, source=None,
                   first_block: ForkPoint | None = None, checks: ForkChecks | None = None, marks=None,
                   **kwargs) -> torch.Tensor | None:
    """The UNet output for ``x``, each branch's twins joining the batch at its stage (before that, only the
    rows they copy are computed). Returns None when the fork cannot be used: the caller then runs
    ``unet(x, ...)`` as usual.

    ``layout``: the rows of the call (labels and sources, ``lib_pag.layout``) and ``stages``
    (``fork_stages``); or, for one branch, ``perturbed`` (a bool mask), ``source`` (for each perturbed row
    the row it copies) and ``first_block``. A call of ``k·N`` rows for a layout of ``N`` is ``k`` tiles of it.
    Nothing here reads device data; ``checks`` gets the deferred twin-input check. ``marks`` (the
    ``RowMarks`` the attention patch reads) gets each segment's layout while it runs.
    """
    if layout is None:
        if perturbed is None or first_block is None:
            return None
        try:
            layout = RowLayout.from_mask(torch.as_tensor(perturbed, dtype=torch.bool).reshape(-1).tolist(), sources=source)
        except ValueError as err:
            log.debug("PAG fork off: %s", err)
            return None
        stages = ((first_block, (1,)),)
    if stages is None or kwargs:
        if kwargs:
            log.debug("PAG fork off: extra UNet arguments %s", ", ".join(sorted(kwargs)))
        return None
    plain = original_forward(unet)
    if plain is None:
        return None
    n = x.shape[0]
    try:
        layout = layout.fit(n, n)
    except RuntimeError:
        log.debug("PAG fork off: a UNet call of %d rows does not fit the %d marked rows", n, layout.n)
        return None
    if (y is not None) != (getattr(unet, "num_classes", None) is not None):
        return None
    if getattr(unet, "predict_codebook_ids", False):
        return None
    mod = plain.module
    stages = _placed(unet, mod, tuple(stages))
    if stages is None:
        return None
    plan = fork_plan(layout, stages)
    if plan is None:
        log.debug("PAG fork off: nothing to share in this call (%s)", "no source rows" if layout.sources is None else "layout")
        return None
    if checks is not None:
        checks.add(inputs_differ((x, timesteps, context, y), n, plan))
    log.debug("PAG fork before %s: prefix on %d of %d rows", ", ".join(str(s.point) for s in plan.stages),
              len(plan.prefix), n)
    cat = getattr(getattr(mod, "th", None) or getattr(mod, "torch", torch), "cat")  # A1111 hijacks th.cat
    stages_left = list(plan.stages)
    saved = marks.segment(plan.prefix_layout) if marks is not None else None
    try:
        return _walk_ldm(unet, plain, mod, cat, plan, stages_left, marks, x, timesteps, context, y, n)
    finally:
        if marks is not None:
            marks.restore(saved)


def _walk_ldm(unet, plain, mod, cat, plan, stages_left, marks, x, timesteps, context, y, n):
    """``UNetModel.forward`` of ldm/sgm, block by block, the rows growing at each stage."""
    def due(part, index):
        return bool(stages_left) and (stages_left[0].point.part, stages_left[0].point.index) == (part, index)

    def join(h, hs, emb):
        stage = stages_left.pop(0)
        if marks is not None:
            marks.segment(stage.layout)
        g = stage.gather
        return g.take(h), [g.take(t) for t in hs], g.take(emb), take_rows(context, stage.active, n)

    rows = plan.prefix
    xk, tk, ck, yk = (take_rows(v, rows, n) for v in (x, timesteps, context, y))
    t_emb = mod.timestep_embedding(tk, unet.model_channels, repeat_only=False)
    weight = getattr(unet.time_embed[0], "weight", None)
    if weight is not None and t_emb.dtype != weight.dtype and not torch.is_autocast_enabled():
        t_emb = t_emb.to(weight.dtype)
    emb = unet.time_embed(t_emb)
    if yk is not None:
        emb = emb + unet.label_emb(yk)
    h = xk.type(unet.dtype) if plain.flavor == "ldm" and isinstance(getattr(unet, "dtype", None), torch.dtype) else xk
    hs = []
    ctx = ck
    for i, block in enumerate(unet.input_blocks):
        if due("input", i):
            h, hs, emb, ctx = join(h, hs, emb)
        h = block(h, emb, ctx)
        hs.append(h)
    middle = unet.middle_block
    if not any(s.point.part == "middle" for s in stages_left):
        h = middle(h, emb, ctx)
    else:
        done = 0
        while stages_left and stages_left[0].point.part == "middle":
            split = stages_left[0].point.index
            if split > done:
                h = _run_children(middle, mod, h, emb, ctx, done, split)
                done = split
            h, hs, emb, ctx = join(h, hs, emb)
        h = middle(h, emb, ctx) if done == 0 else _run_children(middle, mod, h, emb, ctx, done, len(middle))
    for i, block in enumerate(unet.output_blocks):
        if due("output", i):
            h, hs, emb, ctx = join(h, hs, emb)
        h = block(cat([h, hs.pop()], dim=1), emb, ctx)
    h = h.type(x.dtype)
    return unet.out(h)


def _placed(unet, mod, stages):
    """The stages as this UNet can fork them: a join inside the middle block moves before it when its
    children cannot be run one by one (``_can_split``); None when a point does not exist."""
    placed: dict[ForkPoint, list[int]] = {}
    can_split = None
    for point, labels in stages:
        if point.part == "output" and not 0 <= point.index < len(unet.output_blocks):
            return None
        if point.part == "input" and not 0 <= point.index < len(unet.input_blocks):
            return None
        if point.part == "middle" and point.index > 0:
            if can_split is None:
                can_split = _can_split(unet.middle_block, mod)
            if not can_split:
                point = ForkPoint("middle", 0)
        placed.setdefault(point, []).extend(labels)
    return tuple((point, tuple(labels)) for point, labels in sorted(placed.items(), key=lambda kv: kv[0].order))


def take_rows(value, rows: Rows, n: int):
    """The given rows of per-row tensors (also inside lists/dicts); everything else as is."""
    if torch.is_tensor(value):
        return rows.take(value) if value.ndim >= 1 and value.shape[0] == n else value
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, rows, n) for k, v in value.items()}
    return value


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def foreign_patch(module: torch.nn.Module, known_forward) -> str | None:
    """What someone else attached to ``module`` that a shortcut around its own call would skip, or None.

    A shortcut may run a module's children or body itself only when calling the module would do
    nothing more: no forward or pre-forward hook (the module's own or torch's global ones), no
    instance ``forward`` (except PAG's fork), and a class ``forward`` that is ``known_forward``.
    Checked at every call, so patches added between jobs or during one are seen.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return "a forward hook"
    from torch.nn.modules import module as torch_module

    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return "a global forward hook"
    own = module.__dict__.get("forward")
    if own is not None and not getattr(own, "__pag_fork__", False) and not _is_own_bound_forward(module, own):
        return f"an instance forward ({getattr(own, '__qualname__', type(own).__name__)})"
    if type(module).forward is not known_forward:
        return f"another class forward ({getattr(type(module).forward, '__qualname__', '?')})"
    return None


def _can_split(middle, mod) -> bool:
    """Whether ``middle_block``'s children can be run one by one exactly as its own forward does.

    Not when something foreign is attached to ``middle_block`` itself (FreeU/Deep-Shrink-style hooks,
    an instance forward): then the fork moves to the coarser boundary before ``middle_block``.
    """
    sequential = getattr(mod, "TimestepEmbedSequential", None)
    if sequential is None or not hasattr(mod, "TimestepBlock") or not hasattr(mod, "SpatialTransformer"):
        return False
    stock = sequential.forward
    if (getattr(stock, "__qualname__", "") != "TimestepEmbedSequential.forward"
            or getattr(stock, "__module__", "") != mod.__name__):
        # someone replaced the class's forward (AnimateDiff does): its children are not ours to run
        log.debug("PAG fork: TimestepEmbedSequential.forward is %s.%s, not the model's own; forking before "
                  "middle_block", getattr(stock, "__module__", "?"), getattr(stock, "__qualname__", stock))
        return False
    reason = foreign_patch(middle, stock)
    if reason is not None:
        log.debug("PAG fork: middle_block has %s; forking before middle_block instead of inside it", reason)
        return False
    return True


def _run_children(middle, mod, h, emb, context, start, stop):
    """``TimestepEmbedSequential.forward`` over ``middle[start:stop]``."""
    for layer in list(middle)[start:stop]:
        if isinstance(layer, mod.TimestepBlock):
            h = layer(h, emb)
        elif isinstance(layer, mod.SpatialTransformer):
            h = layer(h, context)
        else:
            h = layer(h)
    return h


# --- the per-call switch --------------------------------------------------------------------------

DISABLE_ENV = "SD_WEBUI_PAG_NO_FORK"  # set to 1 to turn the shared-prefix fork off (debugging, benchmarks)


@contextmanager
def forking(unet: torch.nn.Module, selection, perturbed, source=None, *, checks: ForkChecks | None = None,
            marks=None):
    """Fork the UNet calls made inside the block (an instance ``forward`` on ``unet``, always removed).

    ``selection``: a ``LayerSelection`` (branch 1) or ``{label: LayerSelection}``; ``perturbed``: the call's
    ``RowLayout`` (with sources), or a bool mask with ``source`` (for each perturbed row the row it copies).
    Yields the first fork point in use, or None when the fork is off (replaced forward, nothing to share,
    ``SD_WEBUI_PAG_NO_FORK``): calls then run the UNet's own forward untouched.
    """
    stages = fork_stages(selection)
    layout = perturbed
    if layout is not None and not isinstance(layout, RowLayout):
        try:
            layout = RowLayout.from_mask(torch.as_tensor(layout, dtype=torch.bool).reshape(-1).tolist(), sources=source)
        except ValueError as err:
            log.debug("PAG fork off: %s", err)
            layout = None
    previous = unet.__dict__.get("forward")
    if getattr(previous, "__pag_fork__", False):
        log.debug("PAG fork: already forking this UNet; the inner block adds nothing")
        stages = None
    if checks is not None and checks.failed_at is not None:
        stages = None
    if (stages is None or layout is None or fork_plan(layout, stages) is None  # nothing to share (separate mode: all rows)
            or original_forward(unet) is None):
        yield None
        return
    state = {"active": True}

    def forward(x, timesteps=None, context=None, y=None, *args, **kwargs):
        if state["active"] and not args:
            out = forked_forward(unet, x, timesteps, context, y, layout=layout, stages=stages, checks=checks,
                                 marks=marks, **kwargs)
            if out is not None:
                return out
        own = previous if previous is not None else (lambda *a, **k: type(unet).forward(unet, *a, **k))
        if args:
            return own(x, timesteps, context, y, *args, **kwargs)
        if y is not None:
            kwargs["y"] = y
        return own(x, timesteps, context, **kwargs)

    forward.__pag_fork__ = True
    unet.forward = forward
    try:
        yield stages[0][0]
    finally:
        state["active"] = False
        if unet.__dict__.get("forward") is forward:
            if previous is not None:
                unet.forward = previous
            else:
                del unet.forward
        else:
            log.warning("PAG: the UNet's forward was replaced while the fork was on; leaving a pass-through")


__all__ = ["ForkChecks", "ForkPlan", "ForkPoint", "PlainForward", "Stage", "first_perturbed_stage", "foreign_patch", "fork_plan",
           "fork_stages", "forked_forward", "forking", "inputs_differ", "original_forward", "register_original_forward",
           "take_rows"]
