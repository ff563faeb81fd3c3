"""Double of Forge ``backend/modules/k_model.py`` ``KModel``: ``apply_model`` → x0 prediction (eps model).

The diffusion model is the double of Forge's ``IntegratedUNet2DConditionModel`` over a real ldm UNet's
modules (``backend/nn/unet.py``), so patches in ``transformer_options`` and object patches take effect.
"""

import torch

from backend.nn.unet import IntegratedUNet2DConditionModel
from tests.forge_double.unet_walk import CALLS, c_in, denoised_from_eps, float_output, sigma_to_t


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = IntegratedUNet2DConditionModel(diffusion_model)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``KModel.apply_model``: sigma in, ``calculate_input`` / ``timestep`` / ``calculate_denoised``."""
        sigma = t
        xc = c_in(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        CALLS.append(xc.shape[0])
        # as the host: the input, the context and every float extra cond in the UNet's dtype (fp16 UNets
        # get fp16 inputs), the timestep as float, the output back to float
        dtype = next(self.diffusion_model.parameters()).dtype
        xc = xc.to(dtype)
        context = c_crossattn.to(dtype) if c_crossattn is not None else None
        extra = {k: (v.to(dtype) if torch.is_tensor(v) and v.dtype not in (torch.int, torch.long) else v)
                 for k, v in kwargs.items()}
        eps = self.diffusion_model(xc, sigma_to_t(sigma).float(), context=context, control=control,
                                   transformer_options=transformer_options, **extra)
        eps = float_output(eps)  # the hosts' .float() on the output; float64 stays float64 (tests/exactness.py)
        return denoised_from_eps(x, sigma, eps)

    def memory_required(self, input_shape):
        """Mirrors ``KModel.memory_required``: proportional to rows × H × W."""
        return input_shape[0] * input_shape[2] * input_shape[3]
