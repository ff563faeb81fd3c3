"""Double of ``modules/script_callbacks.py`` (A1111 1.10): callback registration and dispatch.

Kept from the host: the parameter classes (``CFGDenoiserParams`` with ``denoiser``, ``CFGDenoisedParams``,
``AfterCFGCallbackParams``, ...), ``ScriptCallback(script, callback, name)``, registration with the
caller's file name and a unique ``<extension>/<file>/<category>[/<name>][-n]`` name (no de-duplication of
functions), the 1.9+ ordered-callback cache (``ordered_callbacks_map``, re-sorted when its length
changes; user order from ``opts.prioritized_callbacks_<category>``), removal by file or by function, and
dispatch that catches every exception and reports it through ``errors.report(..., exc_info=True)``.
Not kept: ordering by extension metadata (``metadata.ini`` ``[callbacks/...]``) and startup timers.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Optional

from modules import errors


def report_exception(c, job):
    """Mirrors ``script_callbacks.report_exception``: log a failed callback and carry on."""
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:
    """Mirrors ``script_callbacks.ImageSaveParams``."""

    def __init__(self, image, p, filename, pnginfo):
        """Mirrors ``ImageSaveParams.__init__`` (modules/script_callbacks.py)."""
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:
    """Mirrors ``script_callbacks.ExtraNoiseParams`` (img2img/hires extra noise)."""

    def __init__(self, noise, x, xi):
        """Mirrors ``ExtraNoiseParams.__init__`` (modules/script_callbacks.py)."""
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:
    """Mirrors ``script_callbacks.CFGDenoiserParams``; the host reads x, image_cond, sigma, text_cond and
    text_uncond back after the callbacks ran. ``denoiser`` (1.8+) is the calling ``CFGDenoiser``."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        """Mirrors ``CFGDenoiserParams.__init__`` (modules/script_callbacks.py)."""
        self.x = x
        """Rows fed to the UNet: cond rows (image i repeated once per AND sub-prompt), then one uncond row per image"""
        self.image_cond = image_cond
        """Image conditioning rows, laid out like ``x``"""
        self.sigma = sigma
        """Sigma (k-diffusion) or timestep (DDIM/PLMS/UniPC) per row"""
        self.sampling_step = sampling_step
        """``shared.state.sampling_step``"""
        self.total_sampling_steps = total_sampling_steps
        """``shared.state.sampling_steps``"""
        self.text_cond = text_cond
        """Cond text embeddings (tensor, or DictWithShape for SDXL), one row per cond row"""
        self.text_uncond = text_uncond
        """Uncond text embeddings, one row per image"""
        self.denoiser = denoiser
        """The CFGDenoiser calling the callback"""


class CFGDenoisedParams:
    """Mirrors ``script_callbacks.CFGDenoisedParams``; ``x`` is the UNet output (not read back by 1.10)."""

    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        """Mirrors ``CFGDenoisedParams.__init__`` (modules/script_callbacks.py)."""
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    """Mirrors ``script_callbacks.AfterCFGCallbackParams``; ``x`` (the combined result) is read back."""

    def __init__(self, x, sampling_step, total_sampling_steps):
        """Mirrors ``AfterCFGCallbackParams.__init__`` (modules/script_callbacks.py)."""
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class UiTrainTabParams:
    """Mirrors ``script_callbacks.UiTrainTabParams``."""

    def __init__(self, txt2img_preview_params):
        """Mirrors ``UiTrainTabParams.__init__`` (modules/script_callbacks.py)."""
        self.txt2img_preview_params = txt2img_preview_params


class ImageGridLoopParams:
    """Mirrors ``script_callbacks.ImageGridLoopParams``."""

    def __init__(self, imgs, cols, rows):
        """Mirrors ``ImageGridLoopParams.__init__`` (modules/script_callbacks.py)."""
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class BeforeTokenCounterParams:
    """Mirrors ``script_callbacks.BeforeTokenCounterParams``."""

    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:
    """Mirrors ``script_callbacks.ScriptCallback``: registering file, function and unique name."""

    script: str
    callback: Any
    name: str = None


def _extension_name_for(filename):
    """Stands in for ``extensions.find_extension(filename).canonical_name`` (``'base'`` when none).

    A file under ``<dir>/scripts/`` counts as belonging to the extension ``<dir>``'s folder name.
    """
    parent = os.path.dirname(os.path.abspath(filename))
    if os.path.basename(parent) == "scripts":
        return os.path.basename(os.path.dirname(parent)).lower()
    return "base"


def add_callback(callbacks, fun, *, name=None, category="unknown"):
    """Mirrors ``script_callbacks.add_callback``: record the caller's file and a unique name."""
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"

    callback_name = f"{_extension_name_for(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"

    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f"{callback_name}-{index + 1}"

    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    """Mirrors ``script_callbacks.sort_callbacks`` (user order only; no extension metadata)."""
    callbacks = unordered_callbacks.copy()
    if enable_user_sort:
        from modules import shared

        for name in reversed(getattr(shared.opts, "prioritized_callbacks_" + category, None) or []):
            index = next((i for i, callback in enumerate(callbacks) if callback.name == name), None)
            if index is not None:
                callbacks.insert(0, callbacks.pop(index))
    return callbacks


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    """Mirrors ``script_callbacks.ordered_callbacks``: cached order, rebuilt when the count changes."""
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])

    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)

    callbacks = ordered_callbacks_map.get(category)
    if callbacks is not None and len(callbacks) == len(unordered_callbacks):
        return callbacks

    callbacks = sort_callbacks(category, unordered_callbacks)
    ordered_callbacks_map[category] = callbacks
    return callbacks


