"""A1111 1.7–1.10 adapter: PAG rows in the CFG batch through the CFGDenoiser callbacks.

- ``on_cfg_denoiser``: one perturbed twin per cond row goes between the cond and the uncond rows
  (or, in separate mode, the cond rows are kept for an extra call);
- every UNet call goes through a wrapper on the denoiser's inner model that finds which rows of
  the batch it was given (by storage offset, so chunked and split calls are tracked exactly) and
  runs the UNet inside the attention patch for exactly those rows — the model is patched only
  for the duration of a call, so an exception or interrupt can never leave it patched;
- ``on_cfg_denoised``: the perturbed rows' output gives ``s·Σ w·(cond − perturbed)`` per image;
- ``combine_denoised`` (wrapped on the denoiser, chained): that term joins the combined prediction
  before the host's inpaint blend (hard masks and soft inpainting alike);
- ``on_cfg_after_cfg``: ends the call (a fallback adds the term there if the combine step was replaced).

Host modules are imported lazily so this file loads (and is tested) without the WebUI.
"""

from __future__ import annotations

import logging
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import PagError
from .fork import ForkChecks, forking
from .calls import PassCounter
from .guidance import ScaledCall, multicond_pag_delta, multicond_reference, promote, rescale_guided, scale_for_step
from .job import (
    announce_refusal, check_neighbors, flush_notes, image_keys, job_summary, more_guidances, never_called, note_skipped,
    perturbations_for, refuse_job, resolve_guidances, start_params, write_infotext, write_note,
)
from .layers import LayerSelection, build_catalog, resolve_layers
from .params import PagParams
from .patch import AttentionPatch, Branch, RowMarks
from .perturbations import Perturbation
from .layout import RowLayout
from .rows import row_offset, rows_of, twin_cond, twin_rows

log = logging.getLogger("sd_webui_pag")


# --- jobs ------------------------------------------------------------------------------------------

@dataclass
class Call(ScaledCall):
    """What one denoiser call of a job needs between the three callbacks.

    ``scales``: the guidances active at this call (index → scale ≠ 0), in index order; their twin blocks of
    ``n_cond`` rows follow the cond rows in that order (the last one in the uncond rows' place at CFG 1)."""

    scales: dict
    n_cond: int
    conds_list: list
    denoiser: object = None
    x_in: torch.Tensor | None = None  # batched: the tensor whose row slices reach the UNet
    layout: RowLayout | None = None  # batched: the rows of x_in (labels, sources, draw keys)
    keys: dict = field(default_factory=dict)  # guidance -> per cond row, its twin's draw key (separate mode)
    separate: bool = False  # separate mode: the cond rows run again, perturbed, after each host call
    perturbed: dict = field(default_factory=dict)  # separate mode: guidance -> perturbed outputs, call by call
    seen: dict = field(default_factory=dict)
    lost: bool = False
    deltas: list | None = None  # per guidance: (s·Σ w·(cond − perturbed), rescale φ)
    reference: torch.Tensor | None = None
    applied: bool = False  # the term went into the host's combine_denoised (before its mask blend)
    twins: bool = False  # the twins sit after the cond rows of the denoiser's batch (batched layout)


