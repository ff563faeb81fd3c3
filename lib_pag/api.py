"""Reject bad PAG args in WebUI API requests with HTTP 422 before the host swallows the error.

A1111 passes ``alwayson_scripts`` args raw to the script hooks and logs (then ignores) whatever they
raise, so a bad value would quietly give an image without PAG. This wraps the txt2img/img2img
routes of the FastAPI app (an ASGI wrapper around each route's app: no middleware rebuild, works
on every Starlette the hosts ship) and answers ``422 {"detail": ..., "field": ..., ...}`` instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

from .errors import PagError, short_repr
from .layers import build_catalog, resolve_layers
from .job import resolve_guidances
from .params import BRANCH_FIELDS, MAX_BRANCHES, BranchParams, PagParams, field_names, label_of, params_from_positional

log = logging.getLogger("sd_webui_pag")
ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


class JsonObject(dict):
    """A JSON object as parsed for the check: ``repeated`` holds ``(key, first value, later value)`` for each key
    the request gave twice with different values (the host's parser silently keeps the last)."""

    repeated: list


def _json_object(pairs) -> JsonObject:
    obj = JsonObject()
    obj.repeated = []
    for key, value in pairs:
        if key in obj and obj[key] != value:
            obj.repeated.append((key, obj[key], value))
        obj[key] = value
    return obj


def _no_repeats(obj, where: str) -> None:
    for key, first, later in getattr(obj, "repeated", ()):
        raise PagError("PAG args", {key: [first, later]}, f"each key once in {where}",
                       f"gives {short_repr(key)} twice in one JSON object, with different values")


def pag_args_of(body: dict, title: str):
    """The ``args`` a request gives this script (matched by title, case-insensitive), or None.

    The host applies every matching title and the last one wins; two of them with different args, or a
    key repeated with different values in the JSON, are an error naming both.
    """
    scripts = body.get("alwayson_scripts") if isinstance(body, dict) else None
    if not isinstance(scripts, dict):
        return None
    found = None
    for name, entry in scripts.items():
        if not (isinstance(name, str) and name.lower() == title.lower()):
            continue
        if not isinstance(entry, dict):
            raise PagError("PAG args", entry, 'an object like {"args": [...]}', "has the wrong type")
        _no_repeats(entry, f"alwayson_scripts[{short_repr(name)}]")
        args = entry.get("args", [])
        if not isinstance(args, list):
            raise PagError("PAG args", args, "a list: positional values, or one object with named settings", "has the wrong type")
        for value in args:
            _no_repeats(value, "the PAG args")
        if found is not None and found[1] != args:
            raise PagError("PAG args", {found[0]: found[1], name: args}, "the script once in alwayson_scripts",
                           f"is given twice, as {short_repr(found[0])} and {short_repr(name)}, with different args")
        found = (name, args)
    _no_repeats_of_title(scripts, title)
    return None if found is None else found[1]


def _no_repeats_of_title(scripts, title) -> None:
    for key, first, later in getattr(scripts, "repeated", ()):
        if isinstance(key, str) and key.lower() == title.lower():
            raise PagError("PAG args", {key: [first, later]}, "the script once in alwayson_scripts",
                           f"is given twice as {short_repr(key)} in one JSON object, with different args")


def validate_request_args(args: list, unet=None) -> PagParams:
    """The params a request's args give; layers are checked against ``unet`` when one is loaded."""
    if args and isinstance(args[0], dict):
        if len(args) > 1:
            raise PagError("PAG args", args, "one object with named settings, or positional values", "mixes both forms")
        params = PagParams.from_dict(args[0])
    else:
        params = params_from_positional(args)
    if params.enabled and unet is not None:
        resolve_guidances(params, build_catalog(unet))
    return params


MAX_DETAIL = 1_500  # a last bound on the message; every value in it is already shortened


def error_body(err: PagError) -> dict:
    """The 422 body: ``error``, ``detail`` (the message), ``field``, ``value`` (shortened), ``allowed``."""
    detail = str(err)
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL - 20] + f"… ({len(detail)} characters)"
    return {"error": "PagError", "detail": detail, **err.as_dict()}


@dataclass(frozen=True)
class HostLookups:
    """What the check asks the host (all optional; each may raise, then the check goes without it).

    ``current_unet()``: the loaded UNet (layers are checked against it); ``job_catalog()``: when given, the
    ``LayerCatalog`` of the model the next job will use, or None while it is not known (used instead of
    ``current_unet``: Forge 2 loads the selected checkpoint only when a job starts); ``parse_infotext(text)``: the
    host's ``parse_generation_parameters``; ``is_loaded_checkpoint(name)``: whether an
    ``override_settings.sd_model_checkpoint`` leaves the loaded model in place (names it, or names nothing
    the host knows — A1111 then drops the override); ``authorized(headers)``:
    whether the host's API authentication accepts the request (lower-case header names → values) — a
    request it rejects is passed through unjudged, so the client gets the host's own 401 and nothing
    about PAG or the model.
    """

    current_unet: Callable = lambda: None
    parse_infotext: Callable | None = None
    is_loaded_checkpoint: Callable = lambda name: False
    authorized: Callable = lambda headers: True  # the host's own API auth (--api-auth) would let it in
    job_catalog: Callable | None = None


