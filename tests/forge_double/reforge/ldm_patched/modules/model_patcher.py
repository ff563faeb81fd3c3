"""Double of reForge ``ldm_patched/modules/model_patcher.py``: option helpers and ``ModelPatcher``'s option API.

``modules_forge.unet_patcher.UnetPatcher`` (ControlNet list, extras) is folded into ``ModelPatcher`` here.
"""

import copy


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """Mirrors ``set_model_options_patch_replace`` (copies the dicts it changes)."""
    to = dict(model_options["transformer_options"])
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][key] = patch
    model_options["transformer_options"] = to
    return model_options


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def set_model_options_pre_cfg_function(model_options, pre_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_pre_cfg_function"] = model_options.get("sampler_pre_cfg_function", []) + [pre_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ModelPatcher:
    """Mirrors ``ModelPatcher`` (+ ``UnetPatcher``): ``clone()`` deep-copies ``model_options``."""

    def __init__(self, model, load_device=None, offload_device=None, size=0, weight_inplace_update=False):
        self.model = model
        self.load_device, self.offload_device, self.size = load_device, offload_device, size
        self.patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.controlnet_linked_list = None
        self.extra_concat_condition = None

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function, disable_cfg1_optimization)

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_pre_cfg_function(self.model_options, pre_cfg_function, disable_cfg1_optimization)

    def set_model_sampler_calc_cond_batch_function(self, sampler_calc_cond_batch_function):
        self.model_options["sampler_calc_cond_batch_function"] = sampler_calc_cond_batch_function

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number, transformer_index)

    def set_memory_peak_estimation_modifier(self, modifier):
        """Mirrors reForge ``modules_forge/unet_patcher.py: UnetPatcher.set_memory_peak_estimation_modifier``."""
        self.model_options["memory_peak_estimation_modifier"] = modifier

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)


def sampling_prepare_estimate(unet, x):
    """Mirrors the estimate in reForge ``modules_forge/forge_sampler.py: sampling_prepare``: the memory
    reserved for a batch of ``x``'s rows, asked for cond + uncond rows (``B * 2``)."""
    b, c, h, w = x.shape
    estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
    return estimate([b * 2, c, h, w])
