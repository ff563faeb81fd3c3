"""Double of ``modules/sd_samplers_timesteps.py`` with ``modules/sd_samplers_timesteps_impl.py`` inline
(A1111 1.10): DDIM / DDIM CFG++ / PLMS driven by integer-valued timesteps.

``CFGDenoiserTimesteps`` returns **eps** (not x0): its ``inner_model`` is ``CompVisTimestepsDenoiser``
(``apply_model`` → eps) or ``CompVisTimestepsVDenoiser`` (v → eps); the mask is blended into the
*input* before denoising. UniPC is not provided.
"""
from __future__ import annotations

import inspect

import k_diffusion.sampling
import numpy as np
import torch
import tqdm

import modules.shared as shared
from modules import devices, sd_samplers_common
from modules.script_callbacks import ExtraNoiseParams, extra_noise_callback
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.shared import opts


# ----------------------------------------------------------------------------------------------------
# sd_samplers_timesteps_impl.py
# ----------------------------------------------------------------------------------------------------

def _ddim_schedule(model, timesteps, x, eta):
    """Shared set-up of ``sd_samplers_timesteps_impl.ddim``/``ddim_cfgpp``: alphas at t and at the
    previous timestep (float64), and the eta-scaled sigmas."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    prev_index = torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))
    alphas_prev = alphas_cumprod[prev_index].to(torch.float64 if x.device.type != "mps" else torch.float32)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    a_prev_np = alphas_prev.cpu().numpy()
    a_np = alphas.cpu().numpy()
    sigmas = eta * np.sqrt((1 - a_prev_np) / (1 - a_np) * (1 - a_np / a_prev_np))
    return alphas, alphas_prev, sqrt_one_minus_alphas, sigmas


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    """Mirrors ``sd_samplers_timesteps_impl.ddim``: walk the timesteps from high to low; each step asks the
    CFG denoiser for eps at ``timesteps[index]`` and moves x to the previous timestep."""
    alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = _ddim_schedule(model, timesteps, x, eta)

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in tqdm.trange(len(timesteps) - 1, disable=disable):
        index = len(timesteps) - 1 - i

        e_t = model(x, timesteps[index].item() * s_in, **extra_args)

        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x

        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * k_diffusion.sampling.torch.randn_like(x)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise

        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})

    return x


@torch.no_grad()
def ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    """Mirrors ``sd_samplers_timesteps_impl.ddim_cfgpp`` (1.10): CFG scale divided by 12.5, and the
    direction term uses the uncond eps (``model.last_noise_uncond``)."""
    alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = _ddim_schedule(model, timesteps, x, eta)

    model.cond_scale_miltiplier = 1 / 12.5
    model.need_last_noise_uncond = True

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in tqdm.trange(len(timesteps) - 1, disable=disable):
        index = len(timesteps) - 1 - i

        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        last_noise_uncond = model.last_noise_uncond

        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x

        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * last_noise_uncond
        noise = sigma_t * k_diffusion.sampling.torch.randn_like(x)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise

        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})

    return x


@torch.no_grad()
def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """Mirrors ``sd_samplers_timesteps_impl.plms``: pseudo linear multistep on eps (the first step is a
    2nd-order improved-Euler step that calls the denoiser twice)."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64 if x.device.type != "mps" else torch.float32)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones((x.shape[0]))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def get_x_prev_and_pred_x0(e_t, index):
        """Mirrors ``plms.get_x_prev_and_pred_x0`` (modules/sd_samplers_timesteps_impl.py)."""
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1. - a_prev).sqrt() * e_t, pred_x0

    for i in tqdm.trange(len(timesteps) - 1, disable=disable):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in

        e_t = model(x, ts, **extra_args)

        if len(old_eps) == 0:
            x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = model(x_prev, t_next, **extra_args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24

        x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t_prime, index)

        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)

        x = x_prev

        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})

    return x


# ----------------------------------------------------------------------------------------------------
# sd_samplers_timesteps.py
# ----------------------------------------------------------------------------------------------------

samplers_timesteps = [
    ("DDIM", ddim, ["ddim"], {}),
    ("DDIM CFG++", ddim_cfgpp, ["ddim_cfgpp"], {}),
    ("PLMS", plms, ["plms"], {}),
]
"""Mirrors ``sd_samplers_timesteps.samplers_timesteps`` (UniPC left out)."""

samplers_data_timesteps = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: CompVisSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_timesteps
]