def install(app, title: str = "PAG", current_unet=lambda: None, *, host: HostLookups | None = None) -> int:
    """Wrap the generation routes of ``app``; returns how many were wrapped (idempotent)."""
    host = host or HostLookups(current_unet=current_unet)
    wrapped = 0
    for route in getattr(app, "routes", []):
        if getattr(route, "path", None) not in ROUTES or getattr(route, "__pag_wrapped__", False):
            continue
        route.app = _validating(route.app, title, host)
        route.__pag_wrapped__ = True
        wrapped += 1
    return wrapped


def _validating(inner, title, host):
    async def app(scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await inner(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not _ask(lambda: host.authorized(headers)):
            return await inner(scope, receive, send)  # the host answers (401); no PAG judgement
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await inner(scope, _replay([message], receive), send)
            chunks.append(message)
            more = message.get("more_body", False)
        error = _check(b"".join(m.get("body", b"") for m in chunks), title, host)
        if error is not None:
            payload = json.dumps(error_body(error)).encode()
            log.error("API request rejected: %s", error)
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await inner(scope, _replay(chunks, receive), send)

    return app


def _check(raw: bytes, title, host: HostLookups) -> PagError | None:
    try:
        body = json.loads(raw or b"{}", object_pairs_hook=_json_object)
    except ValueError:
        return None  # not ours to judge; FastAPI answers malformed JSON itself
    if not isinstance(body, dict):
        return None
    try:
        args = pag_args_of(body, title)
        from_infotext = infotext_values(body.get("infotext"), host.parse_infotext)
        if args is None and not from_infotext:
            return None
        params = request_params(args or [], from_infotext)
        if params.enabled and not switches_checkpoint(body, host.is_loaded_checkpoint):
            if host.job_catalog is not None:
                catalog = _ask(host.job_catalog)
            else:
                unet = _ask(host.current_unet)
                catalog = build_catalog(unet) if unet is not None else None
            if catalog is not None:
                resolve_guidances(params, catalog)
    except PagError as err:
        return err
    return None


def infotext_values(infotext, parse) -> dict:
    """The PAG settings an API request's ``infotext`` field gives, converted the way the host's
    ``Api.apply_infotext`` converts them for the script's controls (``type(control.value)(text)``: a
    checkbox gets ``bool(text)``, a number ``float(text)``). ``{}`` without PAG keys or a parser."""
    if not isinstance(infotext, str) or not infotext.strip() or parse is None:
        return {}
    try:
        parsed = parse(infotext)
    except Exception:  # the host's own parser failing is the host's to report
        return {}
    values = {}
    for position, (label, default) in enumerate(positional_labels()):
        text = parsed.get(label) if isinstance(parsed, dict) else None
        if text is None:
            continue
        if isinstance(default, bool):
            values[position] = bool(text)
        elif isinstance(default, float):
            try:
                values[position] = float(text)
            except (TypeError, ValueError):
                raise PagError(label, text, "a number (in the request's infotext)", "is not a number") from None
        else:
            values[position] = text
    return values


def guidance_spans() -> list:
    """``(enabled label, first position, end position)`` of each guidance's positional args: the main
    settings, then guidances 2 and 3 (the enabled value comes first in each)."""
    spans = [(label_of("enabled"), 0, len(field_names()))]
    for index in range(2, MAX_BRANCHES + 1):
        start = len(field_names()) + (index - 2) * len(BRANCH_FIELDS)
        spans.append((BranchParams(index).label("enabled"), start, start + len(BRANCH_FIELDS)))
    return spans


def positional_labels() -> list:
    """``(infotext label, default)`` of every positional arg: the main settings, then guidances 2 and 3."""
    defaults = PagParams()
    out = [(label_of(name), getattr(defaults, name)) for name in field_names()]
    for index in range(2, MAX_BRANCHES + 1):
        branch = BranchParams(index)
        out += [(branch.label(name), getattr(branch, name)) for name in BRANCH_FIELDS]
    return out


def request_params(args: list, from_infotext: dict) -> PagParams:
    """The settings the job will get: the host fills the script's args with the defaults, then the
    infotext values, then the ``alwayson_scripts`` args over the positions they give; the named form
    (one object) is read on its own."""
    if args and isinstance(args[0], dict):
        return validate_request_args(args)
    if not from_infotext:
        return validate_request_args(args)
    for label, start, end in guidance_spans():
        # the host fills only the controls whose label the infotext has (no paste callback on this path): a
        # guidance whose settings it gives without its enabled key would stay off, silently
        named = any(start < position < end for position in from_infotext)
        if named and start not in from_infotext and start >= len(args):
            raise PagError(label, None, f"'{label}: True' in the infotext (PAG writes it), or the enabled value "
                           "in the args", "is missing from the infotext that gives this guidance's settings (the "
                           "host would run without it)")
    defaults = [default for _, default in positional_labels()]
    last = max(max(from_infotext) + 1, len(field_names()), len(args))
    values = [from_infotext.get(k, defaults[k]) for k in range(last)]
    values[:len(args)] = args
    return params_from_positional(values)


def switches_checkpoint(body: dict, is_loaded=lambda name: False) -> bool:
    """A request that loads another checkpoint first: its layers can only be checked by the job itself."""
    overrides = body.get("override_settings")
    name = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
    if not name:
        return False
    return not bool(_ask(lambda: is_loaded(name)))


def _ask(question):
    try:
        return question()
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
