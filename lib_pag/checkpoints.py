"""What PAG can know about the model a job will use before that model is loaded.

Forge 2 loads the selected checkpoint only when a job starts (``modules/sd_models.py: forge_model_reload``),
and A1111 loads it in the background at start-up: until then the accordion's status line and layer map
must not describe some other model. A ``.safetensors`` file starts with a JSON header that lists every
tensor's name, dtype and shape without any weight, so the UNet's layer catalog can be built from the names
``model.diffusion_model.{input_blocks.N | middle_block | output_blocks.N}.K.transformer_blocks.J.attn1.*``
(the original ldm/sgm layout A1111, Forge and reForge checkpoints use; a UNet-only file may leave the
``model.diffusion_model.`` prefix out) — the same catalog ``layers.build_catalog`` gives for the loaded UNet.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

from .layers import HOST_BLOCK, PREFIX, AttnLayer, LayerCatalog, build_catalog, guess_arch

MAX_HEADER = 64 * 2**20  # bytes; an SDXL checkpoint's header is about 0.2 MiB
_ATTN1 = re.compile(r"^(?:model\.diffusion_model\.)?(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))"
                    r"\.(\d+)\.transformer_blocks\.(\d+)\.attn1\.")
_PARTS = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}


@dataclass(frozen=True)
class ModelView:
    """The model the next job will use, as far as it is known without loading it.

    ``catalog``: its layer catalog, or None when it cannot be known before the job starts (``reason``: a
    sentence for the status line saying why and what happens then); ``source``: ``"loaded"`` (the model in memory), ``"file"`` (read from the checkpoint file's
    header) or ``"unknown"``; ``name``: the checkpoint's file name, for messages.
    """

    catalog: LayerCatalog | None
    source: str
    name: str = ""
    reason: str = ""


def safetensors_tensors(path: str) -> dict:
    """``{tensor name: shape}`` from a ``.safetensors`` file's header (8 bytes little-endian header length,
    then JSON), reading nothing else. Raises ``ValueError`` for a file that is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{os.path.basename(path)}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER:
            raise ValueError(f"{os.path.basename(path)}: a header of {length} bytes is not a safetensors header")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{os.path.basename(path)}: the header is not a JSON object")
    return {name: tuple(entry.get("shape", ())) for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)}


def catalog_from_tensors(shapes: dict) -> LayerCatalog | None:
    """The catalog of the UNet whose tensors are ``shapes`` (``{name: shape}``); None without ldm/sgm attn1 keys
    (no UNet of the latent-diffusion family: Flux, SD3, a diffusers-layout file)."""
    found: dict[tuple, set] = {}  # (part, host index, child index) -> transformer indices
    for name in shapes:
        m = _ATTN1.match(name)
        if not m:
            continue
        root = m.group(1).split(".", 1)[0]
        host = int(m.group(2) or m.group(3) or 0)
        found.setdefault((_PARTS[root], host, int(m.group(4))), set()).add(int(m.group(5)))
    if not found:
        return None
    layers = []
    for part in ("down", "mid", "up"):
        hosts = sorted({(host, child) for (p, host, child) in found if p == part})
        for block, (host, child) in enumerate(hosts):
            prefix = "middle_block" if part == "mid" else f"{'input' if part == 'down' else 'output'}_blocks.{host}"
            for j in sorted(found[(part, host, child)]):
                layers.append(AttnLayer(name=f"{PREFIX[part]}{block}.{j}", part=part, block=block, transformer=j,
                                        host_block=(HOST_BLOCK[part], host),
                                        path=f"{prefix}.{child}.transformer_blocks.{j}.attn1"))
    first = layers[0].path.rsplit(".transformer_blocks", 1)[0]

    def first_uses_linear():
        shape = shapes.get(f"model.diffusion_model.{first}.proj_in.weight", shapes.get(f"{first}.proj_in.weight"))
        return shape is not None and len(shape) == 2

    return LayerCatalog(tuple(layers), guess_arch(layers, first_uses_linear))


_FILE_VIEWS: dict = {}  # (path, size, mtime) -> ModelView


def view_of_file(path: str) -> ModelView:
    """The ``ModelView`` of a checkpoint file that is not loaded: its catalog read from the header of a
    ``.safetensors`` file (cached per path, size and time); ``"unknown"`` for other formats or a broken file."""
    name = os.path.basename(path)
    if not name.lower().endswith(".safetensors"):
        return ModelView(None, "unknown", name, f"{name} is not loaded yet (only a .safetensors file lists its layers "
                                                "without loading it): the layers are checked when the job starts.")
    try:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _FILE_VIEWS:
            catalog = catalog_from_tensors(safetensors_tensors(path))
            _FILE_VIEWS.clear()  # one selected checkpoint at a time is enough
            _FILE_VIEWS[key] = ModelView(catalog, "file", name, "" if catalog is not None else
                                         f"{name} has no UNet of the latent-diffusion family (e.g. Flux, SD3): "
                                         "PAG will be refused for it.")
        return _FILE_VIEWS[key]
    except (OSError, ValueError) as err:
        return ModelView(None, "unknown", name, f"{name} is not loaded yet and its header cannot be read ({err}): "
                                                "the layers are checked when the job starts.")


def view_of_unet(unet, name: str = "") -> ModelView:
    """The ``ModelView`` of a loaded UNet module."""
    if not hasattr(unet, "input_blocks"):
        return ModelView(None, "loaded", name, "The loaded model has no UNet of the latent-diffusion family (e.g. "
                                               "Flux, SD3): PAG will be refused for it.")
    return ModelView(build_catalog(unet), "loaded", name)


def next_job_model(loaded_unet, loaded_file: str | None, selected_file: str | None) -> ModelView:
    """What the next job runs on: the loaded UNet when it is the selected checkpoint's (or nothing is
    selected), else the selected checkpoint read from its file; ``"unknown"`` when neither is there."""
    def same(a, b):
        return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))

    if loaded_unet is not None and (selected_file is None or (loaded_file and same(loaded_file, selected_file))):
        return view_of_unet(loaded_unet, os.path.basename(loaded_file or ""))
    if selected_file:
        return view_of_file(selected_file)
    return ModelView(None, "unknown", "", "No model is loaded yet and no checkpoint is selected: the layers are "
                                          "checked when the job starts.")


__all__ = ["ModelView", "catalog_from_tensors", "next_job_model", "safetensors_tensors", "view_of_file", "view_of_unet"]
