"""Regenerate the SVG pictures in docs/ from the real layer catalogs of the test UNets.

Run from the repository root:  PYTHONPATH=.:tests .venv/bin/python docs/make_pictures.py
"""

from pathlib import Path

from lib_pag import PagParams, build_catalog
from lib_pag.maps import layer_map_svg, schedule_svg, standalone
from unets import sd15_unet, sdxl_unet

DOCS = Path(__file__).resolve().parent


def pictures():
    sd15 = build_catalog(sd15_unet())
    sdxl = build_catalog(sdxl_unet("base"))
    on = PagParams(enabled=True)
    yield "layer-map-sd15.svg", layer_map_svg(sd15, "mid,up")
    yield "layer-map-sdxl.svg", layer_map_svg(sdxl, "m0.2-9,u0:0.5")
    yield "schedule-constant.svg", schedule_svg(on, 20)
    yield "schedule-linear-window.svg", schedule_svg(on.with_overrides(start=0.2, end=0.8, schedule="linear"), 20)
    yield "schedule-cosine-hires.svg", schedule_svg(on.with_overrides(schedule="cosine", hires="own", hires_scale=1.5),
                                                    20, hires_steps=10)


def main():
    for name, svg in pictures():
        (DOCS / name).write_text(standalone(svg), encoding="utf-8")
        print("wrote", DOCS / name)


if __name__ == "__main__":
    main()
