"""Double of ``modules/sd_samplers_cfg_denoiser.py`` (A1111 1.10): the classifier-free-guidance denoiser
shared by every sampler.

``CFGDenoiser.forward`` follows the 1.10 order of operations exactly (see the step comments): interrupt
check, refiner hook, edit-model detection, ``reconstruct_*``, mask blend before (timesteps samplers), row
building, ``cfg_denoiser`` callback with read-back, skip-uncond (early-CFG skip, NGMS), padding, the three
UNet-call layouts, fake uncond, ``cfg_denoised`` callback, combine, mask blend after (k-diffusion),
preview latent, ``cfg_after_cfg`` callback with read-back, step counter.
"""
from __future__ import annotations

import torch

import modules.shared as shared
from modules import prompt_parser, sd_samplers_common
from modules.script_callbacks import AfterCFGCallbackParams, cfg_after_cfg_callback
from modules.script_callbacks import CFGDenoisedParams, cfg_denoised_callback
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.shared import opts, state


def catenate_conds(conds):
    """Mirrors ``sd_samplers_cfg_denoiser.catenate_conds``: concatenate tensors, or dicts key by key."""
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0].keys()}


def subscript_cond(cond, a, b):
    """Mirrors ``sd_samplers_cfg_denoiser.subscript_cond``: rows ``a:b`` of a tensor or of every dict entry."""
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def pad_cond(tensor, repeats, empty):
    """Mirrors ``sd_samplers_cfg_denoiser.pad_cond``: append ``repeats`` copies of the empty-prompt chunk
    along the token axis (the ``crossattn`` entry of a dict, modified in place)."""
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


def _repeat_rows(t, repeats):
    """Row i of ``t`` repeated ``repeats[i]`` times, image by image (the host's stack-in-a-loop)."""
    return [torch.stack([t[i] for _ in range(n)]) for i, n in enumerate(repeats)]


