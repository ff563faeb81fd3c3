"""Test-only module (not host API): a tiny stand-in for the model object A1111 puts in ``shared.sd_model``.

Mirrors what the CFG path uses of ``ldm.models.diffusion.ddpm.LatentDiffusion`` (SD1/SD2, via
``modules/sd_models.py``) and of ``sgm.models.diffusion.DiffusionEngine`` as extended by
``modules/sd_models_xl.py`` (SDXL): ``.model`` (a ``DiffusionWrapper``-like module holding
``.diffusion_model`` and ``.conditioning_key``), ``apply_model``, ``alphas_cumprod`` and friends,
``parameterization``, ``cond_stage_key``, ``cond_stage_model_empty_prompt``, the ``is_sd1/is_sd2/is_sdxl/
is_ssd`` flags, ``latent_channels`` and ``sd_checkpoint_info``. ``get_learned_conditioning`` is a
deterministic fake text encoder (seeded by the prompt text), not CLIP.

Factories: ``make_sd15_model(seed)`` / ``make_sd15_inpaint_model(seed)`` build the real ldm ``UNetModel``
(pip ``stable-diffusion-sdkit``) in the SD1.5 block layout with tiny widths and random (non-zero)
weights. For SDXL pass an sgm-like UNet (``forward(x, timesteps, context, y)``) with ``is_sdxl=True``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

import ldm.modules.attention as ldm_attention
from ldm.modules.diffusionmodules.openaimodel import UNetModel

# modules/sd_hijack.py: A1111 never uses ldm's xformers attention class; attn1/attn2 are CrossAttention
ldm_attention.MemoryEfficientCrossAttention = ldm_attention.CrossAttention
ldm_attention.BasicTransformerBlock.ATTENTION_MODES["softmax-xformers"] = ldm_attention.CrossAttention

TOKENS_PER_CHUNK = 4
"""Scaled-down stand-in for CLIP's 77-token chunk (``cond_stage_model_empty_prompt.shape[1]``)."""
WORDS_PER_CHUNK = 3
"""Scaled-down stand-in for 75 prompt tokens per chunk in the fake text encoder."""


@dataclass
class CheckpointInfo:
    """Test-only stand-in for ``sd_models.CheckpointInfo``; ``model`` is what loading it yields."""

    title: str
    model: object = None
    short_title: str = ""
    model_name: str = ""
    hash: str = ""
    sha256: str = ""
    filename: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Test-only: fill the derived names like ``sd_models.CheckpointInfo`` does."""
        self.short_title = self.short_title or self.title
        self.model_name = self.model_name or self.title
        self.filename = self.filename or f"{self.title}.safetensors"

    def __eq__(self, other):
        """Test-only: checkpoint infos compare by title (the host compares the same object)."""
        return isinstance(other, CheckpointInfo) and other.title == self.title

    def __hash__(self):
        """Test-only: hash by title, consistent with ``__eq__``."""
        return hash(self.title)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Test-only stand-in for ``sd_models.reload_model_weights``: make ``info.model`` the current model
    (``shared.sd_model``) and fire ``model_loaded`` callbacks, as the refiner switch does."""
    from modules import script_callbacks, shared

    model = info.model
    model.sd_checkpoint_info = info
    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    return model


class DiffusionWrapper(torch.nn.Module):
    """Mirrors ``ldm.models.diffusion.ddpm.DiffusionWrapper.forward``: route the cond dict to the UNet by
    ``conditioning_key`` (concat on channels for hybrid, crossattn concatenated on the token axis)."""

    def __init__(self, diffusion_model, conditioning_key):
        """Mirrors ``DiffusionWrapper.__init__`` (ldm/models/diffusion/ddpm.py)."""
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list = None, c_crossattn: list = None, c_adm=None):
        """Mirrors ``DiffusionWrapper.forward`` (ldm/models/diffusion/ddpm.py)."""
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid-adm":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1), y=c_adm)
        if key == "crossattn-adm":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=c_adm)
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        raise NotImplementedError(key)