@dataclass
class Job:
    params: PagParams
    p_ref: object
    perturbations: dict  # guidance index -> Perturbation
    marks: RowMarks = field(default_factory=RowMarks)
    refused: str | None = None
    call: Call | None = None
    selections: dict = field(default_factory=dict)  # id(unet) -> (weakref to it, LayerSelection | PagError)
    checked_mode: str | None = None  # the mode after the neighbor check (``Job.mode``)
    # this step's batched twins (denoiser, n_cond, rows): the combine step must not see them even when the
    # step's PAG term was dropped (a refusal or a lost batch after the rows were added)
    twins: tuple | None = None
    counter: PassCounter = field(default_factory=PassCounter)  # where a call stands in its sampling pass
    images: tuple = ()  # per image of the batch in progress: the key its random draws start from (job.image_keys)
    draw: tuple = ()  # this denoiser call's draw key: (hires pass, model call index)
    fork_checks: ForkChecks = field(default_factory=ForkChecks)
    applied_calls: int = 0  # model calls whose output got PAG's term
    skipped: dict = field(default_factory=dict)  # reason -> model calls that were due PAG but ran without it
    late_term: bool = False  # the term went in after the host's combine step (said once)
    # for the job's console line: denoiser calls, those with PAG rows, perturbed rows, row layouts used
    calls: int = 0
    calls_with_pag: int = 0
    perturbed_rows: int = 0
    layouts: set = field(default_factory=set)

    @property
    def p(self):
        return self.p_ref()

    @property
    def perturbation(self) -> Perturbation:
        """The main guidance's perturbation."""
        return self.perturbations[1]

    def selections_for(self, unet) -> dict:
        """``{guidance index: LayerSelection}`` on ``unet`` (cached per model); ``PagError`` naming the guidance's
        layers field when the model lacks a name."""
        key = id(unet)
        cached = self.selections.get(key)
        if cached is None or cached[0]() is not unet:  # a freed model's id can come back for another one
            try:
                found = resolve_guidances(self.params, build_catalog(unet))
            except PagError as err:
                found = err
            self.selections[key] = (weakref.ref(unet), found)
        found = self.selections[key][1]
        if isinstance(found, PagError):
            raise found
        return found

    def selection_for(self, unet) -> LayerSelection:
        """The main guidance's layers on ``unet``."""
        return self.selections_for(unet)[1]

    def mode(self) -> str | None:
        """``batched`` or ``separate`` for this job's denoiser calls; None after a refusal. Checked once, at the
        first denoiser call (other extensions' ``process`` hooks have run by then): an extension that cannot
        share a batch switches PAG to separate mode, or off, with a log line and a ``PAG note``."""
        if self.checked_mode is None:
            self.checked_mode = check_neighbors(self.p, self.params, self.refuse) or self.params.mode
        return None if self.refused else self.checked_mode

    def refuse(self, reason: str, level: int = logging.WARNING) -> None:
        """Stop PAG for this job (a bad setting logs an error, an unsupported model a warning)."""
        if self.refused is None:
            self.refused = reason
            announce_refusal(self.p, reason, level, applied_calls=self.applied_calls)
        self.call = None

    def skip(self, reason: str) -> None:
        """This model call runs without PAG's term although it was due (log once, ``PAG note`` with a count)."""
        note_skipped(self.p, self.skipped, reason)
        self.call = None


class JobRegistry:
    """Active PAG jobs by processing object; several can be alive (X/Y/Z cells, ADetailer inside a job)."""

    def __init__(self):
        self._jobs: dict[int, Job] = {}
        self._latest: Job | None = None
        # the job of the denoiser call in progress: cfg_denoised/cfg_after_cfg get no denoiser, and
        # every call starts with cfg_denoiser, which resets this even after an aborted call
        self.current: Job | None = None

    def start(self, p, params: PagParams, seed: int) -> Job:
        self.prune()
        job = Job(params=params, p_ref=weakref.ref(p), perturbations=perturbations_for(params, seed))
        self._jobs[id(p)] = job
        self._latest = job
        return job

    def get(self, p) -> Job | None:
        job = self._jobs.get(id(p))
        return job if job is not None and job.p is p else None

    def end(self, p) -> None:
        job = self._jobs.pop(id(p), None)
        if job is not None and job.p is p:
            job.call = None
        if self._latest is job:
            self._latest = None
        if self.current is job:
            self.current = None

    def for_denoiser(self, denoiser) -> Job | None:
        p = getattr(denoiser, "p", None)
        if p is not None:
            return self.get(p)
        return self._latest  # A1111 1.7 denoisers don't know their p

    def prune(self) -> None:
        for key, job in list(self._jobs.items()):
            if job.p is None:
                del self._jobs[key]

    def clear(self) -> None:
        self._jobs.clear()
        self._latest = None
        self.current = None

    def __len__(self):
        return len(self._jobs)


JOBS = JobRegistry()


# --- script-hook side ------------------------------------------------------------------------------

def alternative_unet_refusal() -> str | None:
    """A1111's ``sd_unet.current_unet`` (TensorRT and other engines) runs no PyTorch attention modules."""
    import sys

    sd_unet = sys.modules.get("modules.sd_unet")
    engine = getattr(sd_unet, "current_unet", None)
    if engine is None:
        return None
    return (f"an alternative UNet ({type(engine).__name__}, SD Unet setting) is active; it runs no PyTorch "
            "attention modules for PAG to perturb")


