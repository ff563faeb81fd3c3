"""Shared-prefix fork on Forge 2 and reForge, through their UNet patcher API.

In batched mode the perturbed twins ride in the host's cond/uncond UNet call (``lib_pag.forge``). A twin
has the same ``x``, timestep, conditioning, ``y`` and ControlNet residuals as the host row it copies, and
nothing before the first perturbed attn1 treats it differently — so, as on A1111 (``lib_pag.fork``), the
blocks before that point run on the host's own rows only and their ``h``, skip tensors and ``emb`` are
copied into the twins' places; the rest of the UNet runs on the whole batch.

How it reaches the UNet, each host through its own patcher API (no host function is replaced):

- **Forge 2** (``backend/nn/unet.py``): an object patch ``diffusion_model.forward`` on this job's clone of
  the UNet patcher (``ModelPatcher.add_object_patch``); the patcher sets it when it loads the model and
  puts the old value back when it unloads it. It forks only the UNet calls that carry a ``ForkPlan`` in
  their ``transformer_options`` (key ``FORK_KEY``) and passes every other call on to the forward it replaced.
- **reForge** (``ldm_patched/ldm/modules/diffusionmodules/openaimodel.py``): a ``DIFFUSION_MODEL`` wrapper
  (``ldm_patched/modules/patcher_extension.py``) in the ``transformer_options`` of the twinned UNet call
  only, added after any other wrapper (so it is the innermost and every other wrapper still runs).

The walk mirrors the host's UNet forward statement for statement (``IntegratedUNet2DConditionModel.forward``
of Forge 2, ``UNetModel._forward`` of reForge): ``emb_patch``, ``input_block_patch``,
``input_block_patch_after_skip``, ``output_block_patch``, ``group_norm_wrapper``, ControlNet residuals; every
block is called as the host calls it. Forge 2's block modifiers see every block in turn and may carry state
from one to the next, so while any is set the fork is off (and the walk has no modifier calls). The prefix
sees the host's own ``transformer_options`` (its rows, no twins); the rest the twinned call's. It runs only
when the UNet's forward is one of those two functions and uses no name or key the walk does not mirror
(checked on the function's code, so a changed host forward turns the fork off rather than being
half-mirrored); otherwise the call runs the host's forward unchanged, with a DEBUG line naming why. The fork point
is a block boundary: before ``middle_block`` or before ``output_blocks[i]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import weakref

import torch

from .fork import (
    DISABLE_ENV, ForkChecks, ForkPoint, _is_own_bound_forward, first_perturbed_stage, fork_plan, fork_stages, inputs_differ,
    take_rows,
)
from .layers import LayerSelection
from .layout import RowLayout

log = logging.getLogger("sd_webui_pag")

FORK_KEY = "pag_fork"  # transformer_options key of a UNet call whose twins may share the prefix
OBJECT_PATCH = "diffusion_model.forward"  # Forge 2: the patcher key of PAG's forward
WRAPPER_KEY = "pag_fork"  # reForge: the key of PAG's DIFFUSION_MODEL wrapper
DIFFUSION_MODEL = "diffusion_model"  # reForge: WrappersMP.DIFFUSION_MODEL


@dataclasses.dataclass(frozen=True)
class HostForward:
    """A host UNet forward the walk mirrors: where it is defined and every name and key it uses."""

    flavor: str  # "forge2" | "reforge"
    module: str
    qualname: str
    keys: frozenset  # identifier-like string constants (transformer_options keys, block names)
    names: frozenset  # attribute and global names (co_names)


FORGE2_FORWARD = HostForward(
    "forge2", "backend.nn.unet", "IntegratedUNet2DConditionModel.forward",
    frozenset({"after", "before", "block", "block_modifiers", "group_norm_wrapper", "input", "input_block_patch",
               "input_block_patch_after_skip", "middle", "original_shape", "output", "output_block_patch", "patches",
               "transformer_index"}),
    frozenset({"append", "apply_control", "cat", "dtype", "enumerate", "get", "input_blocks", "label_emb", "len",
               "list", "middle_block", "model_channels", "num_classes", "out", "output_blocks", "pop", "shape",
               "time_embed", "timestep_embedding", "to", "torch", "type"}),
)
REFORGE_FORWARD = HostForward(
    "reforge", "ldm_patched.ldm.modules.diffusionmodules.openaimodel", "UNetModel._forward",
    frozenset({"block", "emb_patch", "image_only_indicator", "input", "input_block_patch",
               "input_block_patch_after_skip", "middle", "num_video_frames", "original_shape", "output",
               "output_block_patch", "patches", "time_context", "transformer_index"}),
    frozenset({"append", "apply_control", "cat", "default_num_video_frames", "dtype", "enumerate",
               "forward_timestep_embed", "get", "id_predictor", "input_blocks", "label_emb", "len", "list",
               "middle_block", "model_channels", "num_classes", "out", "output_blocks", "pop",
               "predict_codebook_ids", "shape", "th", "time_embed", "timestep_embedding", "to", "type"}),
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHECKED: dict = {}  # function -> None (mirrored) | reason


_ABSENT = object()  # ForkPlan.restore: the host's options had no such key


@dataclasses.dataclass(frozen=True)
class ForkPlan:
    """What one twinned UNet call needs to fork: its ``layout`` (the host's rows, then the twins with the host
    row each copies: ``lib_pag.layout``), the ``stages`` (``fork.fork_stages``) and ``restore``: for every
    ``transformer_options`` key PAG set or changed for the twins, the host's own value (``_ABSENT``: none),
    so the prefix sees the options the UNet really receives — with whatever a wrapper between PAG's and the
    UNet added — for the host's rows. ``checks`` gets the deferred twin-input check of every forked call."""

    stages: tuple
    layout: RowLayout
    restore: dict
    checks: ForkChecks | None = None
    stage_options: object = None  # (stage layout) -> the options PAG builds for a partial batch (several stages)

    @property
    def rows(self) -> int:
        return self.layout.n

    @property
    def point(self) -> ForkPoint:
        return self.stages[0][0]

    @classmethod
    def between(cls, stages, layout: RowLayout, host_options: dict, call_options: dict, checks: ForkChecks | None = None,
                stage_options=None):
        """The plan for a call whose options PAG built as ``call_options`` from the host's ``host_options``
        (compared by identity, key by key; before ``FORK_KEY`` and PAG's wrapper are added)."""
        restore = {k: host_options.get(k, _ABSENT) for k in set(host_options) | set(call_options)
                   if k not in call_options or k not in host_options or call_options[k] is not host_options[k]}
        restore[FORK_KEY] = _ABSENT
        restore["wrappers"] = host_options.get("wrappers", _ABSENT)
        return cls(tuple(stages), layout, restore, checks, stage_options)

    def options_at(self, layout: RowLayout, received: dict) -> dict:
        """The options for a stage whose batch is ``layout`` (some guidances' twins joined, not all): the received
        options with PAG's keys set for that batch (``stage_options``)."""
        options = self.prefix_options(received)
        built = self.stage_options(layout)
        for k in self.restore:
            if k in (FORK_KEY, "wrappers"):
                continue
            if k in built:
                options[k] = built[k]
            else:
                options.pop(k, None)
        return options

    def prefix_options(self, received: dict) -> dict:
        """The options the UNet received, with PAG's twin bookkeeping undone: what the host's rows see."""
        options = dict(received)
        for k, v in self.restore.items():
            if v is _ABSENT:
                options.pop(k, None)
            else:
                options[k] = v
        return options


