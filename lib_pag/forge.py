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

import contextlib
import dataclasses
import importlib
import inspect
import logging
import weakref
from typing import Callable

import torch

from . import forge_fork
from .job import (NEVER_CALLED, NOTE_KEY, announce_refusal, check_neighbors, job_summary, refusal_of, refuse_job,
                  start_params, write_infotext)
from .errors import PagError
from .calls import PassCounter
from .guidance import rescale_guided, scale_for_step
from .layers import LayerSelection, build_catalog, resolve_layers
from .params import PagParams
from .patch import TokenGrids, fit_rows
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
    """The ``transformer_options[MARK]`` of a UNet call: its perturbed rows (``mask`` None = all rows)."""

    mask: torch.Tensor | None = None

    def rows_for(self, batch: int, unet_rows: int | None = None) -> torch.Tensor:
        """``unet_rows``: the UNet call's batch (``original_shape[0]``; MultiDiffusion tiles the batch)."""
        if self.mask is None:
            return torch.ones(batch, dtype=torch.bool)
        return fit_rows(self.mask, batch, unet_rows)


class Step:
    """One sampling-function call with PAG rows: the host's cond entries and their twins' running sum."""

    def __init__(self, host: HostApi, scale: float, cond: list, x: torch.Tensor, sigma: torch.Tensor):
        self.scale = scale
        self.sigma = sigma
        self.entries = [e for e in (host.get_area_and_mult(c, x, sigma) for c in cond) if e is not None]
        self.done = [False] * len(self.entries)
        self.acc = torch.zeros_like(x)
        self.count = torch.ones_like(x) * 1e-37  # as the host: uncovered pixels end up 0
        self.closed = not self.entries

    @property
    def complete(self) -> bool:
        return bool(self.entries) and all(self.done)

    def match(self, c: dict, entry: int, rows: int, x_rows: torch.Tensor, taken: set) -> int | None:
        """The cond entry whose conditioning equals entry ``entry`` (``rows`` rows) of the call's ``c``."""
        for k, e in enumerate(self.entries):
            if self.done[k] or k in taken or tuple(e.input_x.shape) != tuple(x_rows.shape):
                continue
            if all(_same_cond(c.get(key), entry, rows, value) for key, value in e.conditioning.items()):
                return k
        return None

    def add(self, k: int, prediction: torch.Tensor) -> None:
        e = self.entries[k]
        _region(self.acc, e.area).add_(prediction * e.mult)
        _region(self.count, e.area).add_(e.mult)
        self.done[k] = True
        if all(self.done):
            self.closed = True

    def result(self) -> torch.Tensor:
        return self.acc / self.count


def _region(t: torch.Tensor, area):
    """The part of ``t`` an area covers: ``(sizes..., offsets...)`` as both hosts store it; None = all."""
    if area is None:
        return t
    dims = len(area) // 2
    for i in range(dims):
        t = t.narrow(i + 2, int(area[dims + i]), int(area[i]))
    return t


def _same_cond(chunk, entry: int, rows: int, condition) -> bool:
    value = getattr(condition, "cond", condition)
    if not torch.is_tensor(value):
        return chunk == value if not torch.is_tensor(chunk) else False
    if not torch.is_tensor(chunk) or chunk.ndim != value.ndim:
        return False
    part = chunk[entry * rows:(entry + 1) * rows]
    if part.shape != value.shape:
        # cross-attention conds of different token counts are concatenated repeated to a common length
        if value.ndim != 3 or part.shape[0] != value.shape[0] or part.shape[2] != value.shape[2] or part.shape[1] % value.shape[1]:
            return False
        value = value.repeat(1, part.shape[1] // value.shape[1], 1)
    return torch.equal(part, value.to(part.device, part.dtype))


# --- the job -----------------------------------------------------------------------------------------

class ForgeJob:
    """Everything PAG keeps for one processing object on a Forge-family host."""

    def __init__(self, p, params: PagParams, host: HostApi | None):
        self.p_ref = weakref.ref(p)
        self.params = params
        self.host = host
        self.perturbation = Perturbation(params.method, params.blur_sigma, params.noise_scale, int(getattr(p, "seed", 0) or 0))
        self.active = True
        self.refused: str | None = None
        self.selection: LayerSelection | None = None
        self.selection_of: int | None = None  # id() of the diffusion model the selection was resolved on
        self.diffusion_model = None  # weak reference to the UNet the selection was resolved on
        self.grids = TokenGrids()  # blur: the true token grid of each perturbed attention call
        self.perturbed_calls = 0  # attn1 replace-patch calls that perturbed marked rows
        self.neighbor_mode: str | None = None  # None: not checked yet; "checked"; "separate" (neighbors.py)
        self.fork_point = None  # forge_fork: where the twins join (batched mode, on a host with a fork route)
        self.step: Step | None = None
        self.calls = 0  # denoiser calls seen in this pass (schedule fallback)
        self.pass_counter = PassCounter()  # where a call stands in its sampling pass (the step window)
        self.log: list = []  # (step, total, sigma, scale, how) per post-CFG call: for debugging and tests
        self.perturbed_rows = 0  # perturbed rows computed over the job (the console line)
        self.fork_off: str | None = None  # why the shared-prefix fork is off on a host that has one

    @property
    def p(self):
        return self.p_ref()

    @property
    def live(self) -> bool:
        return self.active and self.refused is None and self.p is not None

    def refuse(self, reason: str, level: int = logging.WARNING) -> None:
        if self.refused is None:
            self.refused = reason
            announce_refusal(self.p, reason, level)
        self.step = None

    def keys(self):
        """``((block, id, transformer index), strength)`` of every chosen attn1."""
        return [((layer.host_block[0], layer.host_block[1], layer.transformer), s) for layer, s in self.selection.chosen]

    def scale_at(self, sigma) -> tuple[float, int, int, float]:
        """``(scale, call index, model calls of this pass, sigma)`` for the denoiser call in progress.

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
        value = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        scale = scale_for_step(self.params, step=step, total_steps=total, sigma=value, hires=bool(getattr(p, "is_hr_pass", False)))
        return scale, step, total, value

    @contextlib.contextmanager
    def watching_grids(self):
        """Blur only: the token grid of every chosen attn1 is read off its spatial transformer's input."""
        unet = self.diffusion_model() if self.diffusion_model is not None else None
        if unet is None or not self.perturbation.needs_grid:
            yield
            return
        with self.grids.watching(unet, [layer for layer, _ in self.selection.chosen]):
            yield

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
    if job.selection is None or job.selection_of != id(diffusion_model):
        try:
            job.selection = resolve_layers(job.params.layers, build_catalog(diffusion_model))
            job.selection_of = id(diffusion_model)
            job.diffusion_model = weakref.ref(diffusion_model)
        except PagError as err:
            write_infotext(p, PagParams())
            job.refuse(str(err), logging.ERROR)
            return job
    seeds = getattr(p, "seeds", None)
    job.perturbation.reseed(int(seeds[0]) if seeds else int(getattr(p, "seed", 0) or 0))
    job.step, job.calls = None, 0
    clone = unet.clone()
    _install(clone, job)
    sd_model.forge_objects.unet = clone
    _note_refiner(p)
    log.debug("PAG on (%s): scale %g, %s on %s (%d attn1: %s), %s mode%s", job.host.kind, job.params.scale, job.params.method,
             job.selection.catalog.arch, len(job.selection.chosen), job.params.layers, _mode(job),
             ", hires pass" if getattr(p, "is_hr_pass", False) else "")
    return job


def end(p) -> None:
    """``postprocess``: the job's one console line (INFO, ``job.job_summary``; a refused job said why in its
    own line already), then drop the job; functions still installed on a patcher become pass-throughs."""
    job = job_of(p)
    if job is not None and job.live and job.params.enabled and job.selection is not None and job.log:
        used = [how for *_, scale, how in job.log if scale]
        fork = (f"fork before {job.fork_point}" if job.fork_point is not None else
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
            resolve_layers(job.params.layers, build_catalog(unet))
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
        if isinstance(extra, dict) and extra.get(NOTE_KEY) != REFINER_NOTE:
            extra[NOTE_KEY] = REFINER_NOTE
            log.warning("PAG: the refiner switch at %g reloads the model without the PAG patches; PAG %s", switch, REFINER_NOTE)


# --- installation ----------------------------------------------------------------------------------

def _install(unet, job: ForgeJob) -> None:
    """Add the gate, the row wrapper (batched, with the shared-prefix fork where the host has a route for
    it) and the post-CFG function to ``unet`` (this job's clone)."""
    options = unet.model_options
    job.fork_point = None
    if _mode(job) == "batched":
        job.fork_point = forge_fork.fork_point(job.selection) if job.host.fork else None
        if job.fork_point is not None and job.host.fork == "object_patch":
            reason = forge_fork.install_object_patch(unet, lambda: job.live)
            if reason is not None:
                log.debug("PAG: no shared-prefix fork (%s); the twins run the whole UNet", reason)
                job.fork_point, job.fork_off = None, reason
        wrapper = _make_unet_wrapper(job, options.get("model_function_wrapper"))
        unet.set_model_unet_function_wrapper(wrapper)
        if job.host.gate == "pre_cfg":
            unet.set_model_sampler_pre_cfg_function(_make_pre_cfg(job))
        else:
            unet.set_model_sampler_calc_cond_batch_function(
                _make_calc_cond_batch(job, options.get("sampler_calc_cond_batch_function")))
        if hasattr(unet, "set_memory_peak_estimation_modifier"):
            unet.set_memory_peak_estimation_modifier(
                _make_memory_estimate(unet, options.get("memory_peak_estimation_modifier")))
    unet.set_model_sampler_post_cfg_function(_make_post_cfg(job))


def _make_memory_estimate(unet, previous):
    """``memory_peak_estimation_modifier``: the host reserves memory for its ``[2·B, C, H, W]`` cond + uncond
    batch before sampling; the batched twins add one row per cond row, so count ``3·B`` rows (chained to a
    modifier another extension set)."""

    def estimate(shape):
        shape = list(shape)
        rows = shape[0] + (shape[0] + 1) // 2
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
    scale, *_ = job.scale_at(sigma)
    if scale != 0 and cond:
        job.step = Step(job.host, scale, cond, x, sigma)


def _make_unet_wrapper(job: ForgeJob, previous):
    """``model_function_wrapper``: perturbed twins of the cond entries ride in the host's UNet call."""

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
        matches, taken = [], set()
        for entry, kind in enumerate(cond_or_uncond):
            if kind != 0:
                continue
            k = step.match(c, entry, rows, x[entry * rows:(entry + 1) * rows], taken)
            if k is not None:
                matches.append((entry, k))
                taken.add(k)
        if not matches:
            return run(apply_model, args)
        total = x.shape[0]
        index = torch.cat([torch.arange(e * rows, (e + 1) * rows) for e, _ in matches]).to(x.device)
        mask = torch.zeros(total + index.numel(), dtype=torch.bool)
        mask[total:] = True
        twinned = {key: (value if key in ("transformer_options", "control_model") else _twin(value, index, total))
                   for key, value in c.items()}
        twinned["transformer_options"] = _call_options(job, c.get("transformer_options", {}), cond_or_uncond,
                                                       [e for e, _ in matches], rows, PagRows(mask))
        if job.fork_point is not None:
            to = twinned["transformer_options"]
            to[forge_fork.FORK_KEY] = forge_fork.ForkPlan.between(job.fork_point, total, index.cpu(),
                                                                  c.get("transformer_options", {}), to)
            if job.host.fork == "wrapper":
                forge_fork.add_wrapper(to, lambda: job.live)
        new_args = dict(args)
        new_args.update(input=_twin(x, index, total), timestep=_twin(args["timestep"], index, total), c=twinned,
                        cond_or_uncond=cond_or_uncond + [0] * len(matches))
        before = job.perturbed_calls
        with job.watching_grids():
            out = run(apply_model, new_args)
        if job.perturbed_calls == before:
            job.refuse(NEVER_CALLED)
            return out[:total]
        for i, (_, k) in enumerate(matches):
            step.add(k, out[total + i * rows:total + (i + 1) * rows])
        return out[:total]

    return _tag(wrapper, job)


def _twin(value, index: torch.Tensor, total: int):
    """``value`` with the rows ``index`` appended, for every per-row tensor (also inside dicts/lists: ControlNet)."""
    if torch.is_tensor(value):
        if value.ndim >= 1 and value.shape[0] == total:
            return torch.cat([value, value[index.to(value.device)]])
        return value
    if isinstance(value, dict):
        return {k: _twin(v, index, total) for k, v in value.items()}
    if isinstance(value, list):
        return [_twin(v, index, total) for v in value]
    if isinstance(value, tuple):
        return tuple(_twin(v, index, total) for v in value)
    return value


def _call_options(job: ForgeJob, options: dict, cond_or_uncond: list, twinned: list, rows: int, marks: PagRows) -> dict:
    """This UNet call's transformer_options: row bookkeeping for the longer batch, the mark, the patches."""
    to = dict(options)
    new_cu = cond_or_uncond + [0] * len(twinned)
    to["cond_or_uncond"] = new_cu
    if "uuids" in to:
        to["uuids"] = list(to["uuids"]) + [to["uuids"][e] for e in twinned]
    if "cond_mark" in to:  # Forge 2: one entry per row
        sigmas = to.get("sigmas")
        marks_list = [float(cu) for cu in new_cu for _ in range(rows)]
        to["cond_mark"] = torch.tensor(marks_list).to(sigmas) if torch.is_tensor(sigmas) else torch.tensor(marks_list)
    if "cond_indices" in to or "uncond_indices" in to:
        to["cond_indices"] = [i * rows + r for i, cu in enumerate(new_cu) if cu == 0 for r in range(rows)]
        to["uncond_indices"] = [i * rows + r for i, cu in enumerate(new_cu) if cu != 0 for r in range(rows)]
    holder = {"transformer_options": to}
    _add_patches(job, holder)
    holder["transformer_options"][MARK] = marks
    return holder["transformer_options"]


def _add_patches(job: ForgeJob, model_options: dict) -> None:
    """attn1 replace patches through the host's ``set_model_options_patch_replace`` (it copies the dicts it changes)."""
    for key, strength in job.keys():
        existing = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        previous = existing.get(key, existing.get(key[:2]))
        job.host.set_patch_replace(model_options, _make_attn1_patch(job, previous, strength), "attn1", *key)


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


def _make_attn1_patch(job: ForgeJob, previous, strength: float):
    """attn1 replace patch: marked rows get ``(1−a)·attn + a·perturbed`` before ``to_out`` (linear: the
    same as mixing after it); other rows go to the patch that was there, or the host's attention."""

    def through(q, k, v, extra):
        if previous is not None:
            return previous(q, k, v, extra)
        return job.host.attention(q, k, v, extra["n_heads"], extra)

    def patch(q, k, v, extra):
        mark = extra.get(MARK)
        if mark is None or not job.live:
            return through(q, k, v, extra)
        shape = extra.get("original_shape")
        rows = mark.rows_for(q.shape[0], int(shape[0]) if shape else None).to(q.device)
        if not bool(rows.any()):
            return through(q, k, v, extra)
        job.perturbed_calls += 1
        grid = job.grids.grid_for(q.shape[1])
        heads = extra["n_heads"]
        perturbed = job.perturbation(_Projected(q[rows], k[rows], v[rows], heads), q[rows], grid=grid)
        if previous is None and strength == 1.0:
            if bool(rows.all()):
                return perturbed
            keep = ~rows
            plain = job.host.attention(q[keep], k[keep], v[keep], heads, extra)
            out = torch.empty((q.shape[0],) + tuple(plain.shape[1:]), dtype=plain.dtype, device=plain.device)
            out[keep] = plain
            out[rows] = perturbed.to(plain.dtype)
            return out
        base = through(q, k, v, extra)
        out = base.clone()
        mixed = perturbed.float() if strength == 1.0 else (1.0 - strength) * base[rows].float() + strength * perturbed.float()
        out[rows] = mixed.to(base.dtype)
        return out

    patch.__pag_patch__ = True
    return patch


def _make_post_cfg(job: ForgeJob):
    """``sampler_post_cfg_function``: ``denoised + s·(cond_denoised − perturbed)`` (+ rescale)."""

    def post_cfg(args):
        denoised = args["denoised"]
        step, job.step = job.step, None
        if not job.live:
            return denoised
        scale, n, total, sigma = job.scale_at(args["sigma"])
        job.calls += 1
        if scale == 0:
            job.log.append((n, total, sigma, 0.0, "off"))
            return denoised
        cond_denoised = args["cond_denoised"]
        if step is not None and step.complete and step.scale == scale:
            perturbed, how = step.result(), "batched"
        else:
            if _mode(job) == "batched":
                log.debug("PAG: the perturbed rows did not come back from the batched call; separate call this step")
            perturbed, how = _separate(job, args), "separate"
            if not job.live:
                return denoised
        # the host's CFG is cfg·Σ strength·(cond average − uncond) (its edit_strength): weigh PAG's term the
        # same way, so s·Σ w·(cond − perturbed) as on A1111 — one meaning of AND on every host
        weight = and_weight(args.get("cond"))
        guided = denoised.float() + scale * weight * (cond_denoised.float() - perturbed.float())
        if job.params.rescale:
            guided = rescale_guided(guided, cond_denoised.float(), job.params.rescale)
        job.log.append((n, total, sigma, scale, how))
        job.perturbed_rows += (sum(int(e.input_x.shape[0]) for e in step.entries) if how == "batched"
                               else int(args["input"].shape[0]) * max(1, len(args.get("cond") or ())))
        return guided.to(denoised.dtype)

    return _tag(post_cfg, job)


def and_weight(cond) -> float:
    """Σ of the AND sub-prompts' strengths of one image (the host's ``edit_strength``); 1 without them."""
    try:
        return float(sum(entry.get("strength", 1.0) for entry in cond)) if cond else 1.0
    except (TypeError, AttributeError):
        return 1.0


def _separate(job: ForgeJob, args) -> torch.Tensor:
    """The cond entries once more in their own call, every row perturbed, on a copy of model_options."""
    options = dict(args["model_options"])
    options["transformer_options"] = dict(options.get("transformer_options", {}))
    _add_patches(job, options)
    options["transformer_options"][MARK] = PagRows(None)
    before = job.perturbed_calls
    with job.watching_grids():
        out = job.host.cond_prediction(args["model"], args["cond"], args["input"], args["sigma"], options)
    if job.perturbed_calls == before:
        job.refuse(NEVER_CALLED)
    return out


__all__ = ["A1111", "FORGE2", "REFORGE", "ForgeJob", "HostApi", "PagRows", "apply", "detect_host", "diffusion_model_of", "end", "host_api",
           "is_forge_host", "job_of", "start"]