def refusal_for_model(sd_model) -> str | None:
    """Why PAG cannot run on this model, or None."""
    if sd_model is None:
        return "no model is loaded"
    engine = alternative_unet_refusal()
    if engine is not None:
        return engine
    if getattr(sd_model, "is_sd3", False):
        return "SD3 has no UNet self-attention blocks"
    inner = getattr(sd_model, "model", None)
    if getattr(inner, "conditioning_key", None) == "crossattn-adm":
        return "unCLIP models are not supported"
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        return "edit models (InstructPix2Pix) are not supported"
    unet = getattr(inner, "diffusion_model", None)
    if unet is None or not hasattr(unet, "input_blocks"):
        return "this model has no UNet of the latent-diffusion family"
    return None


def start_job(p, args) -> Job | None:
    """``process`` hook: read the settings, write the infotext, register the job.

    A bad setting while PAG is on — a value, or a layer the job's model does not have (the model is loaded
    when ``process`` runs) — stops the job (``job.refuse_job``: the host shows the error, no image). A model
    PAG cannot work on is refused with a ``PAG note`` (the image is made without PAG and says why)."""
    JOBS.end(p)
    params = start_params(p, args)
    if params is None:
        return None
    seed = int(getattr(p, "seed", 0) or 0)
    job = JOBS.start(p, params, seed)
    import modules.shared as shared

    reason = refusal_for_model(shared.sd_model)
    if reason is None:
        try:
            selection = job.selection_for(shared.sd_model.model.diffusion_model)
        except PagError as err:
            JOBS.end(p)
            write_infotext(p, PagParams())
            refuse_job(p, err)
            return None
        log.debug("PAG start: scale %g, %s on %s (%d attn1: %s), %s mode%s", params.scale, params.method,
                  selection.catalog.arch, len(selection.chosen), params.layers, params.mode, more_guidances(params))
    if reason is not None:
        write_infotext(p, PagParams())
        job.refuse(reason)
    return job


def end_job(p) -> None:
    """``postprocess``: the job's one console line (INFO, ``job.job_summary``), then drop the job. A refused
    job said why in its own WARNING/ERROR line already."""
    job = JOBS.get(p)
    if job is not None and job.params.enabled and not job.refused:
        selections = next((found for _, found in job.selections.values() if isinstance(found, dict)), None) or {}
        selection = selections.get(1)
        log.info("%s", job_summary(
            job.params, arch=selection.catalog.arch if selection else "?", n_layers=len(selection.chosen) if selection else 0,
            modes=job.layouts, calls_with_pag=job.calls_with_pag, calls=job.calls, rows=job.perturbed_rows,
            fork=fork_text(job.params, selections, job.checked_mode), p=p))
    JOBS.end(p)


def fork_text(params: PagParams, selections, mode) -> str:
    """Where the shared-prefix fork lets each guidance's twins join the batch, or why it does not
    (``fork.forking`` can still turn it off per call: another extension's forward or hooks; DEBUG lines say so)."""
    import os

    from .fork import DISABLE_ENV, fork_stages

    if (mode or params.mode) == "separate":
        return "no fork (separate mode)"
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"no fork ({DISABLE_ENV} is set)"
    stages = fork_stages(selections) if selections else None
    if not stages:
        return "no fork"
    return "fork before " + ", ".join(str(point) for point, _ in stages)


def start_batch(p, seeds, subseeds=None) -> None:
    """``process_batch``: the batch's image seeds key every random draw of its perturbed rows (per image)."""
    job = JOBS.get(p)
    if job is not None:
        job.images = image_keys(p, seeds, subseeds)
        if seeds:
            for perturbation in job.perturbations.values():
                perturbation.reseed(int(seeds[0]))


# --- CFGDenoiser callbacks -------------------------------------------------------------------------

def _denoiser(params):
    """The CFGDenoiser of a cfg_denoiser callback (A1111 1.7 does not pass it: the latest job's sampler's)."""
    den = getattr(params, "denoiser", None)
    if den is None and JOBS._latest is not None:
        den = getattr(getattr(JOBS._latest.p, "sampler", None), "model_wrap_cfg", None)
    return den


