"""Test double of AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/api/api.py`` (+ app creation).

A real FastAPI app: ``Api(app, queue_lock)`` registers ``POST /sdapi/v1/txt2img``,
``POST /sdapi/v1/img2img``, ``GET /sdapi/v1/scripts`` and ``GET /sdapi/v1/script-info`` and installs the
host's ``api_middleware`` exception handling (any exception -> JSON ``{error, detail, body, errors}``
with the exception's ``status_code`` or 500). Script args are built like the host:
``init_default_script_args`` (every script's ``ui()`` called twice inside ``gr.Blocks()``, the
components' ``.value`` are the defaults), ``apply_infotext`` (request ``infotext`` -> script args via
``paste_fields``), ``init_script_args`` (``alwayson_scripts`` title lookup, case-insensitive,
positional args, 422 for unknown/selectable scripts), ``p.script_args = tuple(...)`` and
``process_images``. Responses carry latents as nested lists instead of base64 PNGs (no VAE).

``create_app()`` mirrors ``webui.py: api_only`` (``FastAPI()``, ``initialize_util.setup_middleware``,
``create_api``, ``script_callbacks.before_ui_callback()``, ``script_callbacks.app_started_callback(None, app)``).
"""

from contextlib import closing
from threading import Lock

import gradio as gr
import torch
from secrets import compare_digest

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse

from modules import errors, infotext_utils, scripts
from modules.api import models
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, process_images


def _shared():
    """Double-only helper (no upstream counterpart): late import of the sampling-path ``modules.shared``."""
    from modules import shared
    return shared


def script_name_to_index(name, scripts_list):
    """Mirrors ``api.script_name_to_index``: by ``title().lower()``; unknown -> HTTP 422."""
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def validate_sampler_name(name):
    """Mirrors ``api.validate_sampler_name``: 404 when ``sd_samplers.all_samplers_map`` lacks the name."""
    from modules import sd_samplers
    samplers_map = getattr(sd_samplers, "all_samplers_map", None)
    if samplers_map is not None and samplers_map.get(name, None) is None:
        raise HTTPException(status_code=404, detail="Sampler not found")
    return name


def decode_latent(data):
    """Double of ``api.decode_base64_to_image``: a nested list (latent ``[C, h, w]``) -> tensor."""
    return torch.tensor(data, dtype=torch.float32)


def encode_latent(image):
    """Double of ``api.encode_pil_to_base64``: a latent tensor -> nested list of floats."""
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu().tolist()
    return image


def api_middleware(app: FastAPI):
    """Mirrors ``api.api_middleware``: every exception becomes a JSON error response."""

    def handle_exception(request: Request, e: Exception):
        """Mirrors ``api_middleware.handle_exception``: JSON ``{error, detail, body, errors}`` with the status code."""
        err = {
            "error": type(e).__name__,
            "detail": vars(e).get('detail', ''),
            "body": vars(e).get('body', ''),
            "errors": str(e),
        }
        if not isinstance(e, HTTPException):
            errors.report(f"API error: {request.method}: {request.url} {err}", exc_info=True)
        return JSONResponse(status_code=vars(e).get('status_code', 500), content=jsonable_encoder(err))

    @app.middleware("http")
    async def exception_handling(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as e:
            return handle_exception(request, e)

    @app.exception_handler(Exception)
    async def fastapi_exception_handler(request: Request, e: Exception):
        return handle_exception(request, e)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, e: HTTPException):
        return handle_exception(request, e)


