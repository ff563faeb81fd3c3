"""The layer catalog of a checkpoint that is not loaded, read from its safetensors header (lib_pag.checkpoints):
the same catalog ``build_catalog`` gives for the loaded UNet, for every family; and which model the
accordion describes (``next_job_model``)."""

import json
import struct

import pytest
from safetensors.torch import save_file

from lib_pag.checkpoints import ModelView, catalog_from_tensors, next_job_model, safetensors_tensors, view_of_file
from lib_pag.layers import build_catalog, resolve_layers
from lib_pag.ui import layer_map_html, validation_message
from unets import sd15_unet, sd2_unet, sdxl_unet

UNETS = {
    "SD1.x": lambda: sd15_unet(seed=1),
    "SD2.x": lambda: sd2_unet(seed=1),
    "SDXL": lambda: sdxl_unet("base", seed=1),
    "SDXL refiner": lambda: sdxl_unet("refiner", seed=1),
    "SSD-1B": lambda: sdxl_unet("ssd", seed=1),
}


def write_checkpoint(path, unet, prefix="model.diffusion_model."):
    tensors = {f"{prefix}{k}": v.contiguous() for k, v in unet.state_dict().items()}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = __import__("torch").zeros(1, 77)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("arch", list(UNETS))
def test_the_file_catalog_is_the_loaded_catalog(tmp_path, arch):
    unet = UNETS[arch]()
    loaded = build_catalog(unet)
    path = write_checkpoint(tmp_path / "model.safetensors", unet)
    from_file = catalog_from_tensors(safetensors_tensors(str(path)))
    assert from_file.arch == loaded.arch == arch
    assert [(l.name, l.part, l.block, l.transformer, l.host_block, l.path) for l in from_file.layers] == \
           [(l.name, l.part, l.block, l.transformer, l.host_block, l.path) for l in loaded.layers]
    assert from_file.summary() == loaded.summary()
    for spec in ("mid,up", "d1", "u0:0.5", "up"):
        try:
            want = resolve_layers(spec, loaded).names
        except Exception as err:  # noqa: BLE001 — the file must refuse what the model refuses, with the same text
            with pytest.raises(type(err), match=str(err).split(";")[0].replace("(", r"\(").replace(")", r"\)")):
                resolve_layers(spec, from_file)
        else:
            assert resolve_layers(spec, from_file).names == want


def test_a_unet_only_file_without_the_prefix(tmp_path):
    unet = UNETS["SDXL"]()
    path = write_checkpoint(tmp_path / "unet.safetensors", unet, prefix="")
    assert catalog_from_tensors(safetensors_tensors(str(path))).arch == "SDXL"


def test_files_that_say_nothing_about_layers(tmp_path):
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": __import__("torch").zeros(2, 2)}, str(flux))
    view = view_of_file(str(flux))
    assert view.catalog is None and "no UNet of the latent-diffusion family" in view.reason
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"PK\x03\x04")
    view = view_of_file(str(ckpt))
    assert view.source == "unknown" and "checked when the job starts" in view.reason
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "header cannot be read" in view_of_file(str(broken)).reason
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "tiny.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    assert safetensors_tensors(str(tmp_path / "tiny.safetensors")) == {"a": (1,)}


def test_which_model_the_accordion_describes(tmp_path):
    sd15 = UNETS["SD1.x"]()
    sdxl_file = write_checkpoint(tmp_path / "xl.safetensors", UNETS["SDXL"]())
    loaded_file = str(tmp_path / "sd15.safetensors")
    assert next_job_model(sd15, loaded_file, loaded_file).source == "loaded"
    assert next_job_model(sd15, loaded_file, None).source == "loaded"  # nothing selected: what is in memory
    view = next_job_model(sd15, loaded_file, str(sdxl_file))  # Forge 2 after a switch in the menu
    assert view.source == "file" and view.catalog.arch == "SDXL" and view.name == "xl.safetensors"
    assert next_job_model(None, None, str(sdxl_file)).catalog.arch == "SDXL"  # nothing loaded yet
    assert next_job_model(None, None, None).catalog is None


def test_status_and_map_never_call_an_unknown_model_valid(tmp_path):
    unknown = ModelView(None, "unknown", "", "No model is loaded yet: the layers are checked against it when the job starts.")
    for spec in ("u99", "mid,up"):
        status = validation_message(spec, unknown)
        assert "pag-pending" in status and "valid" not in status and "checked against it when the job starts" in status
        assert layer_map_html(spec, unknown) == ""
    assert "pag-error" in validation_message("zz", unknown)  # the syntax is known without a model
    view = view_of_file(str(write_checkpoint(tmp_path / "xl.safetensors", UNETS["SDXL"]())))
    assert "10 self-attention layers on the SDXL UNet of xl.safetensors (read from the file" in validation_message("m0", view)
    assert "does not exist in this SDXL UNet" in validation_message("u99", view)
    assert "SDXL: 10 of 70" in layer_map_html("m0", view)


def test_no_unet_unet_for_an_unrecognised_family():
    import torch

    unet = sd15_unet(seed=1)
    unet.input_blocks = torch.nn.ModuleList(list(unet.input_blocks)[:4])  # a layout no family has
    status = validation_message("mid", unet)
    assert "on this UNet:" in status and "UNet UNet" not in status
    assert "UNet UNet" not in validation_message("d9", unet)