def _rows(t) -> int:
    return (t["crossattn"] if isinstance(t, dict) else t).shape[0]


def conds_list_of(denoiser, n_cond: int, batch: int) -> list | None:
    """A1111's ``conds_list``: per image ``[(cond row, AND weight), ...]``, from the multicond structure."""
    cond = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", {}).get("cond")
    structure = getattr(cond, "batch", None)
    if structure is None:
        return [[(i, 1.0)] for i in range(batch)] if n_cond == batch else None
    out, row = [], 0
    for prompts in structure:
        out.append([(row + k, float(c.weight)) for k, c in enumerate(prompts)])
        row += len(prompts)
    return out if row == n_cond and len(out) == batch else None


def needs_sigma(params) -> bool:
    """Whether the schedule depends on this call's sigma (a sigma window is set)."""
    return bool(params.sigma_start or params.sigma_end)


def _g(value) -> str:
    return "?" if value is None else f"{value:.4g}"


def real_sigma(denoiser, sigma_in: torch.Tensor) -> float:
    """The noise level of this call; timesteps samplers (DDIM/PLMS/UniPC) pass a timestep instead."""
    value = float(sigma_in.reshape(-1)[0])
    if getattr(denoiser, "mask_before_denoising", False) or type(denoiser).__name__ == "CFGDenoiserTimesteps":
        import modules.shared as shared

        alphas = shared.sd_model.alphas_cumprod
        a = float(alphas[int(round(min(max(value, 0), len(alphas) - 1)))])
        return math.sqrt((1 - a) / a)
    return value


def call_in_pass(job: Job, den, params) -> tuple[int, int]:
    """``(call index, model calls of this sampling pass)`` for the step window: the calls the sampler really
    makes (``calls.PassCounter``); the host's ``step``/``total_steps`` where they cannot be known."""
    where = job.counter.at(job.p, getattr(den, "sampler", None), den)
    if where is not None:
        return where.index, where.total
    step = getattr(den, "step", params.sampling_step)
    total = getattr(den, "total_steps", params.total_sampling_steps) or params.total_sampling_steps
    return step, total


