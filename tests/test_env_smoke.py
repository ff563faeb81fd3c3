"""Smoke test for the test environment itself (requirements-test*.txt).

Checks that the real third-party packages the suite relies on import, and that
the latent-diffusion UNet from stable-diffusion-sdkit builds and runs on CPU in
both SD1.x (conv proj_in, num_heads) and SD2.x (linear proj_in,
num_head_channels) layouts, with k-diffusion sampling through CompVisDenoiser.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

# Tiny SD-shaped UNet: 4 levels (channel_mult), attention at 3 of them, 2 res
# blocks per level, cross-attention on a 64-dim context. model_channels must be
# a multiple of 32 (GroupNorm(32, C)). use_checkpoint=False avoids ldm's custom
# CheckpointFunction (works, but warns about deprecated torch autocast APIs).
TINY_UNET_KWARGS = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=64,
    legacy=False,
    use_checkpoint=False,
    use_fp16=False,
)
SD1_KWARGS = dict(TINY_UNET_KWARGS, num_heads=4)
SD2_KWARGS = dict(TINY_UNET_KWARGS, num_head_channels=8, use_linear_in_transformer=True)


def test_third_party_imports():
    import fastapi
    import gradio
    import k_diffusion
    import k_diffusion.external
    import k_diffusion.sampling
    import torchvision
    from fastapi.testclient import TestClient  # noqa: F401
    from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer  # noqa: F401
    from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: F401

    assert torch.__version__.startswith("2.14.1")
    assert torchvision.__version__.startswith("0.29.1")
    assert gradio.__version__ == "3.41.2"
    assert fastapi.__version__ == "0.94.0"
    for name in ("sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m"):
        assert callable(getattr(k_diffusion.sampling, name))
    assert isinstance(k_diffusion.external.CompVisDenoiser, type)


def _build(kwargs):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**kwargs).eval()
    # ldm zero-initialises the output conv and every proj_out, so a fresh UNet
    # returns exactly 0 and its attention has no effect; give those weights values.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        zeroed = [p for p in unet.parameters() if not p.any()]
        assert zeroed, "expected ldm's zero-initialised output layers"
        for p in zeroed:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return unet


@pytest.mark.parametrize("kwargs", [SD1_KWARGS, SD2_KWARGS], ids=["sd1", "sd2"])
def test_tiny_unet_forward(kwargs):
    from ldm.modules.attention import CrossAttention, SpatialTransformer

    unet = _build(kwargs)
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    # 2 res blocks x 3 attention levels down, 1 middle, 3 x 3 up.
    assert len(transformers) == 2 * 3 + 1 + 3 * 3
    assert sum(isinstance(m, CrossAttention) for m in unet.modules()) == 2 * len(transformers)
    linear = isinstance(transformers[0].proj_in, torch.nn.Linear)
    assert linear == kwargs.get("use_linear_in_transformer", False)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([999, 10])
    ctx = torch.randn(2, 7, 64, generator=gen)
    with torch.no_grad():
        out = unet(x, timesteps=t, context=ctx)
        out_other_ctx = unet(x, timesteps=t, context=ctx.flip(0))
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0
    # The context really flows through cross-attention.
    assert not torch.allclose(out, out_other_ctx)


def test_k_diffusion_samples_through_compvis_denoiser():
    import k_diffusion.external
    import k_diffusion.sampling

    unet = _build(SD1_KWARGS)

    class CompVisWrapper(torch.nn.Module):
        """Minimal stand-in for ldm's LatentDiffusion as CompVisDenoiser sees it."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
            self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())

        def apply_model(self, x, t, cond):
            return self.model(x, timesteps=t, context=cond)

    denoiser = k_diffusion.external.CompVisDenoiser(CompVisWrapper(unet))
    sigmas = denoiser.get_sigmas(3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, generator=gen) * sigmas[0]
    cond = torch.randn(1, 7, 64, generator=gen)
    with torch.no_grad():
        out = k_diffusion.sampling.sample_euler(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
