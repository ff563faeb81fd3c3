"""Host variations: A1111 1.7 callbacks without a denoiser, refiner switch mid-sampling, nested jobs."""

import logging

import pytest
import torch

from a1111_harness import Recorder, expected_output, load_webui, reference_model, relative_error, txt2img, img2img, unload_webui
from lib_pag import a1111
from modules import processing, scripts, sd_samplers_cfg_denoiser, shared
from modules import sd_models_double
from modules.script_callbacks import CFGDenoiserParams
from tests.exactness import assert_exact, assert_visible, to_float64


def latents(processed):
    return torch.stack([torch.as_tensor(i) for i in processed.images])


@pytest.fixture()
def sd15():
    model = sd_models_double.make_sd15_model(seed=12)
    load_webui(model)
    yield model
    unload_webui()


def test_a1111_17_callback_params_without_denoiser(sd15, monkeypatch):
    """1.7's CFGDenoiserParams has no ``denoiser``: the job's sampler is found through ``p.sampler``."""
    _, with_denoiser = None, processing.process_images(txt2img([{"enabled": True}], steps=3))

    def params_17(x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        params = CFGDenoiserParams(x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond)
        del params.denoiser
        return params

    monkeypatch.setattr(sd_samplers_cfg_denoiser, "CFGDenoiserParams", params_17)
    without = processing.process_images(txt2img([{"enabled": True}], steps=3))
    plain = processing.process_images(txt2img([False], steps=3))
    assert torch.equal(latents(with_denoiser), latents(without))
    assert not torch.equal(latents(without), latents(plain))


def test_refiner_switch_mid_sampling_follows_the_new_model(monkeypatch, float64):
    sd15 = to_float64(sd_models_double.make_sd15_model(seed=12))
    refiner = to_float64(sd_models_double.make_sd15_model(seed=13, title="tiny-refiner"))
    info = sd_models_double.CheckpointInfo("tiny-refiner", refiner)
    rec = Recorder(monkeypatch)
    load_webui(sd15)
    try:
        p = txt2img([{"enabled": True, "layers": "mid,up"}], steps=4)
        p.refiner_checkpoint_info, p.refiner_switch_at = info, 0.5
        processing.process_images(p)
        assert shared.sd_model is refiner
    finally:
        shared.sd_model = sd15
        unload_webui()
    models = [sd15, sd15, refiner, refiner]
    assert len(rec.calls) == 4
    strongest = 0.0
    for call, model in zip(rec.calls, models):
        ref = reference_model(model, "mid,up")
        assert_exact(call.out, expected_output(call, model, ref, 3.0), what=f"step {call.step}")
        strongest = max(strongest, relative_error(call, expected_output(call, model, ref, 0.0)))
    assert_visible(strongest, what="PAG term")
    assert not any("forward" in m.__dict__ for m in refiner.modules())
    assert not any("forward" in m.__dict__ for m in sd15.modules())


def test_refiner_without_the_layers_stops_pag_with_a_message(monkeypatch, caplog):
    from unets import sdxl_unet

    def sdxl_model(kind, seed):
        unet = sdxl_unet(kind, seed=seed)
        return sd_models_double.make_sdxl_model(unet, context_dim=32, adm_in_channels=unet.label_emb[0][0].in_features,
                                                is_ssd=kind == "ssd", seed=seed, title=f"tiny-{kind}")

    base, ssd = sdxl_model("base", 14), sdxl_model("ssd", 14)  # the "refiner" has no middle-block attention
    info = sd_models_double.CheckpointInfo("tiny-ssd", ssd)
    sizes = []
    for model in (base, ssd):
        model.model.diffusion_model.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    load_webui(base)
    try:
        with caplog.at_level(logging.WARNING, logger="sd_webui_pag"):
            p = txt2img([{"enabled": True, "layers": "mid"}], steps=4)
            p.refiner_checkpoint_info, p.refiner_switch_at = info, 0.5
            processed = processing.process_images(p)
    finally:
        unload_webui()
    assert "'mid' does not exist in this SSD-1B UNet" in caplog.text and "model changed during the job" in caplog.text
    # PAG ran on the first two model calls: the infotext keeps its settings and says where it stopped
    assert any(c.startswith("PAG stopped after 2 model calls: PAG layers: 'mid' does not exist") for c in p.comments)
    assert p.extra_generation_params["PAG layers"] == "mid"
    assert p.extra_generation_params["PAG note"].startswith("stopped after 2 model calls: PAG layers: 'mid'")
    assert sizes == [3, 3, 2, 2]  # twins before the switch, none after
    assert len(processed.images) == 1


class NestedDetailer(scripts.Script):
    """An ADetailer-style always-on script: runs an img2img job from postprocess_image."""

    inner_settings = [{"enabled": True, "scale": 6.0, "layers": "u0"}]
    ran = []

    def title(self):
        return "Nested Detailer"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def postprocess_image(self, p, pp, *args):
        if getattr(p, "_nested", False):
            return
        inner = img2img(self.inner_settings, torch.as_tensor(pp.image).clone(), steps=2, denoising_strength=0.5)
        inner._nested = True
        NestedDetailer.ran.append(processing.process_images(inner).infotexts[0])


def test_nested_job_uses_its_own_settings_and_outer_batches_keep_theirs(monkeypatch):
    model = sd_models_double.make_sd15_model(seed=15)
    load_webui(model)
    try:
        baseline = latents(processing.process_images(txt2img([{"enabled": True, "scale": 2.0}], n_iter=2, steps=3)))
    finally:
        unload_webui()
    scripts.test_only_register_script_class(NestedDetailer)
    load_webui_keep = scripts.scripts_data[:]
    try:
        load_webui(model)
        scripts.scripts_data[:0] = [d for d in load_webui_keep if d.script_class is NestedDetailer]
        scripts.test_only_build_ui(is_img2img=False)
        scripts.test_only_build_ui(is_img2img=True)
        NestedDetailer.ran.clear()
        outer = processing.process_images(txt2img([{"enabled": True, "scale": 2.0}], n_iter=2, steps=3))
    finally:
        unload_webui()
    assert len(NestedDetailer.ran) == 2
    assert all("PAG scale: 6" in t and "PAG layers: u0" in t for t in NestedDetailer.ran)
    assert torch.equal(latents(outer), baseline)  # batch 2 of the outer job still had its own PAG
    assert "PAG scale: 2" in outer.infotexts[0]
    assert len(a1111.JOBS) == 0


def test_hires_pass_on_another_checkpoint(monkeypatch, float64):
    """A1111 reloads the hires checkpoint before it creates the hires sampler; PAG follows the new model."""
    from modules import sd_samplers

    first = to_float64(sd_models_double.make_sd15_model(seed=16))
    second = to_float64(sd_models_double.make_sd15_model(seed=17, title="tiny-hires"))
    created = []
    real_create = sd_samplers.create_sampler

    def create_sampler(name, model):
        created.append(name)
        if len(created) == 2:  # the hires pass: sd_models.reload_model_weights(info=hr_checkpoint_info)
            shared.sd_model = model = second
        return real_create(name, model)

    monkeypatch.setattr(sd_samplers, "create_sampler", create_sampler)
    rec = Recorder(monkeypatch)
    load_webui(first)
    try:
        p = txt2img([{"enabled": True, "hires": "own", "hires_scale": 1.5}], steps=2, enable_hr=True, hr_scale=2.0,
                    hr_second_pass_steps=2, denoising_strength=0.5)
        processing.process_images(p)
    finally:
        shared.sd_model = first
        unload_webui()
    assert len(rec.calls) == 4
    strongest = 0.0
    for call, model, scale in zip(rec.calls, [first, first, second, second], [3.0, 3.0, 1.5, 1.5]):
        ref = reference_model(model, "mid,up")
        assert_exact(call.out, expected_output(call, model, ref, scale), what=f"step {call.step}")
        strongest = max(strongest, relative_error(call, expected_output(call, model, ref, 0.0)))
    assert_visible(strongest, what="PAG term")
    for model in (first, second):
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_install_script_message():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pag_install", Path(__file__).resolve().parent.parent / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    assert "older than 1.7.0" in install.check("v1.6.0")
    assert install.check("v1.7.0") is None and install.check("v1.10.1-2-gabcdef") is None
    assert install.check("f2.0.1v1.10.1", forge_family=True) is None
    assert install.check(None) is None
