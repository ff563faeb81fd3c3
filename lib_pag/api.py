"""Reject bad PAG args in WebUI API requests with HTTP 422 before the host swallows the error.

A1111 passes ``alwayson_scripts`` args raw to the script hooks and logs (then ignores) whatever they
raise, so a bad value would quietly give an image without PAG. This wraps the txt2img/img2img
routes of the FastAPI app (an ASGI wrapper around each route's app: no middleware rebuild, works
on every Starlette the hosts ship) and answers ``422 {"detail": ..., "field": ..., ...}`` instead.
"""

from __future__ import annotations

import json
import logging

from .errors import PagError
from .layers import build_catalog, resolve_layers
from .params import PagParams

log = logging.getLogger("sd_webui_pag")
ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def pag_args_of(body: dict, title: str):
    """The ``args`` a request gives this script (matched by title, case-insensitive), or None."""
    scripts = body.get("alwayson_scripts") if isinstance(body, dict) else None
    if not isinstance(scripts, dict):
        return None
    for name, entry in scripts.items():
        if isinstance(name, str) and name.lower() == title.lower():
            if not isinstance(entry, dict):
                raise PagError("PAG args", entry, 'an object like {"args": [...]}', "has the wrong type")
            args = entry.get("args", [])
            if not isinstance(args, list):
                raise PagError("PAG args", args, "a list: positional values, or one object with named settings", "has the wrong type")
            return args
    return None


def validate_request_args(args: list, unet=None) -> PagParams:
    """The params a request's args give; layers are checked against ``unet`` when one is loaded."""
    if args and isinstance(args[0], dict):
        if len(args) > 1:
            raise PagError("PAG args", args, "one object with named settings, or positional values", "mixes both forms")
        params = PagParams.from_dict(args[0])
    else:
        params = PagParams.from_values(*args)
    if params.enabled and unet is not None:
        resolve_layers(params.layers, build_catalog(unet))
    return params


def error_body(err: PagError) -> dict:
    return {"error": "PagError", "detail": str(err), **err.as_dict()}


def install(app, title: str = "PAG", current_unet=lambda: None) -> int:
    """Wrap the generation routes of ``app``; returns how many were wrapped (idempotent)."""
    wrapped = 0
    for route in getattr(app, "routes", []):
        if getattr(route, "path", None) not in ROUTES or getattr(route, "__pag_wrapped__", False):
            continue
        route.app = _validating(route.app, title, current_unet)
        route.__pag_wrapped__ = True
        wrapped += 1
    return wrapped


def _validating(inner, title, current_unet):
    async def app(scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await inner(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await inner(scope, _replay([message], receive), send)
            chunks.append(message)
            more = message.get("more_body", False)
        error = _check(b"".join(m.get("body", b"") for m in chunks), title, current_unet)
        if error is not None:
            payload = json.dumps(error_body(error)).encode()
            log.error("API request rejected: %s", error)
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await inner(scope, _replay(chunks, receive), send)

    return app


def _check(raw: bytes, title, current_unet) -> PagError | None:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return None  # not ours to judge; FastAPI answers malformed JSON itself
    try:
        args = pag_args_of(body, title)
        if args is not None:
            validate_request_args(args, None if switches_checkpoint(body) else _loaded(current_unet))
    except PagError as err:
        return err
    return None


def switches_checkpoint(body: dict) -> bool:
    """A request that loads another checkpoint first: its layers can only be checked by the job itself."""
    overrides = body.get("override_settings")
    return isinstance(overrides, dict) and bool(overrides.get("sd_model_checkpoint"))


def _loaded(current_unet):
    try:
        return current_unet()
    except Exception:
        return None


def _replay(messages, original):
    """Hand the buffered body to the route, then fall back to the real channel (disconnects)."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await original()

    return receive
