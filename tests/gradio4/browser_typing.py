"""The PAG accordion under gradio 4.40.0 (Forge 2) in headless Chromium: keys typed with no delay leave the
status line, layer map and schedule preview on what the boxes hold; run in ``.venv-gradio4``.

    .venv-gradio4/bin/python tests/gradio4/browser_typing.py

The accordion is built with ``build_accordion.py``'s double of Forge's ``InputAccordion`` inside one
``gr.Blocks`` served like Forge serves its page (``queue()``), with a known model (an SD1.x layer catalog:
this venv has no UNet code) and a slow server (every check takes 0.25 s). Prints one JSON summary; exits 1
when a check failed, 2 when it could not run (e.g. no Chromium).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, ROOT / "tests", HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import build_accordion  # noqa: E402  (applies Forge's two gradio shims)
import gradio as gr  # noqa: E402

PAG = "#script_txt2img_pag_"
LAYERS_BOX = f"{PAG}layers textarea, {PAG}layers input"
SCALE_BOX = f"{PAG}scale input[type=number]"


def main() -> int:
    import lib_pag.ui as ui
    from lib_pag.checkpoints import ModelView
    from lib_pag.maps import example_catalog
    from ui_page import ROOT_JS, Chromium, find_chromium, free_port

    binary = find_chromium()
    if binary is None:
        print(json.dumps({"ok": False, "error": "chromium not installed"}))
        return 2

    def slow(fn):
        def wrapper(*args, **kwargs):
            time.sleep(0.25)
            return fn(*args, **kwargs)
        return wrapper

    ui.validation_message = slow(ui.validation_message)
    ui.schedule_html = slow(ui.schedule_html)
    view = ModelView(example_catalog("SD1.x"), "loaded", "sd15.safetensors")
    with gr.Blocks() as demo:
        ui.build_ui(gr, build_accordion.InputAccordion, lambda item: f"script_txt2img_pag_{item}", lambda: view)
    demo.queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_api=False)
    shown_js = f"""(() => {{
      const root = {ROOT_JS};
      const q = (s) => root.querySelector(s);
      const status = q('{PAG}status span');
      const bar = q('{PAG}schedule_plot rect.pag-bar');
      const title = q('{PAG}layer_map svg title');
      return {{box: q('{LAYERS_BOX}').value, status_text: status ? status.innerText : null,
               status_for: status ? status.getAttribute('data-layers') : null,
               map_title: title ? title.textContent : null, scale_box: q('{SCALE_BOX}').value,
               plot_scale: bar ? bar.getAttribute('data-scale') : null}};
    }})()"""
    failures, seen = [], {}
    try:
        with Chromium(binary) as browser:
            browser.send("Page.enable")
            browser.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
            browser.wait_for(f"!!{ROOT_JS}.querySelector('#script_txt2img_pag_enabled .label-wrap')", 30, "the accordion")
            browser.evaluate(f"{ROOT_JS}.querySelector('#script_txt2img_pag_enabled .label-wrap').click()")
            browser.wait_for(f"!!{ROOT_JS}.querySelector('{LAYERS_BOX}')", 10, "the layer box")

            def settle(done, timeout=10.0):
                deadline = time.monotonic() + timeout
                shown = browser.evaluate(shown_js)
                while time.monotonic() < deadline and not done(shown):
                    time.sleep(0.1)
                    shown = browser.evaluate(shown_js)
                time.sleep(0.8)  # late (stale) replies would land now
                return browser.evaluate(shown_js)

            browser.type_fast(LAYERS_BOX, "mid,up")
            shown = seen["mid,up"] = settle(lambda s: (s["status_text"] or "").startswith("10 self-attention layers"))
            if not (shown["box"] == shown["status_for"] == "mid,up" and shown["status_text"].startswith("10 self-attention layers on this SD1.x UNet")
                    and (shown["map_title"] or "").startswith("SD1.x: 10 of 16")):
                failures.append(f"after typing mid,up: {shown}")
            browser.type_fast(LAYERS_BOX, "zz,u99")
            shown = seen["zz,u99"] = settle(lambda s: (s["status_text"] or "").startswith("PAG layers: 'zz'"))
            if not (shown["box"] == shown["status_for"] == "zz,u99" and shown["status_text"].startswith("PAG layers: 'zz' is not a layer name")
                    and shown["map_title"] is None):
                failures.append(f"after typing zz,u99: {shown}")
            browser.type_fast(SCALE_BOX, "12.5")
            shown = seen["12.5"] = settle(lambda s: s["plot_scale"] == "12.5")
            if not (shown["scale_box"] == "12.5" and shown["plot_scale"] == "12.5"):
                failures.append(f"after typing 12.5 as the scale: {shown}")
            browser.type_fast(f"{PAG}noise_scale input", "250")
            plot = f"{ROOT_JS}.querySelector('{PAG}schedule_plot').innerText"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "PAG noise scale: 250.0 is out of range" not in (browser.evaluate(plot) or ""):
                time.sleep(0.1)
            seen["noise_scale_250"] = browser.evaluate(plot)
            if "PAG noise scale: 250.0 is out of range; allowed: a number from 0 to 100" not in (seen["noise_scale_250"] or ""):
                failures.append(f"a noise scale of 250 is not shown in the preview's place: {seen['noise_scale_250']!r}")
    finally:
        demo.close()
    print(json.dumps({"ok": not failures, "gradio": gr.__version__, "failures": failures, "seen": seen}, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as err:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, indent=1))
        sys.exit(2)
