"""Double of Forge ``backend/patcher/unet.py`` ``UnetPatcher``: clone keeps the ControlNet list and extras."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_concat_condition = None

    def clone(self):
        """Mirrors ``UnetPatcher.clone``."""
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_sampler_pre_cfg_function(self, modifier, ensure_uniqueness=False):
        """Mirrors ``UnetPatcher.add_sampler_pre_cfg_function`` (appends in place to its own list)."""
        self.model_options.setdefault("sampler_pre_cfg_function", [])
        if not (ensure_uniqueness and modifier in self.model_options["sampler_pre_cfg_function"]):
            self.model_options["sampler_pre_cfg_function"].append(modifier)

    def set_memory_peak_estimation_modifier(self, modifier):
        """Mirrors ``UnetPatcher.set_memory_peak_estimation_modifier`` (one slot in ``model_options``)."""
        self.model_options["memory_peak_estimation_modifier"] = modifier


def sampling_prepare_estimate(unet, x):
    """Mirrors the estimate at the top of ``backend/sampling/sampling_function.py: sampling_prepare``: the
    memory Forge reserves for a batch of ``x``'s rows, asked for cond + uncond rows (``B * 2``)."""
    b, c, h, w = x.shape
    estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
    return estimate([b * 2, c, h, w])
