"""Double of ``modules/shared.py`` (A1111 1.10) and the bits of ``modules/options.py`` it exposes.

Module attributes kept: ``opts``, ``state``, ``sd_model`` (tests assign it), ``cmd_opts``, ``device``,
``total_tqdm``, ``parallel_processing_allowed``, ``OptionInfo``, ``options_section``,
``loaded_hypernetworks``. ``opts`` is an ``Options`` object whose defaults are the host's defaults for
the settings the sampling path reads; unknown names raise ``AttributeError`` like the host.
"""
from __future__ import annotations

import types

from modules import devices
from modules.shared_state import State


class OptionInfo:
    """Mirrors ``modules.options.OptionInfo``: a setting's default, label, component and section."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        """Mirrors ``OptionInfo.__init__`` (modules/options.py)."""
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label, url):
        """Mirrors ``OptionInfo.link`` (chainable)."""
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        """Mirrors ``OptionInfo.js`` (chainable)."""
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info):
        """Mirrors ``OptionInfo.info`` (chainable)."""
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html):
        """Mirrors ``OptionInfo.html`` (chainable)."""
        self.comment_after += html
        return self

    def needs_restart(self):
        """Mirrors ``OptionInfo.needs_restart`` (chainable)."""
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        """Mirrors ``OptionInfo.needs_reload_ui`` (chainable)."""
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier, options_dict):
    """Mirrors ``modules.options.options_section``: stamp a section onto every OptionInfo."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


_DEFAULTS = {
    # sampler parameters (modules/shared_options.py, "sampler-params" section)
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "ddim_discretize": "uniform",
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "eta_noise_seed_delta": 0,
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1",
    "uni_pc_skip_type": "time_uniform",
    "uni_pc_order": 3,
    "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default",
    "skip_early_cond": 0.0,
    "beta_dist_alpha": 0.6,
    "beta_dist_beta": 0.6,
    # optimizations ("optimizations" section)
    "cross_attention_optimization": "Automatic",
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "persistent_cond_cache": True,
    "batch_cond_uncond": True,
    "fp8_storage": "Disable",
    "cache_fp16_weight": False,
    # stable diffusion section
    "enable_quantization": False,
    "emphasis": "Original",
    "enable_batch_seeds": True,
    "comma_padding_backtrack": 20,
    "CLIP_stop_at_last_layers": 1,
    "upcast_attn": False,
    "randn_source": "GPU",
    "tiling": False,
    "hires_fix_refiner_pass": "second pass",
    "refiner_switch_by_sample_steps": False,
    "sd_checkpoint_hash": "",
    "sd_model_checkpoint": None,
    "sd_unet": "Automatic",
    "sd_vae": "Automatic",
    "img2img_fix_steps": False,
    "img2img_extra_noise": 0.0,
    "img2img_background_color": "#ffffff",
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "use_old_emphasis_implementation": False,
    "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False,
    "use_old_hires_fix_width_height": False,
    "use_old_scheduling": False,
    "use_downcasted_alpha_bar": False,
    "disable_nan_check": False,
    # live previews
    "live_previews_enable": False,
    "live_preview_content": "Prompt",
    "show_progress_every_n_steps": 10,
    "show_progress_type": "Approx NN",
    "live_preview_fast_interrupt": False,
    # infotext / ui
    "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any",
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "disable_weights_auto_swap": True,
    "samples_save": True,
    "save_images_before_color_correction": False,
    "return_grid": True,
    "hide_samplers": [],
    "restore_config_state_file": "",
    "extra_networks_default_multiplier": 1.0,
    "sd_hypernetwork": "None",
    "sd_lora": "None",
    "lora_functional": False,
    "disabled_extensions": [],
    "disable_all_extensions": "none",
    "prefer_fp16_vae": False,
}