class Api:
    """Mirrors ``modules/api/api.py: Api`` (the script-related endpoints)."""

    def __init__(self, app: FastAPI, queue_lock: Lock):
        """Mirrors ``modules/api/api.py: Api.__init__``."""
        if _shared().cmd_opts.api_auth:
            self.credentials = {}
            for auth in _shared().cmd_opts.api_auth.split(","):
                user, password = auth.split(":")
                self.credentials[user] = password

        self.app = app
        self.queue_lock = queue_lock
        api_middleware(self.app)
        self.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"], response_model=models.TextToImageResponse)
        self.add_api_route("/sdapi/v1/img2img", self.img2imgapi, methods=["POST"], response_model=models.ImageToImageResponse)
        self.add_api_route("/sdapi/v1/scripts", self.get_scripts_list, methods=["GET"], response_model=models.ScriptsList)
        self.add_api_route("/sdapi/v1/script-info", self.get_script_info, methods=["GET"], response_model=list[models.ScriptInfo])

        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []

        # upstream: ui.create_ui() builds both tabs (initialize_scripts + setup_ui) when not done yet
        if not scripts.scripts_txt2img.scripts:
            scripts.test_only_build_ui(is_img2img=False)
        if not self.default_script_arg_txt2img:
            self.default_script_arg_txt2img = self.init_default_script_args(scripts.scripts_txt2img)

        if not scripts.scripts_img2img.scripts:
            scripts.test_only_build_ui(is_img2img=True)
        if not self.default_script_arg_img2img:
            self.default_script_arg_img2img = self.init_default_script_args(scripts.scripts_img2img)

    def add_api_route(self, path: str, endpoint, **kwargs):
        """Mirrors ``Api.add_api_route``: with ``--api-auth`` every route depends on ``auth``."""
        if _shared().cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        """Mirrors ``Api.auth``: HTTP basic credentials against ``--api-auth``, else 401."""
        if credentials.username in self.credentials:
            if compare_digest(credentials.password, self.credentials[credentials.username]):
                return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    def get_selectable_script(self, script_name, script_runner):
        """Mirrors ``Api.get_selectable_script``."""
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[script_idx], script_idx

    def get_scripts_list(self):
        """Mirrors ``Api.get_scripts_list``."""
        t2ilist = [s.name for s in scripts.scripts_txt2img.scripts if s.name is not None]
        i2ilist = [s.name for s in scripts.scripts_img2img.scripts if s.name is not None]
        return models.ScriptsList(txt2img=t2ilist, img2img=i2ilist)

    def get_script_info(self):
        """Mirrors ``Api.get_script_info``: ``api_info`` of every script of both tabs."""
        res = []
        for script_list in [scripts.scripts_txt2img.scripts, scripts.scripts_img2img.scripts]:
            res += [s.api_info for s in script_list if s.api_info is not None]
        return res

    def get_script(self, script_name, script_runner):
        """Mirrors ``Api.get_script``: lookup among all scripts by title (422 when unknown)."""
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.scripts)
        return script_runner.scripts[script_idx]

    def init_default_script_args(self, script_runner):
        """Mirrors ``Api.init_default_script_args``: ``[0, None...]`` then each script's ui() values.

        Like the host, ``script.ui()`` is called twice per script inside a fresh ``gr.Blocks()``.
        """
        last_arg_index = 1
        for script in script_runner.scripts:
            if last_arg_index < script.args_to:
                last_arg_index = script.args_to
        script_args = [None] * last_arg_index
        script_args[0] = 0

        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    ui_default_values = []
                    for elem in script.ui(script.is_img2img):
                        ui_default_values.append(elem.value)
                    script_args[script.args_from:script.args_to] = ui_default_values
        return script_args

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *, input_script_args=None):
        """Mirrors ``Api.init_script_args``: defaults, infotext args, selectable args, ``alwayson_scripts``."""
        script_args = default_script_args.copy()

        if input_script_args is not None:
            for index, value in input_script_args.items():
                script_args[index] = value

        if selectable_scripts:
            script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request.script_args
            script_args[0] = selectable_idx + 1

        if request.alwayson_scripts:
            for alwayson_script_name in request.alwayson_scripts.keys():
                alwayson_script = self.get_script(alwayson_script_name, script_runner)
                if alwayson_script is None:
                    raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
                if alwayson_script.alwayson is False:
                    raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
                if "args" in request.alwayson_scripts[alwayson_script_name]:
                    given = request.alwayson_scripts[alwayson_script_name]["args"]
                    for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(given))):
                        script_args[alwayson_script.args_from + idx] = given[idx]
        return script_args

    def apply_infotext(self, request, tabname, *, script_runner=None, mentioned_script_args=None):
        """Mirrors ``Api.apply_infotext``: infotext values for request fields and script args.

        Fields already set in the request win; script components found in ``script_runner.inputs``
        get ``mentioned_script_args[index] = value`` converted to ``type(component.value)``.
        """
        if not request.infotext:
            return {}

        possible_fields = infotext_utils.paste_fields.get(tabname, {}).get("fields") or []
        set_fields = request.dict(exclude_unset=True)
        params = infotext_utils.parse_generation_parameters(request.infotext)

        def get_field_value(field, params):
            """Mirrors the ``get_field_value`` closure of upstream ``Api.apply_infotext``."""
            value = field.function(params) if field.function else params.get(field.label)
            if value is None:
                return None
            if field.api in type(request).__fields__:
                current = getattr(request, field.api, None)
                target_type = type(current) if current is not None else type(field.component.value)
            else:
                target_type = type(field.component.value)
            if target_type == type(None):
                return None
            if isinstance(value, dict) and value.get('__type__') == 'generic_update':
                value = value.get('value')
            if value is not None and not isinstance(value, target_type):
                value = target_type(value)
            return value

        for field in possible_fields:
            if not field.api or field.api in set_fields:
                continue
            value = get_field_value(field, params)
            if value is not None:
                setattr(request, field.api, value)

        if request.override_settings is None:
            request.override_settings = {}
        for _, setting_name, value in infotext_utils.get_override_settings(params):
            request.override_settings.setdefault(setting_name, value)

        if script_runner is not None and mentioned_script_args is not None:
            indexes = {id(v): i for i, v in enumerate(script_runner.inputs)}
            for field in possible_fields:
                index = indexes.get(id(field.component))
                if index is None:
                    continue
                value = get_field_value(field, params)
                if value is None:
                    continue
                mentioned_script_args[index] = value

        return params

    def _run(self, request, tab, processing_class, script_runner, default_args, extra_pop=(), setup=None):
        """Shared body of upstream ``Api.text2imgapi``/``Api.img2imgapi``: args, ``init_script_args``, ``process_images``."""
        infotext_script_args = {}
        self.apply_infotext(request, tab, script_runner=script_runner, mentioned_script_args=infotext_script_args)

        selectable_scripts, selectable_script_idx = self.get_selectable_script(request.script_name, script_runner)
        sampler_name = validate_sampler_name(request.sampler_name or request.sampler_index)

        args = request.dict()
        args["sampler_name"] = sampler_name
        args["do_not_save_samples"] = not request.save_images
        args["do_not_save_grid"] = not request.save_images
        args.pop("sampler_index", None)
        for key in ('script_name', 'script_args', 'alwayson_scripts', 'infotext', 'send_images', 'save_images', *extra_pop):
            args.pop(key, None)

        script_args = self.init_script_args(request, default_args, selectable_scripts, selectable_script_idx, script_runner, input_script_args=infotext_script_args)
        send_images = request.send_images

        shared = _shared()
        with self.queue_lock:
            with closing(processing_class(sd_model=shared.sd_model, **args)) as p:
                if setup is not None:
                    setup(p)
                p.is_api = True
                p.scripts = script_runner
                try:
                    if hasattr(shared.state, "begin"):
                        shared.state.begin(job=f"scripts_{tab}")
                    if selectable_scripts is not None:
                        p.script_args = script_args
                        processed = script_runner.run(p, *p.script_args)
                    else:
                        p.script_args = tuple(script_args)
                        processed = process_images(p)
                finally:
                    if hasattr(shared.state, "end"):
                        shared.state.end()

        images = [encode_latent(x) for x in processed.images] if send_images else []
        return images, processed

    def text2imgapi(self, txt2imgreq: models.StableDiffusionTxt2ImgProcessingAPI):
        """Mirrors ``Api.text2imgapi``."""
        images, processed = self._run(txt2imgreq, "txt2img", StableDiffusionProcessingTxt2Img, scripts.scripts_txt2img, self.default_script_arg_txt2img)
        return models.TextToImageResponse(images=images, parameters=txt2imgreq.dict(), info=processed.js())

    def img2imgapi(self, img2imgreq: models.StableDiffusionImg2ImgProcessingAPI):
        """Mirrors ``Api.img2imgapi`` (``init_images``/``mask`` are nested-list latents)."""
        init_images = img2imgreq.init_images
        if init_images is None:
            raise HTTPException(status_code=404, detail="Init image not found")
        mask = decode_latent(img2imgreq.mask) if img2imgreq.mask else None
        request_mask = img2imgreq.mask
        img2imgreq.mask = None

        def setup(p):
            """Double-only: sets the decoded latents on ``p`` like upstream ``img2imgapi`` sets ``p.init_images``."""
            p.init_images = [decode_latent(x) for x in init_images]
            p.image_mask = mask

        try:
            images, processed = self._run(img2imgreq, "img2img", StableDiffusionProcessingImg2Img, scripts.scripts_img2img, self.default_script_arg_img2img, extra_pop=("include_init_images", "init_images"), setup=setup)
        finally:
            img2imgreq.mask = request_mask

        if not img2imgreq.include_init_images:
            img2imgreq.init_images = None
            img2imgreq.mask = None
        return models.ImageToImageResponse(images=images, parameters=img2imgreq.dict(), info=processed.js())


