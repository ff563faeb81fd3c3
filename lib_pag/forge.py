"""Forge 2.x / reForge (and Forge 1) adapter: PAG through the host's own UNet patcher API.

What ``apply(p, args)`` (from ``process_before_every_sampling``) does, per sampling pass:

- clones ``p.sd_model.forge_objects.unet`` and puts the clone back; the patcher the pass started
  with is never touched, and nothing is written into a ``model_options`` dict someone else holds;
- **batched** (default): a UNet function wrapper (``set_model_unet_function_wrapper``, chained to a
  wrapper that was already there) appends a perturbed twin of every cond entry of the host's
  cond/uncond UNet call, marks those rows in the call's ``transformer_options`` (key ``pag_rows``)
  and adds, for that call only, attn1 replace patches on the chosen ``(block, id, transformer
  index)`` keys (chained to any attn1 replace patch already there for that key or its
  ``(block, id)`` fallback). The wrapper returns the host exactly the rows it asked for and keeps
  the twins' outputs. The wrapper only adds rows while a *gate* is open: Forge 2 opens it in a
  ``sampler_pre_cfg_function`` (right before ``calc_cond_uncond_batch``), reForge in a chained
  ``sampler_calc_cond_batch_function`` (around ``calc_cond_batch``); it closes as soon as every
  cond entry of that step has its twin, so UNet calls other post-CFG functions make get no rows;
- **separate** (``mode == "separate"``, Forge 1, or when a twin went missing): the post-CFG
  function makes its own cond-only call (Forge 2 ``calc_cond_uncond_batch(model, cond, None, ...)``,
  reForge ``calc_cond_batch(model, [cond], ...)``) on a *copy* of ``model_options`` with the patches;
- the post-CFG function (``set_model_sampler_post_cfg_function``) returns
  ``denoised + s·(cond_denoised − perturbed_denoised)`` (then rescale against ``cond_denoised``).

AND prompts: the host averages sub-prompt predictions, ``Σ mult_k·pred_k / Σ mult_k`` with
``mult_k`` = strength (× mask/area), over the entries of its ``cond`` list. The twins are
accumulated with the *same* ``mult``/area, obtained from the host's own ``get_area_and_mult``, and
each twin is matched to its cond entry by comparing the conditioning tensors of the UNet call with
the entry's — independent of how the host chunked or ordered the entries. The post-CFG term is then
scaled by the sum of the strengths, as the host scales its CFG term (``edit_strength``): the term is
``s·Σ w·(cond − perturbed)``, exactly A1111's, so PAG's strength relative to CFG is the same on every host.

Schedule: the step fraction is the call's index over the model calls the sampling pass really makes
(``calls.PassCounter``, shared with the A1111 adapter: read off ``p.sampler``'s own schedule; the CFG
denoiser's ``step / total_steps`` where the count cannot be known); without those counters, this job's
own count of denoiser calls over ``p.steps``. Sigma windows use the real sigma the host passes to the
sampling function.

State lives on ``p`` (attribute ``_pag_forge_job``) and in closures over that job object; ``end(p)``
makes every installed function inert. Host modules are imported lazily (tests use doubles).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import weakref
from typing import Callable

import torch

from . import forge_fork
from .job import (
    NOTE_KEY, announce_refusal, check_neighbors, flush_notes, job_summary, more_guidances, never_called, perturbations_for,
    refusal_of, refuse_job, resolve_guidances, start_params, write_infotext, write_note,
)
from .errors import PagError
from .calls import PassCounter
from .guidance import ScaledCall, promote, rescale_guided, scale_for_step
from .layers import LayerSelection, build_catalog, resolve_layers
from .params import PagParams
from .fork import ForkChecks
from .job import image_keys
from .layout import RowLayout, Rows, assemble, module_plan
from .patch import AttentionPatch, Branch, TokenGrids, draw_keys as _draw_keys, layer_key
from .perturbations import Perturbation

log = logging.getLogger("sd_webui_pag")

FORGE2, REFORGE, A1111 = "forge2", "reforge", "a1111"
JOB_ATTR = "_pag_forge_job"
MARK = "pag_rows"  # transformer_options key: which rows of this UNet call are perturbed
REFINER_NOTE = "not applied after the refiner switch"
_HOST: dict = {}


# --- host detection --------------------------------------------------------------------------------

def detect_host(refresh: bool = False) -> str:
    """``"forge2"`` (``backend`` importable), ``"reforge"`` (``ldm_patched``: reForge, Forge 1) or ``"a1111"``."""
    if refresh or "kind" not in _HOST:
        _HOST.clear()
        _HOST["kind"] = _probe()
    return _HOST["kind"]


def _probe() -> str:
    for kind, module in ((FORGE2, "backend.patcher.base"), (REFORGE, "ldm_patched.modules.model_patcher")):
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a half-installed host
            continue
        return kind
    return A1111


def is_forge_host() -> bool:
    return detect_host() != A1111


@dataclasses.dataclass(frozen=True)
class HostApi:
    """The few host functions the adapter calls, bound once per process."""

    kind: str
    set_patch_replace: Callable  # set_model_options_patch_replace(model_options, patch, name, block, number, index)
    attention: Callable  # (q, k, v, heads, extra_options) -> attention output before to_out
    get_area_and_mult: Callable  # (cond_entry, x, sigma) -> cond_obj | None
    cond_prediction: Callable  # (model, cond_list, x, sigma, model_options) -> the cond rows' prediction
    gate: str | None  # "pre_cfg" (Forge 2), "calc_cond_batch_function" (reForge), None (Forge 1: separate only)
    fork: str | None = None  # shared-prefix fork: "object_patch" (Forge 2), "wrapper" (reForge), None


def host_api() -> HostApi | None:
    if "api" not in _HOST:
        kind = detect_host()
        _HOST["api"] = _load_forge2() if kind == FORGE2 else _load_reforge() if kind == REFORGE else None
    return _HOST["api"]


def _load_forge2() -> HostApi:
    from backend.attention import attention_function
    from backend.patcher.base import set_model_options_patch_replace
    from backend.sampling import sampling_function as sf

    return HostApi(
        kind=FORGE2,
        set_patch_replace=set_model_options_patch_replace,
        attention=lambda q, k, v, heads, extra: attention_function(q, k, v, heads),
        get_area_and_mult=sf.get_area_and_mult,
        cond_prediction=lambda model, cond, x, sigma, mo: sf.calc_cond_uncond_batch(model, cond, None, x, sigma, mo)[0],
        gate="pre_cfg",
        fork="object_patch",
    )


def _load_reforge() -> HostApi:
    from ldm_patched.ldm.modules.attention import optimized_attention
    from ldm_patched.modules import samplers
    from ldm_patched.modules.model_patcher import set_model_options_patch_replace

    takes_precision = "attn_precision" in inspect.signature(optimized_attention).parameters

    def attention(q, k, v, heads, extra):
        if takes_precision:
            return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"))
        return optimized_attention(q, k, v, heads)

    if hasattr(samplers, "calc_cond_batch"):  # reForge main (recent ComfyUI sampling code)
        cond_prediction = lambda model, cond, x, sigma, mo: samplers.calc_cond_batch(model, [cond], x, sigma, mo)[0]
        gate = "calc_cond_batch_function"
    else:  # Forge 1: no hook right before the batched call, so the separate call only
        cond_prediction = lambda model, cond, x, sigma, mo: samplers.calc_cond_uncond_batch(model, cond, None, x, sigma, mo)[0]
        gate = None
    try:  # the DIFFUSION_MODEL wrappers of recent ComfyUI code (reForge main); Forge 1 has none
        from ldm_patched.modules.patcher_extension import WrappersMP

        fork = "wrapper" if getattr(WrappersMP, "DIFFUSION_MODEL", None) == forge_fork.DIFFUSION_MODEL else None
    except ImportError:
        fork = None
    return HostApi(REFORGE, set_model_options_patch_replace, attention, samplers.get_area_and_mult, cond_prediction, gate,
                   fork if gate is not None else None)


# --- rows and per-step state -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PagRows:
    """The ``transformer_options[MARK]`` of a UNet call: its perturbed rows, host-side.

    ``layout``: the call's ``RowLayout`` (twins after the host's rows); None = every row is a twin of guidance
    ``label`` (the separate call), its draw keys then from ``images`` (per image, ``job.image_keys``) for rows
    taken as entries of ``entry_rows`` rows each. ``draw``: the call's draw key (pass, model call).
    """

    layout: RowLayout | None = None
    draw: tuple = ()
    images: tuple = ()
    entry_rows: int = 0
    label: int = 1

    def layout_for(self, batch: int, unet_rows: int | None = None) -> RowLayout:
        """``unet_rows``: the UNet call's batch (``original_shape[0]``; MultiDiffusion tiles the batch)."""
        if self.layout is None:
            return _all_rows(unet_rows or batch, self.images, self.entry_rows, self.label).fit(batch, unet_rows)
        return self.layout.fit(batch, unet_rows)


