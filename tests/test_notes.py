"""One rule (issue 18): a job that runs without the guidance the user asked for — on some model calls or all —
says so in its infotext (``PAG note``), never only in the log. Each case here ran silently (a log line at
most) before.
"""

from __future__ import annotations

import logging

import pytest
import torch

from a1111_harness import load_webui, txt2img, unload_webui
from lib_pag import Perturbation
from lib_pag.job import write_note
from modules import processing, script_callbacks, sd_models_double


@pytest.fixture(scope="module")
def sd15():
    return sd_models_double.make_sd15_model(seed=7)


@pytest.fixture()
def webui(sd15):
    load_webui(sd15)
    yield sd15
    unload_webui()


def run(values, **kw):
    p = txt2img(values, steps=4, **kw)
    return p, processing.process_images(p)


def test_a_cfg_batch_rebuilt_by_another_extension_is_a_counted_note(webui, caplog):
    """Another extension's cfg_denoiser callback (after PAG's) replaces the batch PAG built: PAG cannot find its
    rows, the call runs without its term — said in the note with the count, the settings kept."""
    def rebuild(params):
        if params.x.shape[0] == 3:  # the call where PAG added its twins
            params.x = params.x.clone()

    script_callbacks.on_cfg_denoiser(rebuild, name="rebuilder")
    with caplog.at_level(logging.WARNING, logger="sd_webui_pag"):
        p, processed = run([{"enabled": True, "end": 0.5}])
    note = p.extra_generation_params["PAG note"]
    assert note == "2 model calls without PAG: another extension rebuilt the CFG batch after PAG added its rows"
    assert p.extra_generation_params["PAG scale"] == "3"  # what was asked, kept
    assert caplog.text.count("a model call ran without PAG") == 1  # the log once, the note counts
    assert "PAG note" in processed.infotexts[0]


def test_separate_mode_cond_rows_that_never_reach_the_unet_are_a_note(webui):
    def clone_rows(params):
        params.x = params.x.clone()  # the UNet gets rows PAG cannot place

    script_callbacks.on_cfg_denoiser(clone_rows, name="cloner")
    p, _ = run([{"enabled": True, "mode": "separate"}])
    assert p.extra_generation_params["PAG note"].startswith("4 model calls without PAG: the cond rows did not all reach")


def test_notes_of_one_job_add_up():
    class P:
        extra_generation_params = {"PAG scale": "3"}

    p = P()
    write_note(p, "a", keep_settings=True)
    write_note(p, "b", keep_settings=True)
    write_note(p, "c1", keep_settings=True, key="c")
    write_note(p, "c2", keep_settings=True, key="c")
    assert p.extra_generation_params == {"PAG scale": "3", "PAG note": "a; b; c2"}
    write_note(p, "not applied: x")  # a refusal replaces what was there, settings included
    assert p.extra_generation_params == {"PAG note": "not applied: x"}


def test_blur_without_a_known_grid_is_a_note(webui, monkeypatch):
    """An attention call whose token grid PAG cannot see (an extension split its tokens) blurs along the token
    order: the image says so."""
    from lib_pag.patch import TokenGrids

    p_plain, _ = run([{"enabled": True, "method": "blur", "layers": "mid"}])
    assert "PAG note" not in p_plain.extra_generation_params
    monkeypatch.setattr(TokenGrids, "grid_for", lambda self, tokens: None)
    p, _ = run([{"enabled": True, "method": "blur", "layers": "mid"}])
    assert "blur along the flattened token order" in p.extra_generation_params["PAG note"]
    assert p.extra_generation_params["PAG method"] == "blur"


def test_perturbation_collects_its_notes_once():
    perturbation = Perturbation("blur", blur_sigma=2.0)
    attn = torch.nn.Module()
    lin = torch.nn.Linear(8, 8)
    attn.to_q = attn.to_k = attn.to_v = attn.to_out = lin
    attn.heads = 2
    x = torch.randn(1, 6, 8)
    perturbation(attn, x)
    perturbation(attn, x)
    assert len(perturbation.notes) == 1
