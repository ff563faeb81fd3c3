"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/processing.py``, in latent space.

Keeps the host's classes, field names, hook order and counts:
``process_images`` -> ``before_process`` (before override_settings), ``process_images_inner`` ->
``process`` -> per batch ``before_process_batch``, ``process_batch``, ``setup_conds``, ``p.sample``
(``process_before_every_sampling`` right before every sampler run, ``before_hr`` + a second
``process_before_every_sampling`` with ``p.is_hr_pass`` True for hires fix, a new sampler per
txt2img batch and per hires pass, one img2img sampler created in ``init``), ``post_sample``,
``postprocess_batch``, ``postprocess_batch_list``, per image ``postprocess_image``,
``postprocess_maskoverlay``, ``postprocess_image_after_composite``, infotext; then ``postprocess``
once at the end of ``process_images_inner`` (not in a ``finally``).

Differences from the host (on purpose, because there is no VAE, text encoder or checkpoint):
- "images" are latents: decoding is the identity, ``Processed.images`` holds ``[C, h, w]`` tensors;
- img2img ``init_images`` are latent tensors (``[C, h, w]`` or ``[1, C, h, w]``) and ``mask`` is a
  latent-resolution tensor (1 = repaint), no blur/crop/"only masked";
- noise: ``torch.Generator().manual_seed(seed)`` per image with ``seeds = seed + i`` (``ImageRNG``);
- conditioning: when a test sets ``p.c``/``p.uc`` before ``process_images`` they are used as given
  (plain tensors are wrapped into ``MulticondLearnedConditioning``/``ScheduledPromptConditioning``);
  otherwise they come from ``modules.prompt_parser`` and ``shared.sd_model`` like the host;
- hires fix is latent upscaling only (``shared.latent_upscale_modes`` names), no checkpoint switch;
- no extra networks, styles, saving, face restore, color correction, token merging, refiner.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from modules import errors, infotext_utils, scripts

opt_C = 4
opt_f = 8

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
"""Mirrors ``shared.latent_upscale_modes`` / ``latent_upscale_default_mode`` (used if shared lacks them)."""


def _shared():
    """Double-only helper (no upstream counterpart): late import of the sampling-path ``modules.shared``."""
    from modules import shared
    return shared


def _opt(name, default=None):
    """``shared.opts.<name>`` with a fallback for options the sampling-path double does not define."""
    try:
        return getattr(_shared().opts, name, default)
    except Exception:
        return default


def _state():
    """Double-only helper: ``shared.state`` (upstream imports ``from modules.shared import state``)."""
    return _shared().state


def _autocast():
    """Double-only helper: ``devices.autocast()`` when the devices double has it, else a null context."""
    from modules import devices
    fn = getattr(devices, "autocast", None)
    return fn() if fn is not None else contextlib.nullcontext()


def _torch_gc():
    """Double-only helper: ``devices.torch_gc()`` when available (upstream calls it directly)."""
    from modules import devices
    fn = getattr(devices, "torch_gc", None)
    if fn is not None:
        fn()


def _device():
    """Double-only helper: ``devices.device`` (where upstream's ``rng.ImageRNG`` puts the noise)."""
    from modules import devices
    return getattr(devices, "device", torch.device("cpu"))


def _sd_samplers():
    """Double-only helper: late import of ``modules.sd_samplers`` so tests can monkeypatch ``create_sampler``."""
    from modules import sd_samplers
    return sd_samplers


def _prompt_parser():
    """Double-only helper: late import of ``modules.prompt_parser``."""
    from modules import prompt_parser
    return prompt_parser


