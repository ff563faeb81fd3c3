"""Double of reForge ``ldm_patched/modules/model_base.py`` ``BaseModel``: ``apply_model`` → x0 (eps model)."""

import torch

from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.forge_double.unet_walk import CALLS, c_in, denoised_from_eps, float_output, sigma_to_t


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = UNetModel(diffusion_model)  # the host's UNet class over a real ldm UNet's modules

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``BaseModel.apply_model`` / ``_apply_model`` (sigma in, model_sampling in/out)."""
        sigma = t
        xc = c_in(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        CALLS.append(xc.shape[0])
        eps = float_output(self.diffusion_model(xc, sigma_to_t(sigma), context=c_crossattn, control=control,
                                                transformer_options=transformer_options, **kwargs))
        return denoised_from_eps(x, sigma, eps)

    def memory_required(self, input_shape, cond_shapes=None):
        return input_shape[0] * input_shape[2] * input_shape[3]