class OpenAIWrapper(torch.nn.Module):
    """Mirrors ``sgm.modules.diffusionmodules.wrappers.OpenAIWrapper``: ``crossattn`` → context,
    ``vector`` → y, ``concat`` (not A1111's ``c_concat``) appended on channels."""

    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        """Mirrors ``OpenAIWrapper.__init__`` (sgm/modules/diffusionmodules/wrappers.py)."""
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key  # set by A1111's sd_models_xl.extend_sdxl

    def forward(self, x, t, c, **kwargs):
        """Mirrors ``OpenAIWrapper.forward`` (sgm/modules/diffusionmodules/wrappers.py)."""
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


def scaled_linear_alphas_cumprod(n_timestep=1000, linear_start=0.00085, linear_end=0.012):
    """ldm ``make_beta_schedule("linear")`` (SD's "scaled linear"): betas = linspace(sqrt(a), sqrt(b))²."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    return np.cumprod(1.0 - betas.numpy(), axis=0)


class TinyLatentDiffusion(torch.nn.Module):
    """Test-only: what A1111's CFG path needs of ``LatentDiffusion`` / SDXL ``DiffusionEngine``.

    ``apply_model(x_noisy, t, cond)`` dispatches like ``LatentDiffusion.apply_model`` (SD1/2) or like
    ``sd_models_xl.apply_model`` (SDXL dict conds; 9-channel UNets get ``c_concat`` on channels).
    """

    def __init__(self, unet, *, conditioning_key="crossattn", parameterization="eps", cond_stage_key="txt",
                 is_sdxl=False, is_sd2=False, is_ssd=False, context_dim=None, adm_in_channels=None,
                 tokens_per_chunk=TOKENS_PER_CHUNK, title="tiny-sd15", seed=0):
        """Test-only: sets the attributes ``LatentDiffusion.__init__``/``register_schedule`` (ldm/models/diffusion/ddpm.py) and A1111's ``sd_models.load_model`` give the model."""
        super().__init__()
        self.is_sdxl = is_sdxl
        self.is_sd2 = is_sd2 and not is_sdxl
        self.is_sd1 = not is_sdxl and not is_sd2
        self.is_ssd = is_ssd
        self.is_sd3 = False
        self.model = OpenAIWrapper(unet, "crossattn") if is_sdxl else DiffusionWrapper(unet, conditioning_key)
        self.parameterization = parameterization
        self.cond_stage_key = cond_stage_key
        self.latent_channels = 4
        self.context_dim = context_dim if context_dim is not None else getattr(unet, "context_dim", None)
        self.adm_in_channels = adm_in_channels
        self.tokens_per_chunk = tokens_per_chunk
        self.text_seed = seed

        alphas_cumprod = scaled_linear_alphas_cumprod()
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        to_torch = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.num_timesteps = len(alphas_cumprod)
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))

        self.sd_checkpoint_info = CheckpointInfo(title, self)
        self.sd_model_hash = f"{zlib.crc32(title.encode()):08x}"
        self.sd_model_checkpoint = self.sd_checkpoint_info.filename
        # sd_models.get_empty_cond: the "" prompt's embedding, (1, chunk, dim); SDXL: its crossattn
        empty = self._encode_one("", 1)
        self.register_buffer("cond_stage_model_empty_prompt", (empty["crossattn"] if isinstance(empty, dict) else empty)[None], persistent=False)

    # --- LatentDiffusion.apply_model / sd_models_xl.apply_model ---------------------------------------
    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """Mirrors ``LatentDiffusion.apply_model`` (SD1/2) and A1111's SDXL ``apply_model``."""
        if self.is_sdxl:
            if getattr(self.model.diffusion_model, "in_channels", 4) == 9:
                x_noisy = torch.cat([x_noisy] + cond["c_concat"], dim=1)
            return self.model(x_noisy, t, cond)

        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    # --- fake text encoder -----------------------------------------------------------------------------
    def _encode_one(self, text, n_chunks):
        """Deterministic per-text embedding: ``(n_chunks * tokens_per_chunk, context_dim)`` (SDXL: a dict
        with ``crossattn`` and ``vector`` rows). Seeded from the text so identical prompts match."""
        g = torch.Generator().manual_seed((zlib.crc32(text.encode("utf-8")) + 7919 * self.text_seed) % (2**31))
        tokens = n_chunks * self.tokens_per_chunk
        crossattn = torch.randn(tokens, self.context_dim, generator=g, dtype=torch.float32)
        if not self.is_sdxl:
            return crossattn
        vector = torch.randn(self.adm_in_channels, generator=g, dtype=torch.float32)
        return {"crossattn": crossattn, "vector": vector}

    def get_learned_conditioning(self, texts):
        """Stand-in for ``LatentDiffusion.get_learned_conditioning`` / SDXL's: one chunk of
        ``tokens_per_chunk`` tokens per ``WORDS_PER_CHUNK`` words (at least one); all prompts in one call
        are padded to the longest with extra chunks, like the host's batch encoding."""
        n_chunks = max(max(1, math.ceil(len(str(t).split()) / WORDS_PER_CHUNK)) for t in texts) if len(texts) else 1
        rows = [self._encode_one(str(t), n_chunks) for t in texts]
        # on the UNet's device, in its dtype (float64 when a test compares paths in float64)
        to = {"device": self.alphas_cumprod.device, "dtype": next(self.model.parameters()).dtype}
        if self.is_sdxl:
            return {k: torch.stack([r[k] for r in rows]).to(**to) for k in ("crossattn", "vector")}
        return torch.stack(rows).to(**to)


