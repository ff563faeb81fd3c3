"""Double of Forge ``backend/modules/k_model.py`` ``KModel``: ``apply_model`` → x0 prediction (eps model).

The diffusion model is a real ldm UNet run through ``unet_walk.unet_forward`` (the host's
transformer_options-aware forward), so patches in ``transformer_options`` take effect.
"""

import torch

from backend.attention import attention_function
from tests.forge_double.unet_walk import c_in, denoised_from_eps, sigma_to_t, unet_forward


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``KModel.apply_model``: sigma in, ``calculate_input`` / ``timestep`` / ``calculate_denoised``."""
        sigma = t
        xc = c_in(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        eps = unet_forward(self.diffusion_model, xc, sigma_to_t(sigma), context=c_crossattn, control=control,
                           transformer_options=transformer_options,
                           attention=lambda q, k, v, h, extra: attention_function(q, k, v, h), **kwargs).float()
        return denoised_from_eps(x, sigma, eps)

    def memory_required(self, input_shape):
        """Mirrors ``KModel.memory_required``: proportional to rows × H × W."""
        return input_shape[0] * input_shape[2] * input_shape[3]
