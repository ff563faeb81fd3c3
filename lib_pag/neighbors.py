"""Other extensions PAG knows it cannot share a batch with, as data: how to tell they are on, and what PAG
does then — run its perturbed rows in their own pass (``separate``), not at all (``refuse``), or as asked
with a warning (``warn``: the combination is allowed but rarely meant).

Everything else runs batched: the fork and the row bookkeeping already keep foreign hooks, wrapped blocks,
replaced combine steps and tiled UNet calls exact (see the README's compatibility table). An entry here is
for an extension that decides what a row *means* by its position or by the row count, which no bookkeeping
on PAG's side can fix. Each is told by what it writes into the job's infotext (``p.extra_generation_params``)
once its own ``process`` hook ran, so the check runs at the first denoiser call, not at job start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Neighbor:
    name: str
    is_on: Callable[[dict], bool]  # from the job's extra_generation_params
    action: str  # "separate" | "refuse" | "warn" (PAG runs as asked; the log and a PAG note say why to look)
    why: str


def _regional_prompter(latent: bool):
    def is_on(extra: dict) -> bool:
        if not extra.get("RP Active"):
            return False
        return ("La" in str(extra.get("RP Calc Mode", ""))) == latent
    return is_on


KNOWN = (
    # hako-mikan/sd-webui-regional-prompter, scripts/latent.py: denoised_callback_s derives the number of
    # regions from the CFG batch's row count and reorders the rows; extra rows break it (IndexError)
    Neighbor("Regional Prompter (Latent mode)", _regional_prompter(latent=True), "refuse",
             "it counts and reorders the CFG batch rows in its own denoiser callbacks"),
    # scripts/attention.py: hook_forward splits a batch that is neither B nor 2·B rows into a positive and a
    # negative half by position (x.chunk(2)); a cond-only call of B rows is told apart by its token length
    Neighbor("Regional Prompter (Attention mode)", _regional_prompter(latent=False), "separate",
             "its cross-attention hooks split a larger batch into a positive and a negative half by position"),
    # Forge 2 extensions-builtin/sd_forge_perturbed_attention: its process_before_every_sampling (sorting
    # priority 13, before PAG's 14) adds its own PAG post-CFG term and writes pagi_enabled into the infotext
    Neighbor("Forge's PerturbedAttentionGuidance Integrated", lambda extra: extra.get("pagi_enabled") is True, "warn",
             "its PAG term and this one add up, so PAG is applied twice; untick one of the two accordions"),
)


def neighbor_on(extra) -> Neighbor | None:
    """The first known neighbor that is on for this job, or None."""
    if not isinstance(extra, dict):
        return None
    for neighbor in KNOWN:
        try:
            if neighbor.is_on(extra):
                return neighbor
        except Exception:  # a neighbor's odd values must never break a generation
            continue
    return None


__all__ = ["KNOWN", "Neighbor", "neighbor_on"]
