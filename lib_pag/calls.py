"""How many model (denoiser) calls a sampling pass really makes, and which of them this one is.

PAG's step window (``start``/``end``) and its ``linear``/``cosine`` schedules are fractions of the model
calls the sampling pass *really* makes, on every sampler, pass (txt2img, img2img, hires) and host. The
hosts' own counters do not say that: A1111's ``CFGDenoiser.total_steps`` is ``steps`` (``2·steps`` for
samplers marked ``second_order``) of ``Sampler.launch_sampling(steps, …)``, while the sampler function
makes another number of calls. Facts this module follows (A1111 1.10.1; Forge 2 and reForge use the same
``modules/sd_samplers_*.py`` classes):

- ``CFGDenoiser.step`` (``modules/sd_samplers_cfg_denoiser.py``) is reset to 0 by ``Sampler.initialize``
  and grows by 1 at the end of every ``CFGDenoiser.forward``: during a call it is that call's 0-based
  index in the pass. ``CFGDenoiser.steps`` is the ``steps`` given to ``launch_sampling``
  (``modules/sd_samplers_common.py``).
- k-diffusion (``KDiffusionSampler.sample``/``sample_img2img``, ``modules/sd_samplers_kdiffusion.py``):
  txt2img samples ``get_sigmas(p, steps)``; img2img and the hires pass take ``(steps, t_enc)`` from
  ``sd_samplers_common.setup_img2img_steps(p, steps)``, sample ``sigmas[steps − t_enc − 1:]`` and
  launch ``t_enc + 1`` steps. The sampler function makes, per step ``i`` (``sigmas[i] → sigmas[i+1]``),
  one call, or two for Heun/DPM2/DPM2 a/DPM++ 2S a/DPM++ SDE except on a step to sigma 0 (``sample_heun``
  etc. in ``k_diffusion/sampling.py``: ``if sigmas[i + 1] == 0`` / ``if sigma_down == 0``: an Euler step).
  Most schedules end at 0 (KL Optimal does not; the DDIM schedule's length is not ``steps + 1``).
- timesteps samplers (``CompVisSampler``, ``modules/sd_samplers_timesteps.py``): txt2img samples
  ``get_timesteps(p, steps)``, img2img/hires ``timesteps[:t_enc]`` (still launching ``t_enc + 1``).
  ``sd_samplers_timesteps_impl.ddim``/``ddim_cfgpp`` call the model ``len(timesteps) − 1`` times,
  ``plms`` ``len(timesteps)`` (its first step calls twice), ``unipc`` ``len(timesteps)`` (``UniPC.sample``,
  multistep: one call at the start, one per step but the last).

So DDIM in img2img makes ``t_enc − 1`` calls where the host says ``t_enc + 1``; Heun makes ``2n − 1`` where
it says ``2n``. ``PassCounter.at`` reads the sampler's real schedule (its own ``get_sigmas``/``get_timesteps``
with the steps the pass used) once per pass and counts; where the count cannot be known in advance
(DPM adaptive, Restart, a sampler not listed here, a script's own noise schedule) it falls back to the
host's ``step / total_steps`` and says so once per pass at DEBUG.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

log = logging.getLogger("sd_webui_pag")

# k-diffusion sampler functions by name, and how many model calls a step from sigmas[i] to sigmas[i+1] makes.
ONE_CALL_PER_STEP = frozenset({
    # k_diffusion/sampling.py (k-diffusion 0.0.16 in A1111 and reForge, Forge's own copy)
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_ipndm", "sample_ipndm_v", "sample_deis",  # Forge k_diffusion/sampling.py
    "sample_lcm",  # modules/sd_samplers_lcm.py (A1111, Forge)
    "sample_ddpm",  # Forge backend/modules/k_diffusion_extra.py (generic_step_sampler)
})
TWO_CALLS_UNLESS_TO_ZERO = frozenset({
    # a second (midpoint / Heun) call, except on a step to sigma 0 — k_diffusion/sampling.py: sample_heun,
    # sample_dpm_2, sample_dpmpp_sde test ``sigmas[i + 1] == 0``; sample_dpm_2_ancestral and
    # sample_dpmpp_2s_ancestral test ``sigma_down == 0``, which with eta ≤ 1 is the same step
    "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
})
HEUN_PP2 = "sample_heunpp2"  # Forge: 3 calls a step, 2 on the step before the last sigma, 1 on the last
DPM_FAST = "sample_dpm_fast"  # DPMSolver.dpm_solver_fast: exactly ``n`` model evaluations (its nfe)
UNKNOWABLE = {
    "sample_dpm_adaptive": "DPM adaptive chooses its step sizes while it runs",
    "restart_sampler": "Restart adds restart segments to the schedule",  # modules/sd_samplers_extra.py
}
# timesteps samplers (modules/sd_samplers_timesteps_impl.py): calls = len(timesteps) + offset
TIMESTEPS_CALLS = {"ddim": -1, "ddim_cfgpp": -1, "plms": 0, "unipc": 0}


class Unknown(Exception):
    """The number of calls of this pass cannot be known in advance; the message says why."""


@dataclasses.dataclass(frozen=True)
class PassCalls:
    """Where a model call stands in its sampling pass.

    ``index``: this call, 0-based (the CFG denoiser's ``step``); ``total``: the model calls the pass makes
    (exact) or the host's ``total_steps`` (``exact`` False); ``how``: how ``total`` was found (for logs).
    """

    index: int
    total: int
    exact: bool
    how: str


def function_name(sampler) -> str:
    """The sampler function's name: ``Sampler.funcname`` is a ``k_diffusion.sampling`` attribute name or
    the function itself (timesteps samplers, Restart, LCM, Forge's DDPM)."""
    func = getattr(sampler, "funcname", None)
    if isinstance(func, str):
        return func
    return getattr(func, "__name__", "") or getattr(getattr(sampler, "func", None), "__name__", "") or ""


def sigma_schedule_calls(name: str, sigmas: Sequence[float], *, n: int | None = None) -> int:
    """Model calls a k-diffusion sampler function makes over ``sigmas`` (the schedule it is given).

    ``n``: the ``n`` argument DPM fast gets (A1111: ``steps`` in txt2img, ``len(sigmas) − 1`` in img2img).
    Raises ``Unknown`` for samplers whose count depends on more than the schedule, or that are not listed.
    """
    steps = len(sigmas) - 1
    if steps < 0:
        raise Unknown("the sampler's schedule is empty")
    if name in ONE_CALL_PER_STEP:
        return steps
    if name in TWO_CALLS_UNLESS_TO_ZERO:
        return sum(1 if float(sigmas[i + 1]) == 0 else 2 for i in range(steps))
    if name == HEUN_PP2:
        end = float(sigmas[-1])
        return sum(1 if float(sigmas[i + 1]) == end else 2 if float(sigmas[i + 2]) == end else 3 for i in range(steps))
    if name == DPM_FAST:
        return int(n if n is not None else steps)
    if name in UNKNOWABLE:
        raise Unknown(UNKNOWABLE[name])
    raise Unknown(f"sampler function {name or '?'} is not one whose calls PAG knows")


def timesteps_calls(name: str, timesteps: Sequence[int]) -> int:
    """Model calls of a timesteps sampler (DDIM, DDIM CFG++, PLMS, UniPC) over the timesteps it is given."""
    if name not in TIMESTEPS_CALLS:
        raise Unknown(f"timesteps sampler {name or '?'} is not one whose calls PAG knows")
    return max(len(timesteps) + TIMESTEPS_CALLS[name], 0)


def _setup_img2img_steps() -> Callable:
    from modules import sd_samplers_common  # the host's own (A1111, Forge 2, reForge)

    return sd_samplers_common.setup_img2img_steps


def pass_total(p, sampler, den) -> tuple[int, str]:
    """``(model calls, how)`` of the pass ``den`` (``sampler.model_wrap_cfg``) runs; raises ``Unknown``.

    Reads what the pass really samples: the sampler's own ``get_sigmas``/``get_timesteps`` with the steps
    ``sample``/``sample_img2img`` gave them. A pass is img2img-like (img2img, hires) when the sampler set
    ``den.init_latent`` (only ``sample_img2img`` does); its full step count then comes from the host's
    ``setup_img2img_steps(p, steps)`` with ``steps`` = ``hr_second_pass_steps or steps`` in the hires pass
    (``processing.StableDiffusionProcessingTxt2Img.sample_hr_pass``) and None in img2img, checked against
    the ``t_enc + 1`` the pass launched.
    """
    launched = getattr(den, "steps", None)
    if not isinstance(launched, int) or launched <= 0:
        raise Unknown("the sampler did not say how many steps it launched")
    name = function_name(sampler)
    if name in UNKNOWABLE:
        raise Unknown(UNKNOWABLE[name])
    img2img = getattr(den, "init_latent", None) is not None
    if img2img:
        hires = bool(getattr(p, "is_hr_pass", False))
        asked = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else None
        steps, t_enc = _setup_img2img_steps()(p, asked)
        if t_enc + 1 != launched:
            raise Unknown(f"the pass launched {launched} steps, not the t_enc + 1 = {t_enc + 1} of its settings")
    else:
        steps, t_enc = launched, None
    if callable(getattr(sampler, "get_sigmas", None)):
        if getattr(p, "sampler_noise_scheduler_override", None):
            raise Unknown("a script replaced the noise schedule")
        sigmas = [float(s) for s in _host_list(sampler.get_sigmas(p, steps))]
        sched = sigmas[steps - t_enc - 1:] if img2img else sigmas
        calls = sigma_schedule_calls(name, sched, n=len(sched) - 1 if img2img else steps)
        return calls, f"{name} over {len(sched)} sigmas{' ending at 0' if sched and sched[-1] == 0 else ''}"
    if callable(getattr(sampler, "get_timesteps", None)):
        timesteps = [int(t) for t in sampler.get_timesteps(p, steps).tolist()]
        sched = timesteps[:t_enc] if img2img else timesteps
        return timesteps_calls(name, sched), f"{name} over {len(sched)} timesteps"
    raise Unknown(f"{type(sampler).__name__} has neither get_sigmas nor get_timesteps")


def _host_list(values) -> list:
    """A schedule as host numbers: a tensor is read from the device once (not once per element)."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


class PassCounter:
    """Per job: ``at(p, sampler, den)`` → ``PassCalls`` for the call in progress, counted once per pass."""

    def __init__(self):
        self._key = None
        self._found: tuple[int | None, str] = (None, "")

    def at(self, p, sampler, den) -> PassCalls | None:
        """None when the host gives no call counter (``den.step``) to place the call with."""
        index = getattr(den, "step", None)
        if not isinstance(index, int):
            return None
        key = (id(sampler), id(den), getattr(den, "steps", None), getattr(den, "total_steps", None),
               getattr(den, "init_latent", None) is not None, bool(getattr(p, "is_hr_pass", False)))
        if key != self._key:
            self._key = key
            try:
                self._found = pass_total(p, sampler, den)
            except Unknown as why:
                self._found = (None, str(why))
            except Exception as err:  # a host that differs from the ones above: never break the generation
                self._found = (None, f"{type(err).__name__}: {err}")
            total, how = self._found
            if total is None:
                log.debug("PAG: this pass's model calls cannot be known in advance (%s); the step window counts "
                          "the sampler's steps instead (%s total)", how, getattr(den, "total_steps", None))
            else:
                log.debug("PAG: this pass makes %d model calls (%s; the host counts %s)", total, how,
                          getattr(den, "total_steps", None))
        total, how = self._found
        if total is None:
            host_total = getattr(den, "total_steps", None)
            if not isinstance(host_total, int) or host_total <= 0:
                return None
            return PassCalls(index, host_total, False, how)
        return PassCalls(index, max(total, 1), True, how)
