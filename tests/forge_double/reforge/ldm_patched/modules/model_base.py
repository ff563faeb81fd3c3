"""Double of reForge ``ldm_patched/modules/model_base.py`` ``BaseModel``: ``apply_model`` → x0 (eps model)."""

import torch

from ldm_patched.ldm.modules.attention import optimized_attention
from tests.forge_double.unet_walk import c_in, denoised_from_eps, sigma_to_t, unet_forward


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        """Mirrors ``BaseModel.apply_model`` / ``_apply_model`` (sigma in, model_sampling in/out)."""
        sigma = t
        xc = c_in(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        eps = unet_forward(self.diffusion_model, xc, sigma_to_t(sigma), context=c_crossattn, control=control,
                           transformer_options=transformer_options,
                           attention=lambda q, k, v, h, extra: optimized_attention(q, k, v, h, attn_precision=extra.get("attn_precision")),
                           extra_keys={"attn_precision": None}, **kwargs).float()
        return denoised_from_eps(x, sigma, eps)

    def memory_required(self, input_shape, cond_shapes=None):
        return input_shape[0] * input_shape[2] * input_shape[3]
