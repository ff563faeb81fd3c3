"""The README's install step from scratch: clone into a WebUI's extensions/, run install.py, load the script.

The clone is loaded in a fresh interpreter that can see only the clone and the WebUI double, so the
committed tree must be complete on its own.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOADER = r"""
import json, os, sys
clone, webui, root = sys.argv[1], sys.argv[2], os.path.realpath(sys.argv[3])
hidden = {root, os.path.join(root, "tests")}
sys.path[:] = [webui] + [p for p in sys.path if p and os.path.realpath(p) not in hidden]
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
from modules import scripts, script_callbacks, shared, sd_models_double
shared.sd_model = sd_models_double.make_sd15_model(seed=0)
module = scripts.test_only_load_script_file(os.path.join(clone, "scripts", "pag.py"))
script_callbacks.before_ui_callback()
runner = scripts.test_only_build_ui(is_img2img=False)
import lib_pag
pag = [s for s in runner.alwayson_scripts if s.title() == "PAG"]
print(json.dumps({"loaded": module is not None, "lib_pag": lib_pag.__file__, "scripts": len(pag),
                  "args": pag[0].args_to - pag[0].args_from if pag else 0}))
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to clone")
def test_clone_into_extensions_then_install_and_load(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "extensions").mkdir(parents=True)
    clone = webui / "extensions" / "sd-webui-pag"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(clone / "install.py")], cwd=webui, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""  # a supported (here: unknown-version) host gets no message

    out = subprocess.run([sys.executable, "-c", LOADER, str(clone), str(ROOT / "tests" / "webui"), str(ROOT)],
                         cwd=webui,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # 15 main values, then guidance 2 and guidance 3 with 14 values each (README, "API")
    assert summary["loaded"] and summary["scripts"] == 1 and summary["args"] == 15 + 2 * 14
    assert summary["lib_pag"].startswith(str(clone))  # the clone's own package, not the working tree's
