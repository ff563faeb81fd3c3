"""Double of Forge ``backend/memory_management.py``: the free-memory figure ``calc_cond_uncond_batch`` chunks by.

Tests lower ``FREE_MEMORY`` to force the host to split cond/uncond entries over several UNet calls.
"""

FREE_MEMORY = float("inf")


def get_free_memory(device=None):
    """Mirrors ``memory_management.get_free_memory``."""
    return FREE_MEMORY


current_loaded_models = []  # LoadedModel-like entries: the patchers whose object patches are set


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    """Mirrors the patching side of ``memory_management.load_models_gpu``: a patcher already loaded stays
    (``LoadedModel.__eq__`` compares patchers by identity); otherwise every loaded clone of the same model
    is unloaded (``unload_model_clones`` → ``forge_unpatch_model``) and the patcher is loaded
    (``LoadedModel.model_load`` → ``forge_patch_model``: object patches set)."""
    for patcher in models:
        if any(loaded is patcher for loaded in current_loaded_models):
            continue
        for i in reversed(range(len(current_loaded_models))):
            if patcher.is_clone(current_loaded_models[i]):
                current_loaded_models.pop(i).forge_unpatch_model()
        patcher.forge_patch_model()
        current_loaded_models.insert(0, patcher)
