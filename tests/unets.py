"""Small random-weight UNets with the real block layouts, shared by the tests.

SD1.x/SD2.x use the real ``ldm`` UNet (PyPI ``stable-diffusion-sdkit``); SDXL-family layouts use the
sgm double in ``tests/doubles/sgm_unet.py``.
"""

import copy

import torch


def randomize_zero_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """ldm/sgm zero-initialise proj_out and the output conv; give them weights so every block matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def sd15_unet(seed: int = 0, context_dim: int = 32) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=4, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, legacy=False,
    )
    return randomize_zero_init(unet, seed).eval()


def sd2_unet(seed: int = 0, context_dim: int = 48) -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=8, use_spatial_transformer=True,
        use_linear_in_transformer=True, transformer_depth=1, context_dim=context_dim, legacy=False,
    )
    return randomize_zero_init(unet, seed).eval()


def sdxl_unet(kind: str = "base", seed: int = 0) -> torch.nn.Module:
    from tests.doubles import sgm_unet

    factory = {"base": sgm_unet.make_sdxl_base, "refiner": sgm_unet.make_sdxl_refiner, "ssd": sgm_unet.make_ssd_1b}[kind]
    return randomize_zero_init(factory(tiny=True, seed=seed), seed).eval()


class IdentityAttention(torch.nn.Module):
    """The reference perturbation, built independently of lib_pag: ``(1−a)·attn(x) + a·to_out(to_v(x))``."""

    def __init__(self, original: torch.nn.Module, strength: float = 1.0):
        super().__init__()
        self.original = original
        self.strength = strength

    def forward(self, x, *args, **kwargs):
        identity = self.original.to_out(self.original.to_v(x))
        if self.strength == 1.0:
            return identity
        return (1 - self.strength) * self.original(x, *args, **kwargs) + self.strength * identity


def reference_unet(unet: torch.nn.Module, paths_strengths: dict) -> torch.nn.Module:
    """A deep copy of ``unet`` whose given attn1 modules are replaced by ``IdentityAttention``."""
    ref = copy.deepcopy(unet)
    for path, strength in paths_strengths.items():
        parent_path, _, name = path.rpartition(".")
        parent = ref.get_submodule(parent_path)
        setattr(parent, name, IdentityAttention(getattr(parent, name), strength))
    return ref


def unet_inputs(unet, batch: int = 2, size: int = 16, tokens: int = 7, seed: int = 0):
    """x, timesteps, context (and y for sgm UNets with a label embedding)."""
    g = torch.Generator().manual_seed(seed)
    context_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    kwargs = {"context": torch.randn(batch, tokens, context_dim, generator=g)}
    if getattr(unet, "num_classes", None) == "sequential" or hasattr(unet, "label_emb"):
        adm = unet.label_emb[0][0].in_features
        kwargs["y"] = torch.randn(batch, adm, generator=g)
    x = torch.randn(batch, unet.in_channels if hasattr(unet, "in_channels") else 4, size, size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    return x, t, kwargs


def snapshot(module: torch.nn.Module):
    """Everything that must come back unchanged: weights, buffers and each module's instance attributes."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    attrs = {name: (set(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in module.named_modules()}
    return state, attrs


def assert_same_snapshot(before, after):
    (s0, a0), (s1, a1) = before, after
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert a0 == a1