def enumerate_callbacks():
    """Mirrors ``script_callbacks.enumerate_callbacks``: ``(category, callbacks)`` pairs."""
    for category, callbacks in callback_map.items():
        if category.startswith("callbacks_"):
            category = category[10:]
        yield category, callbacks


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_extra_noise=[],
    callbacks_cfg_denoiser=[],
    callbacks_cfg_denoised=[],
    callbacks_cfg_after_cfg=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_image_grid=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_list_optimizers=[],
    callbacks_list_unets=[],
    callbacks_before_token_counter=[],
)
"""Mirrors ``script_callbacks.callback_map``."""

ordered_callbacks_map = {}
"""Mirrors ``script_callbacks.ordered_callbacks_map`` (1.9+)."""


def clear_callbacks():
    """Mirrors ``script_callbacks.clear_callbacks`` (called by ``scripts.load_scripts``)."""
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run(category, job, *args):
    """Shared body of the host's ``*_callback`` dispatchers: call each, report and swallow errors."""
    for c in ordered_callbacks(category):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo: Optional[Any], app: Any):
    """Mirrors ``script_callbacks.app_started_callback``."""
    _run("app_started", "app_started_callback", demo, app)


def app_reload_callback():
    """Mirrors ``script_callbacks.app_reload_callback``."""
    _run("on_reload", "callbacks_on_reload")


def model_loaded_callback(sd_model):
    """Mirrors ``script_callbacks.model_loaded_callback``."""
    _run("model_loaded", "model_loaded_callback", sd_model)


def ui_tabs_callback():
    """Mirrors ``script_callbacks.ui_tabs_callback``: concatenated tab lists."""
    res = []
    for c in ordered_callbacks("ui_tabs"):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def ui_train_tabs_callback(params: UiTrainTabParams):
    """Mirrors ``script_callbacks.ui_train_tabs_callback``."""
    _run("ui_train_tabs", "callbacks_ui_train_tabs", params)


def ui_settings_callback():
    """Mirrors ``script_callbacks.ui_settings_callback``."""
    _run("ui_settings", "ui_settings_callback")


def before_image_saved_callback(params: ImageSaveParams):
    """Mirrors ``script_callbacks.before_image_saved_callback``."""
    _run("before_image_saved", "before_image_saved_callback", params)


def image_saved_callback(params: ImageSaveParams):
    """Mirrors ``script_callbacks.image_saved_callback``."""
    _run("image_saved", "image_saved_callback", params)


def extra_noise_callback(params: ExtraNoiseParams):
    """Mirrors ``script_callbacks.extra_noise_callback``."""
    _run("extra_noise", "callbacks_extra_noise", params)


def cfg_denoiser_callback(params: CFGDenoiserParams):
    """Mirrors ``script_callbacks.cfg_denoiser_callback``."""
    _run("cfg_denoiser", "cfg_denoiser_callback", params)


def cfg_denoised_callback(params: CFGDenoisedParams):
    """Mirrors ``script_callbacks.cfg_denoised_callback``."""
    _run("cfg_denoised", "cfg_denoised_callback", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    """Mirrors ``script_callbacks.cfg_after_cfg_callback``."""
    _run("cfg_after_cfg", "cfg_after_cfg_callback", params)


def before_component_callback(component, **kwargs):
    """Mirrors ``script_callbacks.before_component_callback``."""
    for c in ordered_callbacks("before_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "before_component_callback")


def after_component_callback(component, **kwargs):
    """Mirrors ``script_callbacks.after_component_callback``."""
    for c in ordered_callbacks("after_component"):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, "after_component_callback")


def image_grid_callback(params: ImageGridLoopParams):
    """Mirrors ``script_callbacks.image_grid_callback``."""
    _run("image_grid", "image_grid", params)


def infotext_pasted_callback(infotext: str, params: dict):
    """Mirrors ``script_callbacks.infotext_pasted_callback``: callbacks mutate ``params`` in place."""
    _run("infotext_pasted", "infotext_pasted", infotext, params)


def script_unloaded_callback():
    """Mirrors ``script_callbacks.script_unloaded_callback`` (runs in reverse registration order)."""
    for c in reversed(ordered_callbacks("script_unloaded")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "script_unloaded")


def before_ui_callback():
    """Mirrors ``script_callbacks.before_ui_callback`` (runs in reverse registration order)."""
    for c in reversed(ordered_callbacks("before_ui")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "before_ui")


def list_optimizers_callback():
    """Mirrors ``script_callbacks.list_optimizers_callback``."""
    res = []
    _run("list_optimizers", "list_optimizers", res)
    return res


def list_unets_callback():
    """Mirrors ``script_callbacks.list_unets_callback``."""
    res = []
    _run("list_unets", "list_unets", res)
    return res


def before_token_counter_callback(params: BeforeTokenCounterParams):
    """Mirrors ``script_callbacks.before_token_counter_callback``."""
    _run("before_token_counter", "before_token_counter", params)


def remove_current_script_callbacks():
    """Mirrors ``script_callbacks.remove_current_script_callbacks`` (1.9+ incl. the ordered map):
    drop every callback, of every category, registered from the calling file."""
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)
    for ordered_callbacks_list in ordered_callbacks_map.values():
        for callback_to_remove in [cb for cb in ordered_callbacks_list if cb.script == filename]:
            ordered_callbacks_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    """Mirrors ``script_callbacks.remove_callbacks_for_function`` (1.9.1+ incl. the ordered map):
    drop every registration whose function compares equal to ``callback_func``."""
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)
    for ordered_callback_list in ordered_callbacks_map.values():
        for callback_to_remove in [cb for cb in ordered_callback_list if cb.callback == callback_func]:
            ordered_callback_list.remove(callback_to_remove)


