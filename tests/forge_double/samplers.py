"""The sampler layer of Forge 2 / reForge over the patcher doubles: one sampling pass as the hosts run it.

Both hosts keep A1111 1.10's sampler modules (diffed against A1111 1.10.1 at /work/hosts: the pass
structure below is unchanged, only ``sampling_prepare``/``sampling_cleanup`` and device moves are added):

- ``Sampler.initialize``/``launch_sampling`` mirror ``modules/sd_samplers_common.py``: ``step = 0``,
  then ``steps`` and ``total_steps = config.total_steps(steps)`` (``2·steps`` for ``second_order``);
  ``setup_img2img_steps`` and ``SamplerData`` are that file's (the A1111 double's, identical in both hosts);
- ``KDiffusionSampler`` mirrors ``modules/sd_samplers_kdiffusion.py``: ``sample`` runs the real
  ``k_diffusion.sampling`` function over ``get_sigmas(p, steps)``; ``sample_img2img`` over
  ``sigmas[steps − t_enc − 1:]``, launching ``t_enc + 1`` steps and setting ``init_latent``.
  ``get_sigmas`` is the host's with the ``karras`` scheduler only (and ``discard_next_to_last_sigma``),
  over the double's SD1.5 sigma range;
- ``CompVisSampler`` mirrors ``modules/sd_samplers_timesteps.py`` (``get_timesteps``, ``timesteps[:t_enc]``
  in img2img) and runs ``ddim``/``plms`` of ``sd_samplers_timesteps_impl.py`` (byte-identical to A1111's in
  Forge 2, so the A1111 double's copies);
- ``CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)`` mirrors the
  sampler-facing side of Forge's ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward``: the
  timesteps samplers' ``classic_ddim_eps_estimation`` (timestep → the model's sigma, ``x`` scaled by
  ``sqrt(σ² + 1)``, eps returned), one prompt per image, then the patcher-level denoiser double
  (``webui.Forge2Denoiser``/``ReForgeDenoiser``: ``sampling_function``, ``step += 1``);
- ``run_pass`` mirrors the order in ``modules/processing.py``: ``create_sampler``, ``forge_objects`` reset,
  ``process_before_every_sampling`` (the hook), then ``sample``/``sample_img2img``.
"""

import k_diffusion.sampling
import torch

from modules.sd_samplers_common import SamplerData, setup_img2img_steps
from modules.sd_samplers_timesteps import ddim, plms

# the double's model: SD1.5's scaled-linear schedule (Forge: alphas_cumprod = 1 / (predictor.sigmas² + 1))
_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - _BETAS, 0).float()
SIGMAS = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5

