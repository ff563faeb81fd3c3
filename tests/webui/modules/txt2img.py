"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/txt2img.py``.

``txt2img_create_processing`` builds the ``StableDiffusionProcessingTxt2Img`` from the UI's values with
``p.scripts = scripts_txt2img`` and ``p.script_args = args`` (every script's controls, in the runner's
order); ``txt2img`` runs the selected script or ``process_images`` inside ``closing(p)`` and returns
``(images, generation_info_js, plaintext_to_html(info), plaintext_to_html(comments, "comments"))``.
The double's UI passes only prompt and negative prompt before the script args (its ``Processing`` has
small fixed sizes); the images are the latents drawn as small RGB pictures (the double has no VAE).
"""

import html
from contextlib import closing

import gradio as gr
import numpy as np
from PIL import Image

import modules.scripts
from modules import processing


def plaintext_to_html(text, classname=None):
    """Mirrors ``modules/ui.py: plaintext_to_html``."""
    content = "<br>\n".join(html.escape(x) for x in text.split('\n'))
    return f"<p class='{classname}'>{content}</p>" if classname else f"<p>{content}</p>"


def txt2img_create_processing(id_task: str, request: gr.Request, prompt: str, negative_prompt: str, *args):
    """Mirrors ``txt2img.txt2img_create_processing`` (prompt, negative prompt, then the script args)."""
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative_prompt, width=64, height=64,
                                                    steps=3, sampler_name="Euler", seed=11, cfg_scale=5.0)
    p.scripts = modules.scripts.scripts_txt2img
    p.script_args = args
    p.user = getattr(request, "username", None)
    return p


def _picture(latent) -> Image.Image:
    """Double-only: a latent as an RGB picture (its first three channels, stretched to 0–255, ×8 in size)."""
    a = np.asarray(latent, dtype=np.float32)[:3]
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
    return Image.fromarray(a.transpose(1, 2, 0).astype(np.uint8)).resize((a.shape[2] * 8, a.shape[1] * 8))


def txt2img(id_task: str, request: gr.Request, *args):
    """Mirrors ``txt2img.txt2img``."""
    p = txt2img_create_processing(id_task, request, *args)
    with closing(p):
        processed = modules.scripts.scripts_txt2img.run(p, *p.script_args)
        if processed is None:
            processed = processing.process_images(p)
    images = [_picture(image) for image in processed.images if image is not None]
    return images, processed.js(), plaintext_to_html(processed.info), plaintext_to_html(processed.comments, classname="comments")