class CompVisTimestepsDenoiser(torch.nn.Module):
    """Mirrors ``sd_samplers_timesteps.CompVisTimestepsDenoiser``: ``apply_model`` at the timestep → eps."""

    def __init__(self, model, *args, **kwargs):
        """Mirrors ``CompVisTimestepsDenoiser.__init__`` (modules/sd_samplers_timesteps.py)."""
        super().__init__(*args, **kwargs)
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        """Mirrors ``CompVisTimestepsDenoiser.forward`` (modules/sd_samplers_timesteps.py)."""
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiser(torch.nn.Module):
    """Mirrors ``sd_samplers_timesteps.CompVisTimestepsVDenoiser``: v prediction converted to eps."""

    def __init__(self, model, *args, **kwargs):
        """Mirrors ``CompVisTimestepsVDenoiser.__init__`` (modules/sd_samplers_timesteps.py)."""
        super().__init__(*args, **kwargs)
        self.inner_model = model

    def predict_eps_from_z_and_v(self, x_t, t, v):
        """eps = sqrt(a_t)·v + sqrt(1-a_t)·x_t."""
        idx = t.to(torch.int)
        return self.inner_model.sqrt_alphas_cumprod[idx, None, None, None] * v + self.inner_model.sqrt_one_minus_alphas_cumprod[idx, None, None, None] * x_t

    def forward(self, input, timesteps, **kwargs):
        """Mirrors ``CompVisTimestepsVDenoiser.forward`` (modules/sd_samplers_timesteps.py)."""
        model_output = self.inner_model.apply_model(input, timesteps, **kwargs)
        return self.predict_eps_from_z_and_v(input, timesteps, model_output)


class CFGDenoiserTimesteps(CFGDenoiser):
    """Mirrors ``sd_samplers_timesteps.CFGDenoiserTimesteps``: eps-space CFG, mask blended before."""

    def __init__(self, sampler):
        """Mirrors ``CFGDenoiserTimesteps.__init__`` (modules/sd_samplers_timesteps.py)."""
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        """x0 from eps at integer timestep ``sigma``: (x - sqrt(1-a)·eps) / sqrt(a)."""
        ts = sigma.to(dtype=int)
        a_t = self.alphas[ts][:, None, None, None]
        sqrt_one_minus_at = (1 - a_t).sqrt()
        return (x_in - sqrt_one_minus_at * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        """Lazily wrap ``shared.sd_model`` (eps or v) like the host."""
        if self.model_wrap is None:
            denoiser = CompVisTimestepsVDenoiser if shared.sd_model.parameterization == "v" else CompVisTimestepsDenoiser
            self.model_wrap = denoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    """Mirrors ``sd_samplers_timesteps.CompVisSampler``."""

    def __init__(self, funcname, sd_model):
        """Mirrors ``CompVisSampler.__init__`` (modules/sd_samplers_timesteps.py)."""
        super().__init__(funcname)
        self.eta_option_field = "eta_ddim"
        self.eta_infotext_field = "Eta DDIM"
        self.eta_default = 0.0
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)

    def get_timesteps(self, p, steps):
        """Mirrors ``CompVisSampler.get_timesteps``: ``range(0, 1000, 1000 // steps) + 1``, clipped to 999."""
        discard_next_to_last_sigma = self.config is not None and self.config.options.get("discard_next_to_last_sigma", False)
        if opts.always_discard_next_to_last_sigma and not discard_next_to_last_sigma:
            discard_next_to_last_sigma = True
            p.extra_generation_params["Discard penultimate sigma"] = True

        steps += 1 if discard_next_to_last_sigma else 0
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps)), device=devices.device) + 1, 0, 999)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors ``CompVisSampler.sample_img2img``: noise ``x`` to ``timesteps[t_enc]`` and run from there."""
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)

        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]

        alphas_cumprod = shared.sd_model.alphas_cumprod
        sqrt_alpha_cumprod = torch.sqrt(alphas_cumprod[timesteps[t_enc]])
        sqrt_one_minus_alpha_cumprod = torch.sqrt(1 - alphas_cumprod[timesteps[t_enc]])

        xi = x * sqrt_alpha_cumprod + noise * sqrt_one_minus_alpha_cumprod

        if opts.img2img_extra_noise > 0:
            p.extra_generation_params["Extra noise"] = opts.img2img_extra_noise
            extra_noise_params = ExtraNoiseParams(noise, x, xi)
            extra_noise_callback(extra_noise_params)
            noise = extra_noise_params.noise
            xi += noise * opts.img2img_extra_noise * sqrt_alpha_cumprod

        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "timesteps" in parameters:
            extra_params_kwargs["timesteps"] = timesteps_sched
        if "is_img2img" in parameters:
            extra_params_kwargs["is_img2img"] = True

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
        """Mirrors ``CompVisSampler.sample``: unit noise ``x`` is used as is (no sigma scaling)."""
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)

        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "timesteps" in parameters:
            extra_params_kwargs["timesteps"] = timesteps

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
