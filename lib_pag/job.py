"""Host-neutral job pieces both adapters (A1111, Forge/reForge) use: reading a job's settings, the
infotext, and how a refusal reaches the user (log, the generation's comments, a ``PAG note``)."""

from __future__ import annotations

import dataclasses
import logging

from .errors import PagError
from .neighbors import neighbor_on
from .params import BRANCH_FIELDS, MAX_BRANCHES, PagParams, canonical_key, field_names, params_from_positional

log = logging.getLogger("sd_webui_pag")
INFOTEXT_PREFIX = "PAG "
NEVER_CALLED = ("the UNet ran without calling the chosen attn1 modules (a UNet engine such as TensorRT, or an "
                "extension that replaced them): there is no self-attention for PAG to perturb")
NEVER_CALLED_BLOCKS = ("the UNet ran without calling the chosen transformer blocks as modules (an extension or host that "
                       "replaced them): there are no hidden states for TPG to shuffle")
NOTE_KEY = "PAG note"  # infotext: why PAG did not run, or ran differently than asked (paste ignores it)
XYZ_ENABLED_BY = "_pag_xyz_enabled_by"  # p attribute: the X/Y/Z axis label that turned PAG on for a grid


def announce_refusal(p, reason: str, level: int = logging.WARNING, *, applied_calls: int = 0) -> None:
    """Why PAG does not run, in the log, in the generation's comments and in the infotext: a ``PAG note``
    replaces PAG's settings there, so the image does not claim a PAG it did not get — and an API client,
    which the host gives no error response for a script's refusal, can read why from the image's infotext.
    ``applied_calls``: model calls that already had PAG (a refusal mid-job): then the settings stay and the
    note says PAG stopped."""
    if applied_calls:
        log.log(level, "PAG stopped after %d model calls: %s", applied_calls, reason)
        comment(p, f"PAG stopped after {applied_calls} model calls: {reason}")
        write_note(p, f"stopped after {applied_calls} model calls: {reason}", keep_settings=True, key="refused")
        return
    log.log(level, "PAG refused: %s", reason)
    comment(p, f"PAG not applied: {reason}")
    write_note(p, f"not applied: {reason}")


NOTES_ATTR = "_pag_notes"  # on p: the notes of this job so far (key -> text), joined into the one PAG note


def write_note(p, text: str, *, keep_settings: bool = False, key: str | None = None) -> None:
    """Say in ``PAG note`` why PAG did not run (its settings dropped from the infotext) or ran differently
    than asked (``keep_settings``: the settings it really ran with stay). Notes of one job add up (``; ``);
    a note with the same ``key`` replaces the earlier one (a count that grows)."""
    extra = getattr(p, "extra_generation_params", None)
    if not isinstance(extra, dict):
        return
    notes = getattr(p, NOTES_ATTR, None)
    if not isinstance(notes, dict):
        notes = {}
        try:
            setattr(p, NOTES_ATTR, notes)
        except AttributeError:
            pass
    if not keep_settings:
        _drop_pag_keys(extra)
        notes.clear()
    notes[key or text] = text
    extra[NOTE_KEY] = "; ".join(notes.values())


def flush_notes(p, perturbation) -> None:
    """What a perturbation noted while it ran (``Perturbation.notes``) goes into the ``PAG note`` (settings kept)."""
    while perturbation.notes:
        write_note(p, perturbation.notes.pop(0), keep_settings=True)


def note_skipped(p, counts: dict, reason: str) -> None:
    """A model call ran without PAG's term although it was due: counted per reason in ``counts`` (the job's),
    said in the log (once per reason) and in the ``PAG note`` with the count, settings kept."""
    counts[reason] = counts.get(reason, 0) + 1
    if counts[reason] == 1:
        log.warning("PAG: a model call ran without PAG: %s", reason)
    n = counts[reason]
    write_note(p, f"{n} model call{'s' if n != 1 else ''} without PAG: {reason}", keep_settings=True, key=f"skip:{reason}")


def _drop_pag_keys(extra: dict) -> None:
    for key in [k for k in extra if isinstance(k, str) and k.startswith(INFOTEXT_PREFIX)]:
        del extra[key]


