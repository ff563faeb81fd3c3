"""Shared-prefix fork: the perturbed twins skip the UNet blocks before the first perturbed layer.

A perturbed twin has the same ``x``, timestep, context and ``y`` as its source row, and no layer
before the first perturbed attn1 treats it differently, so everything up to that point is the same
for both. ``forked_forward`` runs that prefix on the other rows only, then copies ``h``, every skip
tensor in ``hs``, ``emb`` and ``context`` of each source row into its twin's place and runs the rest
of the UNet on the full batch.

The walker mirrors ``UNetModel.forward`` of ``ldm`` (SD1.x/SD2.x) and ``sgm`` (SDXL) block by block
and only runs on a UNet whose forward is one of those (A1111's ``sd_unet`` dispatcher around them
included, while no alternative UNet such as TensorRT is active). Anything else (an instance
``forward`` from ControlNet, another class forward, extra keyword arguments, twins whose inputs are
not bitwise those of their source) makes it answer None, and the caller runs the normal forward.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .layers import LayerSelection
from .patch import fit_rows

log = logging.getLogger("sd_webui_pag")

_ORIGINAL_MODULES = {
    "ldm.modules.diffusionmodules.openaimodel": "ldm",
    "sgm.modules.diffusionmodules.openaimodel": "sgm",
}
_REGISTERED: dict = {}  # forward function -> flavor, for UNet classes that mirror ldm/sgm (test doubles)


@dataclass(frozen=True)
class ForkPoint:
    """Where the batch forks: before ``input_blocks[i]`` / ``middle_block[i]`` / ``output_blocks[i]``."""

    part: str  # "middle" | "output"
    index: int

    def __str__(self):
        if self.part == "middle" and self.index == 0:
            return "middle_block"
        return f"{self.part}_block{'s' if self.part == 'output' else ''}[{self.index}]"


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
    """The fork point for a selection, or None (no layers, or the first one is on the down path)."""
    if selection is None or not selection.chosen:
        return None
    first = selection.first_in_forward_order()
    if first.part == "down":
        return None
    if first.part == "mid":
        # "middle_block.<child>.transformer_blocks.<j>.attn1": the children before it are shared too
        pieces = first.path.split(".")
        child = int(pieces[1]) if len(pieces) > 1 and pieces[1].isdigit() else 0
        return ForkPoint("middle", child)
    return ForkPoint("output", int(first.host_block[1]))


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


# --- the forked forward ----------------------------------------------------------------------------

def forked_forward(unet: torch.nn.Module, x: torch.Tensor, timesteps=None, context=None, y=None, *,
                   perturbed, source=None, first_block: ForkPoint | None, **kwargs) -> torch.Tensor | None:
    """The UNet output for ``x``, the prefix before ``first_block`` computed for the unperturbed rows only.

    ``perturbed``: bool mask over the batch; ``source``: for each perturbed row (in order) the index of
    the row it copies, or None to find it (the first unperturbed row with identical inputs). Returns
    None when the fork cannot be used: the caller then runs ``unet(x, ...)`` as usual.
    """
    if first_block is None or perturbed is None or kwargs:
        if kwargs:
            log.debug("PAG fork off: extra UNet arguments %s", ", ".join(sorted(kwargs)))
        return None
    plain = original_forward(unet)
    if plain is None:
        return None
    n = x.shape[0]
    perturbed = torch.as_tensor(perturbed, dtype=torch.bool).reshape(-1).cpu()
    if perturbed.numel() != n and n % perturbed.numel() == 0 and source is None:
        perturbed = fit_rows(perturbed, n, n)  # k tiles of the marked batch (Tiled Diffusion)
    if perturbed.numel() != n:
        log.debug("PAG fork off: a UNet call of %d rows does not fit the %d marked rows", n, perturbed.numel())
        return None
    if not bool(perturbed.any()) or bool(perturbed.all()):
        return None
    if (y is not None) != (getattr(unet, "num_classes", None) is not None):
        return None
    if getattr(unet, "predict_codebook_ids", False):
        return None
    if first_block.part == "output" and not 0 <= first_block.index < len(unet.output_blocks):
        return None
    inputs = (x, timesteps, context, y)
    keep = ~perturbed
    source = _sources(inputs, n, perturbed, keep, source)
    if source is None:
        return None
    mod = plain.module
    middle = unet.middle_block
    if first_block.part == "middle" and first_block.index > 0 and not _can_split(middle, mod):
        first_block = ForkPoint("middle", 0)
    log.debug("PAG fork before %s: prefix on %d of %d rows", first_block, n - source.numel(), n)
    device = x.device
    keep_rows = keep.nonzero().flatten().to(device)
    kept_position = torch.cumsum(keep.long(), 0) - 1
    origin = torch.arange(n)
    origin[perturbed] = source
    gather = kept_position[origin].to(device)  # full-batch row -> its row in the unforked prefix

    cat = getattr(getattr(mod, "th", None) or getattr(mod, "torch", torch), "cat")  # A1111 hijacks th.cat

    # the prefix, unperturbed rows only
    xk, tk, ck, yk = (_take(v, keep_rows, n) for v in inputs)
    t_emb = mod.timestep_embedding(tk, unet.model_channels, repeat_only=False)
    weight = getattr(unet.time_embed[0], "weight", None)
    if weight is not None and t_emb.dtype != weight.dtype and not torch.is_autocast_enabled():
        t_emb = t_emb.to(weight.dtype)
    emb = unet.time_embed(t_emb)
    if yk is not None:
        emb = emb + unet.label_emb(yk)
    h = xk.type(unet.dtype) if plain.flavor == "ldm" and isinstance(getattr(unet, "dtype", None), torch.dtype) else xk
    hs = []
    for block in unet.input_blocks:
        h = block(h, emb, ck)
        hs.append(h)

    output_start = 0
    if first_block.part == "middle":
        split = first_block.index
        h = _run_children(middle, mod, h, emb, ck, 0, split)
        h, hs, emb, context = _fork(gather, n, h, hs, emb, ck)
        h = middle(h, emb, context) if split == 0 else _run_children(middle, mod, h, emb, context, split, len(middle))
    else:
        h = middle(h, emb, ck)
        output_start = first_block.index
        for block in list(unet.output_blocks)[:output_start]:
            h = block(cat([h, hs.pop()], dim=1), emb, ck)
        h, hs, emb, context = _fork(gather, n, h, hs, emb, ck)

    # the rest, full batch
    for block in list(unet.output_blocks)[output_start:]:
        h = block(cat([h, hs.pop()], dim=1), emb, context)
    h = h.type(x.dtype)
    return unet.out(h)


def _sources(inputs, n, perturbed, keep, source):
    """Validated source rows (a CPU long tensor, one per perturbed row), or None."""
    pert_rows = perturbed.nonzero().flatten()
    if source is not None:
        source = torch.as_tensor(source, dtype=torch.long).reshape(-1).cpu()
        if source.numel() != pert_rows.numel() or bool((source < 0).any()) or bool((source >= n).any()):
            log.debug("PAG fork off: %d source rows for %d perturbed rows", source.numel(), pert_rows.numel())
            return None
        if not bool(keep[source].all()):
            log.debug("PAG fork off: a source row is itself perturbed")
            return None
        for p, s in zip(pert_rows.tolist(), source.tolist()):
            if not _same_inputs(inputs, n, p, s):
                log.debug("PAG fork off: row %d's inputs differ from its source row %d", p, s)
                return None
        return source
    candidates = keep.nonzero().flatten().tolist()
    found = []
    for p in pert_rows.tolist():
        s = next((c for c in candidates if _same_inputs(inputs, n, p, c)), None)
        if s is None:
            log.debug("PAG fork off: perturbed row %d has no unperturbed row with the same inputs", p)
            return None
        found.append(s)
    return torch.tensor(found, dtype=torch.long)


def _same_inputs(inputs, n, a, b) -> bool:
    for value in inputs:
        for t in _tensors(value):
            if t.ndim >= 1 and t.shape[0] == n and not torch.equal(t[a], t[b]):
                return False
    return True


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _take(value, rows, n):
    """The given rows of per-row tensors (also inside lists/dicts); everything else as is."""
    if torch.is_tensor(value):
        return value.index_select(0, rows.to(value.device)) if value.ndim >= 1 and value.shape[0] == n else value
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, rows, n) for k, v in value.items()}
    return value


def _fork(gather, n, h, hs, emb, context):
    """Full-batch ``h``, ``hs``, ``emb``, ``context`` from their unperturbed-rows versions."""
    kept = int(h.shape[0])
    return (_take(h, gather, kept), [_take(t, gather, kept) for t in hs], _take(emb, gather, kept),
            _take(context, gather, kept))


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
def forking(unet: torch.nn.Module, selection: LayerSelection | None, perturbed, source=None):
    """Fork the UNet calls made inside the block (an instance ``forward`` on ``unet``, always removed).

    Yields the ForkPoint in use, or None when the fork is off (down-path layer first, replaced
    forward): calls then run the UNet's own forward untouched.
    """
    point = None if os.environ.get(DISABLE_ENV, "") not in ("", "0") else first_perturbed_stage(selection)
    previous = unet.__dict__.get("forward")
    if getattr(previous, "__pag_fork__", False):
        log.debug("PAG fork: already forking this UNet; the inner block adds nothing")
        point = None
    if perturbed is not None:
        perturbed = torch.as_tensor(perturbed, dtype=torch.bool).reshape(-1).cpu()
        if not bool(perturbed.any()) or bool(perturbed.all()):  # nothing to share (separate mode: all rows)
            point = None
    if point is None or perturbed is None or original_forward(unet) is None:
        yield None
        return
    state = {"active": True}

    def forward(x, timesteps=None, context=None, y=None, *args, **kwargs):
        if state["active"] and not args:
            out = forked_forward(unet, x, timesteps, context, y, perturbed=perturbed, source=source,
                                 first_block=point, **kwargs)
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
        yield point
    finally:
        state["active"] = False
        if unet.__dict__.get("forward") is forward:
            if previous is not None:
                unet.forward = previous
            else:
                del unet.forward
        else:
            log.warning("PAG: the UNet's forward was replaced while the fork was on; leaving a pass-through")


__all__ = ["ForkPoint", "PlainForward", "first_perturbed_stage", "foreign_patch", "forked_forward", "forking", "original_forward",
           "register_original_forward"]
