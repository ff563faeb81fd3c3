"""Row layouts of a UNet call, worked out on the host once and reused: no device data is ever read here.

A host adapter builds, per UNet call, a ``RowLayout``: for every row of the batch it gave the UNet, a label
(``PLAIN`` = 0 for the host's own rows, ``b ≥ 1`` for a perturbed twin of guidance branch ``b``) and the row
whose inputs that twin copies. Everything the hot path needs from it — which rows go through a module's own
forward, which through a perturbation, and how the pieces go back together — is derived from the labels
alone (plain Python, cached per layout), so the patched modules never index with boolean masks, never ask
the device a question (``.item()``, ``bool()``, ``nonzero()``) and never copy an index to the device more
than once per layout and device (``Rows.index``).

Slicing follows the layout: a contiguous run of rows is taken as a view (``t[a:b]``), a few runs as one
``torch.cat`` of views, anything more fragmented (hypertile's interleaved sub-rows) with one
``index_select`` through a cached device index.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

PLAIN = 0
MAX_RUNS = 8  # up to this many contiguous runs are gathered with torch.cat of views; more with index_select


def runs_of(index: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``index`` as maximal ``(start, stop)`` runs of consecutive values, in order."""
    runs: list[list[int]] = []
    for i in index:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def device_index(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A long tensor of ``index`` on ``device``; on CUDA copied from pinned memory without blocking the host."""
    host = torch.tensor(index, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class Rows:
    """Some rows of a batch (host-side indices, in order) and how to take them from a tensor without a sync."""

    __slots__ = ("index", "runs", "_on")

    def __init__(self, index: Sequence[int]):
        self.index = tuple(int(i) for i in index)
        self.runs = runs_of(self.index)
        self._on: dict = {}

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Rows({', '.join(f'{a}:{b}' for a, b in self.runs)})"

    @property
    def contiguous(self) -> bool:
        return len(self.runs) <= 1

    def on(self, device) -> torch.Tensor:
        """The indices as a long tensor on ``device`` (made once per device)."""
        device = torch.device(device)
        key = (device.type, device.index)
        found = self._on.get(key)
        if found is None:
            found = self._on[key] = device_index(self.index, device)
        return found

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s rows (dim 0): a view for one run, ``cat`` of views for a few, ``index_select`` otherwise."""
        if len(self.runs) == 1:
            a, b = self.runs[0]
            return t if (a, b) == (0, t.shape[0]) else t[a:b]
        if len(self.runs) <= MAX_RUNS:
            return torch.cat([t[a:b] for a, b in self.runs])
        return t.index_select(0, self.on(t.device))


@dataclass(frozen=True)
class RowLayout:
    """Per row of a UNet call: its label (``PLAIN`` or a guidance branch ``b ≥ 1``) and the row it copies.

    ``sources[i]`` is the row whose inputs row ``i`` copies (``i`` itself for a plain row); None when the
    layout does not say (then nothing may be shared between a twin and its source: the fork is off).
    ``keys[i]``: the seed key of row ``i``'s random draws (a tuple of ints: its image's seed, …; see
    ``perturbations``), or None for rows (or layouts) without one.
    """

    labels: tuple[int, ...]
    sources: tuple[int, ...] | None = None
    keys: tuple | None = None

    def __post_init__(self):
        if self.keys is not None and len(self.keys) != len(self.labels):
            raise ValueError(f"{len(self.keys)} row keys for {len(self.labels)} rows")
        if self.sources is not None:
            if len(self.sources) != len(self.labels):
                raise ValueError(f"{len(self.sources)} source rows for {len(self.labels)} rows")
            for i, (label, s) in enumerate(zip(self.labels, self.sources)):
                if label == PLAIN and s != i:
                    raise ValueError(f"plain row {i} must be its own source, not {s}")
                if label != PLAIN and not (0 <= s < len(self.labels) and self.labels[s] == PLAIN):
                    raise ValueError(f"twin row {i}'s source {s} is not a plain row")

    @classmethod
    def from_mask(cls, mask, label: int = 1, sources=None) -> "RowLayout":
        """From a bool sequence (or CPU tensor) over the rows: True = a twin of branch ``label``."""
        if torch.is_tensor(mask):
            mask = mask.reshape(-1).tolist()
        labels = tuple(label if bool(m) else PLAIN for m in mask)
        if sources is not None:
            given = [int(s) for s in (sources.reshape(-1).tolist() if torch.is_tensor(sources) else sources)]
            twins = [i for i, lab in enumerate(labels) if lab != PLAIN]
            if len(given) != len(twins):
                raise ValueError(f"{len(given)} source rows for {len(twins)} perturbed rows")
            full = list(range(len(labels)))
            for i, s in zip(twins, given):
                full[i] = s
            sources = tuple(full)
        return cls(labels, sources)

    @classmethod
    def twins_after(cls, host_rows: int, twin_labels: Sequence[int], twin_sources: Sequence[int]) -> "RowLayout":
        """``host_rows`` plain rows, then one twin per entry (its label and the host row it copies)."""
        labels = (PLAIN,) * host_rows + tuple(int(v) for v in twin_labels)
        return cls(labels, tuple(range(host_rows)) + tuple(int(s) for s in twin_sources))

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def branches(self) -> tuple[int, ...]:
        """The branch labels present, in first-seen order."""
        return tuple(dict.fromkeys(label for label in self.labels if label != PLAIN))

    @property
    def perturbed(self) -> bool:
        return any(label != PLAIN for label in self.labels)

    def rows(self, label: int) -> Rows:
        return _rows_with(self, label)

    def fit(self, batch: int, unet_rows: int | None = None) -> "RowLayout":
        """The layout of a call of ``batch`` rows made while this layout's UNet call (``unet_rows``) runs.

        Two things multiply rows, each in its own order: a UNet call of ``k·N`` rows holds ``k`` tiles of
        the whole batch one after another (Tiled Diffusion / MultiDiffusion: the layout repeats per tile);
        an attention call of ``j`` × the UNet batch splits each row into ``j`` sub-rows next to each other
        (hypertile's ``(b nh nw)``: each entry repeats ``j`` times). Raises ``RuntimeError`` when the sizes
        do not fit.
        """
        return _fit(self, int(batch), None if unet_rows is None else int(unet_rows))


@functools.lru_cache(maxsize=512)
def _rows_with(layout: RowLayout, label: int) -> Rows:
    return Rows([i for i, lab in enumerate(layout.labels) if lab == label])


@functools.lru_cache(maxsize=512)
def _fit(layout: RowLayout, batch: int, unet_rows: int | None) -> RowLayout:
    labels, sources, keys, n = list(layout.labels), layout.sources, layout.keys, layout.n
    if unet_rows is not None and unet_rows != n:
        if n == 0 or unet_rows % n:
            raise RuntimeError(f"PAG: a UNet call of {unet_rows} rows does not fit the {n} marked rows")
        tiles = unet_rows // n
        labels = labels * tiles
        if sources is not None:
            sources = tuple(t * n + s for t in range(tiles) for s in sources)
        if keys is not None:  # a tile is a crop of the same image: the same key
            keys = tuple(keys) * tiles
        n = unet_rows
    if batch != n:
        if n == 0 or batch % n:
            raise RuntimeError(f"PAG: attention batch of {batch} rows does not fit the {n} marked UNet rows")
        j = batch // n
        labels = [label for label in labels for _ in range(j)]
        if sources is not None:
            sources = tuple(s * j + k for s in sources for k in range(j))
        if keys is not None:  # sub-rows of one row draw apart from each other
            keys = tuple(None if key is None else key + (k,) for key in keys for k in range(j))
    if batch == layout.n and unet_rows in (None, layout.n):
        return layout
    return RowLayout(tuple(labels), None if sources is None else tuple(sources), keys)


# --- one module's plan: own forward for some rows, a perturbation for others -------------------------

@dataclass(frozen=True)
class BranchRows:
    """The rows of one branch a module perturbs, with the strength ``a`` of its mix
    ``(1−a)·own(x) + a·perturbed(x)``; ``in_own``: where those rows sit in the own-forward output (a < 1)."""

    label: int
    rows: Rows
    strength: float
    in_own: Rows | None = None


@dataclass(frozen=True)
class ModulePlan:
    """How one patched module's call splits its batch (built on the host, cached per layout).

    ``own``: rows that run the module's own forward (plain rows, rows of branches that do not perturb this
    module, and rows a branch mixes at strength < 1), None when there are none; ``branches``: the perturbed
    row sets; ``pieces``: the output rows as ``(source, start, stop)`` runs, source 0 = the own output and
    ``k ≥ 1`` = the k-th branch's output (mixed where its strength < 1); ``gather``: the same as one index
    into ``cat(sources)`` when there are too many runs to ``cat`` views.
    """

    n: int
    own: Rows | None
    branches: tuple[BranchRows, ...]
    pieces: tuple[tuple[int, int, int], ...]
    gather: Rows | None = field(default=None)


def module_plan(layout: RowLayout, strengths: tuple[tuple[int, float], ...]) -> ModulePlan | None:
    """The plan for a module that perturbs the branches in ``strengths`` (``(label, a)`` pairs), or None
    when no row of ``layout`` belongs to one of them (the module then runs its own forward untouched)."""
    return _module_plan(layout, tuple(strengths))


@functools.lru_cache(maxsize=1024)
def _module_plan(layout: RowLayout, strengths: tuple[tuple[int, float], ...]) -> ModulePlan | None:
    strength_of = dict(strengths)
    present = [label for label in layout.branches if label in strength_of]
    if not present:
        return None
    own_index = [i for i, lab in enumerate(layout.labels) if lab not in strength_of or strength_of[lab] < 1.0]
    own_position = {row: k for k, row in enumerate(own_index)}
    branches = []
    where: dict[int, tuple[int, int]] = {i: (0, own_position[i]) for i in own_index}
    for k, label in enumerate(present, start=1):
        rows = layout.rows(label)
        a = float(strength_of[label])
        in_own = Rows([own_position[i] for i in rows.index]) if a < 1.0 else None
        branches.append(BranchRows(label, rows, a, in_own))
        for position, i in enumerate(rows.index):
            where[i] = (k, position)
    pieces: list[list[int]] = []
    for i in range(layout.n):
        source, position = where[i]
        if pieces and pieces[-1][0] == source and pieces[-1][2] == position:
            pieces[-1][2] = position + 1
        else:
            pieces.append([source, position, position + 1])
    gather = None
    if len(pieces) > MAX_RUNS:
        sizes = [len(own_index)] + [len(b.rows) for b in branches]
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        gather = Rows([offsets[where[i][0]] + where[i][1] for i in range(layout.n)])
    return ModulePlan(layout.n, Rows(own_index) if own_index else None, tuple(branches),
                      tuple(tuple(p) for p in pieces), gather)


def assemble(plan: ModulePlan, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The module's output in row order from ``outputs`` (own output or None first, then one per branch)."""
    if len(plan.pieces) == 1:
        source, a, b = plan.pieces[0]
        out = outputs[source]
        return out if (a, b) == (0, out.shape[0]) else out[a:b]
    if plan.gather is not None:
        return torch.cat([o for o in outputs if o is not None]).index_select(0, plan.gather.on(outputs[1].device))
    return torch.cat([outputs[source][a:b] for source, a, b in plan.pieces])


__all__ = ["PLAIN", "BranchRows", "ModulePlan", "RowLayout", "Rows", "assemble", "device_index", "module_plan", "runs_of"]
