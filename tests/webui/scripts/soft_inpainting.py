"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.8–1.10 ``extensions-builtin/soft-inpainting/scripts/
soft_inpainting.py`` ("Soft Inpainting"), the parts that reach the denoiser.

Kept (written from the upstream math, not copied):
- ``process``: when enabled and the job inpaints, ``p.mask_round = False`` (the latent mask stays soft);
- ``on_mask_blend`` during sampling (``mba.is_final_blend`` false): the blend is
  ``latent_blend(settings, init_latent, current_latent, get_modified_nmask(settings, nmask, sigma[0]))``;
  at the final blend the result is the current latent as is (upstream composites in pixel space later);
- ``get_modified_nmask``: ``nmask ** (sigma ** mask_blend_power · mask_blend_scale)``;
- ``latent_blend(a, b, t)``: the linear interpolation ``a·(1−t) + b·t`` rescaled per pixel so that its
  channel norm is ``(|a|^p·(1−t₀) + |b|^p·t₀)^(1/p)`` with ``p`` = inpaint detail preservation and ``t₀`` the
  first channel of ``t`` (norms over the channel dimension, in float64; ``+1e-5`` on the current norm).
Left out: the pixel-space composite (``postprocess_maskoverlay``, adaptive overlay masks), infotext labels
beyond "Soft inpainting enabled", the UI's descriptions.
"""

from dataclasses import dataclass

import gradio as gr
import torch

import modules.scripts as scripts


@dataclass
class SoftInpaintingSettings:
    """Mirrors ``SoftInpaintingSettings`` (the UI's defaults below are upstream's)."""

    mask_blend_power: float = 1.0
    mask_blend_scale: float = 0.5
    inpaint_detail_preservation: float = 4.0
    composite_mask_influence: float = 0.0
    composite_difference_threshold: float = 0.5
    composite_difference_contrast: float = 2.0


def processing_uses_inpainting(p) -> bool:
    """Mirrors ``processing_uses_inpainting``."""
    return any(getattr(p, name, None) is not None for name in ("image_mask", "mask", "nmask"))


def get_modified_nmask(settings: SoftInpaintingSettings, nmask: torch.Tensor, sigma) -> torch.Tensor:
    """Mirrors ``get_modified_nmask``: the soft mask sharpened as sigma grows."""
    return torch.pow(nmask, (sigma ** settings.mask_blend_power) * settings.mask_blend_scale)


def latent_blend(settings: SoftInpaintingSettings, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mirrors ``latent_blend``: interpolate ``a`` → ``b`` by ``t``, magnitudes interpolated separately."""
    if t.dim() == 3:
        t2, t3 = t[None], t[0][None, None]
    else:
        t2, t3 = t, t[:, 0][:, None]
    mixed = a * (1 - t2) + b * t2
    norm = lambda v: torch.linalg.vector_norm(v.double(), dim=1, keepdim=True)  # noqa: E731
    p = settings.inpaint_detail_preservation
    desired = (norm(a).pow(p) * (1 - t3) + norm(b).pow(p) * t3).pow(1 / p)
    return mixed * (desired / (norm(mixed) + 0.00001)).to(mixed.dtype)


class Script(scripts.Script):
    """Mirrors the upstream ``Script`` of soft_inpainting.py (title "Soft Inpainting")."""

    def __init__(self):
        # upstream sets section = "inpaint" (its accordion sits in the inpaint panel); this UI double
        # builds only the default section, so the script stays there
        self.settings = None

    def title(self):
        return "Soft Inpainting"

    def show(self, is_img2img):
        return scripts.AlwaysVisible if is_img2img else False

    def ui(self, is_img2img):
        defaults = SoftInpaintingSettings()
        return [gr.Checkbox(False, label="Soft inpainting", elem_id=self.elem_id("enabled")),
                gr.Slider(0, 8, defaults.mask_blend_power, label="Schedule bias"),
                gr.Slider(0, 8, defaults.mask_blend_scale, label="Preservation strength"),
                gr.Slider(1, 32, defaults.inpaint_detail_preservation, label="Transition contrast boost"),
                gr.Slider(0, 1, defaults.composite_mask_influence, label="Mask influence"),
                gr.Slider(0, 8, defaults.composite_difference_threshold, label="Difference threshold"),
                gr.Slider(0, 8, defaults.composite_difference_contrast, label="Difference contrast")]

    def process(self, p, enabled, power, scale, detail, influence, threshold, contrast):
        """Mirrors ``Script.process``: soft masks stay unrounded."""
        if not enabled or not processing_uses_inpainting(p):
            return
        p.mask_round = False
        self.settings = SoftInpaintingSettings(power, scale, detail, influence, threshold, contrast)
        p.extra_generation_params["Soft inpainting enabled"] = True

    def on_mask_blend(self, p, mba, enabled, *_):
        """Mirrors ``Script.on_mask_blend``."""
        if not enabled or not processing_uses_inpainting(p):
            return
        if mba.is_final_blend:
            mba.blended_latent = mba.current_latent
            return
        mba.blended_latent = latent_blend(self.settings, mba.init_latent, mba.current_latent,
                                          get_modified_nmask(self.settings, mba.nmask, mba.sigma[0]))
