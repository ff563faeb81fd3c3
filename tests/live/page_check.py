"""What a user sees in the PAG accordion of a running WebUI, captured in headless Chromium (not a pytest file).

    .venv/bin/python tests/live/page_check.py http://127.0.0.1:7860 /tmp/pag-page [forge]

Opens the txt2img PAG accordion like a user (the host's InputAccordion ticks it), records the status line,
layer map title, schedule preview and hover hints (the ``title`` the host's hints.js set), types layer
texts and a scale with no delay between keys, then presses Generate with layers ``zz`` and with a noise
scale of 250 and records the host's error box and the number of images. Prints one JSON object;
screenshots go to OUTDIR. ``forge``: shorter waits (Forge 2 / reForge). Needs Chromium.
"""
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from ui_page import ROOT_JS, Chromium, find_chromium  # noqa: E402

URL, OUT = sys.argv[1].rstrip("/") + "/", Path(sys.argv[2])
FORGE = len(sys.argv) > 3 and sys.argv[3] == "forge"
OUT.mkdir(parents=True, exist_ok=True)
PAG = "#script_txt2img_pag_"
LAYERS_BOX = f"{PAG}layers textarea, {PAG}layers input"
SCALE_BOX = f"{PAG}scale input[type=number]"
seen = {}

SHOWN_JS = f"""(() => {{
  const root = {ROOT_JS};
  const q = (s) => root.querySelector(s);
  const status = q('{PAG}status span');
  const bar = q('{PAG}schedule_plot rect.pag-bar');
  const title = q('{PAG}layer_map svg title');
  return {{box: q('{LAYERS_BOX}').value, status_for: status ? status.getAttribute('data-layers') : null,
           status_text: status ? status.innerText : null, map_title: title ? title.textContent : null,
           scale_box: q('{SCALE_BOX}') ? q('{SCALE_BOX}').value : null, plot_scale: bar ? bar.getAttribute('data-scale') : null,
           enabled: q('{PAG}enabled-checkbox input') ? q('{PAG}enabled-checkbox input').checked : null}};
}})()"""


def settle(browser, done, timeout=30.0):
    deadline = time.monotonic() + timeout
    shown = browser.evaluate(SHOWN_JS)
    while time.monotonic() < deadline and not done(shown):
        time.sleep(0.2)
        shown = browser.evaluate(SHOWN_JS)
    time.sleep(1.5)
    return browser.evaluate(SHOWN_JS)


def shot(browser, name):
    browser.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector('{PAG}enabled'); if (e) e.scrollIntoView(); return 1; }})()")
    time.sleep(0.5)
    browser.screenshot(OUT / f"{name}.png")


try:
  browser = Chromium(find_chromium(), timeout=60)
  browser.send("Page.enable")
  browser.send("Emulation.setDeviceMetricsOverride", width=1400, height=1200, deviceScaleFactor=1, mobile=False)
  browser.send("Page.navigate", url=URL)
  browser.wait_for(f"!!{ROOT_JS}.querySelector('{PAG}enabled .label-wrap')", 120, "the PAG accordion")
  time.sleep(3)  # onUiLoaded (hints) and the host's own scripts
  seen["closed"] = browser.evaluate(SHOWN_JS)
  seen["hints"] = browser.evaluate(f"""(() => {{ const r = {{}}; for (const n of ['enabled', 'scale', 'layers', 'method', 'start',
      'end', 'mode', 'preset', 'groups', 'status', 'layer_map', 'schedule_plot', 'noise_scale', 'hires']) {{
      const e = {ROOT_JS}.querySelector('{PAG}' + n); r[n] = e ? e.title : null; }} return r; }})()""")
  seen["host_hint_example"] = browser.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector('#txt2img_steps'); return e ? (e.title || (e.querySelector('[title]') || {{}}).title || null) : null; }})()")
  browser.evaluate(f"{ROOT_JS}.querySelector('{PAG}enabled .label-wrap').click()")
  browser.wait_for(f"(() => {{ const r = {ROOT_JS}.querySelector('{PAG}scale').getBoundingClientRect(); return r.width > 0; }})()", 20, "open")
  seen["opened"] = settle(browser, lambda s: s["status_text"] and s["status_for"] == "mid,up")
  shot(browser, "1-opened")
  browser.type_fast(LAYERS_BOX, "u99", whole=True)
  seen["u99"] = settle(browser, lambda s: s["status_for"] == "u99")
  browser.type_fast(LAYERS_BOX, "mid,up")
  seen["typed_fast_mid_up"] = settle(browser, lambda s: s["status_for"] == "mid,up" and s["box"] == "mid,up")
  browser.type_fast(LAYERS_BOX, "zz,u99")
  seen["typed_fast_zz_u99"] = settle(browser, lambda s: s["status_for"] == "zz,u99")
  shot(browser, "2-typed-fast")
  browser.type_fast(SCALE_BOX, "12.5")
  seen["typed_fast_scale"] = settle(browser, lambda s: s["plot_scale"] == "12.5")
  browser.type_fast(SCALE_BOX, "3", whole=True)

  # a bad value at Generate: layers zz (PAG on, ticked by opening the accordion)
  error_js = f"(() => {{ const e = {ROOT_JS}.querySelector('#html_log_txt2img .error'); return e ? e.innerText : null; }})()"
  images_js = f"{ROOT_JS}.querySelectorAll('#txt2img_gallery img').length"
  seen["images_before"] = browser.evaluate(images_js)
  browser.type_fast(LAYERS_BOX, "zz", whole=True)
  time.sleep(1)
  browser.evaluate(f"{ROOT_JS}.querySelector('#txt2img_generate').click()")
  seen["generate_zz_error"] = browser.wait_for(error_js, 300, "the error box")
  time.sleep(2)
  seen["generate_zz_images"] = browser.evaluate(images_js)
  shot(browser, "3-generate-zz")
  # noise scale 250 with good layers
  browser.type_fast(LAYERS_BOX, "mid,up", whole=True)
  browser.type_fast(f"{PAG}noise_scale input", "250", whole=True)
  browser.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector('{PAG}noise_scale input'); e.dispatchEvent(new Event('change', {{bubbles: true}})); e.blur(); return 1; }})()")
  time.sleep(1.5)
  browser.evaluate(f"{ROOT_JS}.querySelector('#txt2img_generate').click()")
  try:
    seen["generate_noise250_error"] = browser.wait_for(f"(() => {{ const t = {error_js}; return t && t.includes('noise scale') ? t : null; }})()", 90, "the error box")
  except TimeoutError:
    seen["generate_noise250_error"] = "(no 'noise scale' in the error box after 90 s) " + str(browser.evaluate(error_js))
  seen["generate_noise250_images"] = browser.evaluate(images_js)
  shot(browser, "4-generate-noise250")

finally:
  browser.close()
  print(json.dumps(seen, indent=1))
