"""Double of Forge ``backend/memory_management.py``: the free-memory figure ``calc_cond_uncond_batch`` chunks by.

Tests lower ``FREE_MEMORY`` to force the host to split cond/uncond entries over several UNet calls.
"""

FREE_MEMORY = float("inf")


def get_free_memory(device=None):
    """Mirrors ``memory_management.get_free_memory``."""
    return FREE_MEMORY