SAMPLERS = {  # name → (function, options): the rows of the hosts' sampler tables the double runs
    "Euler": ("sample_euler", {}),
    "Heun": ("sample_heun", {"second_order": True}),
    "DPM2": ("sample_dpm_2", {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    "DDIM": (ddim, {}),
    "PLMS": (plms, {}),
}


def cfg_denoiser_class(base):
    """Forge's ``CFGDenoiser`` over the patcher-level denoiser double ``base`` (Forge 2 or reForge)."""

    class CFGDenoiser(base):
        def __init__(self, p, sampler, timesteps):
            super().__init__(p)
            self.sampler = sampler
            self.steps = None
            self.init_latent = None
            self.mask = self.nmask = None
            self.classic_ddim_eps_estimation = timesteps

        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
            if self.classic_ddim_eps_estimation:
                fake_sigmas = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5
                sigma = fake_sigmas[sigma.round().long().clip(0, fake_sigmas.shape[0] - 1)].to(x.dtype)
                x = x * ((sigma ** 2 + 1) ** 0.5)[:, None, None, None]
            conds_list = [[(i, 1.0)] for i in range(x.shape[0])]
            denoised = self(x, sigma, uncond, cond, conds_list, cond_scale, image_cond)
            if self.classic_ddim_eps_estimation:
                return (x - denoised) / sigma[:, None, None, None]
            return denoised

    return CFGDenoiser


class _Model:
    """What the sampler function is handed: the CFG denoiser module (``model.inner_model.inner_model`` is
    ``sd_model``, whose ``alphas_cumprod`` the timesteps samplers read)."""

    def __init__(self, den):
        self.den = den
        self.inner_model = den.inner_model
        self.cond_scale_miltiplier = 1.0

    def __call__(self, x, sigma, **extra_args):
        return self.den.forward(x, sigma, **extra_args)


class Sampler:
    def __init__(self, name, p, denoiser_cls, *, timesteps):
        funcname, options = SAMPLERS[name]
        self.funcname = funcname
        self.func = getattr(k_diffusion.sampling, funcname) if isinstance(funcname, str) else funcname
        self.config = SamplerData(name, None, [], options)
        self.model_wrap_cfg = cfg_denoiser_class(denoiser_cls)(p, self, timesteps)
        self.sampler_extra_args = None

    def initialize(self, p):
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        return {}

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        return func()

    def _run(self, x, extra_kwargs, cond, uncond, p):
        self.sampler_extra_args = {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale, "s_min_uncond": 0.0,
                                   "image_cond": None}
        return self.func(_Model(self.model_wrap_cfg), x, extra_args=self.sampler_extra_args, disable=True, **extra_kwargs)


class KDiffusionSampler(Sampler):
    def get_sigmas(self, p, steps):
        discard = self.config.options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard else 0
        sigmas = k_diffusion.sampling.get_sigmas_karras(n=steps, sigma_min=float(SIGMAS[0]), sigma_max=float(SIGMAS[-1]))
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def sample(self, p, x, cond, uncond, steps=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        kwargs = self.initialize(p)
        return self.launch_sampling(steps, lambda: self._run(x, {**kwargs, "sigmas": sigmas}, cond, uncond, p))

    def sample_img2img(self, p, x, noise, cond, uncond, steps=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        kwargs = self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        return self.launch_sampling(t_enc + 1, lambda: self._run(xi, {**kwargs, "sigmas": sigma_sched}, cond, uncond, p))


class CompVisSampler(Sampler):
    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, cond, uncond, steps=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        kwargs = self.initialize(p)
        return self.launch_sampling(steps, lambda: self._run(x, {**kwargs, "timesteps": timesteps}, cond, uncond, p))

    def sample_img2img(self, p, x, noise, cond, uncond, steps=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        a = ALPHAS_CUMPROD[timesteps[t_enc]]
        xi = x * a.sqrt() + noise * (1 - a).sqrt()
        kwargs = self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        return self.launch_sampling(t_enc + 1, lambda: self._run(xi, {**kwargs, "timesteps": timesteps[:t_enc]}, cond, uncond, p))


def create_sampler(name, p, denoiser_cls):
    """Mirrors ``sd_samplers.create_sampler``: a new sampler (and CFG denoiser) for every pass."""
    timesteps = not isinstance(SAMPLERS[name][0], str)
    return (CompVisSampler if timesteps else KDiffusionSampler)(name, p, denoiser_cls, timesteps=timesteps)


def run_pass(p, name, hook, x, cond, uncond, *, img2img=False, hires=False, steps=None, seed=0):
    """One pass in ``processing.py``'s order; img2img-like passes (img2img, hires) start from latent ``x``."""
    p.is_hr_pass = hires
    p.sampler = create_sampler(name, p, p.denoiser_cls)
    p.sd_model.alphas_cumprod = ALPHAS_CUMPROD  # Forge: CompVisTimestepsDenoiser.__init__ sets it on sd_model
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
    hook(p)
    with torch.no_grad():
        if img2img:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            return p.sampler.sample_img2img(p, x, noise, cond, uncond, steps=steps)
        return p.sampler.sample(p, torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)), cond, uncond, steps=steps)


def processing_fields(p, denoiser_cls, **fields):
    """The ``StableDiffusionProcessing`` fields a pass reads (``webui.Processing`` has the patcher side)."""
    defaults = dict(denoiser_cls=denoiser_cls, cfg_scale=5.0, denoising_strength=0.5, hr_second_pass_steps=0,
                    sampler_noise_scheduler_override=None, scheduler=None, hr_scheduler=None)
    for key, value in {**defaults, **fields}.items():
        setattr(p, key, value)
    return p