def comment(p, text: str) -> None:
    if p is not None and hasattr(p, "comment"):
        try:
            p.comment(text)
        except Exception:  # a comment must never break a generation
            pass


def perturbations_for(params: PagParams, seed: int = 0) -> dict:
    """``{guidance index: Perturbation}`` for every guidance the job runs (``PagParams.guidances``)."""
    from .perturbations import Perturbation

    return {g.index: Perturbation(g.method, g.blur_sigma, g.noise_scale, seed) for g in params.guidances()}


def resolve_guidances(params: PagParams, catalog) -> dict:
    """``{guidance index: LayerSelection}`` on a model's catalog; a name the model does not have is a
    ``PagError`` naming that guidance's field (``PAG layers``, ``PAG 2 layers``, …)."""
    from .layers import resolve_layers

    return {g.index: resolve_layers(g.layers, catalog, field=g.label("layers")) for g in params.guidances()}


def never_called(params: PagParams, labels, calls_by_label) -> str | None:
    """Why a UNet call that carried twins of guidances ``labels`` perturbed none of some guidance's rows, or
    None; ``calls_by_label``: perturbed module calls per guidance during that call."""
    for g in params.guidances():
        if g.index in labels and not calls_by_label.get(g.index):
            reason = NEVER_CALLED_BLOCKS if g.method == "tpg" else NEVER_CALLED
            return reason if g.index == 1 else f"guidance {g.index} ({g.method}): {reason}"
    return None


def more_guidances(params: PagParams) -> str:
    """``", + seg 2 on mid, + tpg 1 on d2.2-9,d3"``: the extra guidances of a job, for its log line."""
    return "".join(f", + {b.method} {b.scale:g} on {b.layers}" for b in params.guidances()[1:])


def image_keys(p, seeds=None, subseeds=None) -> tuple:
    """Per image of the batch in progress, the key its random perturbation draws start from: its seed — and,
    when variations are on (``subseed_strength`` > 0), its variation seed and that strength — as the host
    writes them into each image's infotext (``p.seeds`` / ``p.subseeds``, set per batch by
    ``processing.process_images_inner``; ``process_batch`` passes the same lists). So image *k* of a batch
    draws what the same request with its seed and batch size 1 draws. Empty when the host gives no seeds."""
    seeds = list(seeds if seeds is not None else getattr(p, "seeds", None) or [])
    subseeds = list(subseeds if subseeds is not None else getattr(p, "subseeds", None) or [])
    strength = float(getattr(p, "subseed_strength", 0) or 0)
    keys = []
    for k, seed in enumerate(seeds):
        try:
            key = (int(seed),)
            if strength > 0 and k < len(subseeds):
                key += (int(subseeds[k]), round(strength * 1_000_000))
        except (TypeError, ValueError):
            return ()
        keys.append(key)
    return tuple(keys)


def params_from_script_args(args, p=None, extra: dict | None = None, *, xyz: bool = True) -> PagParams:
    """Positional UI/API args or a single dict; then ``p.pag_<field>`` overrides (X/Y/Z, other scripts), then
    ``extra`` (field → value; the X/Y/Z check's cell values). ``xyz``: an X/Y/Z axis that turned PAG on for
    the grid (``XYZ_ENABLED_BY``) turns it on here, unless ``p.pag_enabled`` or ``extra`` say otherwise."""
    if len(args) >= 1 and isinstance(args[0], dict):
        params = PagParams.from_dict(args[0])
    else:
        params = params_from_positional(args)
    overrides = {}
    if xyz and p is not None and getattr(p, XYZ_ENABLED_BY, None):
        overrides["enabled"] = True
    for name in field_names():
        value = getattr(p, f"pag_{name}", None) if p is not None else None
        if value is not None:
            overrides[name] = value
    for index in range(2, MAX_BRANCHES + 1):  # guidances 2 and 3: p.pag2_<name>, p.pag3_<name>
        for name in BRANCH_FIELDS:
            value = getattr(p, f"pag{index}_{name}", None) if p is not None else None
            if value is not None:
                overrides[f"pag{index}_{name}"] = value
    overrides.update(extra or {})
    if overrides:
        params = params.with_overrides(**overrides)
    return params


