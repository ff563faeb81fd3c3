"""Double of Forge ``backend/modules/k_model.py`` ``KModel``: ``apply_model`` → x0 prediction (eps model).

The diffusion model is the double of Forge's ``IntegratedUNet2DConditionModel`` over a real ldm UNet's
modules (``backend/nn/unet.py``), so patches in ``transformer_options`` and object patches take effect.
"""

import torch

from backend.nn.unet import IntegratedUNet2DConditionModel
from tests.forge_double.unet_walk import apply_eps_model


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = IntegratedUNet2DConditionModel(diffusion_model)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``KModel.apply_model``: sigma in, ``calculate_input`` / ``timestep`` / ``calculate_denoised``."""
        return apply_eps_model(self.diffusion_model, x, t, c_concat, c_crossattn, control, transformer_options, kwargs)

    def memory_required(self, input_shape):
        """Mirrors ``KModel.memory_required``: proportional to rows × H × W."""
        return input_shape[0] * input_shape[2] * input_shape[3]
