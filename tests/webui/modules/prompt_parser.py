"""Double of ``modules/prompt_parser.py`` (A1111 1.10): the conditioning containers the sampler consumes.

Kept from the host: ``ScheduledPromptConditioning(end_at_step, cond)``, ``ComposableScheduledPromptConditioning``,
``MulticondLearnedConditioning``, ``DictWithShape``, ``SdConditioning``, ``reconstruct_cond_batch``,
``stack_conds``, ``reconstruct_multicond_batch`` and the ``AND``/``:weight`` split
(``get_multicond_prompt_list``). Simplified: ``get_learned_conditioning`` does not parse prompt-editing
syntax (``[a:b:when]``, ``[a|b]``); every prompt gets one schedule entry lasting all steps.

Test-only additions (not host API): ``make_multicond`` and ``make_uncond`` build the containers straight
from tensors, without a text encoder.
"""
from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ScheduledPromptConditioning.__doc__ = """Mirrors ``prompt_parser.ScheduledPromptConditioning``: ``cond`` is used up to and including step ``end_at_step``."""


class SdConditioning(list):
    """Mirrors ``prompt_parser.SdConditioning``: a list of prompts plus the image size and polarity."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        """Mirrors ``SdConditioning.__init__`` (modules/prompt_parser.py)."""
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """Mirrors ``prompt_parser.get_learned_conditioning`` without prompt-editing schedules.

    Returns one ``[ScheduledPromptConditioning(steps, cond)]`` list per prompt; ``cond`` is a
    ``(tokens, dim)`` tensor or, for SDXL, a ``{"crossattn", "vector"}`` dict of per-prompt rows.
    Identical prompts share a result, like the host's cache.
    """
    res = []
    cache = {}
    for prompt in prompts:
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = SdConditioning([prompt], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        cond = {k: v[0] for k, v in conds.items()} if isinstance(conds, dict) else conds[0]
        schedule = [ScheduledPromptConditioning(steps, cond)]
        cache[prompt] = schedule
        res.append(schedule)
    return res


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    """Mirrors ``prompt_parser.get_multicond_prompt_list``: split on ``AND``, read ``:weight`` suffixes,
    de-duplicate sub-prompt texts. Returns ``(res_indexes, prompt_flat_list, prompt_indexes)``."""
    res_indexes = []
    prompt_indexes = {}
    prompt_flat_list = SdConditioning(prompts)
    prompt_flat_list.clear()

    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)

    return res_indexes, prompt_flat_list, prompt_indexes


class ComposableScheduledPromptConditioning:
    """Mirrors ``prompt_parser.ComposableScheduledPromptConditioning``: one AND sub-prompt and its weight."""

    def __init__(self, schedules, weight=1.0):
        """Mirrors ``ComposableScheduledPromptConditioning.__init__`` (modules/prompt_parser.py)."""
        self.schedules: list[ScheduledPromptConditioning] = schedules
        self.weight: float = weight


class MulticondLearnedConditioning:
    """Mirrors ``prompt_parser.MulticondLearnedConditioning``: ``batch[i]`` = sub-prompts of image i."""

    def __init__(self, shape, batch):
        """Mirrors ``MulticondLearnedConditioning.__init__`` (modules/prompt_parser.py)."""
        self.shape: tuple = shape
        self.batch: list[list[ComposableScheduledPromptConditioning]] = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False) -> MulticondLearnedConditioning:
    """Mirrors ``prompt_parser.get_multicond_learned_conditioning``."""
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    """Mirrors ``prompt_parser.DictWithShape``: SDXL conds ``{"crossattn", "vector"}``; ``shape`` is the
    crossattn shape."""

    def __init__(self, x, shape=None):
        """Mirrors ``DictWithShape.__init__`` (modules/prompt_parser.py)."""
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        """Mirrors ``DictWithShape.shape`` (modules/prompt_parser.py)."""
        return self["crossattn"].shape


def _active_schedule_index(schedules, current_step):
    """The host's inline loop: first schedule entry whose ``end_at_step`` is >= the step (else 0)."""
    for index, entry in enumerate(schedules):
        if current_step <= entry.end_at_step:
            return index
    return 0