def on_app_started(callback, *, name=None):
    """Mirrors ``script_callbacks.on_app_started``: ``callback(demo, app)``."""
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_before_reload(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_reload``: ``callback()``."""
    add_callback(callback_map["callbacks_on_reload"], callback, name=name, category="on_reload")


def on_model_loaded(callback, *, name=None):
    """Mirrors ``script_callbacks.on_model_loaded``: ``callback(sd_model)``."""
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_tabs``: ``callback() -> [(component, title, elem_id)]``."""
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_train_tabs(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_train_tabs``."""
    add_callback(callback_map["callbacks_ui_train_tabs"], callback, name=name, category="ui_train_tabs")


def on_ui_settings(callback, *, name=None):
    """Mirrors ``script_callbacks.on_ui_settings``: ``callback()`` adds settings with ``opts.add_option``."""
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_before_image_saved(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_image_saved``."""
    add_callback(callback_map["callbacks_before_image_saved"], callback, name=name, category="before_image_saved")


def on_image_saved(callback, *, name=None):
    """Mirrors ``script_callbacks.on_image_saved``."""
    add_callback(callback_map["callbacks_image_saved"], callback, name=name, category="image_saved")


def on_extra_noise(callback, *, name=None):
    """Mirrors ``script_callbacks.on_extra_noise``."""
    add_callback(callback_map["callbacks_extra_noise"], callback, name=name, category="extra_noise")


def on_cfg_denoiser(callback, *, name=None):
    """Mirrors ``script_callbacks.on_cfg_denoiser``: ``callback(CFGDenoiserParams)`` before the UNet call."""
    add_callback(callback_map["callbacks_cfg_denoiser"], callback, name=name, category="cfg_denoiser")


def on_cfg_denoised(callback, *, name=None):
    """Mirrors ``script_callbacks.on_cfg_denoised``: ``callback(CFGDenoisedParams)`` after the UNet call."""
    add_callback(callback_map["callbacks_cfg_denoised"], callback, name=name, category="cfg_denoised")


def on_cfg_after_cfg(callback, *, name=None):
    """Mirrors ``script_callbacks.on_cfg_after_cfg``: ``callback(AfterCFGCallbackParams)`` after combining."""
    add_callback(callback_map["callbacks_cfg_after_cfg"], callback, name=name, category="cfg_after_cfg")


def on_before_component(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_component``."""
    add_callback(callback_map["callbacks_before_component"], callback, name=name, category="before_component")


def on_after_component(callback, *, name=None):
    """Mirrors ``script_callbacks.on_after_component``."""
    add_callback(callback_map["callbacks_after_component"], callback, name=name, category="after_component")


def on_image_grid(callback, *, name=None):
    """Mirrors ``script_callbacks.on_image_grid``."""
    add_callback(callback_map["callbacks_image_grid"], callback, name=name, category="image_grid")


def on_infotext_pasted(callback, *, name=None):
    """Mirrors ``script_callbacks.on_infotext_pasted``: ``callback(infotext: str, params: dict)``."""
    add_callback(callback_map["callbacks_infotext_pasted"], callback, name=name, category="infotext_pasted")


def on_script_unloaded(callback, *, name=None):
    """Mirrors ``script_callbacks.on_script_unloaded``: ``callback()`` before scripts are reloaded."""
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_before_ui(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_ui``: ``callback()`` before the UI is built."""
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_list_optimizers(callback, *, name=None):
    """Mirrors ``script_callbacks.on_list_optimizers``."""
    add_callback(callback_map["callbacks_list_optimizers"], callback, name=name, category="list_optimizers")


def on_list_unets(callback, *, name=None):
    """Mirrors ``script_callbacks.on_list_unets``."""
    add_callback(callback_map["callbacks_list_unets"], callback, name=name, category="list_unets")


def on_before_token_counter(callback, *, name=None):
    """Mirrors ``script_callbacks.on_before_token_counter``."""
    add_callback(callback_map["callbacks_before_token_counter"], callback, name=name, category="before_token_counter")
