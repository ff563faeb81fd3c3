"""Host-neutral job pieces both adapters (A1111, Forge/reForge) use: reading a job's settings, the
infotext, and how a refusal reaches the user (log, the generation's comments, a ``PAG note``)."""

from __future__ import annotations

import dataclasses
import logging

from .errors import PagError
from .neighbors import neighbor_on
from .params import PagParams, field_names, params_from_positional

log = logging.getLogger("sd_webui_pag")
INFOTEXT_PREFIX = "PAG "
NEVER_CALLED = ("the UNet ran without calling the chosen attn1 modules (a UNet engine such as TensorRT, or an "
                "extension that replaced them): there is no self-attention for PAG to perturb")
NEVER_CALLED_BLOCKS = ("the UNet ran without calling the chosen transformer blocks as modules (an extension or host that "
                       "replaced them): there are no hidden states for TPG to shuffle")
NOTE_KEY = "PAG note"  # infotext: why PAG did not run, or ran differently than asked (paste ignores it)


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


def params_from_script_args(args, p=None) -> PagParams:
    """Positional UI/API args or a single dict; then ``p.pag_<field>`` overrides (X/Y/Z, other scripts)."""
    if len(args) >= 1 and isinstance(args[0], dict):
        params = PagParams.from_dict(args[0])
    else:
        params = params_from_positional(args)
    overrides = {}
    for name in field_names():
        value = getattr(p, f"pag_{name}", None) if p is not None else None
        if value is not None:
            overrides[name] = value
    if overrides:
        params = params.with_overrides(**overrides)
    return params


def write_infotext(p, params: PagParams) -> None:
    """PAG's settings in the infotext (nothing when off), with the job's notes so far."""
    extra = p.extra_generation_params
    _drop_pag_keys(extra)
    extra.update(params.to_infotext())
    notes = getattr(p, NOTES_ATTR, None)
    if isinstance(notes, dict) and notes:
        extra[NOTE_KEY] = "; ".join(notes.values())


def read_params(p, args) -> tuple[PagParams | None, str | None]:
    """The job's settings with their infotext written; or None and the error, already reported."""
    try:
        params = params_from_script_args(args, p)
    except PagError as err:
        log.error("%s", err)
        comment(p, str(err))
        write_infotext(p, PagParams())
        return None, str(err)
    write_infotext(p, params)
    return params, None


def check_neighbors(p, params: PagParams, refuse) -> str | None:
    """Once per job, after every script's ``process`` ran: a known extension that cannot share a batch
    (``neighbors.KNOWN``) switches PAG to separate mode — returned as ``"separate"``, with a WARNING, the
    infotext saying the mode PAG ran in and a ``PAG note`` — or off, through ``refuse(reason)``. None otherwise."""
    neighbor = neighbor_on(getattr(p, "extra_generation_params", None))
    if neighbor is None:
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


__all__ = ["INFOTEXT_PREFIX", "NEVER_CALLED", "NOTE_KEY", "announce_refusal", "flush_notes", "more_guidances", "never_called", "note_skipped", "perturbations_for",
           "resolve_guidances", "check_neighbors", "comment", "image_keys",
           "params_from_script_args",
           "read_params", "write_infotext", "write_note"]
