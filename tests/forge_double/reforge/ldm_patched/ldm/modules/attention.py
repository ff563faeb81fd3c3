"""Double of reForge ``ldm_patched/ldm/modules/attention.py``: ``optimized_attention`` on projected q/k/v."""

from tests.forge_double.unet_walk import sdpa_attention


def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False):
    """Mirrors ``optimized_attention`` (the selected kernel; math = softmax(qkᵀ/√d)·v)."""
    assert mask is None
    return sdpa_attention(q, k, v, heads)