def randomize_weights_(module: torch.nn.Module, seed: int, scale: float = 1.0):
    """Test-only: replace every parameter with seeded random values (ldm zero-initialises the output
    convs and ``proj_out``, which would make the UNet ignore attention and output zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if sub.weight is not None:
                    sub.weight.copy_(1.0 + 0.1 * torch.randn(sub.weight.shape, generator=g))
                    sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=g))
                continue
            for name, p in sub.named_parameters(recurse=False):
                if name == "bias" or p.dim() == 1:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) * (scale / math.sqrt(fan_in)))
    return module


def make_sd15_unet(seed=0, *, in_channels=4, model_channels=32, num_heads=4, context_dim=32):
    """Test-only: the real ldm ``UNetModel`` in SD1.5's layout (channel_mult 1,2,4,4; attention at
    ds 4,2,1; 2 res blocks; transformer depth 1), tiny widths, random weights, eval mode."""
    unet = UNetModel(
        image_size=32, in_channels=in_channels, model_channels=model_channels, out_channels=4,
        num_res_blocks=2, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
        num_heads=num_heads, use_spatial_transformer=True, transformer_depth=1,
        context_dim=context_dim, use_checkpoint=False, legacy=False,
    )
    unet.context_dim = context_dim
    randomize_weights_(unet, seed)
    return unet.eval().requires_grad_(False)


def make_sd15_model(seed=0, *, parameterization="eps", cond_stage_key="txt", title=None):
    """Test-only: ``TinyLatentDiffusion`` around a tiny SD1.5-layout UNet (crossattn, 4 channels)."""
    unet = make_sd15_unet(seed)
    model = TinyLatentDiffusion(unet, conditioning_key="crossattn", parameterization=parameterization,
                                cond_stage_key=cond_stage_key, context_dim=32, title=title or f"tiny-sd15-{seed}", seed=seed)
    return model.eval().requires_grad_(False)


def make_sd15_inpaint_model(seed=0, *, title=None):
    """Test-only: the 9-channel inpainting variant (``conditioning_key="hybrid"``: latent + mask +
    masked-image latent concatenated on channels)."""
    unet = make_sd15_unet(seed, in_channels=9)
    model = TinyLatentDiffusion(unet, conditioning_key="hybrid", context_dim=32, title=title or f"tiny-sd15-inpaint-{seed}", seed=seed)
    return model.eval().requires_grad_(False)


def make_sdxl_model(unet, *, context_dim, adm_in_channels, parameterization="eps", is_ssd=False, seed=0, title=None):
    """Test-only: ``TinyLatentDiffusion`` in SDXL mode around an sgm-like UNet
    (``forward(x, timesteps, context, y)``); conds are ``{"crossattn", "vector"}`` dicts."""
    model = TinyLatentDiffusion(unet, is_sdxl=True, is_ssd=is_ssd, parameterization=parameterization,
                                context_dim=context_dim, adm_in_channels=adm_in_channels, seed=seed,
                                title=title or f"tiny-sdxl-{seed}")
    return model.eval().requires_grad_(False)
