"""Double of Forge ``backend/attention.py``: ``attention_function(q, k, v, heads, mask=None)`` on projected q/k/v."""

from tests.forge_double.unet_walk import sdpa_attention


def attention_function(q, k, v, heads, mask=None):
    """Mirrors ``backend.attention.attention_function`` (the configured kernel; math = softmax(qkᵀ/√d)·v)."""
    assert mask is None
    return sdpa_attention(q, k, v, heads)
