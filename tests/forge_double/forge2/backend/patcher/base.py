"""Double of Forge ``backend/patcher/base.py``: the model_options helpers and ``ModelPatcher``'s option API."""

import copy


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """Mirrors ``set_model_options_patch_replace``: copies ``transformer_options``, ``patches_replace`` and
    ``patches_replace[name]`` before setting ``[(block, number[, index])]``, and returns ``model_options``."""
    to = dict(model_options["transformer_options"])
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][key] = patch
    model_options["transformer_options"] = to
    return model_options


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    """Mirrors ``set_model_options_post_cfg_function``: a new list with the function appended."""
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def set_model_options_pre_cfg_function(model_options, pre_cfg_function, disable_cfg1_optimization=False):
    """Mirrors ``set_model_options_pre_cfg_function``."""
    model_options["sampler_pre_cfg_function"] = model_options.get("sampler_pre_cfg_function", []) + [pre_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


def _get_attr(obj, attr):
    """Mirrors ``backend/utils.py`` ``get_attr`` (dotted names)."""
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def _set_attr_raw(obj, attr, value):
    """Mirrors ``backend/utils.py`` ``set_attr_raw`` (dotted names)."""
    names = attr.split(".")
    for name in names[:-1]:
        obj = getattr(obj, name)
    setattr(obj, names[-1], value)


class ModelPatcher:
    """Mirrors ``ModelPatcher``: ``clone()`` deep-copies ``model_options``; setters write the patcher's own dict."""

    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.model = model
        self.load_device, self.offload_device, self.size, self.current_device = load_device, offload_device, size, current_device
        self.patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other):
        """Mirrors ``ModelPatcher.is_clone``: the same model object."""
        return hasattr(other, "model") and self.model is other.model

    def add_object_patch(self, name, obj):
        """Mirrors ``ModelPatcher.add_object_patch``: set on the model while this patcher is loaded."""
        self.object_patches[name] = obj

    def forge_patch_model(self, target_device=None):
        """Mirrors ``forge_patch_model``: each object patch set with ``utils.set_attr_raw``, the old value kept."""
        for k, item in self.object_patches.items():
            old = _get_attr(self.model, k)
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
            _set_attr_raw(self.model, k, item)
        return self.model

    def forge_unpatch_model(self, target_device=None):
        """Mirrors ``forge_unpatch_model``: the kept values set back (an instance attribute stays)."""
        for k in list(self.object_patches_backup.keys()):
            _set_attr_raw(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup = {}

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function, disable_cfg1_optimization)

    def set_model_sampler_pre_cfg_function(self, pre_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_pre_cfg_function(self.model_options, pre_cfg_function, disable_cfg1_optimization)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number, transformer_index)

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")
