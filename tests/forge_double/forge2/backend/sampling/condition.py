"""Double of Forge ``backend/sampling/condition.py``: Condition classes and the WebUI cond compilers."""

import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        return tensor.repeat([math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


class Condition:
    """Mirrors ``Condition``: ``process_cond`` repeats to the batch; concat = torch.cat."""

    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        return type(self)(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    """Mirrors ``ConditionCrossAttn``: different token counts concatenate repeated to their lcm (≤ 4×)."""

    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        if s1 != s2:
            if s1[0] != s2[0] or s1[2] != s2[2]:
                return False
            if math.lcm(s1[1], s2[1]) // min(s1[1], s2[1]) > 4:
                return False
        return True

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = 1
        for c in conds:
            length = math.lcm(length, c.shape[1])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


def compile_conditions(cond):
    """Mirrors ``compile_conditions``: one entry; SDXL dicts give ``c_crossattn`` + ``y``."""
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    return [dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
                 model_conds=dict(c_crossattn=ConditionCrossAttn(cond["crossattn"]), y=Condition(cond["vector"])))]


def compile_weighted_conditions(cond, weights):
    """Mirrors ``compile_weighted_conditions``: one entry per AND position (transposed), ``strength`` = its weight."""
    results = []
    for group in map(list, zip(*weights)):
        indices = [i for i, _ in group]
        weight = group[-1][1]
        entry = compile_conditions(cond[indices])
        entry[0]["strength"] = weight
        results += entry
    return results