def on_cfg_denoiser(params) -> None:
    den = _denoiser(params)
    job = JOBS.for_denoiser(den) if den is not None else JOBS._latest
    JOBS.current = job
    if job is None:
        return
    job.call = None
    job.twins = None
    if job.refused or not job.params.enabled:
        return
    job.calls += 1
    if den is None:
        job.refuse("cannot find the sampler's CFG denoiser on this WebUI version")
        return
    import modules.shared as shared

    p = job.p
    reason = refusal_for_model(shared.sd_model)
    if reason is None:
        try:
            selections = job.selections_for(shared.sd_model.model.diffusion_model)
        except PagError as err:
            reason = f"{err} (model changed during the job)"
    if reason is not None:
        job.refuse(reason)
        return
    step, total = call_in_pass(job, den, params)
    # the sigma window needs this call's sigma: one read of the device per step, and only then
    guidances = job.params.guidances()
    sigma = (real_sigma(den, params.sigma) if any(needs_sigma(g) for g in guidances) or log.isEnabledFor(logging.DEBUG)
             else None)
    hires = bool(getattr(p, "is_hr_pass", False))
    multiplier = getattr(den, "cond_scale_miltiplier", 1.0)  # (sic) DDIM CFG++ maps guidance scales by 1/12.5
    scales = {}
    for g in guidances:
        value = scale_for_step(g, step=step, total_steps=total, sigma=sigma, hires=hires) * multiplier
        if value != 0:
            scales[g.index] = value
    n_cond, batch = _rows(params.text_cond), _rows(params.text_uncond)
    if not scales:
        log.debug("PAG step %d/%d sigma %s: scale 0, no extra rows", step, total, _g(sigma))
        return
    if params.x.shape[0] != n_cond + batch:
        job.refuse(f"unexpected CFG batch layout ({params.x.shape[0]} rows for {n_cond} cond + {batch} uncond)")
        return
    conds_list = conds_list_of(den, n_cond, batch)
    if conds_list is None:
        job.refuse("cannot match the AND sub-prompts to the cond rows on this WebUI version")
        return
    call = Call(scales=scales, n_cond=n_cond, conds_list=conds_list, denoiser=den)
    mode = job.mode()
    if mode is None:
        return
    call.keys = {label: twin_keys(job, conds_list, n_cond, label) for label in call.labels}
    job.draw = (int(hires), int(step))
    layout = mode
    if mode == "separate":
        call.separate, call.x_in = True, params.x
    elif uncond_slot_is_free(den, conds_list, n_cond, batch, params):
        # CFG scale 1: the uncond rows cannot reach the image, so they carry the last guidance's twins (2 rows
        # an image for one guidance, not 3); the others' twins go between the cond rows and those
        layout = "uncond slot"
        inserted = len(call.labels) - 1
        params.x = twin_rows(rows_of(params.x, 0, n_cond), n_cond, inserted + 1)
        params.sigma = twin_rows(rows_of(params.sigma, 0, n_cond), n_cond, inserted + 1)
        params.image_cond = twin_rows(rows_of(params.image_cond, 0, n_cond), n_cond, inserted + 1)
        if inserted:
            params.text_cond = twin_cond(params.text_cond, n_cond, inserted)
        params.text_uncond = rows_of(params.text_cond, 0, n_cond)  # a copy of the same class (DictWithShape)
        call.x_in, call.layout = params.x, twin_layout(n_cond, 0, call.keys)
        if inserted:
            call.twins = True
            job.twins = (den, n_cond, params.x.shape[0], inserted * n_cond)
    else:
        k = len(call.labels)
        params.x = twin_rows(params.x, n_cond, k)
        params.sigma = twin_rows(params.sigma, n_cond, k)
        params.image_cond = twin_rows(params.image_cond, n_cond, k)
        params.text_cond = twin_cond(params.text_cond, n_cond, k)
        call.x_in, call.layout, call.twins = params.x, twin_layout(n_cond, batch, call.keys), True
        job.twins = (den, n_cond, params.x.shape[0], k * n_cond)
    job.call = call
    job.calls_with_pag, job.perturbed_rows = job.calls_with_pag + 1, job.perturbed_rows + n_cond * len(scales)
    job.layouts.add(layout)
    install_inner_wrapper(den, job)
    install_combine_wrapper(den)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("PAG step %d/%d sigma %s: %s, %d perturbed rows (%s), layers %s", step, total, _g(sigma),
                  ", ".join(f"guidance {g} scale {v:g}" for g, v in scales.items()), n_cond * len(scales), layout,
                  "; ".join(",".join(selections[g].names) for g in scales))


def twin_keys(job: Job, conds_list, n_cond: int, label: int = 1) -> tuple:
    """Per cond row, the draw key of its perturbed twin: its image's key (``job.images``), its AND sub-prompt
    and the guidance — the same whatever else is in the batch. None for rows of images without a key."""
    keys: list = [None] * n_cond
    for i, conds in enumerate(conds_list):
        image = job.images[i] if i < len(job.images) else None
        for k, (row, _) in enumerate(conds):
            if image is not None and 0 <= row < n_cond:
                keys[row] = image + (k, label)
    return tuple(keys)


def twin_layout(n_cond: int, n_rest: int, keys) -> RowLayout:
    """``[cond, twins of cond per guidance, rest]``: guidance ``g``'s twin ``i`` copies cond row ``i`` and draws
    with ``keys[g][i]`` (``keys``: ``{guidance: per cond row keys}``, in row order; a tuple = guidance 1)."""
    if not isinstance(keys, dict):
        keys = {1: tuple(keys)}
    labels, sources, row_keys = [0] * n_cond, list(range(n_cond)), [None] * n_cond
    for label, per_row in keys.items():
        labels += [label] * n_cond
        sources += list(range(n_cond))
        row_keys += list(per_row) if len(per_row) == n_cond else [None] * n_cond
    start = len(labels)
    labels += [0] * n_rest
    sources += list(range(start, start + n_rest))
    row_keys += [None] * n_rest
    return RowLayout(tuple(labels), tuple(sources), tuple(row_keys))


