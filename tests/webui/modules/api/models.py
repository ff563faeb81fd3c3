"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/api/models.py`` (the parts used).

``ScriptArg``/``ScriptInfo`` (``/sdapi/v1/script-info``), ``ScriptsList``, the txt2img/img2img request
models generated from the processing classes' init fields (like ``PydanticModelGenerator``) plus the
API-only fields, and the responses. Images in responses are nested lists of latent values (no VAE).
"""

import dataclasses
from typing import Any, Optional

from pydantic import BaseModel, Field, create_model  # pydantic 1.10, as A1111 1.x pins (fastapi 0.94)


class ScriptArg(BaseModel):
    """Mirrors ``models.ScriptArg``."""

    class Config:
        arbitrary_types_allowed = True

    label: Optional[str] = Field(default=None, title="Label")
    value: Optional[Any] = Field(default=None, title="Value")
    minimum: Optional[Any] = Field(default=None, title="Minimum")
    maximum: Optional[Any] = Field(default=None, title="Maximum")
    step: Optional[Any] = Field(default=None, title="Step")
    choices: Optional[list] = Field(default=None, title="Choices")


class ScriptInfo(BaseModel):
    """Mirrors ``models.ScriptInfo``."""

    name: Optional[str] = Field(default=None, title="Name")
    is_alwayson: Optional[bool] = Field(default=None, title="IsAlwayson")
    is_img2img: Optional[bool] = Field(default=None, title="IsImg2img")
    args: list[ScriptArg] = Field(title="Arguments")


class ScriptsList(BaseModel):
    """Mirrors ``models.ScriptsList``."""

    txt2img: Optional[list] = Field(default=None)
    img2img: Optional[list] = Field(default=None)


_API_ONLY_FIELDS = [
    ("sampler_index", str, "Euler"),
    ("script_name", Optional[str], None),
    ("script_args", list, []),
    ("send_images", bool, True),
    ("save_images", bool, False),
    ("alwayson_scripts", dict, {}),
    ("force_task_id", Optional[str], None),
    ("infotext", Optional[str], None),
]


def _generate_request_model(model_name, processing_class, extra=()):
    """Mirrors ``models.PydanticModelGenerator``: one optional field per init field of the class."""
    fields = {}
    for f in dataclasses.fields(processing_class):
        if not f.init or f.name in ("sd_model", "sampler_index"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        fields[f.name] = (Optional[Any], default)
    for name, typ, default in list(_API_ONLY_FIELDS) + list(extra):
        fields[name] = (Optional[typ], default)
    class Config:
        arbitrary_types_allowed = True

    return create_model(model_name, __config__=Config, **fields)


def _build():
    """Double-only: builds the request models from the double's processing classes (upstream: ``PydanticModelGenerator``)."""
    from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
    txt = _generate_request_model("StableDiffusionProcessingTxt2Img", StableDiffusionProcessingTxt2Img)
    img = _generate_request_model("StableDiffusionProcessingImg2Img", StableDiffusionProcessingImg2Img,
                                  extra=[("include_init_images", bool, False)])
    return txt, img


StableDiffusionTxt2ImgProcessingAPI, StableDiffusionImg2ImgProcessingAPI = _build()
"""Request bodies of ``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``.

``init_images`` (img2img) is a list of latents as nested lists ``[C][h][w]``; ``mask`` a nested list
``[h][w]`` in latent resolution (1 = repaint), since this double has no VAE.
"""


class TextToImageResponse(BaseModel):
    """Mirrors ``models.TextToImageResponse`` (images: latents as nested lists instead of base64)."""

    images: Optional[list] = Field(default=None, title="Image")
    parameters: dict
    info: str


class ImageToImageResponse(BaseModel):
    """Mirrors ``models.ImageToImageResponse``."""

    images: Optional[list] = Field(default=None, title="Image")
    parameters: dict
    info: str
