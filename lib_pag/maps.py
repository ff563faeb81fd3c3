"""Small inline SVG pictures for the UI and the docs: the UNet layer map and the per-step scale.

Plain strings for a ``gr.HTML`` (no dependency, no ids, no ``<style>`` so several can share a page):
text and outlines use ``currentColor`` (they follow the theme), selected cells and bars one accent
colour. Every element a test or a script may want to read carries ``class`` and ``data-*``
attributes: ``g.pag-block[data-part, data-block, data-name, data-count]`` per attention block,
``rect.pag-cell[data-layer, data-selected, data-strength]`` per transformer, and
``rect.pag-bar[data-pass, data-step, data-scale]`` per sampler step (``data-scale`` is the exact
``repr`` of ``scale_for_step``).
"""

from __future__ import annotations

import html
import math

from .guidance import scale_for_step
from .layers import PARTS, PREFIX, AttnLayer, LayerCatalog, LayerSelection, resolve_layers

ACCENT = "#e8590c"  # readable on white and on near-black
FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', sans-serif\""

MAP_W, MAP_H = 600, 260
BOX_H = 58
SCHED_W, SCHED_H = 600, 150


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _n(value: float) -> str:
    """Short deterministic number for coordinates and labels."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _svg_open(width: int, height: int, label: str, kind: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="pag-{kind}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" style="max-width:100%;height:auto" role="img" '
            f'aria-label="{_e(label)}" {FONT} font-size="11" fill="currentColor">'
            f'<title>{_e(label)}</title>')


# --- layer map ---------------------------------------------------------------------------------

def layer_map_svg(catalog: LayerCatalog, selection=None, *, title: str | None = None) -> str:
    """The UNet as a U: down blocks going down, mid at the bottom, up blocks going up.

    ``selection``: a ``LayerSelection``, a layer spec (str or list, resolved against ``catalog``;
    an invalid spec raises ``PagError``, show that instead) or None for the bare architecture.
    One box per attention-bearing block (``d0``, ``m0``, ``u3`` …) with its transformer count and one
    cell per transformer; perturbed cells are filled (more transparent for strength < 1) and the
    box shows the strength when it is below 1.
    """
    if selection is not None and not isinstance(selection, LayerSelection):
        selection = resolve_layers(selection, catalog)
    strengths = {layer.name: s for layer, s in selection.chosen} if selection is not None else {}

    blocks = {part: [(b, [l for l in catalog.layers if l.part == part and l.block == b]) for b in catalog.blocks(part)]
              for part in PARTS}
    has_mid = bool(blocks["mid"])
    columns = [("down", b, ls) for b, ls in blocks["down"]]
    columns += [("mid", b, ls) for b, ls in blocks["mid"]] if has_mid else [("mid", None, [])]
    columns += [("up", b, ls) for b, ls in blocks["up"]]

    total = len(catalog.layers)
    if title is None:
        arch = catalog.arch
        if selection is None:
            title = f"{arch}: {total} self-attention layers ({catalog.summary() or 'none'})"
        else:
            title = f"{arch}: {len(strengths)} of {total} self-attention layers perturbed"

    margin, gap = 8.0, 6.0
    col_w = (MAP_W - 2 * margin) / max(len(columns), 1)
    box_w = col_w - gap
    top, bottom = 26.0, MAP_H - 22.0
    lowest = bottom - BOX_H  # the mid box's top
    n_down, n_up = len(blocks["down"]), len(blocks["up"])

    def box_top(part, index):
        if part == "down":
            return top + (lowest - top) * index / max(n_down, 1)
        if part == "mid":
            return lowest
        return lowest - (lowest - top) * (index + 1) / max(n_up, 1)

    out = [_svg_open(MAP_W, MAP_H, title, "layer-map"),
           f'<text x="{_n(MAP_W / 2)}" y="15" text-anchor="middle" font-size="12" font-weight="600">{_e(title)}</text>']
    geometry = []
    for i, (part, block, layers) in enumerate(columns):
        index = block if block is not None else 0
        if part == "up":
            index = [b for b, _ in blocks["up"]].index(block)
        elif part == "down":
            index = [b for b, _ in blocks["down"]].index(block)
        geometry.append((margin + i * col_w + gap / 2, box_top(part, index)))

    # the path through the UNet: short links between neighbouring boxes
    links = []
    for (x0, y0), (x1, y1) in zip(geometry, geometry[1:]):
        links.append(f"M{_n(x0 + box_w)} {_n(y0 + BOX_H / 2)}L{_n(x1)} {_n(y1 + BOX_H / 2)}")
    if links:
        out.append(f'<path d="{" ".join(links)}" fill="none" stroke="currentColor" stroke-opacity="0.35" stroke-width="1.5"/>')

    for (part, block, layers), (x, y) in zip(columns, geometry):
        if block is None:
            out.append(_no_mid(x, y, box_w))
            continue
        out.append(_block_box(part, block, layers, strengths, x, y, box_w))

    # legend
    ly = MAP_H - 7
    out.append(f'<rect x="{_n(margin)}" y="{ly - 8}" width="8" height="8" fill="{ACCENT}"/>'
               f'<text x="{_n(margin + 11)}" y="{ly}" font-size="10">perturbed (paler = strength &lt; 1)</text>'
               f'<rect x="{_n(margin + 186)}" y="{ly - 8}" width="8" height="8" fill="none" stroke="currentColor" stroke-opacity="0.6"/>'
               f'<text x="{_n(margin + 198)}" y="{ly}" font-size="10">not perturbed</text>'
               f'<text x="{_n(MAP_W - margin)}" y="{ly}" font-size="10" text-anchor="end" fill-opacity="0.8">'
               f'd = down ↓ · m = mid · u = up ↑ · ×n = transformers</text>')
    out.append("</svg>")
    return "".join(out)


def _block_box(part: str, block: int, layers: list[AttnLayer], strengths: dict, x: float, y: float, w: float) -> str:
    name = f"{PREFIX[part]}{block}"
    n = len(layers)
    chosen = [strengths[l.name] for l in layers if l.name in strengths]
    parts = [f'<g class="pag-block" data-part="{part}" data-block="{block}" data-name="{_e(name)}" data-count="{n}" '
             f'data-selected="{len(chosen)}">',
             f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{BOX_H}" rx="4" fill="{ACCENT if chosen else "none"}" '
             f'fill-opacity="0.08" stroke="{ACCENT if chosen else "currentColor"}" stroke-opacity="{1 if chosen else 0.6}" '
             f'stroke-width="{1.5 if chosen else 1}"/>',
             f'<text x="{_n(x + w / 2)}" y="{_n(y + 13)}" text-anchor="middle" font-weight="600">{_e(name)}</text>',
             f'<text x="{_n(x + w / 2)}" y="{_n(y + 24)}" text-anchor="middle" font-size="9" fill-opacity="0.75">×{n}</text>']
    cols = min(n, 5)
    rows = math.ceil(n / cols) if n else 0
    cell = max(2.0, min(8.0, (w - 8 - (cols - 1) * 2) / max(cols, 1)))
    grid_w = cols * cell + (cols - 1) * 2
    cx0, cy0 = x + (w - grid_w) / 2, y + 29
    for k, layer in enumerate(layers):
        cx, cy = cx0 + (k % cols) * (cell + 2), cy0 + (k // cols) * (cell + 2)
        geometry = f'x="{_n(cx)}" y="{_n(cy)}" width="{_n(cell)}" height="{_n(cell)}"'
        if layer.name in strengths:
            s = strengths[layer.name]
            parts.append(f'<rect class="pag-cell pag-on" data-layer="{_e(layer.name)}" data-selected="1" data-strength="{s!r}" '
                         f'{geometry} fill="{ACCENT}" fill-opacity="{_n(0.3 + 0.7 * s)}"><title>{_e(layer.name)}: strength {s:g}'
                         f'</title></rect>')
        else:
            parts.append(f'<rect class="pag-cell" data-layer="{_e(layer.name)}" data-selected="0" {geometry} fill="none" '
                         f'stroke="currentColor" stroke-opacity="0.5" stroke-width="0.8"><title>{_e(layer.name)}</title></rect>')
    weak = sorted({s for s in chosen if s < 1})
    if weak:
        low, high = weak[0], max(chosen)
        text = f"{low:g}" if low == high else f"{low:g}–{high:g}"
        text_y = cy0 + rows * (cell + 2) + 8
        parts.append(f'<text class="pag-strength" x="{_n(x + w / 2)}" y="{_n(min(text_y, y + BOX_H - 3))}" text-anchor="middle" '
                     f'font-size="9" fill="{ACCENT}">{_e(text)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _no_mid(x: float, y: float, w: float) -> str:
    return (f'<g class="pag-no-mid"><rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{BOX_H}" rx="4" fill="none" '
            f'stroke="currentColor" stroke-opacity="0.4" stroke-dasharray="3 3"/>'
            f'<text x="{_n(x + w / 2)}" y="{_n(y + 25)}" text-anchor="middle" font-size="9" fill-opacity="0.7">no mid</text>'
            f'<text x="{_n(x + w / 2)}" y="{_n(y + 36)}" text-anchor="middle" font-size="9" fill-opacity="0.7">attn</text></g>')


# --- schedule ----------------------------------------------------------------------------------

def schedule_svg(params, steps: int = 20, *, hires_steps: int | None = None) -> str:
    """Bars of the PAG scale per sampler step (``scale_for_step``), plus the hires pass when given.

    ``hires_steps``: None = no hires pass; 0 = as many as ``steps`` (A1111's convention). The sigma
    window is not drawn (it depends on the sampler's sigmas); the title says when one is set.
    """
    steps = max(1, int(steps))
    if hires_steps is not None:
        hires_steps = max(1, int(hires_steps) or steps)
    passes = [("base", steps, [scale_for_step(params, step=i, total_steps=steps) for i in range(steps)])]
    if hires_steps is not None:
        passes.append(("hires", hires_steps, [scale_for_step(params, step=i, total_steps=hires_steps, hires=True)
                                              for i in range(hires_steps)]))
    top_value = max(max(values) for _, _, values in passes)
    y_max = top_value if top_value > 0 else 1.0

    label = f"PAG scale per step: {params.schedule}, window {params.start:.0%}–{params.end:.0%} of the steps, max {top_value:g}"
    notes = []
    if not params.enabled:
        notes.append("PAG off")
    if params.sigma_start or params.sigma_end:
        notes.append("sigma window not drawn")
    if notes:
        label += " (" + "; ".join(notes) + ")"

    left, right, plot_top, plot_bottom = 34.0, SCHED_W - 8.0, 26.0, SCHED_H - 30.0
    plot_h = plot_bottom - plot_top
    gap = 18.0 if len(passes) > 1 else 0.0
    total_steps = sum(n for _, n, _ in passes)
    usable = right - left - gap * (len(passes) - 1)

    out = [_svg_open(SCHED_W, SCHED_H, label, "schedule"),
           f'<text x="{_n(left)}" y="15" font-size="12" font-weight="600">{_e(label)}</text>',
           # y axis: 0 and the max
           f'<path d="M{_n(left)} {_n(plot_top)}V{_n(plot_bottom)}" stroke="currentColor" stroke-opacity="0.6"/>',
           f'<text x="{_n(left - 4)}" y="{_n(plot_bottom + 3)}" text-anchor="end" font-size="10">0</text>',
           f'<text class="pag-max" x="{_n(left - 4)}" y="{_n(plot_top + 4)}" text-anchor="end" font-size="10">{_e(_n(top_value))}</text>',
           f'<path d="M{_n(left)} {_n(plot_top)}H{_n(right)}" stroke="currentColor" stroke-opacity="0.25" stroke-dasharray="3 3"/>',
           f'<text x="{_n(12)}" y="{_n((plot_top + plot_bottom) / 2)}" text-anchor="middle" font-size="10" '
           f'transform="rotate(-90 12 {_n((plot_top + plot_bottom) / 2)})">scale</text>']
    x = left
    for name, n, values in passes:
        width = usable * n / total_steps
        slot = width / n
        bar = max(0.6, slot * (0.8 if slot > 3 else 1.0))
        # the step window (start ≤ i/n < end) as a faint band
        active = [i for i in range(n) if params.start <= i / n < params.end]
        if active and params.enabled and not (name == "hires" and params.hires == "off"):
            out.append(f'<rect class="pag-window" x="{_n(x + active[0] * slot)}" y="{_n(plot_top)}" '
                       f'width="{_n((active[-1] - active[0] + 1) * slot)}" height="{_n(plot_h)}" fill="currentColor" fill-opacity="0.07"/>')
        out.append(f'<g class="pag-pass" data-pass="{name}" data-steps="{n}">')
        for i, value in enumerate(values):
            h = plot_h * value / y_max
            out.append(f'<rect class="pag-bar" data-pass="{name}" data-step="{i}" data-scale="{value!r}" '
                       f'x="{_n(x + i * slot + (slot - bar) / 2)}" y="{_n(plot_bottom - h)}" width="{_n(bar)}" height="{_n(h)}" '
                       f'fill="{ACCENT}"><title>step {i + 1}/{n}: {value:.3g}</title></rect>')
        out.append("</g>")
        out.append(f'<path d="M{_n(x)} {_n(plot_bottom)}H{_n(x + width)}" stroke="currentColor" stroke-opacity="0.6"/>')
        caption = f"steps 1–{n}" if name == "base" else f"hires 1–{n}: {_hires_caption(params)}"
        out.append(f'<text x="{_n(x + width / 2)}" y="{_n(plot_bottom + 14)}" text-anchor="middle" font-size="10">{_e(caption)}</text>')
        x += width + gap
    out.append(f'<text x="{_n(right)}" y="{_n(SCHED_H - 4)}" text-anchor="end" font-size="10" fill-opacity="0.8">'
               f'shaded: the PAG start–end window · bars: scale per step</text>')
    out.append("</svg>")
    return "".join(out)


def _hires_caption(params) -> str:
    if params.hires == "off":
        return "PAG off"
    if params.hires == "own":
        return f"own scale {params.hires_scale:g}"
    return "same as the first pass"


# --- docs and previews without a model -----------------------------------------------------------

# (part, host block index, child index, transformers) per attention block; as build_catalog finds them
_LAYOUTS = {
    "SD1.x": [("down", h, 1, 1) for h in (1, 2, 4, 5, 7, 8)] + [("mid", 0, 1, 1)] + [("up", h, 1, 1) for h in range(3, 12)],
    "SDXL": [("down", 4, 1, 2), ("down", 5, 1, 2), ("down", 7, 1, 10), ("down", 8, 1, 10), ("mid", 0, 1, 10)]
            + [("up", h, 1, 10) for h in (0, 1, 2)] + [("up", h, 1, 2) for h in (3, 4, 5)],
    "SDXL refiner": [("down", h, 1, 4) for h in (4, 5, 7, 8)] + [("mid", 0, 1, 4)] + [("up", h, 1, 4) for h in range(3, 9)],
    "SSD-1B": [("down", 4, 1, 2), ("down", 5, 1, 2), ("down", 7, 1, 4), ("down", 8, 1, 4), ("up", 0, 1, 4), ("up", 1, 1, 4),
               ("up", 2, 1, 10), ("up", 3, 1, 2), ("up", 4, 1, 1), ("up", 5, 1, 1)],
}
_LAYOUTS["SD2.x"] = _LAYOUTS["SD1.x"]
_HOST = {"down": ("input", "input_blocks"), "mid": ("middle", "middle_block"), "up": ("output", "output_blocks")}


def example_catalog(arch: str) -> LayerCatalog:
    """The catalog ``build_catalog`` gives for a standard model of ``arch`` (``SD1.x``, ``SD2.x``,
    ``SDXL``, ``SDXL refiner``, ``SSD-1B``), for a map before any model is loaded."""
    layers, index = [], {p: 0 for p in PARTS}
    for part, host, child, depth in _LAYOUTS[arch]:
        host_name, attr = _HOST[part]
        prefix = attr if part == "mid" else f"{attr}.{host}"
        block = index[part]
        index[part] += 1
        layers += [AttnLayer(name=f"{PREFIX[part]}{block}.{j}", part=part, block=block, transformer=j, host_block=(host_name, host),
                             path=f"{prefix}.{child}.transformer_blocks.{j}.attn1") for j in range(depth)]
    return LayerCatalog(tuple(layers), arch)


def standalone(svg: str) -> str:
    """An SVG string as a file: XML declaration and a colour that follows the viewer's light/dark scheme."""
    style = ("<style>svg{color:#1f2328}@media (prefers-color-scheme: dark){svg{color:#e6edf3}}</style>")
    head, sep, rest = svg.partition(">")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + head + sep + style + rest + "\n"


__all__ = ["layer_map_svg", "schedule_svg", "example_catalog", "standalone", "ACCENT"]