def uncond_slot_is_free(den, conds_list, n_cond: int, batch: int, params) -> bool:
    """True when the uncond rows' output provably cannot change the image at this step.

    A1111 combines ``u + Σ w·cfg·(c − u)``: with cfg 1 and one sub-prompt of weight 1 per image that is
    ``c``. Anything that could use the uncond rows otherwise keeps them: skip-uncond (NGMS, skip early
    CFG) drops the last rows, DDIM CFG++ scales the CFG and reads the uncond noise.
    """
    import modules.shared as shared

    extra = getattr(getattr(den, "sampler", None), "sampler_extra_args", None) or {}
    if extra.get("cond_scale") != 1.0 or getattr(den, "cond_scale_miltiplier", 1.0) != 1.0:
        return False
    if getattr(den, "need_last_noise_uncond", False) or (extra.get("s_min_uncond") or 0) > 0:
        return False
    if getattr(shared.opts, "skip_early_cond", 0) or n_cond != batch:
        return False
    if any(len(conds) != 1 or conds[0][1] != 1.0 for conds in conds_list):
        return False
    if params.x.shape[0] != 2 * n_cond or getattr(den, "image_cfg_scale", None) not in (None, 1.0):
        return False
    if not stock_combine(den):
        return False
    return True


def stock_combine(den) -> bool:
    """Whether the denoiser combines with the WebUI's own ``CFGDenoiser.combine_denoised`` (no subclass or
    instance replacement, e.g. Dynamic Thresholding's), which provably ignores the uncond rows at CFG 1."""
    own = den.__dict__.get("combine_denoised")
    if own is not None and not (getattr(own, "__pag_combine__", False) and own.__pag_previous__ is None):
        return False
    function = type(den).combine_denoised
    return (getattr(function, "__module__", "") == "modules.sd_samplers_cfg_denoiser"
            and getattr(function, "__qualname__", "") == "CFGDenoiser.combine_denoised")


def on_cfg_denoised(params) -> None:
    job = _job_with_call(params)
    if job is None:
        return
    call = job.call
    if call.lost:
        job.skip("another extension rebuilt the CFG batch after PAG added its rows")
        return
    if job.fork_checks.failed():
        stop_forking(job)
    for perturbation in job.perturbations.values():
        flush_notes(job.p, perturbation)
    n = call.n_cond
    cond = params.x[:n]
    rescale = {g.index: g.rescale for g in job.params.guidances()}
    deltas = []
    for position, label in enumerate(call.labels, start=1):
        if call.separate:
            seen = call.seen.get(label)
            if seen is None or not bool(seen.all()):
                job.skip("the cond rows did not all reach the UNet as PAG expected (separate mode)")
                return
            perturbed = call.perturbed[label]
        else:  # the twin blocks follow the cond rows in guidance order (the last one in the uncond rows' place at CFG 1)
            perturbed = params.x[position * n:(position + 1) * n]
        deltas.append((multicond_pag_delta(cond, perturbed, call.conds_list, call.scales[label]), rescale[label]))
    call.deltas = deltas
    if any(phi for _, phi in deltas):
        call.reference = multicond_reference(cond, call.conds_list)


def stop_forking(job: Job) -> None:
    """A forked call's twin had inputs other than its cond row's (another extension changed a row after PAG
    built the twins): the fork used the cond row's for the shared prefix. Said in the log and the infotext;
    the rest of the job runs without the fork."""
    step = job.draw[1] if len(job.draw) > 1 else "?"
    job.fork_checks.failed_at = f"model call {step}"
    note = (f"shared-prefix fork off from model call {step}: a perturbed twin's inputs differed from its cond row's "
            "(another extension changed them after PAG built the twins); that call's twins shared the cond rows' prefix")
    log.warning("PAG: %s", note)
    write_note(job.p, note, keep_settings=True)


def guided_with_pag(job: Job, call: Call, denoised: torch.Tensor, *, blended: bool) -> torch.Tensor:
    """``denoised + s·Σ w·(cond − perturbed)``, then rescale; ``blended``: the host's inpaint blend already ran.

    Rescale measures only the repainted area (``nmask``) of an inpainting job.
    """
    den = call.denoiser
    job.applied_calls += 1
    guided = promote(denoised)
    inpainting = getattr(den, "mask", None) is not None and not getattr(den, "mask_before_denoising", False)
    for delta, phi in call.deltas:  # each guidance's term, then its rescale, in guidance order
        guided = guided + promote(delta)
        if phi:
            guided = rescale_guided(guided, promote(call.reference), phi, den.nmask if inpainting else None)
    if blended and inpainting:
        guided = promote(denoised) + (guided - promote(denoised)) * promote(den.nmask)
    return guided.to(denoised.dtype)