def block_stages(selections) -> tuple | None:
    """``fork.fork_stages`` for the walk, which joins at block boundaries: a join inside the middle block moves
    before it (stages at the same point merge). None when the fork is off."""
    stages = fork_stages(selections) if selections else None
    if not stages:
        return None
    merged: dict = {}
    for point, labels in stages:
        if point.part == "middle":
            point = ForkPoint("middle", 0)
        merged.setdefault(point, []).extend(labels)
    return tuple((point, tuple(labels)) for point, labels in sorted(merged.items(), key=lambda kv: kv[0].order))


def fork_point(selection: LayerSelection | None) -> ForkPoint | None:
    """The block boundary to fork at, or None (no layers, or turned off): before an input block, the middle
    block or an output block."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    point = first_perturbed_stage(selection)
    if point is not None and point.part == "middle":
        point = ForkPoint("middle", 0)  # the walk splits at block boundaries only
    return point


def unmirrored(function, host: HostForward) -> str | None:
    """Why ``function`` is not the host forward the walk mirrors, or None when it is."""
    if function in _CHECKED:
        return _CHECKED[function]
    code = getattr(function, "__code__", None)
    if (code is None or getattr(function, "__qualname__", "") != host.qualname
            or getattr(function, "__module__", "") != host.module):
        reason = (f"the UNet forward is {getattr(function, '__module__', '?')}."
                  f"{getattr(function, '__qualname__', function)}, not {host.module}.{host.qualname}")
    else:
        keys = {c for c in _constants(code) if _IDENTIFIER.match(c)}
        extra = sorted((keys - host.keys) | (set(code.co_names) - host.names))
        reason = f"the host's UNet forward uses {', '.join(extra)}, which PAG's fork does not mirror" if extra else None
    _CHECKED[function] = reason
    return reason


def _constants(code):
    for c in code.co_consts:
        if isinstance(c, str):
            yield c
        elif hasattr(c, "co_consts"):
            yield from _constants(c)


# --- the walk ----------------------------------------------------------------------------------------

def forked_forward(unet, host: HostForward, plan: ForkPlan, x, timesteps=None, context=None, y=None, control=None,
                   transformer_options=None, **kwargs):
    """The host forward's output for this call, its prefix run on the host's rows only; None to decline.

    ``x``: ``[N, C, H, W]`` with N = ``plan.rows`` (or k·N: k tiles of the call stacked tile-major, as
    Forge's MultiDiffusion does). Declines (the caller runs the host forward) when the forward is not the
    mirrored one or the rows do not fit the plan. Reads no device data: whether a twin's inputs equal its
    source row's is checked on the device and read by the adapter once per step (``plan.checks``).
    """
    function = getattr(type(unet), "forward" if host.flavor == "forge2" else "_forward", None)
    reason = unmirrored(function, host)
    if reason is None and getattr(unet, "predict_codebook_ids", False):
        reason = "the UNet predicts codebook ids"
    stages = tuple(plan.stages)
    for point, _ in stages:
        if reason is None and point.part == "output" and not 0 <= point.index < len(unet.output_blocks):
            reason = f"{point} does not exist"
        if reason is None and point.part == "input" and not 0 <= point.index < len(unet.input_blocks):
            reason = f"{point} does not exist"
        if reason is None and point.part == "middle" and point.index != 0:
            reason = f"{point} is not a block boundary"
    options = transformer_options if transformer_options is not None else {}
    if reason is None and host.flavor == "forge2" and (options.get("block_modifiers") or options.get("block_inner_modifiers")):
        # they see every block in turn and may carry state from one to the next (ControlNet's tile_colorfix
        # keeps input block 0's h until the last block): rows that change size on the way would break them
        reason = "block modifiers are set (they may carry state from block to block)"
    if reason is None and len(stages) > 1 and plan.stage_options is None:
        reason = "several join points and no options for the partial batches"
    n = int(x.shape[0])
    fitted = None
    if reason is None:
        try:
            fitted = plan.layout.fit(n, n)
        except RuntimeError:
            reason = f"a UNet call of {n} rows does not fit the {plan.rows} rows of the twinned batch"
    rows = fork_plan(fitted, stages) if fitted is not None else None
    if reason is None and rows is None:
        reason = "nothing to share in this call"
    if reason is not None:
        log.debug("PAG fork off: %s", reason)
        return None
    full = (x, timesteps, context, y, control, kwargs)
    if plan.checks is not None:
        plan.checks.add(inputs_differ(full, n, rows))
    log.debug("PAG fork before %s: prefix on %d of %d rows", ", ".join(str(s.point) for s in rows.stages),
              len(rows.prefix), n)
    return _walk(unet, host.flavor == "forge2", sys.modules[type(unet).__module__], rows, full,
                 plan.prefix_options(options), options, plan)


class _Segment:
    """The rows one part of the walk runs on: its inputs and transformer_options."""

    def __init__(self, context, control, options, kwargs):
        self.context, self.control, self.options, self.kwargs = context, control, options, kwargs
        self.patches = options.get("patches", {})


def _walk(unet, forge2: bool, mod, rows, full, prefix_options: dict, options: dict, plan: ForkPlan):
    """The host forward, statement for statement, on ``rows.prefix`` until each stage's join point."""
    x, timesteps, context, y, control, kwargs = full
    n = int(x.shape[0])
    xk, tk, ck, yk, control_k, kwargs_k = (take_rows(v, rows.prefix, n) for v in full)
    seg = _Segment(ck, control_k, prefix_options, kwargs_k)
    seg.options["original_shape"] = list(xk.shape)
    seg.options["transformer_index"] = 0
    stages_left = list(rows.stages)

    def block(module, h, emb, output_shape=None, output=False):
        if forge2:
            if output:  # output blocks get output_shape
                return module(h, emb, seg.context, seg.options, output_shape)
            return module(h, emb, seg.context, seg.options)
        kw = seg.kwargs
        return mod.forward_timestep_embed(module, h, emb, seg.context, seg.options, output_shape,
                                          time_context=kw.get("time_context", None),
                                          num_video_frames=kw.get("num_video_frames", unet.default_num_video_frames),
                                          image_only_indicator=kw.get("image_only_indicator", None))

    def due(part, index):
        return bool(stages_left) and (stages_left[0].point.part, stages_left[0].point.index) == (part, index)

    def join(h, hs, emb):
        nonlocal seg
        stage = stages_left.pop(0)
        index = seg.options.get("transformer_index", 0)
        last = not stages_left
        active = stage.active
        if isinstance(control, dict) and isinstance(seg.control, dict):
            # the part before popped its residuals from its own copies: the rest starts where it stopped
            rest = {k: (take_rows(v[:len(seg.control[k])], active, n) if isinstance(v, list) and isinstance(seg.control.get(k), list)
                        else take_rows(v, active, n)) for k, v in control.items()}
        else:
            rest = take_rows(control, active, n)
        if last:
            seg = _Segment(context, rest, options, kwargs)
            seg.options["original_shape"] = list(x.shape)
        else:  # some guidances' twins joined, not all: PAG's keys for this batch
            seg = _Segment(take_rows(context, active, n), rest, plan.options_at(stage.layout, options),
                           take_rows(kwargs, active, n))
            seg.options["original_shape"] = [len(active)] + list(x.shape[1:])
        seg.options["transformer_index"] = index
        g = stage.gather
        return g.take(h), [g.take(t) for t in hs], g.take(emb)

    t_emb = mod.timestep_embedding(tk, unet.model_channels, repeat_only=False).to(xk.dtype)
    emb = unet.time_embed(t_emb)
    if not forge2:
        for patch in seg.patches.get("emb_patch", []):
            emb = patch(emb, unet.model_channels, seg.options)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(yk)
    h, hs = xk, []
    for i, module in enumerate(unet.input_blocks):
        if due("input", i):
            h, hs, emb = join(h, hs, emb)
        seg.options["block"] = ("input", i)
        h = block(module, h, emb)
        h = mod.apply_control(h, seg.control, "input")
        for patch in seg.patches.get("input_block_patch", []):
            h = patch(h, seg.options)
        hs.append(h)
        for patch in seg.patches.get("input_block_patch_after_skip", []):
            h = patch(h, seg.options)
    if due("middle", 0):
        h, hs, emb = join(h, hs, emb)
    seg.options["block"] = ("middle", 0)
    if forge2 or unet.middle_block is not None:
        h = block(unet.middle_block, h, emb)
    h = mod.apply_control(h, seg.control, "middle")
    for i, module in enumerate(unet.output_blocks):
        if due("output", i):
            h, hs, emb = join(h, hs, emb)
        seg.options["block"] = ("output", i)
        hsp = hs.pop()
        hsp = mod.apply_control(hsp, seg.control, "output")
        for patch in seg.patches.get("output_block_patch", []):
            h, hsp = patch(h, hsp, seg.options)
        h = torch.cat([h, hsp], dim=1)
        del hsp
        output_shape = hs[-1].shape if len(hs) > 0 else None
        h = block(module, h, emb, output_shape, output=True)
    if forge2:
        seg.options["block"] = ("last", 0)
        if "group_norm_wrapper" in seg.options:
            h = seg.options["group_norm_wrapper"](unet.out[0], h, seg.options)
            h = unet.out[1:](h)
        else:
            h = unet.out(h)
        return h.type(x.dtype)
    return unet.out(h.type(x.dtype))


# --- how it reaches the UNet -------------------------------------------------------------------------

_HOST_ARGS = ("x", "timesteps", "context", "y", "control", "transformer_options")


def install_object_patch(patcher, live) -> str | None:
    """Forge 2: add PAG's ``diffusion_model.forward`` object patch to ``patcher`` (this job's clone).

    ``live()``: whether the job still wants forking. Returns None when installed, else why not (another
    object patch on that key, or someone else's instance forward on the UNet: both are left alone). At
    each call PAG's forward hands over to what the patcher replaced when it loaded the model (its
    ``object_patches_backup``, e.g. a forward another script set after PAG installed), and forks only
    while that is the UNet's own forward.
    """
    unet = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(patcher, "add_object_patch"):
        return "the UNet patcher has no object patches"
    if OBJECT_PATCH in getattr(patcher, "object_patches", {}):
        return f"another object patch on {OBJECT_PATCH}"
    own = unet.__dict__.get("forward")
    if own is not None and not _plain_forward(own, unet):
        return f"the UNet has an instance forward ({getattr(own, '__qualname__', type(own).__name__)})"
    unet_ref, patcher_ref = weakref.ref(unet), weakref.ref(patcher)

    def replaced():
        """What this patch replaced on the UNet when the patcher loaded it (None: nothing)."""
        loaded = patcher_ref()
        return getattr(loaded, "object_patches_backup", {}).get(OBJECT_PATCH) if loaded is not None else None

    def forward(*args, **kwargs):
        module = unet_ref()
        before = replaced()
        if before is None:
            before = type(module).forward.__get__(module)
        call = dict(zip(_HOST_ARGS, args), **kwargs)
        options = call.get("transformer_options")
        plan = options.get(FORK_KEY) if isinstance(options, dict) else None
        if plan is not None and live() and len(args) <= len(_HOST_ARGS) and "x" in call:
            if not _plain_forward(before, module):
                log.debug("PAG fork off: the UNet's forward was replaced (%s)", getattr(before, "__qualname__", before))
            else:
                out = forked_forward(module, FORGE2_FORWARD, plan, **call)
                if out is not None:
                    return out
        return before(*args, **kwargs)

    forward.__pag_fork__ = True
    forward.__pag_replaced__ = replaced
    patcher.add_object_patch(OBJECT_PATCH, forward)
    return None


def _plain_forward(fn, unet, depth: int = 0) -> bool:
    """Whether calling ``fn`` runs the UNet's own class forward and nothing else (PAG's own, stale
    forwards pass through to what they replaced: followed)."""
    if fn is None or _is_own_bound_forward(unet, fn):
        return True
    if getattr(fn, "__pag_fork__", False) and depth < 8:
        replaced = getattr(fn, "__pag_replaced__", None)
        return _plain_forward(replaced() if replaced is not None else None, unet, depth + 1)
    return False


def add_wrapper(options: dict, live) -> None:
    """reForge: PAG's DIFFUSION_MODEL wrapper, innermost, in this UNet call's ``transformer_options``
    (``options``, the call's own copy; the nested dicts are copied, never changed in place)."""

    def wrapper(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        plan = transformer_options.get(FORK_KEY) if isinstance(transformer_options, dict) else None
        innermost = getattr(executor, "idx", -1) + 1 == len(getattr(executor, "wrappers", ()))
        unet, original = getattr(executor, "class_obj", None), getattr(executor, "original", None)
        if plan is not None and live():
            if not innermost:
                log.debug("PAG fork off: another DIFFUSION_MODEL wrapper runs inside PAG's")
            elif (getattr(original, "__self__", None) is not unet
                  or getattr(original, "__func__", None) is not getattr(type(unet), "_forward", None)):
                log.debug("PAG fork off: the UNet's _forward was replaced (%s)", getattr(original, "__qualname__", original))
            else:
                out = forked_forward(executor.class_obj, REFORGE_FORWARD, plan, x, timesteps, context, y, control,
                                     transformer_options, **kwargs)
                if out is not None:
                    return out
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    wrapper.__pag_fork__ = True
    wrappers = dict(options.get("wrappers", {}))
    of_type = dict(wrappers.get(DIFFUSION_MODEL, {}))
    of_type.pop(WRAPPER_KEY, None)
    of_type[WRAPPER_KEY] = [wrapper]
    wrappers[DIFFUSION_MODEL] = of_type
    options["wrappers"] = wrappers


__all__ = ["FORGE2_FORWARD", "FORK_KEY", "ForkPlan", "HostForward", "REFORGE_FORWARD", "add_wrapper", "fork_point",
           "forked_forward", "install_object_patch", "unmirrored"]
