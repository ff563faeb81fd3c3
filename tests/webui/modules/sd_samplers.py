"""Double of ``modules/sd_samplers.py`` (A1111 1.10): the sampler registry and ``create_sampler``."""
from __future__ import annotations

from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_timesteps, shared

all_samplers = [
    *sd_samplers_kdiffusion.samplers_data_k_diffusion,
    *sd_samplers_timesteps.samplers_data_timesteps,
]
"""Mirrors ``sd_samplers.all_samplers``."""
all_samplers_map = {x.name: x for x in all_samplers}

samplers: list[sd_samplers_common.SamplerData] = []
samplers_for_img2img: list[sd_samplers_common.SamplerData] = []
samplers_map = {}
samplers_hidden = {}


def find_sampler_config(name):
    """Mirrors ``sd_samplers.find_sampler_config``: by exact label; ``None`` → the first sampler."""
    if name is not None:
        return all_samplers_map.get(name, None)
    return all_samplers[0]


def create_sampler(name, model):
    """Mirrors ``sd_samplers.create_sampler``: build the sampler for ``model`` and attach its config.

    ``shared.sd_model`` must already be ``model`` (the CFG denoiser wraps ``shared.sd_model``)."""
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"

    if model.is_sdxl and config.options.get("no_sdxl", False):
        raise Exception(f"Sampler {config.name} is not supported for SDXL")

    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def set_samplers():
    """Mirrors ``sd_samplers.set_samplers``: visible lists and the lower-case name/alias map."""
    global samplers, samplers_for_img2img, samplers_hidden
    samplers_hidden = set(shared.opts.hide_samplers)
    samplers = all_samplers
    samplers_for_img2img = all_samplers
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


def visible_sampler_names():
    """Mirrors ``sd_samplers.visible_sampler_names``."""
    return [x.name for x in samplers if x.name not in samplers_hidden]


def get_sampler_from_infotext(d: dict):
    """Mirrors ``sd_samplers.get_sampler_from_infotext`` (without the scheduler suffix handling)."""
    return samplers_map.get(str(d.get("Sampler", "")).lower(), all_samplers[0].name)


set_samplers()