def install_combine_wrapper(denoiser) -> None:
    """Wrap the denoiser's ``combine_denoised`` once (chained to an instance one someone put there first).

    The PAG term joins the host's combined prediction right there, so whatever the host does after it
    (the inpaint mask blend, soft inpainting's sigma-dependent ``on_mask_blend``) treats CFG and PAG alike.
    """
    previous = denoiser.__dict__.get("combine_denoised")
    if getattr(previous, "__pag_combine__", False):
        return

    def combine_denoised(x_out, *args, **kwargs):
        own = previous if previous is not None else (lambda *a, **k: type(denoiser).combine_denoised(denoiser, *a, **k))
        job = JOBS.current
        twins = job.twins if job is not None else None
        if twins is not None and twins[0] is denoiser and torch.is_tensor(x_out) and x_out.shape[0] == twins[2]:
            # the combine step (the host's, or one another extension put there: Dynamic Thresholding
            # reads every row before the uncond rows as a cond row) sees exactly the batch it would
            # see without PAG — also when this step's PAG term was dropped after the rows went in
            n_cond, extra = twins[1], twins[3]
            x_out = torch.cat([x_out[:n_cond], x_out[n_cond + extra:]])
        call = job.call if job is not None else None
        if call is None or call.denoiser is not denoiser or call.deltas is None or call.applied:
            return own(x_out, *args, **kwargs)
        call.applied = True
        return guided_with_pag(job, call, own(x_out, *args, **kwargs), blended=False)

    combine_denoised.__pag_combine__ = True
    combine_denoised.__pag_previous__ = previous
    denoiser.combine_denoised = combine_denoised


def on_cfg_after_cfg(params) -> None:
    job = _job_with_call(params)
    if job is None or job.call.deltas is None:
        return
    call, job.call = job.call, None
    if call.applied:
        return
    # combine_denoised was replaced after PAG wrapped it: the term goes on the blended result instead (the same
    # for hard masks — the term is weighted by nmask — but not for a sigma-dependent blend: said in the note)
    if not job.late_term:
        job.late_term = True
        log.warning("PAG: the CFG combine step ran without PAG's wrapper; PAG term added after the mask blend")
        if getattr(call.denoiser, "mask", None) is not None:
            write_note(job.p, "PAG term added after the host's inpaint blend (another extension replaced the CFG "
                              "combine step)", keep_settings=True)
    params.x = guided_with_pag(job, call, params.x, blended=True)


def _job_with_call(params) -> Job | None:
    job = JOBS.current
    if job is None or job.call is None:
        return None
    return job


# --- the UNet-call wrapper -------------------------------------------------------------------------

def install_inner_wrapper(denoiser, job: Job) -> None:
    """Wrap the denoiser's inner model (k-diffusion CompVis(V)Denoiser / timesteps wrapper) once."""
    inner = denoiser.inner_model
    if getattr(inner.__dict__.get("forward"), "__pag_inner__", False):
        return
    previous = inner.__dict__.get("forward")

    def forward(x, sigma, *args, **kwargs):
        own = previous if previous is not None else (lambda *a, **k: type(inner).forward(inner, *a, **k))
        active = JOBS.for_denoiser(denoiser)
        call = active.call if active is not None else None
        if call is None:
            return own(x, sigma, *args, **kwargs)
        unet = inner.inner_model.model.diffusion_model
        if call.separate:
            out = own(x, sigma, *args, **kwargs)
            perturb_cond_rows_again(active, call, unet, own, x, sigma, args, kwargs, out)
            return out
        layout = rows_of_call(call, x)
        if layout is None:
            return own(x, sigma, *args, **kwargs)
        with perturbing(active, unet, layout):
            return own(x, sigma, *args, **kwargs)

    forward.__pag_inner__ = True
    inner.forward = forward


