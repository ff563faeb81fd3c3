"""The PAG accordion on a real gradio 3.41.2 page, and headless Chromium driven over the DevTools protocol.

``served_page()`` loads the extension into the WebUI double (``load_webui``: the txt2img tab's
always-on script UI built by ``ScriptRunner.setup_ui`` inside ``gr.Blocks``, exactly as the double
builds it), adds the repository's ``style.css`` like the host does for an extension, and serves that
Blocks on 127.0.0.1 with a free port. ``Chromium`` starts Debian's ``chromium`` headless with every
host name except 127.0.0.1 resolved to "not found", so the page can never reach the network (gradio
3.41's page links Google fonts and a CDN script; both just fail and the page renders with fallbacks).

Regenerate the README screenshot with ``.venv/bin/python tests/ui_page.py docs/accordion.png``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests", ROOT / "tests" / "webui"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

WINDOW = (1100, 900)
ACCORDION_ID = "script_txt2img_pag_enabled"
NO_NETWORK = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
    "--force-device-scale-factor=1", f"--host-resolver-rules={NO_NETWORK}",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_css() -> str | None:
    css = ROOT / "style.css"
    return css.read_text(encoding="utf-8") if css.is_file() else None


def add_generate_row(demo, runner) -> None:
    """What A1111's ``modules/ui.py`` wires around the txt2img scripts, reduced: prompt boxes, *Generate*
    (``wrap_gradio_gpu_call(txt2img, extra_outputs=[None, '', ''])`` with every script control as input) and
    the outputs — gallery, generation info, infotext, and the ``html_log`` that shows the host's errors."""
    import gradio as gr
    from modules import call_queue, txt2img

    with demo:
        with gr.Row():
            prompt = gr.Textbox(value="a cat", label="Prompt", elem_id="txt2img_prompt")
            negative = gr.Textbox(value="blurry", label="Negative prompt", elem_id="txt2img_neg_prompt")
            submit = gr.Button("Generate", elem_id="txt2img_generate")
        id_task = gr.Textbox(value="task(browser)", visible=False)
        gallery = gr.Gallery(elem_id="txt2img_gallery")
        generation_info = gr.Textbox(visible=False, elem_id="generation_info_txt2img")
        html_info = gr.HTML(elem_id="html_info_txt2img")
        html_log = gr.HTML(elem_id="html_log_txt2img")
        submit.click(call_queue.wrap_gradio_gpu_call(txt2img.txt2img, extra_outputs=[None, '', '']),
                     inputs=[id_task, prompt, negative, *runner.inputs], outputs=[gallery, generation_info, html_info, html_log],
                     show_progress=False)


@contextmanager
def served_page(model=None, *, generate: bool = False):
    """Yield ``(demo, url, runner)``: the txt2img script UI with PAG (``model`` loaded; ``generate``: with
    a prompt row, *Generate* and the outputs), served like the host (``queue(64)``) until the block exits."""
    from a1111_harness import load_webui, unload_webui
    from modules import scripts

    load_webui(model, with_xyz=False)
    runner = scripts.scripts_txt2img
    demo = runner.demo
    try:
        if generate:
            add_generate_row(demo, runner)
        css = page_css()
        if css is not None:
            demo.css = css  # what the host does with an extension's style.css; launch() rebuilds the config
        demo.queue(64)  # webui.py: shared.demo.queue(64) — events of one page run concurrently
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    show_api=False, share=False, inbrowser=False)
        try:
            yield demo, f"http://127.0.0.1:{port}/", runner
        finally:
            demo.close(verbose=False)
    finally:
        unload_webui()


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # 127.0.0.1 only
        return response.read().decode("utf-8")


