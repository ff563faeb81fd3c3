"""Which self-attention layers PAG perturbs: the catalog of a UNet, the spec syntax, resolution.

Names follow the convention of the official SD pipeline and pamparamm: ``d<i>``, ``m0``, ``u<i>``
where ``i`` counts only the attention-bearing blocks of that part of the UNet, in order, and an
optional ``.<j>`` picks one transformer block inside it. SD1.5 has d0-d5, m0, u0-u8; SDXL has
d0-d3, m0 (10 transformers), u0-u5.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field

import torch

from .errors import PagError

FIELD = "PAG layers"
PARTS = ("down", "mid", "up")
PREFIX = {"down": "d", "mid": "m", "up": "u"}
PART_OF_PREFIX = {v: k for k, v in PREFIX.items()}
HOST_BLOCK = {"down": "input", "mid": "middle", "up": "output"}
GROUP_ALIASES = {
    "down": ("down",), "input": ("down",), "mid": ("mid",), "middle": ("mid",),
    "up": ("up",), "output": ("up",), "all": PARTS,
}
SYNTAX_HELP = (
    "groups down, mid, up, all; names d<i>, m0, u<i> with optional .<j> transformer index and ranges "
    "(d1-d3, m0.2-9); module paths (middle_block.1); each optionally followed by :strength in (0, 1]"
)
_FINE = re.compile(r"^([dmu])(\d+)(?:-([dmu])?(\d+))?(?:\.(\d+)(?:-(\d+))?)?$", re.ASCII)
_STRENGTH = re.compile(r"^(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$", re.ASCII | re.IGNORECASE)
_PATH_ROOTS = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class AttnLayer:
    """One self-attention (attn1) module of a UNet."""

    name: str  # "d1.0", "m0.3", "u2.0"
    part: str  # "down" | "mid" | "up"
    block: int  # index among the attention-bearing blocks of its part
    transformer: int  # index in SpatialTransformer.transformer_blocks
    host_block: tuple  # ("input", 4) / ("middle", 0) / ("output", 2): Forge/ComfyUI patch keys
    path: str  # "input_blocks.4.1.transformer_blocks.0.attn1"
    # the attn1 module and its spatial transformer as found (weak references): extensions wrap blocks
    # mid-job (Kohya HRFix puts a Scaler around a block), which changes the path but not the modules
    refs: tuple = field(default=(), compare=False, repr=False)

    def module(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The attn1 module: the one the catalog found, else by path (``AttributeError`` if gone)."""
        found = self.refs[0]() if self.refs else None
        return found if found is not None else unet.get_submodule(self.path)

    def transformer_block(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The transformer block holding it (TPG shuffles the hidden states entering it)."""
        found = self.refs[2]() if len(self.refs) > 2 else None
        return found if found is not None else unet.get_submodule(self.path.rsplit(".attn1", 1)[0])

    def spatial_transformer(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The spatial transformer holding it (its input's shape is the attention's token grid)."""
        found = self.refs[1]() if len(self.refs) > 1 else None
        return found if found is not None else unet.get_submodule(self.path.split(".transformer_blocks.", 1)[0])


@dataclass(frozen=True)
class LayerCatalog:
    layers: tuple[AttnLayer, ...]
    arch: str  # "SD1.x", "SD2.x", "SDXL", "SDXL refiner", "SSD-1B" or "UNet"

    def blocks(self, part: str) -> list[int]:
        return sorted({layer.block for layer in self.layers if layer.part == part})

    def transformers(self, part: str, block: int) -> list[int]:
        return [layer.transformer for layer in self.layers if layer.part == part and layer.block == block]

    def summary(self) -> str:
        """The valid names in short form, e.g. ``d0-d3, m0, u0-u5``."""
        pieces = []
        for part in PARTS:
            blocks = self.blocks(part)
            if blocks:
                p = PREFIX[part]
                pieces.append(f"{p}{blocks[0]}" if len(blocks) == 1 else f"{p}{blocks[0]}-{p}{blocks[-1]}")
        return ", ".join(pieces)


@dataclass(frozen=True)
class LayerSelector:
    """One parsed entry of a layer spec, not yet checked against a model."""

    text: str  # the entry as written, for error messages
    strength: float
    parts: tuple = ()  # for groups
    part: str | None = None  # for fine names
    blocks: tuple | None = None  # (first, last) block index, inclusive
    transformers: tuple | None = None  # (first, last) transformer index, inclusive; None = all
    path: str | None = None  # for module paths


@dataclass(frozen=True)
class LayerSelection:
    """The resolved choice: layers in catalog order with their perturbation strength."""

    catalog: LayerCatalog
    chosen: tuple[tuple[AttnLayer, float], ...]

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer, _ in self.chosen]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer, _ in self.chosen]

    def strength_of(self, path: str) -> float:
        return dict((layer.path, s) for layer, s in self.chosen)[path]

    def first_in_forward_order(self) -> AttnLayer:
        """The perturbed layer the UNet reaches first (down < mid < up)."""
        return min((layer for layer, _ in self.chosen), key=lambda l: (PARTS.index(l.part), l.block, l.transformer))