@contextmanager
def perturbing(job: Job, unet, layout: RowLayout):
    """The UNet calls inside run with the marked rows perturbed (and the shared prefix forked off)."""
    selections = job.selections_for(unet)
    branches = [Branch(label, selections[label], job.perturbations[label]) for label in selections]
    with AttentionPatch(unet, branches=branches, marks=job.marks) as patch, job.marks.marking(layout, job.draw), \
            forking(unet, selections, layout, checks=job.fork_checks, marks=job.marks):
        yield
    reason = never_called(job.params, layout.branches, patch.calls_by_label)
    if reason is not None:
        job.refuse(reason)


def rows_of_call(call: Call, x: torch.Tensor) -> RowLayout | None:
    """The layout of the rows ``x`` of this UNet call (a slice of the denoiser's batch, found by its storage
    offset), or None when it has no perturbed row. A twin whose cond row is not in the same call (chunked
    calls) keeps no source: it runs the whole UNet."""
    offset = row_offset(x, call.x_in)
    if offset is None:
        call.lost = True
        return None
    return chunk_layout(call.layout, offset, x.shape[0])


def chunk_layout(layout: RowLayout, offset: int, rows: int) -> RowLayout | None:
    """Rows ``offset:offset+rows`` of ``layout`` as a layout of their own (None without a perturbed row)."""
    if offset == 0 and rows == layout.n:
        return layout if layout.perturbed else None
    labels = layout.labels[offset:offset + rows]
    if all(label == 0 for label in labels):
        return None
    sources = None
    if layout.sources is not None:
        sources = tuple(s - offset for s in layout.sources[offset:offset + rows])
        if any(not 0 <= s < rows for s in sources):
            sources = None
    keys = None if layout.keys is None else layout.keys[offset:offset + rows]
    return RowLayout(labels, sources, keys)


def perturb_cond_rows_again(job: Job, call: Call, unet, own, x, sigma, args, kwargs, out) -> None:
    """Separate (low-VRAM) mode: right after each host call holding cond rows, the same rows again,
    perturbed, with exactly the conditioning the host passed (after its padding), so the extra calls are
    never larger than the host's own chunks."""
    offset = row_offset(x, call.x_in)
    cond = kwargs.get("cond")
    if offset is None or offset >= call.n_cond or args or not isinstance(cond, dict):
        return
    k = min(x.shape[0], call.n_cond - offset)
    for label in call.labels:  # one extra call per guidance: never larger than the host's chunk
        per_row = call.keys.get(label, ())
        keys = per_row[offset:offset + k] if len(per_row) >= offset + k else None
        with perturbing(job, unet, RowLayout((label,) * k, None, keys)):
            twin = own(x[:k], sigma[:k], **{**kwargs, "cond": _first_rows(cond, k)})
        if label not in call.perturbed:
            call.perturbed[label] = out.new_zeros((call.n_cond,) + tuple(out.shape[1:]))
            call.seen[label] = torch.zeros(call.n_cond, dtype=torch.bool)
        call.perturbed[label][offset:offset + k] = twin
        call.seen[label][offset:offset + k] = True


def _first_rows(cond: dict, k: int) -> dict:
    """The first ``k`` rows of every tensor in the inner model's condition dict (lists of tensors too)."""
    def rows(v):
        if torch.is_tensor(v):
            return v[:k]
        if isinstance(v, list):
            return [rows(t) for t in v]
        return v
    return {key: rows(value) for key, value in cond.items()}


# --- registration ----------------------------------------------------------------------------------

def register_callbacks() -> None:
    """Register the CFG callbacks once per script load (A1111 clears callbacks before reloading scripts)."""
    from modules import script_callbacks

    for register, fn in ((script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
                         (script_callbacks.on_cfg_denoised, on_cfg_denoised),
                         (script_callbacks.on_cfg_after_cfg, on_cfg_after_cfg)):
        script_callbacks.remove_callbacks_for_function(fn)
        try:
            register(fn, name="sd-webui-pag")
        except TypeError:  # A1111 < 1.9 has no name=
            register(fn)
    script_callbacks.remove_callbacks_for_function(JOBS.clear)
    script_callbacks.on_script_unloaded(JOBS.clear)


__all__ = [
    "JOBS", "Job", "JobRegistry", "on_cfg_after_cfg", "on_cfg_denoised", "on_cfg_denoiser", "refusal_for_model",
    "register_callbacks", "start_batch", "start_job",
]
