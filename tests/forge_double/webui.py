"""The WebUI side of Forge 2 / reForge around the patcher, reduced to what PAG touches.

- ``ForgeObjects``: mirrors Forge ``backend/diffusion_engine/base.py`` ``ForgeObjects`` (``shallow_copy``);
- ``SdModel``: ``forge_objects`` and ``forge_objects_after_applying_lora`` (``p.sd_model``);
- ``Forge2Denoiser``: mirrors Forge ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward`` (HEAD)
  after the conds are reconstructed: hires CFG, skip-early/NGMS set ``cond_scale = 1``, then
  ``backend.sampling.sampling_function.sampling_function(self, denoiser_params, cond_scale, cond_composition)``,
  ``step += 1``; at the first call ``sampling_prepare`` (loading the pass's patcher: object patches set);
- ``ReForgeDenoiser``: mirrors reForge ``CFGDenoiser.forward`` + ``modules_forge/forge_sampler.py``
  (``cond_from_a1111_to_patched_ldm(_weighted)``): skip-uncond → ``sampling_function(model, x, σ, None, cond, 1.0)``;
- ``Processing``: a ``p`` with the fields PAG reads, and ``sample_pass`` mirroring the hook order of
  ``modules/processing.py``: reset ``forge_objects`` from the LoRA-applied copy, then
  ``process_before_every_sampling`` — Forge HEAD's hires pass calls it, resets, and calls it again.
"""

import copy
from types import SimpleNamespace

import torch


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class SdModel:
    def __init__(self, unet_patcher):
        self.forge_objects_after_applying_lora = ForgeObjects(unet_patcher)
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()


class DenoiserParams(SimpleNamespace):
    """Mirrors ``CFGDenoiserParams`` (x, image_cond, sigma, text_cond, text_uncond): the raw B-row batch."""


class Forge2Denoiser:
    def __init__(self, p):
        self.p = p
        self.step = 0
        self.total_steps = None
        self.inner_model = SimpleNamespace(inner_model=p.sd_model)

    def __call__(self, x, sigma, uncond, cond, cond_composition, cond_scale, image_cond=None, skip_uncond=False):
        from backend.sampling.sampling_function import sampling_function, sampling_prepare

        if self.step == 0:  # the sampler's run starts: Forge loads the pass's UNet patcher
            sampling_prepare(self.inner_model.inner_model.forge_objects.unet, x)
        params = DenoiserParams(x=x, image_cond=image_cond, sigma=sigma, text_cond=cond, text_uncond=uncond)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if skip_uncond:  # skip_early_cond / NGMS on Forge: cond_scale 1 → the cfg1 optimisation drops the uncond
            cond_scale = 1.0
        denoised, cond_pred, uncond_pred = sampling_function(self, params, cond_scale, cond_composition)
        self.step += 1
        return denoised


def _reforge_cond(cond):
    from ldm_patched.modules.conds import CONDCrossAttn, CONDRegular

    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=CONDCrossAttn(cond)))]
    return [dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
                 model_conds=dict(c_crossattn=CONDCrossAttn(cond["crossattn"]), y=CONDRegular(cond["vector"])))]


def _reforge_weighted(cond, weights):
    results = []
    for group in map(list, zip(*weights)):
        entry = _reforge_cond(cond[[i for i, _ in group]])
        entry[0]["strength"] = group[-1][1]
        results += entry
    return results


class ReForgeDenoiser(Forge2Denoiser):
    def __call__(self, x, sigma, uncond, cond, cond_composition, cond_scale, image_cond=None, skip_uncond=False):
        from ldm_patched.modules.samplers import sampling_function

        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        unet = self.inner_model.inner_model.forge_objects.unet
        uncond_patched = _reforge_cond(uncond)
        cond_patched = _reforge_weighted(cond, cond_composition)
        if skip_uncond:
            denoised = sampling_function(unet.model, x, sigma, None, cond_patched, 1.0, unet.model_options, 0)
        else:
            denoised = sampling_function(unet.model, x, sigma, uncond_patched, cond_patched, cond_scale, unet.model_options, 0)
        self.step += 1
        return denoised


class Processing:
    """The fields of ``StableDiffusionProcessing`` PAG reads, plus the hook sequence of one sampling pass."""

    def __init__(self, sd_model, script_args, denoiser_cls, steps=4, seed=7):
        self.sd_model = sd_model
        self.script_args = script_args
        self.steps = steps
        self.seed = seed
        self.seeds = [seed]
        self.is_hr_pass = False
        self.hr_cfg = 5.0
        self.extra_generation_params = {}
        self.comments = []
        self.refiner_checkpoint_info = None
        self.refiner_switch_at = None
        self.sampler = SimpleNamespace(model_wrap_cfg=denoiser_cls(self))

    def comment(self, text):
        self.comments.append(text)

    def sample_pass(self, hook, *, hires=False, forge_head_hires_reset=True):
        """Reset forge_objects, run the script hook (twice around a reset for Forge HEAD's hires pass), new denoiser."""
        self.is_hr_pass = hires
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        hook(self)
        if hires and forge_head_hires_reset:
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
            hook(self)
        den = self.sampler.model_wrap_cfg = type(self.sampler.model_wrap_cfg)(self)
        return den


def deep_equal(a, b):
    """Structural equality for model_options: tensors by value, functions and other objects by identity."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (int, float, str, bool, type(None))):
        return a == b
    return a is b


def snapshot_options(model_options):
    """A copy of model_options for ``deep_equal``: containers copied, leaves shared."""
    return copy.copy(model_options) if not isinstance(model_options, dict) else {
        k: snapshot_options(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in model_options.items()}
