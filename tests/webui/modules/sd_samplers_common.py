"""Double of ``modules/sd_samplers_common.py`` (A1111 1.10): sampler base class and shared helpers.

Kept: ``SamplerData`` (``total_steps`` doubles for ``second_order``), ``setup_img2img_steps``,
``store_latent``, ``InterruptedException``, ``apply_refiner`` (ratio by sigma/timestep or by step, then a
model swap), ``TorchHijack`` and ``Sampler`` (``callback_state``, ``launch_sampling``, ``initialize``,
``add_infotext``, ``create_noise_sampler``). Dropped: VAE decoding / live preview images.

The refiner swap calls ``sd_models_double.reload_model_weights(info=...)`` (test-only stand-in for
``sd_models.reload_model_weights``): give ``p.refiner_checkpoint_info`` a ``CheckpointInfo`` from that
module whose ``model`` is the refiner.
"""
from __future__ import annotations

import inspect
from collections import namedtuple

import k_diffusion.sampling
import torch

from modules import devices, shared
from modules.shared import opts, state

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    """Mirrors ``sd_samplers_common.SamplerData``."""

    def total_steps(self, steps):
        """Expected number of denoiser calls: ``steps * 2`` for second-order samplers."""
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


def setup_img2img_steps(p, steps=None):
    """Mirrors ``sd_samplers_common.setup_img2img_steps``: ``(steps, t_enc)`` from denoising strength."""
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def store_latent(decoded):
    """Mirrors ``sd_samplers_common.store_latent``: keep the preview latent on ``state`` (no decoding)."""
    state.current_latent = decoded


def is_sampler_using_eta_noise_seed_delta(p):
    """Mirrors ``sd_samplers_common.is_sampler_using_eta_noise_seed_delta``."""
    from modules import sd_samplers

    sampler_config = sd_samplers.find_sampler_config(p.sampler_name)
    eta = p.eta
    if eta is None and getattr(p, "sampler", None) is not None:
        eta = p.sampler.eta
    if eta is None and sampler_config is not None:
        eta = 0 if sampler_config.options.get("default_eta_is_0", False) else 1.0
    if eta == 0:
        return False
    return sampler_config.options.get("uses_ensd", False)


class InterruptedException(BaseException):
    """Mirrors ``sd_samplers_common.InterruptedException`` (a BaseException, caught by ``launch_sampling``)."""


def apply_refiner(cfg_denoiser, sigma=None):
    """Mirrors ``sd_samplers_common.apply_refiner`` (1.9+ signature): switch to the refiner checkpoint
    once the completed ratio passes ``p.refiner_switch_at``; return True when it switched.

    The double reads the refiner fields with ``getattr`` (a bare ``p`` without them never switches)."""
    p = cfg_denoiser.p

    if opts.refiner_switch_by_sample_steps or sigma is None:
        completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
        p.extra_generation_params["Refiner switch by sampling steps"] = True
    else:
        try:
            timestep = torch.argmin(torch.abs(cfg_denoiser.inner_model.sigmas - torch.max(sigma)))
        except AttributeError:  # timesteps samplers: sigma already is the timestep
            timestep = torch.max(sigma).to(dtype=int)
        completed_ratio = (999 - timestep) / 1000

    refiner_switch_at = getattr(p, "refiner_switch_at", None)
    refiner_checkpoint_info = getattr(p, "refiner_checkpoint_info", None)

    if refiner_switch_at is not None and completed_ratio < refiner_switch_at:
        return False

    if refiner_checkpoint_info is None or getattr(shared.sd_model, "sd_checkpoint_info", None) == refiner_checkpoint_info:
        return False

    if getattr(p, "enable_hr", False):
        is_second_pass = p.is_hr_pass
        if opts.hires_fix_refiner_pass == "first pass" and is_second_pass:
            return False
        if opts.hires_fix_refiner_pass == "second pass" and not is_second_pass:
            return False
        if opts.hires_fix_refiner_pass != "second pass":
            p.extra_generation_params["Hires refiner"] = opts.hires_fix_refiner_pass

    p.extra_generation_params["Refiner"] = refiner_checkpoint_info.short_title
    p.extra_generation_params["Refiner switch at"] = refiner_switch_at

    from modules import sd_models_double

    sd_models_double.reload_model_weights(info=refiner_checkpoint_info)

    devices.torch_gc()
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class TorchHijack:
    """Mirrors ``sd_samplers_common.TorchHijack``: stands in for ``torch`` inside ``k_diffusion.sampling``
    so ``randn_like`` draws from ``p.rng``. Double: without ``p.rng`` it falls back to ``torch.randn_like``
    (the global generator: seed it with ``torch.manual_seed``)."""

    def __init__(self, p):
        """Mirrors ``TorchHijack.__init__`` (modules/sd_samplers_common.py)."""
        self.rng = getattr(p, "rng", None)

    def __getattr__(self, item):
        """Mirrors ``TorchHijack.__getattr__`` (modules/sd_samplers_common.py)."""
        if item == "randn_like":
            return self.randn_like
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def randn_like(self, x):
        """Mirrors ``TorchHijack.randn_like`` (modules/sd_samplers_common.py)."""
        if self.rng is not None:
            return self.rng.next()
        return torch.randn_like(x)