def job_summary(params: PagParams, *, arch: str, n_layers: int, modes, calls_with_pag: int, calls: int,
                rows: int, fork: str, p=None) -> str:
    """The one console line a PAG job ends with (INFO): what PAG did.

    ``modes``: how the perturbed rows ran (``batched``, ``uncond slot``, ``separate``); ``calls`` /
    ``calls_with_pag``: the job's model calls (denoiser calls; hires passes included) and those with PAG;
    ``rows``: perturbed rows computed over the job; ``fork``: the shared-prefix fork point, or why none;
    ``p``: the job, whose ``PAG note`` (if any) ends the line."""
    modes = ", ".join(sorted(set(modes))) or params.mode
    window = f", window {params.start:g}-{params.end:g}" if (params.start, params.end) != (0.0, 1.0) else ""
    extra = getattr(p, "extra_generation_params", None)
    note = extra.get(NOTE_KEY) if isinstance(extra, dict) else None
    return (f"PAG done: scale {params.scale:g}, layers {params.layers} ({n_layers} attn1 on {arch}), {params.method}"
            f"{more_guidances(params)}, {modes}{window}; {calls_with_pag} of {calls} model calls with PAG, {rows} "
            f"perturbed rows; {fork}" + (f"; note: {note}" if note else ""))


def write_infotext(p, params: PagParams) -> None:
    """PAG's settings in the infotext (nothing when off), with the job's notes so far."""
    extra = p.extra_generation_params
    _drop_pag_keys(extra)
    extra.update(params.to_infotext())
    notes = getattr(p, NOTES_ATTR, None)
    if isinstance(notes, dict) and notes:
        extra[NOTE_KEY] = "; ".join(notes.values())


def asks_for_pag(args, p=None, *, xyz: bool = True) -> bool:
    """Whether a job's args (or ``p.pag_enabled``, or an X/Y/Z axis that turned PAG on) turn PAG on, read
    without judging the other settings: a job that does not ask for PAG is never stopped by a bad PAG value
    it would not use."""
    override = getattr(p, "pag_enabled", None) if p is not None else None
    if override is not None:
        return override is True or str(override).strip().lower() == "true"
    if xyz and p is not None and getattr(p, XYZ_ENABLED_BY, None):
        return True
    if not args:
        return False
    first = args[0]
    if isinstance(first, dict):
        for key, value in first.items():
            try:
                if canonical_key(key) == "enabled":
                    return value is not False and str(value).strip().lower() != "false"
            except PagError:
                continue
        return False
    return first is not False


def start_params(p, args) -> PagParams | None:
    """``process``: the job's settings, their infotext written; None when PAG is off for this job.

    A bad value while PAG is on stops the job (``refuse_job``: an error where the image would be, the same
    message as the API's 422) — never an image without the PAG the accordion shows. While PAG is off a bad
    value is only logged at DEBUG. An X/Y/Z axis that turned PAG on (``xyz``) is said in a ``PAG note``.
    """
    clear_refusal(p)
    try:
        params = params_from_script_args(args, p)
    except PagError as err:
        write_infotext(p, PagParams())
        if asks_for_pag(args, p):
            refuse_job(p, err)
        else:
            log.debug("PAG is off; a setting it would use is bad: %s", err)
        return None
    write_infotext(p, params)
    if not params.enabled:
        return None
    turned_on_by = getattr(p, XYZ_ENABLED_BY, None)
    if turned_on_by and not asks_for_pag(args, p, xyz=False):
        note = f"turned on by the X/Y/Z axis {turned_on_by} (the PAG accordion is off)"
        log.debug("PAG: %s", note)  # the job's console line ends with its PAG note
        write_note(p, note, keep_settings=True)
    return params


def read_params(p, args) -> tuple[PagParams | None, str | None]:
    """The job's settings with their infotext written; or None and the error, already reported (log, comment)."""
    try:
        params = params_from_script_args(args, p)
    except PagError as err:
        log.error("%s", err)
        comment(p, str(err))
        write_infotext(p, PagParams())
        return None, str(err)
    write_infotext(p, params)
    return params, None


# --- stopping a job --------------------------------------------------------------------------------