class CFGDenoiser(torch.nn.Module):
    """Mirrors ``sd_samplers_cfg_denoiser.CFGDenoiser``: runs the UNet on cond and uncond rows and mixes
    them with the CFG scale. Subclasses supply ``inner_model``."""

    def __init__(self, sampler):
        """Mirrors ``CFGDenoiser.__init__`` (modules/sd_samplers_cfg_denoiser.py)."""
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        """number of steps as specified by user in UI"""
        self.total_steps = None
        """expected number of denoiser calls (``steps``, doubled for second-order samplers)"""
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None

        self.cond_scale_miltiplier = 1.0  # (sic) host spelling; 1/12.5 for DDIM CFG++
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None

        # k-diffusion blends the init latent into the *result*; timesteps samplers blend the input
        self.mask_before_denoising = False

    @property
    def inner_model(self):
        """Mirrors ``CFGDenoiser.inner_model``: the wrapped model (k-diffusion or timesteps wrapper)."""
        raise NotImplementedError()

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        """Mirrors ``CFGDenoiser.combine_denoised``: ``uncond[i] + Σ w·scale·(x_out[row] - uncond[i])``.
        The uncond block is the *last* ``uncond.shape[0]`` rows of ``x_out``."""
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def combine_denoised_for_edit_model(self, x_out, cond_scale):
        """Mirrors ``CFGDenoiser.combine_denoised_for_edit_model`` (InstructPix2Pix: cond, image-cond, uncond)."""
        out_cond, out_img_cond, out_uncond = x_out.chunk(3)
        return out_uncond + cond_scale * (out_cond - out_img_cond) + self.image_cfg_scale * (out_img_cond - out_uncond)

    def get_pred_x0(self, x_in, x_out, sigma):
        """Mirrors ``CFGDenoiser.get_pred_x0``: k-diffusion outputs already are x0."""
        return x_out

    def update_inner_model(self):
        """Mirrors ``CFGDenoiser.update_inner_model``: drop the wrapper (rebuilt lazily for the new
        ``shared.sd_model``) and refresh the sampler's conds from ``p.get_conds()``."""
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def pad_cond_uncond(self, cond, uncond):
        """Mirrors ``CFGDenoiser.pad_cond_uncond``: pad the shorter side with empty-prompt chunks."""
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        """Mirrors ``CFGDenoiser.pad_cond_uncond_v0`` (pre-1.6 DDIM padding): make uncond as long as cond by
        repeating its last token, or truncate it."""
        is_dict_cond = isinstance(uncond, dict)
        uncond_vec = uncond["crossattn"] if is_dict_cond else uncond

        if uncond_vec.shape[1] < cond.shape[1]:
            last_vector = uncond_vec[:, -1:]
            uncond_vec = torch.hstack([uncond_vec, last_vector.repeat([1, cond.shape[1] - uncond_vec.shape[1], 1])])
            self.padded_cond_uncond_v0 = True
        elif uncond_vec.shape[1] > cond.shape[1]:
            uncond_vec = uncond_vec[:, :cond.shape[1]]
            self.padded_cond_uncond_v0 = True

        if is_dict_cond:
            uncond["crossattn"] = uncond_vec
        else:
            uncond = uncond_vec
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        """Mirrors ``CFGDenoiser.forward`` (1.10). Returns the guided prediction for the B images of ``x``."""
        # 1. interrupt / skip, refiner switch (re-read conds if the model changed)
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]

        # 2. InstructPix2Pix only counts as an edit model when the image CFG scale does something
        is_edit_model = shared.sd_model.cond_stage_key == "edit" and self.image_cfg_scale is not None and self.image_cfg_scale != 1.0

        # 3. conds for this step
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)

        assert not is_edit_model or all(len(conds) == 1 for conds in conds_list), "AND is not supported for InstructPix2Pix checkpoint (unless using Image CFG scale = 1.0)"

        def apply_blend(current_latent):
            """Inpainting: keep the unmasked area from ``init_latent``; scripts may override (on_mask_blend)."""
            blended_latent = current_latent * self.nmask + self.init_latent * self.mask
            scripts_runner = getattr(self.p, "scripts", None)
            if scripts_runner is not None:
                from modules import scripts

                mba = scripts.MaskBlendArgs(current_latent, self.nmask, self.init_latent, self.mask, blended_latent, denoiser=self, sigma=sigma)
                scripts_runner.on_mask_blend(self.p, mba)
                blended_latent = mba.blended_latent
            return blended_latent

        # 4. timesteps samplers blend the input
        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)

        # 5./6. layout and how conditioning reaches the model
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]

        if shared.sd_model.model.conditioning_key == "crossattn-adm":
            image_uncond = torch.zeros_like(image_cond)

            def make_condition_dict(c_crossattn, c_adm):
                """Mirrors the ``make_condition_dict`` lambda inside ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py)."""
                return {"c_crossattn": [c_crossattn], "c_adm": c_adm}
        else:
            image_uncond = image_cond
            if isinstance(uncond, dict):
                def make_condition_dict(c_crossattn, c_concat):
                    """Mirrors the ``make_condition_dict`` lambda inside ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py)."""
                    return {**c_crossattn, "c_concat": [c_concat]}
            else:
                def make_condition_dict(c_crossattn, c_concat):
                    """Mirrors the ``make_condition_dict`` lambda inside ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py)."""
                    return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        # 7. rows: cond rows (image i once per sub-prompt), then one uncond row per image
        #    (edit models: a third block with a zero image cond)
        x_in = torch.cat(_repeat_rows(x, repeats) + [x] + ([x] if is_edit_model else []))
        sigma_in = torch.cat(_repeat_rows(sigma, repeats) + [sigma] + ([sigma] if is_edit_model else []))
        image_cond_in = torch.cat(_repeat_rows(image_cond, repeats) + [image_uncond] + ([torch.zeros_like(self.init_latent)] if is_edit_model else []))

        # 8. callback; the host reads these five fields back
        denoiser_params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(denoiser_params)
        x_in = denoiser_params.x
        image_cond_in = denoiser_params.image_cond
        sigma_in = denoiser_params.sigma
        tensor = denoiser_params.text_cond
        uncond = denoiser_params.text_uncond

        # 9. skip the uncond rows: early-CFG skip by progress, else NGMS (every other step unless "all")
        skip_uncond = False
        if shared.opts.skip_early_cond != 0. and self.step / self.total_steps <= shared.opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = shared.opts.skip_early_cond
        elif (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond and not is_edit_model:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if shared.opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = shared.opts.s_min_uncond_all

        if skip_uncond:  # drops the last B rows of x/sigma; image_cond_in is left whole
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        # 10. padding settings (after the callback)
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if shared.opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif shared.opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        # 11. UNet calls
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            if is_edit_model:
                cond_in = catenate_conds([tensor, uncond, uncond])
            elif skip_uncond:
                cond_in = tensor
            else:
                cond_in = catenate_conds([tensor, uncond])

            if shared.opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]))
        else:
            # token lengths differ: cond rows in chunks (2B rows with batch_cond_uncond, else B), then uncond
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if shared.opts.batch_cond_uncond else batch_size
            n_cond_rows = tensor.shape[0]
            for a in range(0, n_cond_rows, chunk):
                b = min(a + chunk, n_cond_rows)
                if not is_edit_model:
                    c_crossattn = subscript_cond(tensor, a, b)
                else:
                    c_crossattn = torch.cat([tensor[a:b]], uncond)  # same (broken) call as the host
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(c_crossattn, image_cond_in[a:b]))

            if not skip_uncond:
                n_uncond = uncond.shape[0]
                x_out[-n_uncond:] = self.inner_model(x_in[-n_uncond:], sigma_in[-n_uncond:], cond=make_condition_dict(uncond, image_cond_in[-n_uncond:]))

        # 12. skipped uncond: the first cond row of each image stands in for it
        denoised_image_indexes = [conds[0][0] for conds in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        # 13. callback on the raw UNet output (only in-place edits count)
        denoised_params = CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model)
        cfg_denoised_callback(denoised_params)

        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0]:])

        # 14. combine
        if is_edit_model:
            denoised = self.combine_denoised_for_edit_model(x_out, cond_scale * self.cond_scale_miltiplier)
        elif skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale * self.cond_scale_miltiplier)

        # 15. k-diffusion samplers blend the result
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)

        # 16. preview latent
        first_rows_in = torch.cat([x_in[i:i + 1] for i in denoised_image_indexes])
        self.sampler.last_latent = self.get_pred_x0(first_rows_in, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]), sigma)
        if opts.live_preview_content == "Prompt":
            preview = self.sampler.last_latent
        elif opts.live_preview_content == "Negative prompt":
            preview = self.get_pred_x0(x_in[-uncond.shape[0]:], x_out[-uncond.shape[0]:], sigma)
        else:
            preview = self.get_pred_x0(first_rows_in, torch.cat([denoised[i:i + 1] for i in denoised_image_indexes]), sigma)
        sd_samplers_common.store_latent(preview)

        # 17. callback on the combined result (read back)
        after_cfg_callback_params = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after_cfg_callback_params)
        denoised = after_cfg_callback_params.x

        # 18.
        self.step += 1
        return denoised
