"""Double of reForge ``ldm_patched/modules/model_base.py`` ``BaseModel``: ``apply_model`` → x0 (eps model)."""

import torch

from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.forge_double.unet_walk import apply_eps_model


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = UNetModel(diffusion_model)  # the host's UNet class over a real ldm UNet's modules

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``BaseModel.apply_model`` / ``_apply_model`` (sigma in, model_sampling in/out)."""
        return apply_eps_model(self.diffusion_model, x, t, c_concat, c_crossattn, control, transformer_options, kwargs)

    def memory_required(self, input_shape, cond_shapes=None):
        return input_shape[0] * input_shape[2] * input_shape[3]
