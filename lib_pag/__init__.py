"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377), host-agnostic core.

Nothing here imports the WebUI; hosts (A1111, Forge, reForge) adapt it in ``scripts/``.
"""

from .errors import PagError
from .guidance import (
    cfg_pag, multicond_pag_delta, multicond_reference, pag_delta, pag_only, rescale_guided,
    scale_for_step, scheduled_scale, step_progress,
)
from .layers import (
    AttnLayer, LayerCatalog, LayerSelection, build_catalog, normalize_layer_spec, parse_layer_spec, resolve_layers,
)
from .params import PRESETS, PagParams, canonical_key, field_names, label_of
from .patch import AttentionPatch, RowMarks
from .perturbations import Perturbation, blur_tokens, identity_attention

__all__ = [name for name in dir() if not name.startswith("_")]
