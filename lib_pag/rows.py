"""Host-agnostic batch surgery: perturbed twins of the cond rows, placed between cond and uncond rows.

Keeping the uncond block last means a host's own slicing (``x[-B:]`` as uncond, dropping the last
``B`` rows to skip it, chunked calls) keeps working with the extra rows in the same UNet call.
"""

from __future__ import annotations

import torch


def twin_rows(t, n_cond: int, copies: int = 1):
    """``[cond, cond × copies, rest]`` for a tensor or a dict of tensors (SDXL conds); None stays None."""
    if t is None:
        return None
    if isinstance(t, dict):
        doubled = {k: twin_rows(v, n_cond, copies) for k, v in t.items()}
        return same_dict_type(t, doubled)
    return torch.cat([t[:n_cond]] * (1 + copies) + [t[n_cond:]])


def rows_of(t, a: int, b: int):
    """Rows ``a:b`` of a tensor or of every tensor of a dict (SDXL conds); None stays None."""
    if t is None:
        return None
    if isinstance(t, dict):
        return same_dict_type(t, {k: v[a:b] for k, v in t.items()})
    return t[a:b]


def same_dict_type(original: dict, values: dict) -> dict:
    """``values`` in the class of ``original``: A1111's ``DictWithShape`` (the host reads its ``.shape``).

    1.7/1.8 store the shape given to ``__init__(x, shape)``; 1.9+ derive it from ``crossattn``.
    """
    if type(original) is dict:
        return values
    shape = values["crossattn"].shape if "crossattn" in values else None
    for args in ((values, shape), (values,)):
        try:
            return type(original)(*args)
        except TypeError:
            continue
    return values


def twin_cond(cond, n_cond: int, copies: int = 1):
    """The text cond with ``copies`` more of its ``n_cond`` rows (all rows of ``cond`` are cond rows)."""
    return twin_rows(cond, n_cond, copies) if n_cond == _rows(cond) else None


def _rows(t) -> int:
    if isinstance(t, dict):
        return next(iter(t.values())).shape[0]
    return t.shape[0]


def perturbed_mask(n_cond: int, n_rest: int) -> torch.Tensor:
    """Row mask of ``[cond, perturbed twins, rest]``."""
    mask = torch.zeros(2 * n_cond + n_rest, dtype=torch.bool)
    mask[n_cond:2 * n_cond] = True
    return mask


def row_offset(view: torch.Tensor, base: torch.Tensor) -> int | None:
    """Index of ``view``'s first row inside ``base`` when ``view`` is a row slice of it, else None."""
    if view is base:
        return 0
    try:
        same = view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    if not same or view.shape[1:] != base.shape[1:] or view.stride() != base.stride() or base.stride(0) == 0:
        return None
    delta = view.storage_offset() - base.storage_offset()
    if delta % base.stride(0):
        return None
    offset = delta // base.stride(0)
    if offset < 0 or offset + view.shape[0] > base.shape[0]:
        return None
    return offset
