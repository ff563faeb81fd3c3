"""Double of reForge ``ldm_patched/ldm/modules/diffusionmodules/openaimodel.py``: ``UNetModel.forward`` (the
``DIFFUSION_MODEL`` wrappers of ``transformer_options`` around ``_forward``), ``UNetModel._forward``,
``forward_timestep_embed`` and ``apply_control`` statement for statement (``emb_patch``,
``input_block_patch``, ``input_block_patch_after_skip``, ``output_block_patch``, ControlNet residuals),
over the modules of a real ldm UNet (``unet_walk.rehome``). Video layers are not modelled.
"""

import torch as th
from torch import nn
from ldm.modules.diffusionmodules.util import timestep_embedding  # the same sinusoidal embedding as reForge's

import ldm_patched.modules.patcher_extension
from ldm_patched.ldm.modules.attention import optimized_attention
from tests.forge_double import unet_walk


def _attention(q, k, v, heads, extra):
    return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"))


def forward_timestep_embed(ts, x, emb, context=None, transformer_options={}, output_shape=None, time_context=None,
                           num_video_frames=None, image_only_indicator=None):
    for layer in ts:
        x = unet_walk.layer_forward(layer, x, emb, context, transformer_options, _attention, {"attn_precision": None},
                                    output_shape)
    return x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, *args, **kwargs):
        return forward_timestep_embed(self, *args, **kwargs)


def apply_control(h, control, name):
    """Mirrors reForge ``apply_control`` (device/dtype match, then ``h + ctrl``; resizing not modelled)."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            if ctrl.device != h.device or ctrl.dtype != h.dtype:
                ctrl = ctrl.to(h)
            h = h + ctrl
    return h


class UNetModel(nn.Module):
    def __init__(self, ldm_unet):
        super().__init__()
        unet_walk.rehome(self, ldm_unet, TimestepEmbedSequential)
        self.default_num_video_frames = None
        self.predict_codebook_ids = False

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return ldm_patched.modules.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            ldm_patched.modules.patcher_extension.get_all_wrappers(ldm_patched.modules.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
        ).execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        transformer_patches = transformer_options.get("patches", {})

        num_video_frames = kwargs.get("num_video_frames", self.default_num_video_frames)
        image_only_indicator = kwargs.get("image_only_indicator", None)
        time_context = kwargs.get("time_context", None)

        assert (y is not None) == (self.num_classes is not None)
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)
        emb = self.time_embed(t_emb)

        if "emb_patch" in transformer_patches:
            patch = transformer_patches["emb_patch"]
            for p in patch:
                emb = p(emb, self.model_channels, transformer_options)

        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)

        h = x
        for id, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", id)
            h = forward_timestep_embed(module, h, emb, context, transformer_options, time_context=time_context, num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)
            h = apply_control(h, control, 'input')
            if "input_block_patch" in transformer_patches:
                patch = transformer_patches["input_block_patch"]
                for p in patch:
                    h = p(h, transformer_options)

            hs.append(h)
            if "input_block_patch_after_skip" in transformer_patches:
                patch = transformer_patches["input_block_patch_after_skip"]
                for p in patch:
                    h = p(h, transformer_options)

        transformer_options["block"] = ("middle", 0)
        if self.middle_block is not None:
            h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options, time_context=time_context, num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)
        h = apply_control(h, control, 'middle')

        for id, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", id)
            hsp = hs.pop()
            hsp = apply_control(hsp, control, 'output')

            if "output_block_patch" in transformer_patches:
                patch = transformer_patches["output_block_patch"]
                for p in patch:
                    h, hsp = p(h, hsp, transformer_options)

            h = th.cat([h, hsp], dim=1)
            del hsp
            if len(hs) > 0:
                output_shape = hs[-1].shape
            else:
                output_shape = None
            h = forward_timestep_embed(module, h, emb, context, transformer_options, output_shape, time_context=time_context, num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)
        h = h.type(x.dtype)
        if self.predict_codebook_ids:
            return self.id_predictor(h)
        else:
            return self.out(h)