class Sampler:
    """Mirrors ``sd_samplers_common.Sampler``: state shared by the k-diffusion and timesteps samplers."""

    def __init__(self, funcname):
        """Mirrors ``Sampler.__init__`` (modules/sd_samplers_common.py)."""
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.sampler_noises = None
        self.stop_at = None
        self.eta = None
        self.config: SamplerData = None  # set by create_sampler
        self.last_latent = None
        self.s_min_uncond = None
        self.s_churn = 0.0
        self.s_tmin = 0.0
        self.s_tmax = float("inf")
        self.s_noise = 1.0

        self.eta_option_field = "eta_ancestral"
        self.eta_infotext_field = "Eta"
        self.eta_default = 1.0

        self.conditioning_key = shared.sd_model.model.conditioning_key

        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.options = {}

    def callback_state(self, d):
        """Mirrors ``Sampler.callback_state``: the per-step callback sets ``state.sampling_step``."""
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps, func):
        """Mirrors ``Sampler.launch_sampling``: set step counters, run, return ``last_latent`` on interrupt."""
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0

        try:
            return func()
        except RecursionError:
            print("Encountered RecursionError during sampling, returning last latent.")
            return self.last_latent
        except InterruptedException:
            return self.last_latent

    def number_of_needed_noises(self, p):
        """Mirrors ``Sampler.number_of_needed_noises``."""
        return p.steps

    def initialize(self, p) -> dict:
        """Mirrors ``Sampler.initialize``: hand ``p``, mask/nmask and step=0 to the CFG denoiser, hijack
        k-diffusion's ``torch``, collect eta/churn keyword arguments."""
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        p_eta = getattr(p, "eta", None)
        self.eta = p_eta if p_eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)

        k_diffusion.sampling.torch = TorchHijack(p)

        parameters = inspect.signature(self.func).parameters
        extra_params_kwargs = {}
        for param_name in self.extra_params:
            if hasattr(p, param_name) and param_name in parameters:
                extra_params_kwargs[param_name] = getattr(p, param_name)

        if "eta" in parameters:
            if self.eta != self.eta_default:
                p.extra_generation_params[self.eta_infotext_field] = self.eta
            extra_params_kwargs["eta"] = self.eta

        if len(self.extra_params) > 0:
            s_churn = getattr(opts, "s_churn", getattr(p, "s_churn", 0.0))
            s_tmin = getattr(opts, "s_tmin", getattr(p, "s_tmin", 0.0))
            s_tmax = getattr(opts, "s_tmax", getattr(p, "s_tmax", None)) or self.s_tmax  # 0 = inf
            s_noise = getattr(opts, "s_noise", getattr(p, "s_noise", 1.0))
            for key, value, default, label in (("s_churn", s_churn, self.s_churn, "Sigma churn"),
                                               ("s_tmin", s_tmin, self.s_tmin, "Sigma tmin"),
                                               ("s_tmax", s_tmax, self.s_tmax, "Sigma tmax"),
                                               ("s_noise", s_noise, self.s_noise, "Sigma noise")):
                if key in extra_params_kwargs and value != default:
                    extra_params_kwargs[key] = value
                    setattr(p, key, value)
                    p.extra_generation_params[label] = value

        return extra_params_kwargs

    def create_noise_sampler(self, x, sigmas, p):
        """Mirrors ``Sampler.create_noise_sampler`` (DPM++ SDE family): a Brownian tree seeded per image."""
        if shared.opts.no_dpmpp_sde_batch_determinism:
            return None
        from k_diffusion.sampling import BrownianTreeNoiseSampler

        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        seeds = getattr(p, "all_seeds", None)
        if seeds:
            iteration = getattr(p, "iteration", 0)
            seeds = seeds[iteration * p.batch_size:(iteration + 1) * p.batch_size]
        else:
            seeds = [int(torch.randint(0, 2**31 - 1, (1,)).item())]
        return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors ``Sampler.sample`` (abstract)."""
        raise NotImplementedError()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors ``Sampler.sample_img2img`` (abstract)."""
        raise NotImplementedError()

    def add_infotext(self, p):
        """Mirrors ``Sampler.add_infotext``: record padding in the infotext."""
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
        if self.model_wrap_cfg.padded_cond_uncond_v0:
            p.extra_generation_params["Pad conds v0"] = True