class Chromium:
    """One headless Chromium with a DevTools connection to its first page (minimal CDP client)."""

    def __init__(self, binary: str, timeout: float = 20.0):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="pag-chromium-")
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port(timeout)
            targets = json.loads(fetch(f"http://127.0.0.1:{port}/json/list"))
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=timeout)
        except BaseException:
            self.close()
            raise
        self._id = 0

    def _devtools_port(self, timeout):
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before DevTools came up")
            if marker.is_file():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise TimeoutError("chromium DevTools port did not appear")

    def send(self, method: str, timeout: float = 20.0, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == self._id:  # events (no id) are ignored
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what or expression}")

    def type_fast(self, selector: str, text: str, *, replace: bool = True, whole: bool = False):
        """Focus the element ``selector`` (inside the app root), select its text (``replace``) and type ``text``
        one character at a time with no pause between keys (each a DevTools ``Input.insertText``, as an IME
        commits it: an ``input`` event per character); ``whole``: all of it in one input event (a paste)."""
        self.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector({json.dumps(selector)}); e.focus();"
                      f" {'e.select();' if replace else ''} return true; }})()")
        for piece in ([text] if whole else text):
            self.send("Input.insertText", text=piece)

    def text_of(self, selector: str):
        return self.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector({json.dumps(selector)}); return e ? e.innerText : null; }})()")

    def value_of(self, selector: str):
        return self.evaluate(f"(() => {{ const e = {ROOT_JS}.querySelector({json.dumps(selector)}); return e ? e.value : null; }})()")

    def click(self, x: float, y: float):
        """A real mouse click (press + release) at page coordinates, as a user would do it."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path):
        data = self.send("Page.captureScreenshot", format="png", fromSurface=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The WebUI's gradioApp(): gradio 3.41 renders into the document; a shadow root is used when present.
ROOT_JS = "((document.querySelector('gradio-app') || {}).shadowRoot || document)"


def rect_js(elem_id: str, child: str = "") -> str:
    selector = json.dumps(f"#{elem_id} {child}".strip())
    return (f"(() => {{ const e = {ROOT_JS}.querySelector({selector}); if (!e) return null;"
            " const r = e.getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")


def visible_js(elem_id: str) -> str:
    return f"(() => {{ const r = {rect_js(elem_id)}; return !!r && r.width > 0 && r.height > 0; }})()"


def load_and_open_accordion(browser: Chromium, url: str, timeout: float = 25.0) -> str:
    """Load the page, click the PAG accordion open like a user; returns the accordion's text while closed."""
    browser.send("Page.enable")
    browser.send("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                 mobile=False)
    browser.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "light"}])
    browser.send("Page.navigate", url=url + "?__theme=light")
    browser.wait_for(visible_js(ACCORDION_ID), timeout, "the PAG accordion to render")
    closed_text = browser.evaluate(f"{ROOT_JS}.querySelector('#{ACCORDION_ID}').innerText")
    header = browser.wait_for(rect_js(ACCORDION_ID, ".label-wrap"), timeout, "the accordion header")
    browser.click(header["x"] + header["width"] / 2, header["y"] + header["height"] / 2)
    browser.wait_for(visible_js("script_txt2img_pag_scale"), timeout, "the accordion to open")
    return closed_text


def open_accordion_and_capture(browser: Chromium, url: str, png: Path, timeout: float = 25.0) -> dict:
    """Load the page, click the PAG accordion open, screenshot it; returns what the page showed."""
    closed_text = load_and_open_accordion(browser, url, timeout)
    # let the opened controls lay out and (failed) font requests settle before the picture
    browser.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))))")
    accordion = browser.evaluate(rect_js(ACCORDION_ID))
    open_text = browser.evaluate(f"{ROOT_JS}.querySelector('#{ACCORDION_ID}').innerText")
    dom = browser.evaluate(f"{ROOT_JS}.querySelector('#{ACCORDION_ID}').outerHTML")
    browser.screenshot(png)
    return {"closed_text": closed_text, "open_text": open_text, "dom": dom, "accordion": accordion}


def main(argv):
    out = Path(argv[1] if len(argv) > 1 else "accordion.png").resolve()
    binary = find_chromium()
    if binary is None:
        raise SystemExit("chromium not found (apt-get install -y chromium)")
    with served_page() as (_demo, url, _runner), Chromium(binary) as browser:
        seen = open_accordion_and_capture(browser, url, out)
    print(f"wrote {out}; accordion at {seen['accordion']}")


if __name__ == "__main__":
    main(sys.argv)