def setup_middleware(app):
    """Mirrors ``modules/initialize_util.py: setup_middleware`` (GZip; CORS options are not modelled).

    The host ends with ``app.build_middleware_stack()``, whose result it discards (old Starlette).
    Current Starlette refuses ``add_middleware`` once ``app.middleware_stack`` is set, so the double
    leaves the stack to be built on the first request; ``Api``'s middleware is added afterwards.
    """
    from starlette.middleware.gzip import GZipMiddleware
    app.middleware_stack = None
    app.add_middleware(GZipMiddleware, minimum_size=1000)


def create_api(app):
    """Mirrors ``webui.py: create_api``."""
    queue_lock = getattr(_shared(), "queue_lock", None) or Lock()
    return Api(app, queue_lock)


def create_app(demo=None):
    """Mirrors ``webui.py: api_only`` up to ``api.launch``: returns ``(app, api)``.

    ``script_callbacks.before_ui_callback()`` then ``script_callbacks.app_started_callback(demo, app)``
    run after the ``Api`` exists, so an extension can add routes/middleware to ``app`` there.
    """
    from modules import script_callbacks

    app = FastAPI()
    setup_middleware(app)
    api = create_api(app)
    before_ui = getattr(script_callbacks, "before_ui_callback", None)
    if before_ui is not None:
        before_ui()
    script_callbacks.app_started_callback(demo, app)
    return app, api