def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step):
    """Mirrors ``prompt_parser.reconstruct_cond_batch``: the uncond rows (one per image) at this step.

    All schedules must share one token length (the host allocates one tensor from the first entry)."""
    param = c[0][0].cond
    is_dict = isinstance(param, dict)

    if is_dict:
        res = DictWithShape({k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in param.items()})
    else:
        res = torch.zeros((len(c),) + param.shape, device=param.device, dtype=param.dtype)

    for i, cond_schedule in enumerate(c):
        entry = cond_schedule[_active_schedule_index(cond_schedule, current_step)].cond
        if is_dict:
            for k, v in entry.items():
                res[k][i] = v
        else:
            res[i] = entry

    return res


def stack_conds(tensors):
    """Mirrors ``prompt_parser.stack_conds``: pad shorter ``(tokens, dim)`` rows by repeating their last
    token, then stack. (Modifies the list in place, like the host.)"""
    token_count = max(x.shape[0] for x in tensors)
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last_vector = tensors[i][-1:]
            tensors[i] = torch.vstack([tensors[i], last_vector.repeat([token_count - tensors[i].shape[0], 1])])
    return torch.stack(tensors)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step):
    """Mirrors ``prompt_parser.reconstruct_multicond_batch``.

    Returns ``(conds_list, tensor)``: ``conds_list[i]`` = ``[(row, weight), ...]`` for image i (one per AND
    sub-prompt), ``tensor`` = the cond rows image by image (``DictWithShape`` for SDXL)."""
    param = c.batch[0][0].schedules[0].cond

    tensors = []
    conds_list = []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable_prompt in composable_prompts:
            target_index = _active_schedule_index(composable_prompt.schedules, current_step)
            conds_for_batch.append((len(tensors), composable_prompt.weight))
            tensors.append(composable_prompt.schedules[target_index].cond)
        conds_list.append(conds_for_batch)

    if isinstance(tensors[0], dict):
        keys = list(tensors[0].keys())
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in keys}
        stacked = DictWithShape(stacked, stacked["crossattn"].shape)
    else:
        stacked = stack_conds(tensors).to(device=param.device, dtype=param.dtype)

    return conds_list, stacked


# --------------------------------------------------------------------------------------------------
# Test-only helpers (not host API): build the containers straight from tensors.
# --------------------------------------------------------------------------------------------------

def _as_schedule(item, steps):
    """Test-only: accept a cond (tensor or dict) or an explicit ``[(end_at_step, cond), ...]`` list."""
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)) and len(item[0]) == 2 and isinstance(item[0][0], int):
        return [ScheduledPromptConditioning(int(end), cond) for end, cond in item]
    return [ScheduledPromptConditioning(steps, item)]


def make_multicond(per_image, steps=10_000):
    """Test-only (not host API): ``MulticondLearnedConditioning`` from tensors.

    ``per_image[i]`` is a list of ``(cond, weight)`` pairs, one per AND sub-prompt of image i. ``cond`` is a
    ``(tokens, dim)`` tensor, an SDXL dict ``{"crossattn": (tokens, dim), "vector": (adm,)}``, or a schedule
    ``[(end_at_step, cond), ...]`` for prompt editing (cond used up to and including ``end_at_step``).
    """
    batch = [[ComposableScheduledPromptConditioning(_as_schedule(cond, steps), float(weight)) for cond, weight in subs] for subs in per_image]
    return MulticondLearnedConditioning(shape=(len(per_image),), batch=batch)


def make_uncond(per_image, steps=10_000):
    """Test-only (not host API): the uncond container (``list[list[ScheduledPromptConditioning]]``).

    ``per_image[i]`` is a cond (tensor/dict, same token length for every image) or a schedule
    ``[(end_at_step, cond), ...]``."""
    return [_as_schedule(cond, steps) for cond in per_image]
