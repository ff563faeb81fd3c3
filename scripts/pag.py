"""sd-webui-pag: Perturbed-Attention Guidance for A1111 1.7–1.10, Forge and reForge; thin host glue over ``lib_pag``."""

import base64
import hmac
import os

import gradio as gr

from modules import script_callbacks, scripts, shared

from lib_pag import a1111, api, checkpoints, console, forge, xyz
from lib_pag.ui import build_ui, fill_pasted_params

try:
    from modules.ui_components import InputAccordion
except ImportError:  # A1111 < 1.7
    InputAccordion = None

TITLE = "PAG"


def _loaded_model():
    """The model in memory, without loading one: A1111's ``shared.sd_model`` loads the selected checkpoint
    on first access, its ``model_data.sd_model`` does not (None until loaded; Forge 2: a placeholder)."""
    try:
        from modules import sd_models

        return sd_models.model_data.sd_model
    except (ImportError, AttributeError):
        return getattr(shared, "sd_model", None)


def _current_unet(model=None):
    model = _loaded_model() if model is None else model
    if forge.is_forge_host():
        return forge.diffusion_model_of(model)
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def _selected_checkpoint_file():
    """The file of the checkpoint the next job loads: Forge 2's loading parameters (what
    ``forge_model_reload`` loads), else the ``sd_model_checkpoint`` setting; None when unknown."""
    try:
        from modules import sd_models
    except ImportError:
        return None
    params = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None)
    info = params.get("checkpoint_info") if isinstance(params, dict) else None
    if info is None:
        name = getattr(shared.opts, "sd_model_checkpoint", None)
        info = getattr(sd_models, "checkpoint_aliases", {}).get(name) if name else None
    return getattr(info, "filename", None)


def _job_model():
    """What the accordion describes: the model the next job will use (``checkpoints.next_job_model``)."""
    model = _loaded_model()
    info = getattr(model, "sd_checkpoint_info", None)
    return checkpoints.next_job_model(_current_unet(model), getattr(info, "filename", None) or getattr(model, "filename", None),
                                      _selected_checkpoint_file())


class PagScript(scripts.Script):
    sorting_priority = 14  # Forge/reForge: accordion order among always-on scripts

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        controls, self.infotext_fields, self.paste_field_names = build_ui(gr, InputAccordion, self.elem_id, _job_model)
        return controls

    def process(self, p, *args):
        if forge.is_forge_host():  # Forge/reForge fire the CFG callbacks too, with another batch layout
            forge.start(p, args)
        else:
            a1111.start_job(p, args)

    def process_batch(self, p, *args, **kwargs):
        a1111.start_batch(p, kwargs.get("seeds"), kwargs.get("subseeds"))

    def process_before_every_sampling(self, p, *args, **kwargs):
        if forge.is_forge_host():
            forge.apply(p, args)  # runs 2–3× per batch with hires; idempotent

    def postprocess(self, p, processed, *args):
        a1111.end_job(p)
        forge.end(p)


def _parse_infotext(text):
    try:
        from modules import infotext_utils
    except ImportError:  # A1111 < 1.8
        from modules import generation_parameters_copypaste as infotext_utils
    return infotext_utils.parse_generation_parameters(text)


def _is_loaded_checkpoint(name):
    """Whether a request's ``override_settings.sd_model_checkpoint`` leaves the loaded model in place: it
    names that model (any alias), or nothing the host knows (A1111 then drops the override)."""
    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    if info is None:
        return False
    try:
        from modules import sd_models

        target = sd_models.checkpoint_aliases.get(name)
    except (ImportError, AttributeError):
        names = {getattr(info, key, None) for key in ("title", "name", "name_for_extra", "model_name", "short_title",
                                                        "hash", "sha256", "shorthash", "filename")}
        return name in names - {None, ""}
    return target is None or target is info or getattr(target, "filename", None) == getattr(info, "filename", "")


def _authorized(headers):
    """What the host's ``Api.auth`` decides for ``--api-auth`` (HTTP basic, ``user:password,...``)."""
    api_auth = getattr(shared.cmd_opts, "api_auth", None)
    if not api_auth:
        return True
    kind, _, token = headers.get("authorization", "").partition(" ")
    if kind.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token).decode("utf-8").partition(":")
    except ValueError:
        return False
    credentials = dict(item.split(":", 1) for item in api_auth.split(",") if ":" in item)
    return user in credentials and hmac.compare_digest(password, credentials[user])


def _job_args(p):
    """This job's PAG args: its slice of ``p.script_args`` (the runner's ``args_from:args_to`` for this script)."""
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", []):
        if script.title() == TITLE and hasattr(script, "args_from"):
            return tuple(p.script_args[script.args_from:script.args_to])
    return None


def _grid_catalog(p):
    """The layer catalog an X/Y/Z grid's cells will use: the loaded model's, unless the job switches checkpoints."""
    overrides = getattr(p, "override_settings", None) or {}
    name = overrides.get("sd_model_checkpoint")
    if name and not _is_loaded_checkpoint(name):
        return None
    return _job_model().catalog


def _on_app_started(_demo, app):
    api.install(app, TITLE, host=api.HostLookups(_current_unet, _parse_infotext, _is_loaded_checkpoint, _authorized,
                                                   job_catalog=lambda: _job_model().catalog))


console.show_on_console(bool(getattr(shared.cmd_opts, "loglevel", None) or os.environ.get("SD_WEBUI_LOG_LEVEL")))
a1111.register_callbacks()
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_before_ui(lambda: xyz.register(scripts, _job_args, _grid_catalog))
script_callbacks.on_infotext_pasted(fill_pasted_params)
