"""sd-webui-pag: Perturbed-Attention Guidance for AUTOMATIC1111 (1.7–1.10); thin host glue over ``lib_pag``."""

import logging

import gradio as gr

from modules import script_callbacks, scripts, shared

from lib_pag import a1111, api, xyz
from lib_pag.ui import build_ui

try:
    from modules.ui_components import InputAccordion
except ImportError:  # A1111 < 1.7
    InputAccordion = None

log = logging.getLogger("sd_webui_pag")
TITLE = "PAG"


def _current_unet():
    model = getattr(shared, "sd_model", None)
    return getattr(getattr(model, "model", None), "diffusion_model", None)


class PagScript(scripts.Script):
    sorting_priority = 14  # Forge/reForge: accordion order among always-on scripts

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        controls, self.infotext_fields, self.paste_field_names = build_ui(gr, InputAccordion, self.elem_id, _current_unet)
        return controls

    def process(self, p, *args):
        a1111.start_job(p, args)

    def process_batch(self, p, *args, **kwargs):
        a1111.start_batch(p, kwargs.get("seeds"))

    def postprocess(self, p, processed, *args):
        a1111.JOBS.end(p)


def _on_app_started(_demo, app):
    api.install(app, TITLE, _current_unet)


a1111.register_callbacks()
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_before_ui(lambda: xyz.register(scripts))