class Options:
    """Mirrors ``modules.options.Options`` (the class behind ``shared.opts``): attribute access to ``data``.

    Reading an unknown setting raises ``AttributeError`` like the host; ``add_option`` registers an
    extension's setting with its default; ``onchange`` records the callback (and can be fired with
    ``set``).
    """

    def __init__(self, defaults=None):
        """Mirrors ``Options.__init__`` (modules/options.py)."""
        super().__setattr__("data_labels", {k: OptionInfo(v) for k, v in (defaults or {}).items()})
        super().__setattr__("data", {k: v for k, v in (defaults or {}).items()})
        super().__setattr__("restricted_opts", set())

    def __setattr__(self, key, value):
        """Mirrors ``Options.__setattr__`` (modules/options.py)."""
        if key in ("data", "data_labels", "restricted_opts"):
            return super().__setattr__(key, value)
        self.data[key] = value

    def __getattr__(self, item):
        """Mirrors ``Options.__getattr__`` (modules/options.py)."""
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        labels = self.__dict__.get("data_labels", {})
        if item in labels:
            return labels[item].default
        raise AttributeError(f"'Options' object has no attribute '{item}'")

    def set(self, key, value, is_api=False, run_callbacks=True):
        """Mirrors ``Options.set``: store the value and run its ``onchange`` callback."""
        old = self.data.get(key, None)
        if old == value:
            return False
        self.data[key] = value
        info = self.data_labels.get(key)
        if run_callbacks and info is not None and info.onchange is not None:
            info.onchange()
        return True

    def get_default(self, key):
        """Mirrors ``Options.get_default``."""
        info = self.data_labels.get(key)
        return None if info is None else info.default

    def add_option(self, key, info):
        """Mirrors ``Options.add_option``: register a setting; its default becomes readable."""
        self.data_labels[key] = info
        if key not in self.data and not getattr(info, "do_not_save", False):
            self.data[key] = info.default

    def onchange(self, key, func, call=True):
        """Mirrors ``Options.onchange``."""
        item = self.data_labels[key]
        item.onchange = func
        if call:
            func()

    def dumpjson(self):
        """Mirrors ``Options.dumpjson`` (values only)."""
        import json

        return json.dumps(self.data)

    def reset_to_defaults(self):
        """Test-only: put every built-in setting back to its host default and drop added ones."""
        self.data.clear()
        self.data.update(_DEFAULTS)
        for key in list(self.data_labels):
            if key not in _DEFAULTS:
                del self.data_labels[key]


opts = Options(_DEFAULTS)
"""Mirrors ``shared.opts``."""

cmd_opts = types.SimpleNamespace(
    precision="autocast", no_half=False, no_half_vae=False, upcast_sampling=False,
    lowvram=False, medvram=False, medvram_sdxl=False, lowram=False,
    xformers=False, force_enable_xformers=False, opt_sdp_attention=False, opt_sdp_no_mem_attention=False,
    opt_split_attention=False, opt_sub_quad_attention=False, disable_opt_split_attention=False,
    disable_nan_check=False, disable_console_progressbars=True, api=False, nowebui=False,
    listen=False, share=False, ui_debug_mode=False, disable_extra_extensions=False,
    disable_all_extensions=False, skip_version_check=True, no_hashing=True,
    data_dir=".", ckpt_dir=None, hypernetwork_dir="models/hypernetworks", api_auth=None,
)
"""Mirrors ``shared.cmd_opts`` (the parsed command line): the flags extensions look at."""

state = State()
"""Mirrors ``shared.state``."""

sd_model = None
"""Mirrors ``shared.sd_model``; tests assign a model from ``modules.sd_models_double``."""

device = devices.device
"""Mirrors ``shared.device``."""

latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
"""Mirrors ``shared.latent_upscale_modes`` (hires fix latent upscalers)."""

parallel_processing_allowed = True
loaded_hypernetworks = []
hypernetworks = {}
demo = None
weight_load_location = None
xformers_available = False
sd_upscalers = []
face_restorers = []


class TotalTQDM:
    """Mirrors ``modules.shared_total_tqdm.TotalTQDM`` with no console output."""

    def __init__(self):
        """Mirrors ``TotalTQDM.__init__`` (modules/shared_total_tqdm.py)."""
        self._tqdm = None
        self.n = 0

    def reset(self):
        """Mirrors ``TotalTQDM.reset``."""
        self.n = 0

    def update(self):
        """Mirrors ``TotalTQDM.update``."""
        self.n += 1

    def updateTotal(self, new_total):
        """Mirrors ``TotalTQDM.updateTotal``."""

    def clear(self):
        """Mirrors ``TotalTQDM.clear``."""
        self.n = 0


total_tqdm = TotalTQDM()
"""Mirrors ``shared.total_tqdm``."""


def reload_gradio_theme(theme_name=None):
    """Mirrors ``shared.reload_gradio_theme``; a no-op in the double."""


def listfiles(dirname):
    """Mirrors ``shared.listfiles``."""
    import os

    return sorted(os.path.join(dirname, x) for x in os.listdir(dirname)) if os.path.isdir(dirname) else []