# --- the catalog -------------------------------------------------------------------------------

def build_catalog(unet: torch.nn.Module) -> LayerCatalog:
    """Enumerate the attn1 modules of an ldm/sgm/ldm_patched-style UNet (input/middle/output blocks)."""
    layers = []
    for part, attr in (("down", "input_blocks"), ("mid", "middle_block"), ("up", "output_blocks")):
        container = getattr(unet, attr, None)
        if container is None:
            continue
        # middle_block is one TimestepEmbedSequential; the others are lists of them
        blocks = [(0, container)] if part == "mid" else list(enumerate(container))
        index = 0
        for host_index, block in blocks:
            found = False
            prefix = attr if part == "mid" else f"{attr}.{host_index}"
            # the spatial transformers inside the block, also when an extension wrapped the block in a
            # module of its own (Kohya HRFix's Scaler keeps it as .block)
            for sub_path, child in block.named_modules():
                for j, tb in enumerate(getattr(child, "transformer_blocks", ())):
                    if not hasattr(tb, "attn1"):
                        continue
                    layers.append(AttnLayer(
                        name=f"{PREFIX[part]}{index}.{j}", part=part, block=index, transformer=j,
                        host_block=(HOST_BLOCK[part], host_index),
                        path=".".join(filter(None, (prefix, sub_path, f"transformer_blocks.{j}.attn1"))),
                        refs=(weakref.ref(tb.attn1), weakref.ref(child), weakref.ref(tb)),
                    ))
                    found = True
            index += found
    return LayerCatalog(tuple(layers), guess_arch(
        layers, lambda: getattr(unet.get_submodule(layers[0].path.rsplit(".transformer_blocks", 1)[0]), "use_linear", False)))


def guess_arch(layers, first_uses_linear) -> str:
    """The family of a UNet from its attention layout; ``first_uses_linear()``: whether its first spatial
    transformer projects with linear layers (SD2.x) rather than 1×1 convolutions (SD1.x)."""
    def depths(part):
        return [sum(1 for l in layers if l.part == part and l.block == b) for b in sorted({l.block for l in layers if l.part == part})]

    down, mid = depths("down"), depths("mid")
    if len(down) == 6 and all(d == 1 for d in down) and mid == [1]:
        return "SD2.x" if first_uses_linear() else "SD1.x"
    if down == [2, 2, 10, 10]:
        return "SDXL" if mid == [10] else "SSD-1B" if not mid else "UNet"
    if down == [2, 2, 4, 4] and not mid:
        return "SSD-1B"
    if down == [4, 4, 4, 4] and mid == [4]:
        return "SDXL refiner"
    return "UNet"


# --- parsing -----------------------------------------------------------------------------------

def parse_layer_spec(spec) -> tuple[LayerSelector, ...]:
    """Parse a spec (``"mid,up"``, ``["mid", "up"]``, ``"m0.2-9:0.5, u0"``) without a model."""
    if isinstance(spec, str):
        entries = [e for e in re.split(r"[,;\s]+", spec.strip()) if e]
    elif isinstance(spec, (list, tuple)) and all(isinstance(e, str) for e in spec):
        entries = [e for item in spec for e in re.split(r"[,;\s]+", item.strip()) if e]
    else:
        raise PagError(FIELD, spec, "a string or a list of strings: " + SYNTAX_HELP, "has the wrong type")
    if not entries:
        raise PagError(FIELD, spec, SYNTAX_HELP, "selects no layer")
    return tuple(_parse_entry(e) for e in entries)


def normalize_layer_spec(spec, field: str = FIELD) -> str:
    """The canonical text form of a valid spec, for infotext and params: entries joined by ``,``, an entry
    repeated later dropped where it stood first (the later one applies again anyway: same meaning).
    ``field``: the name errors give (``PAG 2 layers`` for guidance 2)."""
    try:
        texts = [s.text for s in parse_layer_spec(spec)]
    except PagError as err:
        raise err.relabeled(field) from None
    return ",".join(t for i, t in enumerate(texts) if t not in texts[i + 1:])