REFUSAL_MARK = "__pag_refusal__"


class _RefusedSample:
    """Stands in for ``p.sample`` of a refused job: raises the ``PagError`` instead of sampling."""

    def __init__(self, error: PagError):
        self.error = error
        setattr(self, REFUSAL_MARK, True)

    def __call__(self, *args, **kwargs):
        raise self.error


def refuse_job(p, err: PagError) -> None:
    """Stop the job with ``err`` before it samples anything (the model is not touched).

    The hosts run every script hook inside a ``try/except`` that only logs (A1111 1.7–1.10, Forge 2,
    reForge ``modules/scripts.py: ScriptRunner.process``), so an error raised from ``process`` would still
    give an image — without PAG. ``process_images_inner`` (``modules/processing.py``, every host) calls
    ``p.sample`` outside any such guard, after every script's ``process``: for this processing object only,
    ``p.sample`` raises ``err``. The host's own error path then runs: the UI's ``wrap_gradio_call``
    (``modules/call_queue.py``) shows ``PagError: <message>`` in place of the image, the API's error handler
    answers HTTP 422 with the message (``err.status_code``, ``detail``, ``body``), an X/Y/Z cell stays empty.
    Logged at ERROR.
    """
    log.error("PAG: job stopped: %s", err)
    p.sample = _RefusedSample(for_host(err))


def for_host(err: PagError) -> PagError:
    """``err`` with what the hosts' API error handler (``modules/api/api.py: handle_exception``, A1111 1.10 and
    Forge 2) answers an exception with: HTTP ``status_code`` 422 and ``{"error": "PagError", "detail": <message>,
    "body": {field, value, allowed}, "errors": <message>}``. The UI shows ``PagError: <message>`` either way."""
    err.status_code, err.detail, err.body = 422, str(err), err.as_dict()
    return err


def clear_refusal(p) -> None:
    """Undo ``refuse_job`` on a processing object the host runs again (the Loopback script does)."""
    own = getattr(p, "__dict__", {}).get("sample")
    if getattr(own, REFUSAL_MARK, False):
        del p.__dict__["sample"]


def refusal_of(p) -> PagError | None:
    """The error ``refuse_job`` stopped this job with, or None."""
    own = getattr(p, "__dict__", {}).get("sample")
    return own.error if getattr(own, REFUSAL_MARK, False) else None


def check_neighbors(p, params: PagParams, refuse) -> str | None:
    """Once per job, after every script's ``process`` ran: a known extension that cannot share a batch
    (``neighbors.KNOWN``) switches PAG to separate mode — returned as ``"separate"``, with a WARNING, the
    infotext saying the mode PAG ran in and a ``PAG note`` — or off, through ``refuse(reason)``; one that
    only makes the combination suspect (``warn``: Forge's own PAG) gets a WARNING and a ``PAG note`` while PAG
    runs as asked. None otherwise."""
    neighbor = neighbor_on(getattr(p, "extra_generation_params", None))
    if neighbor is None:
        return None
    if neighbor.action == "warn":
        note = f"{neighbor.name} is on too: {neighbor.why}"
        log.warning("PAG: %s", note)
        write_note(p, note, keep_settings=True)
        return None
    if neighbor.action == "refuse":
        refuse(f"{neighbor.name} is on: {neighbor.why}")
        return None
    if params.mode != "batched":
        return None
    note = f"separate mode: {neighbor.name} is on ({neighbor.why})"
    log.warning("PAG: %s", note)
    write_infotext(p, dataclasses.replace(params, mode="separate"))
    write_note(p, note, keep_settings=True)
    return "separate"


__all__ = ["INFOTEXT_PREFIX", "NEVER_CALLED", "NEVER_CALLED_BLOCKS", "NOTE_KEY", "XYZ_ENABLED_BY", "announce_refusal",
           "asks_for_pag", "check_neighbors", "clear_refusal", "comment", "flush_notes", "for_host", "image_keys",
           "job_summary", "more_guidances", "never_called", "note_skipped", "params_from_script_args",
           "perturbations_for", "read_params", "refusal_of", "refuse_job", "resolve_guidances", "start_params",
           "write_infotext", "write_note"]