@functools.lru_cache(maxsize=64)
def _all_rows(n: int, images: tuple, entry_rows: int, label: int = 1) -> RowLayout:
    """Every row a twin of ``label``; row ``r`` is image ``r mod entry_rows`` of the ``r // entry_rows``-th entry."""
    keys = None
    if images and entry_rows == len(images) and n % entry_rows == 0:
        keys = tuple(images[r % entry_rows] + (r // entry_rows, label) for r in range(n))
    return RowLayout((label,) * n, None, keys)


def rows_of_block_call(x, args, kwargs):
    """For a transformer block's call on Forge: ``(layout, draw)`` from its ``transformer_options`` (TPG)."""
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in args if isinstance(a, dict) and MARK in a), None)
    mark = options.get(MARK) if isinstance(options, dict) else None
    if mark is None:
        return None
    shape = options.get("original_shape")
    return mark.layout_for(x.shape[0], int(shape[0]) if shape else None), mark.draw


class Step(ScaledCall):
    """One sampling-function call with PAG rows: the host's cond entries and, per guidance active at this call
    (``scales``: index → scale), their twins' running sum.

    A twin is matched to its cond entry on the host (shapes, keys and reForge's entry ``uuid``); only
    when several entries fit (AND sub-prompts of one shape) are their conditioning tensors compared, before
    the UNet call. A host-side match is confirmed on the device without waiting (``checks``), read once in
    the post-CFG function: a wrong match makes that step fall back to the separate call.
    """

    def __init__(self, host: HostApi, scales: dict, cond: list, x: torch.Tensor, sigma: torch.Tensor):
        self.scales = dict(scales)
        self.sigma = sigma
        self.entries = [e for e in (host.get_area_and_mult(c, x, sigma) for c in cond) if e is not None]
        self.done = {(label, k): False for label in self.scales for k in range(len(self.entries))}
        self.acc = {label: torch.zeros_like(x) for label in self.scales}
        self.count = {label: torch.ones_like(x) * 1e-37 for label in self.scales}  # as the host: uncovered pixels end up 0
        self.closed = not self.entries
        self.checks = ForkChecks()
        self.matched: set = set()  # entries already twinned in an earlier call of this step

    @property
    def complete(self) -> bool:
        return bool(self.entries) and all(self.done.values())

    def match(self, c: dict, entry: int, rows: int, x_rows: torch.Tensor, taken: set, uuid=None) -> int | None:
        """The cond entry whose conditioning is entry ``entry`` (``rows`` rows) of the call's ``c``."""
        found = []
        for k, e in enumerate(self.entries):
            if k in self.matched or k in taken or tuple(e.input_x.shape) != tuple(x_rows.shape):
                continue
            if uuid is not None and getattr(e, "uuid", None) is not None and e.uuid != uuid:
                continue
            if all(_cond_fits(c.get(key), entry, rows, value) for key, value in e.conditioning.items()):
                found.append(k)
        if len(found) == 1:
            e = self.entries[found[0]]
            for key, value in e.conditioning.items():
                self.checks.add(_cond_differs(c.get(key), entry, rows, value))
            return found[0]
        for k in found:  # several fit by shape: tell them apart by their values (reads the device)
            if all(_same_cond(c.get(key), entry, rows, value) for key, value in self.entries[k].conditioning.items()):
                return k
        return None

    def add(self, label: int, k: int, prediction: torch.Tensor) -> None:
        e = self.entries[k]
        _region(self.acc[label], e.area).add_(prediction * e.mult)
        _region(self.count[label], e.area).add_(e.mult)
        self.done[(label, k)] = True
        if all(self.done.values()):
            self.closed = True

    def result(self, label: int = 1) -> torch.Tensor:
        return self.acc[label] / self.count[label]