def slerp(val, low, high):
    """Mirrors ``modules/rng.py: slerp`` (spherical interpolation used for variation seeds)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    """Mirrors ``modules/rng.py: ImageRNG`` with CPU ``torch.Generator().manual_seed(seed)`` per image.

    ``next()`` returns ``[len(seeds), *shape]`` on ``devices.device``; the first call gives each seed's
    initial noise, later calls continue the same generators (like the host's ``is_first`` logic).
    Variation seeds (``subseed_strength``) are slerped in on the first call.
    """

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        """Mirrors ``modules/processing.py: ImageRNG.__init__``."""
        self.shape = tuple(int(s) for s in shape)
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    def first(self):
        """Mirrors ``ImageRNG.first``: seed noise, blended with subseed noise when requested."""
        xs = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = torch.randn(self.shape, generator=torch.Generator().manual_seed(int(subseed)))
                noise = slerp(self.subseed_strength, noise.reshape(1, -1), subnoise.reshape(1, -1)).reshape(self.shape)
            xs.append(noise)
        return torch.stack(xs).to(_device())

    def next(self):
        """Mirrors ``ImageRNG.next``."""
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(_device())


def create_random_tensors(shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0, p=None):
    """Mirrors ``processing.create_random_tensors``."""
    return ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=subseed_strength).next()


class DecodedSamples(list):
    """Mirrors ``processing.DecodedSamples`` (a list marked ``already_decoded``)."""

    already_decoded = True


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    """Mirrors ``processing.decode_latent_batch`` with an identity "VAE": one latent per item."""
    samples = DecodedSamples()
    for i in range(batch.shape[0]):
        sample = batch[i]
        if target_device is not None:
            sample = sample.to(target_device)
        samples.append(sample)
    return samples


def activate_extra_networks(p, extra_network_data):
    """Mirrors ``modules/extra_networks.py: activate`` for a host without networks.

    Upstream ``activate`` ends with ``p.scripts.after_extra_networks_activate(p, batch_number=p.iteration,
    prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds, extra_network_data=...)``; it is called per
    batch and again in ``sample_hr_pass`` for the hires pass, so the hook fires there too.
    """
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds, extra_network_data=extra_network_data)


def get_fixed_seed(seed):
    """Mirrors ``processing.get_fixed_seed``: '' / None / -1 / bad strings -> a random seed."""
    if seed == '' or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except Exception:
            seed = -1
    if seed == -1:
        return int(random.randrange(4294967294))
    return seed


def fix_seed(p):
    """Mirrors ``processing.fix_seed``."""
    p.seed = get_fixed_seed(p.seed)
    p.subseed = get_fixed_seed(p.subseed)


def program_version():
    """Mirrors ``processing.program_version`` (no git checkout here: None)."""
    return None


def _as_multicond(c, steps):
    """Wrap a plain tensor ``[B, T, D]`` into the host's ``MulticondLearnedConditioning`` (weight 1)."""
    if not isinstance(c, torch.Tensor):
        return c
    pp = _prompt_parser()
    batch = [[pp.ComposableScheduledPromptConditioning([pp.ScheduledPromptConditioning(steps, c[i])], 1.0)]
             for i in range(c.shape[0])]
    return pp.MulticondLearnedConditioning(shape=(c.shape[0],), batch=batch)


def _as_learned(uc, steps):
    """Wrap a plain tensor ``[B, T, D]`` into ``get_learned_conditioning``'s list of schedules."""
    if not isinstance(uc, torch.Tensor):
        return uc
    pp = _prompt_parser()
    return [[pp.ScheduledPromptConditioning(steps, uc[i])] for i in range(uc.shape[0])]


@dataclass(repr=False)
class StableDiffusionProcessing:
    """Mirrors ``processing.StableDiffusionProcessing`` (fields, script properties, conds, prompts)."""

    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    token_merging_ratio = 0
    token_merging_ratio_hr = 0
    disable_extra_networks: bool = False
    firstpass_image: Any = None

    scripts_value: Any = field(default=None, init=False)
    script_args_value: Any = field(default=None, init=False)
    scripts_setup_complete: bool = field(default=False, init=False)

    cached_uc = [None, None]
    cached_c = [None, None]

    comments: dict = None
    sampler: Any = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    paste_to: Any = field(default=None, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)
    rng: Any = field(default=None, init=False)
    step_multiplier: int = field(default=1, init=False)
    color_corrections: list = field(default=None, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    main_negative_prompt: str = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    user: str = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)
    sd_vae_name: str = field(default=None, init=False)
    sd_vae_hash: str = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        """Mirrors ``StableDiffusionProcessing.__post_init__``."""
        self.comments = {}
        if self.styles is None:
            self.styles = []
        self.sampler_noise_scheduler_override = None
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.script_args = self.script_args or {}
        self.refiner_checkpoint_info = None
        if not self.seed_enable_extras:
            self.subseed = -1
            self.subseed_strength = 0
            self.seed_resize_from_h = 0
            self.seed_resize_from_w = 0
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.conds_from_test = False

    def fill_fields_from_opts(self):
        """Mirrors ``StableDiffusionProcessing.fill_fields_from_opts`` (sampler extras from opts)."""
        self.s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else _opt("s_min_uncond", 0.0)
        self.s_churn = self.s_churn if self.s_churn is not None else _opt("s_churn", 0.0)
        self.s_tmin = self.s_tmin if self.s_tmin is not None else _opt("s_tmin", 0.0)
        self.s_tmax = (self.s_tmax if self.s_tmax is not None else _opt("s_tmax", 0.0)) or float('inf')
        self.s_noise = self.s_noise if self.s_noise is not None else _opt("s_noise", 1.0)

    @property
    def sd_model(self):  # noqa: F811 - the host shadows the dataclass field the same way
        """Mirrors ``StableDiffusionProcessing.sd_model``: always ``shared.sd_model``."""
        return _shared().sd_model

    @sd_model.setter
    def sd_model(self, value):
        """Mirrors ``modules/processing.py: StableDiffusionProcessing.sd_model`` (property)."""
        pass

    @property
    def scripts(self):
        """Mirrors ``StableDiffusionProcessing.scripts`` (the tab's ``ScriptRunner``)."""
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):
        """Mirrors ``modules/processing.py: StableDiffusionProcessing.scripts`` (property)."""
        self.scripts_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    @property
    def script_args(self):
        """Mirrors ``StableDiffusionProcessing.script_args``; assigning runs ``setup`` hooks once."""
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        """Mirrors ``modules/processing.py: StableDiffusionProcessing.script_args`` (property)."""
        self.script_args_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    def setup_scripts(self):
        """Mirrors ``StableDiffusionProcessing.setup_scripts``: ``setup_scrips(p, is_ui=not p.is_api)``."""
        self.scripts_setup_complete = True
        self.scripts.setup_scrips(self, is_ui=not self.is_api)

    def comment(self, text):
        """Mirrors ``StableDiffusionProcessing.comment``."""
        self.comments[text] = 1

    def txt2img_image_conditioning(self, x, width=None, height=None):
        """Mirrors ``txt2img_image_conditioning`` for non-inpainting models: zeros ``[B, 5, 1, 1]``."""
        self.is_using_inpainting_conditioning = False
        return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)

    def img2img_image_conditioning(self, source_image, latent_image, image_mask=None, round_image_mask=True):
        """Mirrors ``img2img_image_conditioning``: zeros ``[B, 5, 1, 1]`` for ordinary models; for inpainting
        models (``conditioning_key == "hybrid"``) ``inpainting_image_conditioning``'s ``[mask, masked image
        latent]`` (5 channels), in latent space: the masked image is the init latent with the repainted
        area zeroed (the host VAE-encodes the masked pixels)."""
        if getattr(getattr(self.sd_model, "model", None), "conditioning_key", None) != "hybrid":
            return latent_image.new_zeros(latent_image.shape[0], 5, 1, 1)
        b, _, h, w = latent_image.shape
        if image_mask is None:
            mask = latent_image.new_ones(b, 1, h, w)
        else:
            mask = torch.as_tensor(image_mask, dtype=latent_image.dtype, device=latent_image.device)
            mask = mask.reshape(1, 1, *mask.shape[-2:]).expand(b, 1, h, w)
            if round_image_mask:
                mask = torch.round(mask)
        return torch.cat([mask, latent_image * (1.0 - mask)], dim=1)

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Mirrors ``StableDiffusionProcessing.init`` (overridden by subclasses)."""
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        """Mirrors ``StableDiffusionProcessing.sample`` (abstract)."""
        raise NotImplementedError()

    def close(self):
        """Mirrors ``StableDiffusionProcessing.close``: drop sampler and conds."""
        self.sampler = None
        self.c = None
        self.uc = None
        if not _opt("persistent_cond_cache", True):
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def get_token_merging_ratio(self, for_hr=False):
        """Mirrors ``StableDiffusionProcessing.get_token_merging_ratio``."""
        if for_hr:
            return self.token_merging_ratio_hr or _opt("token_merging_ratio_hr", 0) or self.token_merging_ratio or _opt("token_merging_ratio", 0)
        return self.token_merging_ratio or _opt("token_merging_ratio", 0)

    def setup_prompts(self):
        """Mirrors ``StableDiffusionProcessing.setup_prompts`` (without styles)."""
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        elif isinstance(self.negative_prompt, list):
            self.all_prompts = [self.prompt] * len(self.negative_prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]

        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)

        if len(self.all_prompts) != len(self.all_negative_prompts):
            raise RuntimeError(f"Received a different number of prompts ({len(self.all_prompts)}) and negative prompts ({len(self.all_negative_prompts)})")

        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """Mirrors ``StableDiffusionProcessing.cached_params`` (what invalidates the cond cache)."""
        return (tuple(required_prompts), steps, hires_steps, use_old_scheduling, id(_shared().sd_model),
                self.width, self.height)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        """Mirrors ``StableDiffusionProcessing.get_conds_with_caching``."""
        use_old = _opt("use_old_scheduling", False)
        cached_params = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, use_old)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        with _autocast():
            cache[1] = function(_shared().sd_model, required_prompts, steps, hires_steps, use_old)
        cache[0] = cached_params
        return cache[1]

    def _total_steps(self, sampler_name, steps):
        """Double-only helper: ``find_sampler_config(name).total_steps(steps)`` as in upstream ``setup_conds``."""
        config = getattr(_sd_samplers(), "find_sampler_config", lambda name: None)(sampler_name)
        return config.total_steps(steps) if config is not None and hasattr(config, "total_steps") else steps

    def setup_conds(self):
        """Mirrors ``StableDiffusionProcessing.setup_conds``; keeps test-given ``p.c``/``p.uc``."""
        total_steps = self._total_steps(self.sampler_name, self.steps)
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps

        if self.conds_from_test or (self.c is not None and self.uc is not None):
            self.conds_from_test = True
            self.uc = _as_learned(self.uc, total_steps)
            self.c = _as_multicond(self.c, total_steps)
            return

        pp = _prompt_parser()
        prompts = pp.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = pp.SdConditioning(self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(pp.get_learned_conditioning, negative_prompts, total_steps, [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(pp.get_multicond_learned_conditioning, prompts, total_steps, [self.cached_c], self.extra_network_data)

    def get_conds(self):
        """Mirrors ``StableDiffusionProcessing.get_conds``."""
        return self.c, self.uc

    def parse_extra_network_prompts(self):
        """Mirrors ``parse_extra_network_prompts``; the double has no extra networks (prompts unchanged)."""
        self.extra_network_data = {}

    def save_samples(self) -> bool:
        """Mirrors ``StableDiffusionProcessing.save_samples``; the double never saves."""
        return False


class Processed:
    """Mirrors ``processing.Processed`` (``images`` are latent tensors)."""

    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None, all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        """Mirrors ``modules/processing.py: Processed.__init__``."""
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.subseed_strength = p.subseed_strength
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.image_cfg_scale = getattr(p, 'image_cfg_scale', None)
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.restore_faces = p.restore_faces
        self.face_restoration_model = None
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.sd_vae_name = p.sd_vae_name
        self.sd_vae_hash = p.sd_vae_hash
        self.seed_resize_from_w = p.seed_resize_from_w
        self.seed_resize_from_h = p.seed_resize_from_h
        self.denoising_strength = getattr(p, 'denoising_strength', None)
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.styles = p.styles
        self.job_timestamp = getattr(_state(), "job_timestamp", "0")
        self.clip_skip = _opt("CLIP_stop_at_last_layers", 1)
        self.token_merging_ratio = p.token_merging_ratio
        self.token_merging_ratio_hr = p.token_merging_ratio_hr
        self.eta = p.eta
        self.ddim_discretize = p.ddim_discretize
        self.s_churn = p.s_churn
        self.s_tmin = p.s_tmin
        self.s_tmax = p.s_tmax
        self.s_noise = p.s_noise
        self.s_min_uncond = p.s_min_uncond
        self.sampler_noise_scheduler_override = p.sampler_noise_scheduler_override
        self.prompt = self.prompt if not isinstance(self.prompt, list) else self.prompt[0]
        self.negative_prompt = self.negative_prompt if not isinstance(self.negative_prompt, list) else self.negative_prompt[0]
        self.seed = int(self.seed if not isinstance(self.seed, list) else self.seed[0]) if self.seed is not None else -1
        self.subseed = int(self.subseed if not isinstance(self.subseed, list) else self.subseed[0]) if self.subseed is not None else -1
        self.is_using_inpainting_conditioning = p.is_using_inpainting_conditioning
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)
        self.version = program_version()

    def js(self):
        """Mirrors ``Processed.js``: the JSON ``info`` string of API responses."""
        obj = {
            "prompt": self.all_prompts[0],
            "all_prompts": self.all_prompts,
            "negative_prompt": self.all_negative_prompts[0],
            "all_negative_prompts": self.all_negative_prompts,
            "seed": self.seed,
            "all_seeds": self.all_seeds,
            "subseed": self.subseed,
            "all_subseeds": self.all_subseeds,
            "subseed_strength": self.subseed_strength,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.sampler_name,
            "cfg_scale": self.cfg_scale,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "restore_faces": self.restore_faces,
            "face_restoration_model": self.face_restoration_model,
            "sd_model_name": self.sd_model_name,
            "sd_model_hash": self.sd_model_hash,
            "sd_vae_name": self.sd_vae_name,
            "sd_vae_hash": self.sd_vae_hash,
            "seed_resize_from_w": self.seed_resize_from_w,
            "seed_resize_from_h": self.seed_resize_from_h,
            "denoising_strength": self.denoising_strength,
            "extra_generation_params": self.extra_generation_params,
            "index_of_first_image": self.index_of_first_image,
            "infotexts": self.infotexts,
            "styles": self.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": self.is_using_inpainting_conditioning,
            "version": self.version,
        }
        return json.dumps(obj, default=lambda o: None)

    def infotext(self, p: StableDiffusionProcessing, index):
        """Mirrors ``Processed.infotext``."""
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, comments=[], position_in_batch=index % self.batch_size, iteration=index // self.batch_size)

    def get_token_merging_ratio(self, for_hr=False):
        """Mirrors ``Processed.get_token_merging_ratio``."""
        return self.token_merging_ratio_hr if for_hr else self.token_merging_ratio


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0, use_main_prompt=False, index=None, all_negative_prompts=None):
    """Mirrors ``processing.create_infotext``.

    Builds ``<prompt>[\\nNegative prompt: ...]\\n<k: v, ...>``: builtin keys, then
    ``**p.extra_generation_params``; list values are indexed by image, callables called with
    ``**locals()`` (errors reported, value dropped), None values dropped, a value equal to its key is
    written bare, every other value goes through ``infotext_utils.quote``.
    """
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size

    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts

    clip_skip = getattr(p, 'clip_skip', _opt("CLIP_stop_at_last_layers", 1))
    enable_hr = getattr(p, 'enable_hr', False)
    token_merging_ratio = p.get_token_merging_ratio()
    token_merging_ratio_hr = p.get_token_merging_ratio(for_hr=True)

    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]

    randn_source = _opt("randn_source", "GPU")
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Image CFG scale": getattr(p, 'image_cfg_scale', None),
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Face restoration": None,
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if _opt("add_model_hash_to_info", True) else None,
        "Model": p.sd_model_name if _opt("add_model_name_to_info", True) else None,
        "Variation seed": (None if p.subseed_strength == 0 else (p.all_subseeds[0] if use_main_prompt else all_subseeds[index])),
        "Variation seed strength": (None if p.subseed_strength == 0 else p.subseed_strength),
        "Seed resize from": (None if p.seed_resize_from_w <= 0 or p.seed_resize_from_h <= 0 else f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"),
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": None if clip_skip <= 1 else clip_skip,
        "Token merging ratio": None if token_merging_ratio == 0 else token_merging_ratio,
        "Token merging ratio hr": None if not enable_hr or token_merging_ratio_hr == 0 else token_merging_ratio_hr,
        "Init image hash": getattr(p, 'init_img_hash', None),
        "RNG": randn_source if randn_source != "GPU" else None,
        "Tiling": "True" if p.tiling else None,
        **p.extra_generation_params,
        "Version": program_version() if _opt("add_version_to_infotext", True) else None,
        "User": p.user if _opt("add_user_name_to_info", False) else None,
    }

    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:
            errors.report(f'Error creating infotext for key "{key}"', exc_info=True)
            generation_params[key] = None

    generation_params_text = ", ".join([k if k == v else f'{k}: {infotext_utils.quote(v)}' for k, v in generation_params.items() if v is not None])
    negative_prompt_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_prompt_text}\n{generation_params_text}".strip()


def process_images(p: StableDiffusionProcessing) -> Processed:
    """Mirrors ``processing.process_images``: ``before_process`` first, then override_settings, then inner."""
    if p.scripts is not None:
        p.scripts.before_process(p)

    opts = _shared().opts
    data = getattr(opts, "data", {})
    stored_opts = {k: data[k] for k in p.override_settings.keys() if k in data}

    try:
        for k, v in p.override_settings.items():
            setter = getattr(opts, "set", None)
            if setter is not None:
                try:
                    setter(k, v, is_api=True, run_callbacks=False)
                except TypeError:
                    setter(k, v)
            else:
                setattr(opts, k, v)

        fix = getattr(_sd_samplers(), "fix_p_invalid_sampler_and_scheduler", None)
        if fix is not None:
            fix(p)

        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)

    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    """Mirrors ``processing.process_images_inner`` (the batch loop; hook order and counts as the host)."""
    if isinstance(p.prompt, list):
        assert len(p.prompt) > 0
    else:
        assert p.prompt is not None

    shared = _shared()
    state = shared.state

    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)

    if p.restore_faces is None:
        p.restore_faces = False
    if p.tiling is None:
        p.tiling = _opt("tiling", False)

    model = shared.sd_model
    checkpoint_info = getattr(model, "sd_checkpoint_info", None)
    p.sd_model_name = getattr(checkpoint_info, "name_for_extra", None)
    p.sd_model_hash = getattr(model, "sd_model_hash", None)

    p.fill_fields_from_opts()
    p.setup_prompts()

    if isinstance(seed, list):
        p.all_seeds = seed
    else:
        p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]

    if isinstance(subseed, list):
        p.all_subseeds = subseed
    else:
        p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.no_grad():
        with _autocast():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        if getattr(state, "job_count", 0) == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n

            if getattr(state, "skipped", False):
                state.skipped = False
            if getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False):
                break

            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]

            latent_channels = getattr(shared.sd_model, 'latent_channels', opt_C)
            p.rng = ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            if len(p.prompts) == 0:
                break

            p.parse_extra_network_prompts()

            if not p.disable_extra_networks:
                with _autocast():
                    activate_extra_networks(p, p.extra_network_data)

            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()

            if p.n_iter > 1:
                state.job = f"Batch {n+1} out of {p.n_iter}"

            with _autocast():
                samples_ddim = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            if getattr(samples_ddim, 'already_decoded', False):
                x_samples_ddim = samples_ddim
            else:
                x_samples_ddim = decode_latent_batch(p.sd_model, samples_ddim, target_device=torch.device("cpu"), check_for_nans=True)

            x_samples_ddim = torch.stack([x.to("cpu") for x in x_samples_ddim])
            # upstream: .float() (a half VAE's output up to fp32); the double keeps float64, in which the
            # tests compare paths (tests/exactness.py)
            x_samples_ddim = x_samples_ddim if x_samples_ddim.dtype == torch.float64 else x_samples_ddim.float()

            del samples_ddim
            _torch_gc()
            if hasattr(state, "nextjob"):
                state.nextjob()

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)

                p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
                p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]

                batch_params = scripts.PostprocessBatchListArgs(list(x_samples_ddim))
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                x_samples_ddim = batch_params.images

            def infotext(index=0, use_main_prompt=False):
                """Mirrors the ``infotext(index, use_main_prompt)`` closure of upstream ``process_images_inner``."""
                return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt, index=index, all_negative_prompts=p.negative_prompts)

            for i, x_sample in enumerate(x_samples_ddim):
                p.batch_index = i
                image = x_sample

                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image(p, pp)
                    image = pp.image

                mask_for_overlay = getattr(p, "mask_for_overlay", None)
                overlay_image = None
                if p.scripts is not None:
                    ppmo = scripts.PostProcessMaskOverlayArgs(i, mask_for_overlay, overlay_image)
                    p.scripts.postprocess_maskoverlay(p, ppmo)

                if p.scripts is not None:
                    pp = scripts.PostprocessImageArgs(image)
                    p.scripts.postprocess_image_after_composite(p, pp)
                    image = pp.image

                text = infotext(i)
                infotexts.append(text)
                output_images.append(image)

            del x_samples_ddim
            _torch_gc()

        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))

        p.color_corrections = None
        index_of_first_image = 0

    _torch_gc()

    res = Processed(
        p,
        images_list=output_images,
        seed=p.all_seeds[0],
        info=infotexts[0],
        subseed=p.all_subseeds[0],
        index_of_first_image=index_of_first_image,
        infotexts=infotexts,
    )

    if p.scripts is not None:
        p.scripts.postprocess(p, res)

    return res


def old_hires_fix_first_pass_dimensions(width, height):
    """Mirrors ``processing.old_hires_fix_first_pass_dimensions``."""
    desired_pixel_count = 512 * 512
    actual_pixel_count = width * height
    scale = math.sqrt(desired_pixel_count / actual_pixel_count)
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """Mirrors ``processing.StableDiffusionProcessingTxt2Img`` incl. the latent hires fix."""

    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ''
    hr_negative_prompt: str = ''
    force_task_id: str = None

    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    hr_checkpoint_info: dict = field(default=None, init=False)
    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)
    truncate_x: int = field(default=0, init=False)
    truncate_y: int = field(default=0, init=False)
    applied_old_hires_behavior_to: tuple = field(default=None, init=False)
    latent_scale_mode: dict = field(default=None, init=False)
    hr_c: Any = field(default=None, init=False)
    hr_uc: Any = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)
    all_hr_negative_prompts: list = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: list = field(default=None, init=False)

    def __post_init__(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.__post_init__``."""
        super().__post_init__()
        if self.firstphase_width != 0 or self.firstphase_height != 0:
            self.hr_upscale_to_x = self.width
            self.hr_upscale_to_y = self.height
            self.width = self.firstphase_width
            self.height = self.firstphase_height
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def calculate_target_resolution(self):
        """Mirrors ``calculate_target_resolution``: ``hr_scale`` or ``hr_resize_x/y`` -> upscale target."""
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)
        else:
            self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
            if self.hr_resize_y == 0:
                self.hr_upscale_to_x = self.hr_resize_x
                self.hr_upscale_to_y = self.hr_resize_x * self.height // self.width
            elif self.hr_resize_x == 0:
                self.hr_upscale_to_x = self.hr_resize_y * self.width // self.height
                self.hr_upscale_to_y = self.hr_resize_y
            else:
                target_w, target_h = self.hr_resize_x, self.hr_resize_y
                if self.width / self.height < self.hr_resize_x / self.hr_resize_y:
                    self.hr_upscale_to_x = self.hr_resize_x
                    self.hr_upscale_to_y = self.hr_resize_x * self.height // self.width
                else:
                    self.hr_upscale_to_x = self.hr_resize_y * self.width // self.height
                    self.hr_upscale_to_y = self.hr_resize_y
                self.truncate_x = (self.hr_upscale_to_x - target_w) // opt_f
                self.truncate_y = (self.hr_upscale_to_y - target_h) // opt_f

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Mirrors ``StableDiffusionProcessingTxt2Img.init`` (hires infotext keys, latent upscale mode)."""
        if not self.enable_hr:
            return
        self.extra_generation_params["Denoising strength"] = self.denoising_strength

        if self.hr_sampler_name is not None and self.hr_sampler_name != self.sampler_name:
            self.extra_generation_params["Hires sampler"] = self.hr_sampler_name

        def get_hr_prompt(p, index, prompt_text, **kwargs):
            """Mirrors the ``get_hr_prompt`` closure of upstream ``StableDiffusionProcessingTxt2Img.init`` (infotext callable)."""
            hr_prompt = p.all_hr_prompts[index]
            return hr_prompt if hr_prompt != prompt_text else None

        def get_hr_negative_prompt(p, index, negative_prompt, **kwargs):
            """Mirrors the ``get_hr_negative_prompt`` closure of upstream ``StableDiffusionProcessingTxt2Img.init``."""
            hr_negative_prompt = p.all_hr_negative_prompts[index]
            return hr_negative_prompt if hr_negative_prompt != negative_prompt else None

        self.extra_generation_params["Hires prompt"] = get_hr_prompt
        self.extra_generation_params["Hires negative prompt"] = get_hr_negative_prompt
        self.extra_generation_params["Hires schedule type"] = None

        if self.hr_scheduler is None:
            self.hr_scheduler = self.scheduler

        modes = getattr(_shared(), "latent_upscale_modes", None) or latent_upscale_modes
        default_mode = getattr(_shared(), "latent_upscale_default_mode", latent_upscale_default_mode)
        if self.hr_upscaler is not None:
            self.latent_scale_mode = modes.get(self.hr_upscaler, None)
        else:
            self.latent_scale_mode = modes.get(default_mode, {"mode": "nearest", "antialias": False})
        if self.latent_scale_mode is None:
            raise Exception(f"could not find upscaler named {self.hr_upscaler}")

        self.calculate_target_resolution()

        state = _state()
        if not getattr(state, "processing_has_refined_job_count", False):
            if getattr(state, "job_count", 0) == -1:
                state.job_count = self.n_iter
            state.job_count = getattr(state, "job_count", 0) * 2
            state.processing_has_refined_job_count = True

        if self.hr_second_pass_steps:
            self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
        if self.hr_upscaler is not None:
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        """Mirrors ``StableDiffusionProcessingTxt2Img.sample``: new sampler, first pass, then hires."""
        self.sampler = _sd_samplers().create_sampler(self.sampler_name, self.sd_model)

        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)

        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        del x

        if not self.enable_hr:
            return samples

        _torch_gc()
        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        """Mirrors ``sample_hr_pass`` (latent upscaler branch).

        ``is_hr_pass`` True, a new sampler (``hr_sampler_name or sampler_name``), latent interpolate to
        the target size, new ``ImageRNG`` noise for the new shape, hires conds, ``before_hr`` then
        ``process_before_every_sampling(x=samples, noise, c=hr_c, uc=hr_uc)``, ``sample_img2img`` with
        ``steps=hr_second_pass_steps or steps``; returns ``DecodedSamples``.
        """
        if getattr(_state(), "interrupted", False):
            return samples

        self.is_hr_pass = True
        target_width = self.hr_upscale_to_x
        target_height = self.hr_upscale_to_y

        img2img_sampler_name = self.hr_sampler_name or self.sampler_name
        self.sampler = _sd_samplers().create_sampler(img2img_sampler_name, self.sd_model)

        samples = torch.nn.functional.interpolate(samples, size=(target_height // opt_f, target_width // opt_f), mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"])
        image_conditioning = self.txt2img_image_conditioning(samples)

        state = _state()
        if hasattr(state, "nextjob"):
            state.nextjob()

        samples = samples[:, :, self.truncate_y // 2:samples.shape[2] - (self.truncate_y + 1) // 2, self.truncate_x // 2:samples.shape[3] - (self.truncate_x + 1) // 2]

        self.rng = ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds, subseed_strength=self.subseed_strength, seed_resize_from_h=self.seed_resize_from_h, seed_resize_from_w=self.seed_resize_from_w)
        noise = self.rng.next()

        _torch_gc()

        if not self.disable_extra_networks:
            with _autocast():
                activate_extra_networks(self, self.hr_extra_network_data)

        with _autocast():
            self.calculate_hr_conds()

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)

        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps, image_conditioning=image_conditioning)

        self.sampler = None
        _torch_gc()

        decoded_samples = decode_latent_batch(self.sd_model, samples, target_device=torch.device("cpu"), check_for_nans=True)

        self.is_hr_pass = False
        return decoded_samples

    def close(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.close``."""
        super().close()
        self.hr_c = None
        self.hr_uc = None
        if not _opt("persistent_cond_cache", True):
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    def setup_prompts(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.setup_prompts`` (hires prompts default to the prompts)."""
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == '':
            self.hr_prompt = self.prompt
        if self.hr_negative_prompt == '':
            self.hr_negative_prompt = self.negative_prompt
        if isinstance(self.hr_prompt, list):
            self.all_hr_prompts = self.hr_prompt
        else:
            self.all_hr_prompts = self.batch_size * self.n_iter * [self.hr_prompt]
        if isinstance(self.hr_negative_prompt, list):
            self.all_hr_negative_prompts = self.hr_negative_prompt
        else:
            self.all_hr_negative_prompts = self.batch_size * self.n_iter * [self.hr_negative_prompt]

    def calculate_hr_conds(self):
        """Mirrors ``calculate_hr_conds`` (test-given conds are reused for the hires pass)."""
        if self.hr_c is not None:
            return

        steps = self.hr_second_pass_steps or self.steps
        total_steps = self._total_steps(self.hr_sampler_name or self.sampler_name, steps)

        if self.conds_from_test:
            self.hr_c, self.hr_uc = self.c, self.uc
            return

        pp = _prompt_parser()
        hr_prompts = pp.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        hr_negative_prompts = pp.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True)
        self.hr_uc = self.get_conds_with_caching(pp.get_learned_conditioning, hr_negative_prompts, self.firstpass_steps, [self.cached_hr_uc, self.cached_uc], self.hr_extra_network_data, total_steps)
        self.hr_c = self.get_conds_with_caching(pp.get_multicond_learned_conditioning, hr_prompts, self.firstpass_steps, [self.cached_hr_c, self.cached_c], self.hr_extra_network_data, total_steps)

    def setup_conds(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.setup_conds`` (hires conds computed lazily)."""
        if self.is_hr_pass:
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None
        if self.enable_hr and _opt("hires_fix_use_firstpass_conds", False):
            self.calculate_hr_conds()

    def get_conds(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.get_conds``."""
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    def parse_extra_network_prompts(self):
        """Mirrors ``StableDiffusionProcessingTxt2Img.parse_extra_network_prompts`` (slices hires prompts)."""
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_negative_prompts = self.all_hr_negative_prompts[self.iteration * self.batch_size:(self.iteration + 1) * self.batch_size]
            self.hr_extra_network_data = {}
        return res


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """Mirrors ``processing.StableDiffusionProcessingImg2Img`` with latent ``init_images`` and mask."""

    init_images: list = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = None
    latent_mask: Any = None
    force_task_id: str = None

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor = field(default=None, init=False)
    image_conditioning: torch.Tensor = field(default=None, init=False)
    init_img_hash: str = field(default=None, init=False)
    mask_for_overlay: Any = field(default=None, init=False)
    init_latent: torch.Tensor = field(default=None, init=False)

    def __post_init__(self):
        """Mirrors ``StableDiffusionProcessingImg2Img.__post_init__`` (``mask`` moves to ``image_mask``)."""
        super().__post_init__()
        self.image_mask = self.mask
        self.mask = None
        self.initial_noise_multiplier = _opt("initial_noise_multiplier", 1.0) if self.initial_noise_multiplier is None else self.initial_noise_multiplier

    @property
    def mask_blur(self):
        """Mirrors ``StableDiffusionProcessingImg2Img.mask_blur``."""
        if self.mask_blur_x == self.mask_blur_y:
            return self.mask_blur_x
        return None

    @mask_blur.setter
    def mask_blur(self, value):
        """Mirrors ``modules/processing.py: StableDiffusionProcessingImg2Img.mask_blur`` (property)."""
        if isinstance(value, int):
            self.mask_blur_x = value
            self.mask_blur_y = value

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Mirrors ``StableDiffusionProcessingImg2Img.init`` in latent space.

        Creates the sampler once (reused by every batch, like the host), stacks ``init_images`` into
        ``init_latent`` (one image is repeated ``batch_size`` times; fewer than ``batch_size`` images
        set ``batch_size``), and for a mask sets ``mask`` (keep) / ``nmask`` (repaint) ``[C, h, w]``.
        """
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.image_cfg_scale = self.image_cfg_scale if getattr(_shared().sd_model, "cond_stage_key", None) == "edit" else None

        self.sampler = _sd_samplers().create_sampler(self.sampler_name, self.sd_model)

        latents = []
        for img in self.init_images:
            t = torch.as_tensor(img, dtype=torch.float32)
            if t.dim() == 4:
                t = t[0]
            latents.append(t)

        if len(latents) == 1:
            batch = latents[0].unsqueeze(0).repeat(self.batch_size, 1, 1, 1)
        elif len(latents) <= self.batch_size:
            self.batch_size = len(latents)
            batch = torch.stack(latents)
        else:
            raise RuntimeError(f"bad number of images passed: {len(latents)}; expecting {self.batch_size} or less")

        self.init_latent = batch.to(_device())

        image_mask = self.image_mask
        if image_mask is not None:
            latmask = torch.as_tensor(image_mask, dtype=torch.float32)
            while latmask.dim() > 2:
                latmask = latmask[0]
            if tuple(latmask.shape) != tuple(self.init_latent.shape[2:]):
                latmask = torch.nn.functional.interpolate(latmask[None, None], size=self.init_latent.shape[2:], mode="nearest")[0, 0]
            if self.inpainting_mask_invert:
                latmask = 1.0 - latmask
                self.extra_generation_params["Mask mode"] = "Inpaint not masked"
            if self.mask_blur_x > 0 or self.mask_blur_y > 0:
                self.extra_generation_params["Mask blur"] = self.mask_blur
            if self.mask_round:
                latmask = torch.round(latmask)
            latmask = latmask[None].repeat(self.init_latent.shape[1], 1, 1)

            self.mask = (1.0 - latmask).to(_device())
            self.nmask = latmask.to(_device())
            self.mask_for_overlay = latmask

            if self.inpainting_fill == 2:
                self.init_latent = self.init_latent * self.mask + create_random_tensors(self.init_latent.shape[1:], all_seeds[0:self.init_latent.shape[0]]) * self.nmask
                self.extra_generation_params["Masked content"] = 'latent noise'
            elif self.inpainting_fill == 3:
                self.init_latent = self.init_latent * self.mask
                self.extra_generation_params["Masked content"] = 'latent nothing'
            elif self.inpainting_fill == 0:
                self.extra_generation_params["Masked content"] = 'fill'

        self.image_conditioning = self.img2img_image_conditioning(None, self.init_latent, image_mask, self.mask_round)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        """Mirrors ``StableDiffusionProcessingImg2Img.sample``: noise, hook, ``sample_img2img``, mask blend."""
        x = self.rng.next()

        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier

        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)

        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning, image_conditioning=self.image_conditioning)

        if self.mask is not None:
            blended_samples = samples * self.nmask + self.init_latent * self.mask
            if self.scripts is not None:
                mba = scripts.MaskBlendArgs(samples, self.nmask, self.init_latent, self.mask, blended_samples)
                self.scripts.on_mask_blend(self, mba)
                blended_samples = mba.blended_latent
            samples = blended_samples

        del x
        _torch_gc()
        return samples

    def get_token_merging_ratio(self, for_hr=False):
        """Mirrors ``StableDiffusionProcessingImg2Img.get_token_merging_ratio``."""
        return self.token_merging_ratio or _opt("token_merging_ratio_img2img", 0) or _opt("token_merging_ratio", 0)