def _parse_entry(text: str) -> LayerSelector:
    target, colon, strength_text = text.partition(":")
    strength = 1.0
    if colon:
        if not strength_text:
            raise PagError(FIELD, text, "a strength in (0, 1] after ':', e.g. u0:0.5", "has an empty strength")
        strength = float(strength_text) if _STRENGTH.match(strength_text) else math.nan  # ASCII digits only
        if not (0.0 < strength <= 1.0):
            raise PagError(FIELD, text, "a strength in (0, 1] after ':', e.g. u0:0.5", "has a bad strength")
    key = target.lower()
    canonical = key if strength == 1.0 else f"{key}:{format_number(strength)}"
    if key in GROUP_ALIASES:
        return LayerSelector(canonical, strength, parts=GROUP_ALIASES[key])
    m = _FINE.match(key)
    if m:
        letter, b0, letter2, b1, t0, t1 = m.groups()
        if letter2 and letter2 != letter:
            raise PagError(FIELD, text, SYNTAX_HELP, "mixes parts in one range")
        blocks = (int(b0), int(b1) if b1 is not None else int(b0))
        transformers = None if t0 is None else (int(t0), int(t1) if t1 is not None else int(t0))
        for lo, hi in filter(None, (blocks, transformers)):
            if lo > hi:
                raise PagError(FIELD, text, SYNTAX_HELP, "has a range that runs backwards")
        return LayerSelector(canonical, strength, part=PART_OF_PREFIX[letter], blocks=blocks, transformers=transformers)
    path = re.sub(r"^(model\.)?diffusion_model\.", "", target)
    if path.split(".", 1)[0] in _PATH_ROOTS and re.fullmatch(r"[A-Za-z0-9_.]+", path):
        return LayerSelector(path if strength == 1.0 else f"{path}:{format_number(strength)}", strength, path=path)
    raise PagError(FIELD, text, SYNTAX_HELP, "is not a layer name")


def format_number(value: float) -> str:
    """Short text that parses back to exactly ``value`` (``3``, ``0.25``, ``inf``, ``0.3333331``)."""
    if math.isinf(value):
        return "inf"
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


# --- resolution against a model ----------------------------------------------------------------

def resolve_layers(spec, catalog: LayerCatalog, field: str = FIELD) -> LayerSelection:
    """Resolve a spec against a catalog; later entries override the strength of earlier ones. Raises
    ``PagError`` naming ``field`` (``PAG layers``, ``PAG 2 layers``, …) for names the model does not have."""
    try:
        return _resolve(spec, catalog)
    except PagError as err:
        raise err.relabeled(field) from None


def _resolve(spec, catalog: LayerCatalog) -> LayerSelection:
    selectors = spec if isinstance(spec, tuple) and all(isinstance(s, LayerSelector) for s in spec) else parse_layer_spec(spec)
    strengths: dict[str, float] = {}
    for selector in selectors:
        for layer in _match(selector, catalog):
            strengths[layer.path] = selector.strength
    chosen = tuple((layer, strengths[layer.path]) for layer in catalog.layers if layer.path in strengths)
    return LayerSelection(catalog, chosen)


def family_unet(arch: str) -> str:
    """``"SDXL UNet"``; a UNet of no family PAG recognises is just ``"UNet"`` (never ``"UNet UNet"``)."""
    return "UNet" if arch == "UNet" else f"{arch} UNet"


def _missing(selector: LayerSelector, catalog: LayerCatalog, detail: str = "") -> PagError:
    valid = catalog.summary() or "none (this model has no self-attention blocks)"
    return PagError(FIELD, selector.text, valid, f"does not exist in this {family_unet(catalog.arch)}{detail}", "valid")


def _match(selector: LayerSelector, catalog: LayerCatalog) -> list[AttnLayer]:
    if selector.parts:
        found = [l for l in catalog.layers if l.part in selector.parts]
        if not found:
            detail = " (it has no middle-block attention)" if selector.parts == ("mid",) else ""
            raise _missing(selector, catalog, detail)
        return found
    if selector.path is not None:
        found = [l for l in catalog.layers if l.path == selector.path or l.path.startswith(selector.path + ".")
                 or l.path == selector.path + ".attn1"]
        if not found:
            raise _missing(selector, catalog)
        return found
    found = []
    first, last = selector.blocks
    for block in range(first, last + 1):
        available = catalog.transformers(selector.part, block)
        if not available:
            raise _missing(selector, catalog)
        lo, hi = selector.transformers or (available[0], available[-1])
        wanted = [j for j in available if lo <= j <= hi]  # never materialise a user-given range
        if lo < available[0] or hi > available[-1] or len(wanted) != hi - lo + 1:
            name = f"{PREFIX[selector.part]}{block}"
            raise _missing(selector, catalog, f"; {name} has transformers {available[0]}-{available[-1]}"
                           if len(available) > 1 else f"; {name} has transformer 0 only")
        found += [l for l in catalog.layers if l.part == selector.part and l.block == block and l.transformer in wanted]
    return found