def _region(t: torch.Tensor, area):
    """The part of ``t`` an area covers: ``(sizes..., offsets...)`` as both hosts store it; None = all."""
    if area is None:
        return t
    dims = len(area) // 2
    for i in range(dims):
        t = t.narrow(i + 2, int(area[dims + i]), int(area[i]))
    return t


def _cond_part(chunk, entry: int, rows: int, condition):
    """``(the call's rows of this entry, the entry's own value)`` ready to compare, or None when their
    shapes cannot match; a non-tensor condition is returned as ``(chunk, value)`` for ``==``."""
    value = getattr(condition, "cond", condition)
    if not torch.is_tensor(value):
        return None if torch.is_tensor(chunk) else (chunk, value)
    if not torch.is_tensor(chunk) or chunk.ndim != value.ndim:
        return None
    part = chunk[entry * rows:(entry + 1) * rows]
    if part.shape != value.shape:
        # cross-attention conds of different token counts are concatenated repeated to a common length
        if value.ndim != 3 or part.shape[0] != value.shape[0] or part.shape[2] != value.shape[2] or part.shape[1] % value.shape[1]:
            return None
        value = value.repeat(1, part.shape[1] // value.shape[1], 1)
    return part, value


def _cond_fits(chunk, entry: int, rows: int, condition) -> bool:
    """Whether the entry's condition can be these rows of the call's (shapes only; no device data)."""
    pair = _cond_part(chunk, entry, rows, condition)
    if pair is None:
        return False
    part, value = pair
    return torch.is_tensor(part) or part == value


def _cond_differs(chunk, entry: int, rows: int, condition):
    """A device bool: whether these rows of the call's condition differ from the entry's (None: nothing to
    compare). Does not wait for the device."""
    pair = _cond_part(chunk, entry, rows, condition)
    if pair is None or not torch.is_tensor(pair[0]):
        return None
    part, value = pair
    return (part != value.to(part.device, part.dtype)).flatten().any()


def _same_cond(chunk, entry: int, rows: int, condition) -> bool:
    """Whether these rows of the call's condition equal the entry's (reads the device)."""
    pair = _cond_part(chunk, entry, rows, condition)
    if pair is None:
        return False
    part, value = pair
    if not torch.is_tensor(part):
        return part == value
    return torch.equal(part, value.to(part.device, part.dtype))


# --- the job -----------------------------------------------------------------------------------------

class ForgeJob:
    """Everything PAG keeps for one processing object on a Forge-family host."""

    def __init__(self, p, params: PagParams, host: HostApi | None):
        self.p_ref = weakref.ref(p)
        self.params = params
        self.host = host
        self.perturbations = perturbations_for(params, int(getattr(p, "seed", 0) or 0))
        self.active = True
        self.refused: str | None = None
        self.selections: dict | None = None  # guidance index -> LayerSelection on the diffusion model below
        self.selection_of: int | None = None  # id() of the diffusion model the selections were resolved on
        self.diffusion_model = None  # weak reference to the UNet the selections were resolved on
        self.grids = TokenGrids()  # blur / SEG: the true token grid of each perturbed attention call
        self.perturbed_calls = 0  # patched attn1 / block calls that perturbed marked rows
        self.calls_by_label = collections.Counter()  # the attn1 patches' perturbed calls per guidance
        self.neighbor_mode: str | None = None  # None: not checked yet; "checked"; "separate" (neighbors.py)
        self.fork_point = None  # forge_fork: where the twins join (batched mode, on a host with a fork route)
        self.fork_stages = None  # forge_fork: every guidance's join point (fork.fork_stages)
        self.step: Step | None = None
        self.calls = 0  # denoiser calls seen in this pass (schedule fallback)
        self.pass_counter = PassCounter()  # where a call stands in its sampling pass (the step window)
        self.log: list = []  # (step, total, sigma, scale, how) per post-CFG call: for debugging and tests
        self.images: tuple = ()  # per image of the batch: the key its random draws start from (job.image_keys)
        self.draw: tuple = ()  # the denoiser call's draw key: (hires pass, model call index)
        self.fork_checks = ForkChecks()  # the fork's deferred twin-input checks, read once per step
        self.applied_calls = 0  # model calls whose output got PAG's term
        self.perturbed_rows = 0  # perturbed rows computed over the job (the console line)
        self.fork_off: str | None = None  # why the shared-prefix fork is off on a host that has one

    @property
    def p(self):
        return self.p_ref()

    @property
    def live(self) -> bool:
        return self.active and self.refused is None and self.p is not None

    @property
    def perturbation(self) -> Perturbation:
        """The main guidance's perturbation."""
        return self.perturbations[1]

    @property
    def selection(self) -> LayerSelection | None:
        """The main guidance's layers."""
        return None if self.selections is None else self.selections[1]

    def refuse(self, reason: str, level: int = logging.WARNING) -> None:
        if self.refused is None:
            self.refused = reason
            announce_refusal(self.p, reason, level, applied_calls=self.applied_calls)
        self.step = None

    def keys(self):
        """``((block, id, transformer index), strength)`` of every chosen attn1 of the main guidance."""
        return [((layer.host_block[0], layer.host_block[1], layer.transformer), s) for layer, s in self.selection.chosen]

    def scales_at(self, sigma) -> tuple[dict, int, int, float | None]:
        """``({guidance: scale ≠ 0}, call index, model calls of this pass, sigma)`` for the denoiser call in
        progress.

        The step window counts the model calls the sampling pass really makes (``calls.PassCounter``, from
        the sampler's own schedule: Forge 2 and reForge sample with A1111's ``modules/sd_samplers_*.py``
        classes); the CFG denoiser's ``step / total_steps`` where that count cannot be known; without those
        counters, this job's own count of denoiser calls over ``p.steps``."""
        p = self.p
        sampler = getattr(p, "sampler", None)
        den = getattr(sampler, "model_wrap_cfg", None)
        where = self.pass_counter.at(p, sampler, den) if den is not None else None
        step, total = (where.index, where.total) if where is not None else (None, None)
        if not isinstance(step, int) or not total:
            step, total = self.calls, int(getattr(p, "steps", 0) or 0) or 1
        guidances = self.params.guidances()
        # the sigma window needs this call's sigma: a read of the device, only then (and for the debug log)
        value = None
        if any(g.sigma_start or g.sigma_end for g in guidances) or log.isEnabledFor(logging.DEBUG):
            value = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        hires = bool(getattr(p, "is_hr_pass", False))
        scales = {}
        for g in guidances:
            scale = scale_for_step(g, step=step, total_steps=total, sigma=value, hires=hires)
            if scale != 0:
                scales[g.index] = scale
        return scales, step, total, value

    def scale_at(self, sigma) -> tuple[float, int, int, float | None]:
        """``(the main guidance's scale, call index, model calls of this pass, sigma)`` (see ``scales_at``)."""
        scales, step, total, value = self.scales_at(sigma)
        return scales.get(1, 0.0), step, total, value

    @contextlib.contextmanager
    def watching_grids(self):
        """Blur / SEG only: the token grid of every chosen attn1 is read off its spatial transformer's input."""
        unet = self.diffusion_model() if self.diffusion_model is not None else None
        layers = [layer for label, selection in (self.selections or {}).items() if self.perturbations[label].needs_grid
                  for layer, _ in selection.chosen]
        if unet is None or not layers:
            yield
            return
        with self.grids.watching(unet, layers):
            yield

    @contextlib.contextmanager
    def shuffling(self, labels=None):
        """TPG only: the chosen transformer blocks shuffle the marked rows' tokens (instance wrappers, always
        removed) while the UNet calls inside run; their rows come from each call's ``transformer_options``."""
        unet = self.diffusion_model() if self.diffusion_model is not None else None
        branches = [Branch(label, selection, self.perturbations[label]) for label, selection in (self.selections or {}).items()
                    if self.perturbations[label].level == "block" and (labels is None or label in labels)]
        if unet is None or not branches:
            yield None
            return
        with AttentionPatch(unet, branches=branches, levels=("block",), layout_of=rows_of_block_call) as patch:
            yield patch

    def owns(self, patcher) -> bool:
        """Whether ``patcher`` (or a clone of it someone made) already carries this job's functions."""
        options = getattr(patcher, "model_options", None) or {}
        return any(getattr(fn, "__pag_job__", None) is self for fn in options.get("sampler_post_cfg_function", []))


def diffusion_model_of(sd_model):
    """The UNet module of a Forge-family model (``forge_objects.unet.model.diffusion_model``), else None."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    return getattr(getattr(unet, "model", None), "diffusion_model", None)


def job_of(p) -> ForgeJob | None:
    job = getattr(p, JOB_ATTR, None)
    return job if isinstance(job, ForgeJob) and job.p is p else None


# --- the script hooks --------------------------------------------------------------------------------

def apply(p, args) -> ForgeJob | None:
    """``process_before_every_sampling``: (re)install PAG on a clone of the pass's UNet patcher.

    Idempotent: a second call while ``forge_objects.unet`` is already this job's clone does nothing;
    after the host reset ``forge_objects`` (Forge's hires pass does, twice) it installs again.
    Errors are reported (log, comment, infotext), never raised.
    """
    sd_model = getattr(p, "sd_model", None)
    if not hasattr(sd_model, "forge_objects"):
        return None
    job = job_of(p)
    if job is None:
        job = _start(p, args)
        if job is None:
            return None
    if job.live and job.params.enabled and job.neighbor_mode is None:
        job.neighbor_mode = check_neighbors(p, job.params, job.refuse) or "checked"
    if not job.live or not job.params.enabled:
        return job
    unet = sd_model.forge_objects.unet
    if job.owns(unet):
        return job
    if job.host is None:
        job.refuse(f"cannot use the UNet patcher API of this host ({detect_host()})")
        return job
    diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    if diffusion_model is None or not hasattr(diffusion_model, "input_blocks"):
        write_infotext(p, PagParams())
        job.refuse("this model has no UNet of the latent-diffusion family")
        return job
    if job.selections is None or job.selection_of != id(diffusion_model):
        try:
            job.selections = resolve_guidances(job.params, build_catalog(diffusion_model))
            job.selection_of = id(diffusion_model)
            job.diffusion_model = weakref.ref(diffusion_model)
        except PagError as err:
            write_infotext(p, PagParams())
            job.refuse(str(err), logging.ERROR)
            return job
    seeds = getattr(p, "seeds", None)
    for perturbation in job.perturbations.values():
        perturbation.reseed(int(seeds[0]) if seeds else int(getattr(p, "seed", 0) or 0))
    job.images = image_keys(p)
    job.step, job.calls = None, 0
    clone = unet.clone()
    _install(clone, job)
    sd_model.forge_objects.unet = clone
    _note_refiner(p)
    log.debug("PAG on (%s): scale %g, %s on %s (%d attn1: %s), %s mode%s%s", job.host.kind, job.params.scale,
              job.params.method, job.selection.catalog.arch, len(job.selection.chosen), job.params.layers, _mode(job),
              ", hires pass" if getattr(p, "is_hr_pass", False) else "", more_guidances(job.params))
    return job


def end(p) -> None:
    """``postprocess``: the job's one console line (INFO, ``job.job_summary``; a refused job said why in its
    own line already), then drop the job; functions still installed on a patcher become pass-throughs."""
    job = job_of(p)
    if job is not None and job.live and job.params.enabled and job.selection is not None and job.log:
        used = [how for *_, scale, how in job.log if scale]
        fork = ("fork before " + ", ".join(str(point) for point, _ in job.fork_stages) if job.fork_stages else
                f"no fork ({job.fork_off or ('separate mode' if _mode(job) == 'separate' else 'the first perturbed layer is on the down path')})")
        log.info("%s", job_summary(job.params, arch=job.selection.catalog.arch, n_layers=len(job.selection.chosen),
                                   modes=used or [_mode(job)], calls_with_pag=len(used), calls=len(job.log),
                                   rows=job.perturbed_rows, fork=fork, p=p))
    if job is not None:
        job.active = False
        job.step = None
    if JOB_ATTR in getattr(p, "__dict__", {}):
        delattr(p, JOB_ATTR)


def start(p, args) -> ForgeJob | None:
    """``process``: read and check the settings before the job samples anything.

    Forge 2 and reForge load the job's model before ``process`` (Forge 2: ``manage_model_and_prompt_cache``),
    so the layers are checked against it here. A bad setting while PAG is on stops the job
    (``job.refuse_job``: the host shows the error where the image would be); ``apply`` then never runs.
    """
    sd_model = getattr(p, "sd_model", None)
    if not hasattr(sd_model, "forge_objects"):
        return None
    job = _start(p, args, at_process=True)
    unet = diffusion_model_of(sd_model)
    if job.live and job.params.enabled and unet is not None and hasattr(unet, "input_blocks"):
        try:
            resolve_guidances(job.params, build_catalog(unet))
        except PagError as err:
            write_infotext(p, PagParams())
            refuse_job(p, err)
            job.refused = str(err)
    return job


def _start(p, args, at_process: bool = False) -> ForgeJob:
    params = start_params(p, args)
    job = ForgeJob(p, params or PagParams(), host_api())
    error = refusal_of(p)
    if error is not None:
        if at_process:
            job.refused = str(error)  # the job stops at p.sample; nothing else to say
        else:  # already sampling: the image comes without PAG, and says why
            job.refuse(str(error), logging.ERROR)
    setattr(p, JOB_ATTR, job)
    return job


def _mode(job: ForgeJob) -> str:
    if job.neighbor_mode == "separate":
        return "separate"
    return "batched" if job.params.mode == "batched" and job.host.gate is not None else "separate"


def _note_refiner(p) -> None:
    """Forge/reForge reload the model at the refiner switch without re-running this hook: PAG ends there."""
    switch = getattr(p, "refiner_switch_at", None)
    if getattr(p, "refiner_checkpoint_info", None) is not None and switch is not None and switch < 1:
        extra = getattr(p, "extra_generation_params", None)
        if isinstance(extra, dict) and REFINER_NOTE not in str(extra.get(NOTE_KEY, "")):
            write_note(p, REFINER_NOTE, keep_settings=True)
            log.warning("PAG: the refiner switch at %g reloads the model without the PAG patches; PAG %s", switch, REFINER_NOTE)


# --- installation ----------------------------------------------------------------------------------

def _install(unet, job: ForgeJob) -> None:
    """Add the gate, the row wrapper (batched, with the shared-prefix fork where the host has a route for
    it) and the post-CFG function to ``unet`` (this job's clone)."""
    options = unet.model_options
    job.fork_point = job.fork_stages = None
    if _mode(job) == "batched":
        job.fork_stages = forge_fork.block_stages(job.selections) if job.host.fork else None
        job.fork_point = job.fork_stages[0][0] if job.fork_stages else None
        if job.fork_point is not None and job.host.fork == "object_patch":
            reason = forge_fork.install_object_patch(unet, lambda: job.live)
            if reason is not None:
                log.debug("PAG: no shared-prefix fork (%s); the twins run the whole UNet", reason)
                job.fork_point = job.fork_stages = None
                job.fork_off = reason
        wrapper = _make_unet_wrapper(job, options.get("model_function_wrapper"))
        unet.set_model_unet_function_wrapper(wrapper)
        if job.host.gate == "pre_cfg":
            unet.set_model_sampler_pre_cfg_function(_make_pre_cfg(job))
        else:
            unet.set_model_sampler_calc_cond_batch_function(
                _make_calc_cond_batch(job, options.get("sampler_calc_cond_batch_function")))
        if hasattr(unet, "set_memory_peak_estimation_modifier"):
            unet.set_memory_peak_estimation_modifier(
                _make_memory_estimate(unet, options.get("memory_peak_estimation_modifier"), len(job.params.guidances())))
    unet.set_model_sampler_post_cfg_function(_make_post_cfg(job))


def _make_memory_estimate(unet, previous, guidances: int = 1):
    """``memory_peak_estimation_modifier``: the host reserves memory for its ``[2·B, C, H, W]`` cond + uncond
    batch before sampling; the batched twins add one row per cond row and guidance, so count ``(2 + g)·B`` rows
    (chained to a modifier another extension set)."""

    def estimate(shape):
        shape = list(shape)
        rows = shape[0] + guidances * ((shape[0] + 1) // 2)
        return (previous if previous is not None else unet.memory_required)([rows] + shape[1:])

    estimate.__pag_memory__ = True
    return estimate


def _tag(fn, job):
    fn.__pag_job__ = job
    return fn


def _make_pre_cfg(job: ForgeJob):
    """Forge 2 ``sampler_pre_cfg_function``: runs right before ``calc_cond_uncond_batch``; opens the gate."""

    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        _open_step(job, cond, x, timestep)
        return model, cond, uncond, x, timestep, model_options

    return _tag(pre_cfg, job)


def _make_calc_cond_batch(job: ForgeJob, previous):
    """reForge ``sampler_calc_cond_batch_function``: the gate is open exactly around the batched call."""

    def calc_cond_batch(args):
        conds = args["conds"]
        _open_step(job, conds[0] or [], args["input"], args["sigma"])
        try:
            if previous is not None:
                return previous(args)
            from ldm_patched.modules import samplers

            return samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])
        finally:
            if job.step is not None:
                job.step.closed = True

    return _tag(calc_cond_batch, job)


def _open_step(job: ForgeJob, cond, x, sigma) -> None:
    job.step = None
    if not job.live:
        return
    scales, index, _, _ = job.scales_at(sigma)
    job.draw = (int(bool(getattr(job.p, "is_hr_pass", False))), int(index))
    if scales and cond:
        job.step = Step(job.host, scales, cond, x, sigma)


def _make_unet_wrapper(job: ForgeJob, previous):
    """``model_function_wrapper``: perturbed twins of the cond entries ride in the host's UNet call, one block
    of twins per guidance active at this step."""

    def run(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        step = job.step if job.live else None
        c = args["c"]
        if step is None or step.closed or MARK in c.get("transformer_options", {}):
            return run(apply_model, args)
        cond_or_uncond = list(args["cond_or_uncond"])
        x = args["input"]
        n = len(cond_or_uncond)
        if n == 0 or x.shape[0] % n:
            return run(apply_model, args)
        rows = x.shape[0] // n
        uuids = c.get("transformer_options", {}).get("uuids")
        matches, taken = [], set()
        for entry, kind in enumerate(cond_or_uncond):
            if kind != 0:
                continue
            uuid = uuids[entry] if isinstance(uuids, (list, tuple)) and len(uuids) == n else None
            k = step.match(c, entry, rows, x[entry * rows:(entry + 1) * rows], taken, uuid)
            if k is not None:
                matches.append((entry, k))
                taken.add(k)
        if not matches:
            return run(apply_model, args)
        total = x.shape[0]
        labels = step.labels
        layout = twin_layout(total, rows, tuple(matches), job.images, labels)
        twins = _twin_rows(layout, total)
        blocks = [(label, e, k) for label in labels for e, k in matches]  # the twin blocks, in order
        host_options = c.get("transformer_options", {})
        twinned = {key: (value if key in ("transformer_options", "control_model") else _twin(value, twins, total))
                   for key, value in c.items()}
        twinned["transformer_options"] = _call_options(job, host_options, cond_or_uncond, [e for _, e, _ in blocks],
                                                       rows, PagRows(layout, job.draw), labels)
        if job.fork_stages:
            to = twinned["transformer_options"]

            def stage_options(stage_layout):
                """PAG's keys for a stage's rows: the host's, then the twin blocks of the guidances joined so far."""
                joined = [lab for lab in labels if lab in stage_layout.labels]
                part = [e for lab, e, _ in blocks if lab in joined]
                return _call_options(job, host_options, cond_or_uncond, part, rows, PagRows(stage_layout, job.draw),
                                     tuple(joined))

            to[forge_fork.FORK_KEY] = forge_fork.ForkPlan.between(job.fork_stages, layout, host_options, to,
                                                                  job.fork_checks, stage_options)
            if job.host.fork == "wrapper":
                forge_fork.add_wrapper(to, lambda: job.live)
        new_args = dict(args)
        new_args.update(input=_twin(x, twins, total), timestep=_twin(args["timestep"], twins, total), c=twinned,
                        cond_or_uncond=cond_or_uncond + [0] * len(blocks))
        before = collections.Counter(job.calls_by_label)
        with job.watching_grids(), job.shuffling(labels) as shuffle:
            out = run(apply_model, new_args)
        reason = never_called(job.params, labels, _calls_since(job, before, shuffle))
        if reason is not None:
            job.refuse(reason)
            return out[:total]
        for i, (label, _, k) in enumerate(blocks):
            step.add(label, k, out[total + i * rows:total + (i + 1) * rows])
        step.matched.update(k for _, k in matches)
        return out[:total]

    return _tag(wrapper, job)


@functools.lru_cache(maxsize=256)
def twin_layout(total: int, rows: int, matches: tuple, images: tuple, labels: tuple = (1,)) -> RowLayout:
    """The host's ``total`` rows, then per guidance in ``labels`` a twin of each matched entry's ``rows`` rows
    (``matches``: ``(entry in the call, its index in the step's cond list)``): twin row ``r`` of an entry copies
    that entry's row ``r`` and draws with image ``r``'s key, the entry's index and the guidance."""
    sources = [e * rows + r for _ in labels for e, _ in matches for r in range(rows)]
    twin_labels = [label for label in labels for _ in matches for _ in range(rows)]
    keys = None
    if len(images) == rows:
        keys = (None,) * total + tuple(images[r] + (k, label) for label in labels for _, k in matches for r in range(rows))
    return RowLayout((0,) * total + tuple(twin_labels), tuple(range(total)) + tuple(sources), keys)


def _twin_rows(layout: RowLayout, total: int) -> Rows:
    """The source rows of the twins, in order (contiguous per entry: taken as views)."""
    return Rows(layout.sources[total:])


def _twin(value, twins: Rows, total: int):
    """``value`` with the rows ``twins`` appended, for every per-row tensor (also inside dicts/lists: ControlNet)."""
    if torch.is_tensor(value):
        if value.ndim >= 1 and value.shape[0] == total:
            return torch.cat([value, twins.take(value)])
        return value
    if isinstance(value, dict):
        return {k: _twin(v, twins, total) for k, v in value.items()}
    if isinstance(value, list):
        return [_twin(v, twins, total) for v in value]
    if isinstance(value, tuple):
        return tuple(_twin(v, twins, total) for v in value)
    return value


def _call_options(job: ForgeJob, options: dict, cond_or_uncond: list, twinned: list, rows: int, marks: PagRows,
                  labels: tuple = (1,)) -> dict:
    """This UNet call's transformer_options: row bookkeeping for the longer batch (``twinned``: the entry each
    twin block copies), the mark, the attn1 patches of the guidances in ``labels``."""
    to = dict(options)
    new_cu = cond_or_uncond + [0] * len(twinned)
    to["cond_or_uncond"] = new_cu
    if "uuids" in to:
        to["uuids"] = list(to["uuids"]) + [to["uuids"][e] for e in twinned]
    if "cond_mark" in to:  # Forge 2: one entry per row; the twins are cond rows (0), appended on the device
        mark = to["cond_mark"]
        if torch.is_tensor(mark) and mark.ndim == 1 and mark.shape[0] == len(cond_or_uncond) * rows:
            to["cond_mark"] = torch.cat([mark, mark.new_zeros(len(twinned) * rows)])
        else:
            sigmas = to.get("sigmas")
            marks_list = [float(cu) for cu in new_cu for _ in range(rows)]
            to["cond_mark"] = torch.tensor(marks_list).to(sigmas) if torch.is_tensor(sigmas) else torch.tensor(marks_list)
    if "cond_indices" in to or "uncond_indices" in to:
        to["cond_indices"] = [i * rows + r for i, cu in enumerate(new_cu) if cu == 0 for r in range(rows)]
        to["uncond_indices"] = [i * rows + r for i, cu in enumerate(new_cu) if cu != 0 for r in range(rows)]
    holder = {"transformer_options": to}
    _add_patches(job, holder, labels)
    holder["transformer_options"][MARK] = marks
    return holder["transformer_options"]


def _add_patches(job: ForgeJob, model_options: dict, labels: tuple = (1,)) -> None:
    """attn1 replace patches through the host's ``set_model_options_patch_replace`` (it copies the dicts it
    changes), for the attention guidances in ``labels`` (TPG acts on blocks: ``ForgeJob.shuffling``)."""
    per_key: dict = {}
    for label in labels:
        if job.perturbations[label].level != "attn1":
            continue
        for layer, strength in job.selections[label].chosen:
            key = (layer.host_block[0], layer.host_block[1], layer.transformer)
            entry = per_key.setdefault(key, [layer, []])
            entry[1].append((label, float(strength)))
    for key, (layer, strengths) in per_key.items():
        existing = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        previous = existing.get(key, existing.get(key[:2]))
        job.host.set_patch_replace(model_options, _make_attn1_patch(job, previous, tuple(strengths), layer_key(layer.path)),
                                   "attn1", *key)


class _Projected:
    """Stands in for an attention module whose q/k/v are already projected (what a replace patch gets)."""

    def __init__(self, q, k, v, heads):
        self._q, self._k, self._v, self.heads = q, k, v, heads

    def to_q(self, _):
        return self._q

    def to_k(self, _):
        return self._k

    def to_v(self, _):
        return self._v

    def to_out(self, t):
        return t


def _make_attn1_patch(job: ForgeJob, previous, strengths, layer_key: int = 0):
    """attn1 replace patch: marked rows of guidance ``g`` get ``(1−a)·attn + a·perturbed`` before ``to_out``
    (linear: the same as mixing after it; ``strengths``: ``((g, a), ...)`` at this layer); other rows go to the
    patch that was there, or the host's attention. The rows come from the call's ``PagRows`` (host-side): no
    device data is read."""
    if isinstance(strengths, (int, float)):
        strengths = ((1, float(strengths)),)

    def through(q, k, v, extra):
        if previous is not None:
            return previous(q, k, v, extra)
        return job.host.attention(q, k, v, extra["n_heads"], extra)

    def patch(q, k, v, extra):
        mark = extra.get(MARK)
        if mark is None or not job.live:
            return through(q, k, v, extra)
        shape = extra.get("original_shape")
        layout = mark.layout_for(q.shape[0], int(shape[0]) if shape else None)
        plan = module_plan(layout, strengths)
        if plan is None:
            return through(q, k, v, extra)
        job.perturbed_calls += 1
        for branch in plan.branches:
            job.calls_by_label[branch.label] += 1
        grid = job.grids.grid_for(q.shape[1])
        heads = extra["n_heads"]
        outputs = [None]
        if plan.own is not None:
            own = plan.own
            if previous is None:
                outputs[0] = job.host.attention(own.take(q), own.take(k), own.take(v), heads, extra)
            else:  # someone else's patch gets the whole batch, as without PAG; PAG's rows are replaced after
                outputs[0] = own.take(previous(q, k, v, extra))
        for branch in plan.branches:
            rows = branch.rows
            perturbed = job.perturbations[branch.label](
                _Projected(rows.take(q), rows.take(k), rows.take(v), heads), rows.take(q), grid=grid,
                keys=_draw_keys(layout, rows, mark.draw, layer_key))
            if branch.strength < 1.0:
                a = branch.strength
                perturbed = ((1.0 - a) * promote(branch.in_own.take(outputs[0])) + a * promote(perturbed)).to(outputs[0].dtype)
            outputs.append(perturbed)
        dtype = outputs[0].dtype if outputs[0] is not None else outputs[1].dtype
        return assemble(plan, [o if o is None or o.dtype == dtype else o.to(dtype) for o in outputs])

    patch.__pag_patch__ = True
    return patch


def _make_post_cfg(job: ForgeJob):
    """``sampler_post_cfg_function``: ``denoised + Σ_g s_g·(cond_denoised − perturbed_g)`` (each guidance's
    rescale after its term)."""

    def post_cfg(args):
        denoised = args["denoised"]
        step, job.step = job.step, None
        if not job.live:
            return denoised
        scales, n, total, sigma = job.scales_at(args["sigma"])
        job.calls += 1
        if not scales:
            job.log.append((n, total, sigma, 0.0, "off"))
            return denoised
        cond_denoised = args["cond_denoised"]
        if job.fork_checks.failed():  # one read of the device per step, after the UNet calls
            _stop_forking(job, n)
        for perturbation in job.perturbations.values():
            flush_notes(job.p, perturbation)
        matched = step is not None and step.complete and step.scales == scales
        if matched and step.checks.failed():
            log.warning("PAG: a perturbed twin was matched to the wrong cond entry (another UNet call during the "
                        "step); separate call this step")
            matched = False
        if not matched and _mode(job) == "batched":
            log.debug("PAG: the perturbed rows did not come back from the batched call; separate call this step")
        # the host's CFG is cfg·Σ strength·(cond average − uncond) (its edit_strength): weigh PAG's term the
        # same way, so s·Σ w·(cond − perturbed) as on A1111 — one meaning of AND on every host
        weight = and_weight(args.get("cond"))
        rescale = {g.index: g.rescale for g in job.params.guidances()}
        guided = promote(denoised)
        cond = promote(cond_denoised)
        for label, scale in scales.items():
            perturbed = step.result(label) if matched else _separate(job, args, label)
            if not job.live:
                return denoised
            guided = guided + scale * weight * (cond - promote(perturbed))
            if rescale[label]:
                guided = rescale_guided(guided, cond, rescale[label])
        how = "batched" if matched else "separate"
        job.log.append((n, total, sigma, sum(scales.values()), how))
        job.applied_calls += 1
        job.perturbed_rows += len(scales) * (sum(int(e.input_x.shape[0]) for e in step.entries) if matched
                                             else int(args["input"].shape[0]) * max(1, len(args.get("cond") or ())))
        return guided.to(denoised.dtype)

    return _tag(post_cfg, job)


def _stop_forking(job: ForgeJob, call: int) -> None:
    """A forked call's twin had inputs other than its cond entry's: the fork is off for the rest of the job
    (log and ``PAG note``; that call's twins shared their cond rows' prefix)."""
    job.fork_checks.failed_at = f"model call {call}"
    job.fork_point = None
    note = (f"shared-prefix fork off from model call {call}: a perturbed twin's inputs differed from its cond row's "
            "(another extension changed them after PAG built the twins); that call's twins shared the cond rows' prefix")
    log.warning("PAG: %s", note)
    write_note(job.p, note, keep_settings=True)


def and_weight(cond) -> float:
    """Σ of the AND sub-prompts' strengths of one image (the host's ``edit_strength``); 1 without them."""
    try:
        return float(sum(entry.get("strength", 1.0) for entry in cond)) if cond else 1.0
    except (TypeError, AttributeError):
        return 1.0


def _separate(job: ForgeJob, args, label: int = 1) -> torch.Tensor:
    """The cond entries once more in their own call, every row perturbed by guidance ``label``, on a copy of
    model_options."""
    options = dict(args["model_options"])
    options["transformer_options"] = dict(options.get("transformer_options", {}))
    _add_patches(job, options, (label,))
    options["transformer_options"][MARK] = PagRows(None, job.draw, job.images, int(args["input"].shape[0]), label)
    before = collections.Counter(job.calls_by_label)
    with job.watching_grids(), job.shuffling((label,)) as shuffle:
        out = job.host.cond_prediction(args["model"], args["cond"], args["input"], args["sigma"], options)
    reason = never_called(job.params, (label,), _calls_since(job, before, shuffle))
    if reason is not None:
        job.refuse(reason)
    return out


def _calls_since(job: ForgeJob, before, shuffle) -> collections.Counter:
    """Perturbed module calls per guidance since ``before`` (attn1 patches), plus the TPG block wrappers'."""
    calls = collections.Counter(job.calls_by_label)
    calls.subtract(before)
    if shuffle is not None:
        calls.update(shuffle.calls_by_label)
    return calls


__all__ = ["A1111", "FORGE2", "REFORGE", "ForgeJob", "HostApi", "PagRows", "apply", "detect_host", "diffusion_model_of", "end", "host_api",
           "is_forge_host", "job_of", "start"]
