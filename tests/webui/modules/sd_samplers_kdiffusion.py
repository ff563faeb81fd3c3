"""Double of ``modules/sd_samplers_kdiffusion.py`` (A1111 1.10) plus the few ``modules/sd_schedulers.py``
schedules it needs.

The samplers are the real ``k_diffusion.sampling`` functions driving ``CFGDenoiserKDiffusion``, whose
``inner_model`` is the real ``k_diffusion.external.CompVisDenoiser`` (``CompVisVDenoiser`` for v models)
around ``shared.sd_model``, built lazily like the host. Only a subset of the host's sampler table is
listed (Euler a, Euler, DPM++ 2M, LMS, Heun, DPM++ 2S a, DPM++ SDE). Progress bars follow
``cmd_opts.disable_console_progressbars`` (the host always shows them).
"""
from __future__ import annotations

import dataclasses
import inspect

import k_diffusion.external
import k_diffusion.sampling
import torch

import modules.shared as shared
from modules import devices, sd_samplers_cfg_denoiser, sd_samplers_common
from modules.script_callbacks import ExtraNoiseParams, extra_noise_callback
from modules.sd_samplers_cfg_denoiser import CFGDenoiser  # noqa: F401  (re-exported like the host)
from modules.shared import opts

samplers_k_diffusion = [
    ("DPM++ 2M", "sample_dpmpp_2m", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("DPM++ SDE", "sample_dpmpp_sde", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", ["k_dpmpp_2s_a"], {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    ("Euler a", "sample_euler_ancestral", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
    ("LMS", "sample_lms", ["k_lms"], {}),
    ("Heun", "sample_heun", ["k_heun"], {"second_order": True}),
]
"""Mirrors ``sd_samplers_kdiffusion.samplers_k_diffusion`` (subset): label, function, aliases, options."""

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
    if callable(funcname) or hasattr(k_diffusion.sampling, funcname)
]

sampler_extra_params = {
    "sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_fast": ["s_noise"],
    "sample_dpm_2_ancestral": ["s_noise"],
    "sample_dpmpp_2s_ancestral": ["s_noise"],
    "sample_dpmpp_sde": ["s_noise"],
    "sample_dpmpp_2m_sde": ["s_noise"],
    "sample_dpmpp_3m_sde": ["s_noise"],
}
"""Mirrors ``sd_samplers_kdiffusion.sampler_extra_params``."""

k_diffusion_samplers_map = {x.name: x for x in samplers_data_k_diffusion}


@dataclasses.dataclass
class Scheduler:
    """Mirrors ``sd_schedulers.Scheduler``."""

    name: str
    label: str
    function: object
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: list = None


def uniform(n, sigma_min, sigma_max, inner_model, device):
    """Mirrors ``sd_schedulers.uniform``: the model wrapper's own evenly spaced schedule."""
    return inner_model.get_sigmas(n).to(device)


def sgm_uniform(n, sigma_min, sigma_max, inner_model, device):
    """Mirrors ``sd_schedulers.sgm_uniform``: evenly spaced timesteps, last step dropped, then 0."""
    start = inner_model.sigma_to_t(torch.tensor(sigma_max))
    end = inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigs = [inner_model.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    sigs += [0.0]
    return torch.FloatTensor(sigs).to(device)


schedulers = [
    Scheduler("automatic", "Automatic", None),
    Scheduler("uniform", "Uniform", uniform, need_inner_model=True),
    Scheduler("karras", "Karras", k_diffusion.sampling.get_sigmas_karras, default_rho=7.0),
    Scheduler("exponential", "Exponential", k_diffusion.sampling.get_sigmas_exponential),
    Scheduler("polyexponential", "Polyexponential", k_diffusion.sampling.get_sigmas_polyexponential, default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", sgm_uniform, need_inner_model=True, aliases=["SGMUniform"]),
]
"""Mirrors ``sd_schedulers.schedulers`` (subset)."""
schedulers_map = {**{x.name: x for x in schedulers}, **{x.label: x for x in schedulers}}
k_diffusion_scheduler = {x.name: x.function for x in schedulers}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    """Mirrors ``sd_samplers_kdiffusion.CFGDenoiserKDiffusion``: x0-predicting CFG denoiser."""

    @property
    def inner_model(self):
        """Lazily wrap ``shared.sd_model`` in ``CompVisDenoiser``/``CompVisVDenoiser`` (or the model's own
        ``create_denoiser()``), like the host; ``update_inner_model`` clears it."""
        if self.model_wrap is None:
            denoiser_constructor = getattr(shared.sd_model, "create_denoiser", None)
            if denoiser_constructor is not None:
                self.model_wrap = denoiser_constructor()
            else:
                denoiser = k_diffusion.external.CompVisVDenoiser if shared.sd_model.parameterization == "v" else k_diffusion.external.CompVisDenoiser
                self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    """Mirrors ``sd_samplers_kdiffusion.KDiffusionSampler``."""

    def __init__(self, funcname, sd_model, options=None):
        """Mirrors ``KDiffusionSampler.__init__`` (modules/sd_samplers_kdiffusion.py)."""
        super().__init__(funcname)
        self.extra_params = sampler_extra_params.get(funcname, [])
        self.options = options or {}
        self.func = funcname if callable(funcname) else getattr(k_diffusion.sampling, self.funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        """Mirrors ``KDiffusionSampler.get_sigmas``: the schedule chosen by ``p.scheduler`` (or the sampler's
        default), with the model's sigma range; returned on the CPU."""
        discard_next_to_last_sigma = self.config is not None and self.config.options.get("discard_next_to_last_sigma", False)
        if opts.always_discard_next_to_last_sigma and not discard_next_to_last_sigma:
            discard_next_to_last_sigma = True
            p.extra_generation_params["Discard penultimate sigma"] = True

        steps += 1 if discard_next_to_last_sigma else 0

        is_hr_pass = getattr(p, "is_hr_pass", False)
        scheduler_name = (getattr(p, "hr_scheduler", None) if is_hr_pass else getattr(p, "scheduler", None)) or "Automatic"
        if scheduler_name == "Automatic":
            scheduler_name = self.config.options.get("scheduler", None)
        scheduler = schedulers_map.get(scheduler_name)

        m_sigma_min, m_sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
        sigma_min, sigma_max = (0.1, 10) if opts.use_old_karras_scheduler_sigmas else (m_sigma_min, m_sigma_max)

        override = getattr(p, "sampler_noise_scheduler_override", None)
        if override:
            sigmas = override(steps)
        elif scheduler is None or scheduler.function is None:
            sigmas = self.model_wrap.get_sigmas(steps)
        else:
            sigmas_kwargs = {"sigma_min": sigma_min, "sigma_max": sigma_max}
            if scheduler.label != "Automatic" and not is_hr_pass:
                p.extra_generation_params["Schedule type"] = scheduler.label
            elif scheduler.label != p.extra_generation_params.get("Schedule type"):
                p.extra_generation_params["Hires schedule type"] = scheduler.label
            if opts.sigma_min != 0 and opts.sigma_min != m_sigma_min:
                sigmas_kwargs["sigma_min"] = opts.sigma_min
                p.extra_generation_params["Schedule min sigma"] = opts.sigma_min
            if opts.sigma_max != 0 and opts.sigma_max != m_sigma_max:
                sigmas_kwargs["sigma_max"] = opts.sigma_max
                p.extra_generation_params["Schedule max sigma"] = opts.sigma_max
            if scheduler.default_rho != -1 and opts.rho != 0 and opts.rho != scheduler.default_rho:
                sigmas_kwargs["rho"] = opts.rho
                p.extra_generation_params["Schedule rho"] = opts.rho
            if scheduler.need_inner_model:
                sigmas_kwargs["inner_model"] = self.model_wrap
            sigmas = scheduler.function(n=steps, **sigmas_kwargs, device=devices.cpu)

        if discard_next_to_last_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])

        return sigmas.cpu()

    def _add_sigma_kwargs(self, extra_params_kwargs, sigma_sched, *, img2img):
        """The host's per-signature keyword filling (n, sigma_min/max, sigma_sched, sigmas)."""
        parameters = inspect.signature(self.func).parameters
        if img2img:
            if "sigma_min" in parameters:
                extra_params_kwargs["sigma_min"] = sigma_sched[-2]
            if "sigma_max" in parameters:
                extra_params_kwargs["sigma_max"] = sigma_sched[0]
            if "n" in parameters:
                extra_params_kwargs["n"] = len(sigma_sched) - 1
            if "sigma_sched" in parameters:
                extra_params_kwargs["sigma_sched"] = sigma_sched
        else:
            if "n" in parameters:
                extra_params_kwargs["n"] = len(sigma_sched) - 1
            if "sigma_min" in parameters:
                extra_params_kwargs["sigma_min"] = self.model_wrap.sigmas[0].item()
                extra_params_kwargs["sigma_max"] = self.model_wrap.sigmas[-1].item()
        if "sigmas" in parameters:
            extra_params_kwargs["sigmas"] = sigma_sched

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors ``KDiffusionSampler.sample_img2img``: noise ``x`` to the first sigma of the truncated
        schedule and run ``t_enc + 1`` steps; ``init_latent = x`` for the mask blend."""
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)

        sigmas = self.get_sigmas(p, steps).to(x.device)
        sigma_sched = sigmas[steps - t_enc - 1:]

        x = x.to(noise)
        xi = x + noise * sigma_sched[0]

        if opts.img2img_extra_noise > 0:
            p.extra_generation_params["Extra noise"] = opts.img2img_extra_noise
            extra_noise_params = ExtraNoiseParams(noise, x, xi)
            extra_noise_callback(extra_noise_params)
            noise = extra_noise_params.noise
            xi += noise * opts.img2img_extra_noise

        extra_params_kwargs = self.initialize(p)
        self._add_sigma_kwargs(extra_params_kwargs, sigma_sched, img2img=True)

        if self.config.options.get("brownian_noise", False):
            extra_params_kwargs["noise_sampler"] = self.create_noise_sampler(x, sigmas, p)

        if self.config.options.get("solver_type", None) == "heun":
            extra_params_kwargs["solver_type"] = "heun"

        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }

        samples = self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args, disable=shared.cmd_opts.disable_console_progressbars, callback=self.callback_state, **extra_params_kwargs))

        self.add_infotext(p)
        return samples

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors ``KDiffusionSampler.sample``: scale unit noise ``x`` by the first sigma and run ``steps``."""
        steps = steps or p.steps

        sigmas = self.get_sigmas(p, steps).to(x.device)

        if opts.sgm_noise_multiplier:
            p.extra_generation_params["SGM noise multiplier"] = True
            x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = x * sigmas[0]

        extra_params_kwargs = self.initialize(p)
        self._add_sigma_kwargs(extra_params_kwargs, sigmas, img2img=False)
        if "n" in extra_params_kwargs:
            extra_params_kwargs["n"] = steps

        if self.config.options.get("brownian_noise", False):
            extra_params_kwargs["noise_sampler"] = self.create_noise_sampler(x, sigmas, p)

        if self.config.options.get("solver_type", None) == "heun":
            extra_params_kwargs["solver_type"] = "heun"

        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }

        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=shared.cmd_opts.disable_console_progressbars, callback=self.callback_state, **extra_params_kwargs))

        self.add_infotext(p)
        return samples
