"""Double of reForge ``ldm_patched/modules/model_management.py``: the free memory ``calc_cond_batch`` packs by."""

FREE_MEMORY = float("inf")


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY
