"""X/Y/Z grids and Forge's own PAG beside this one, through a running WebUI's API (not a pytest file).

    python tests/live/xyz_check.py http://127.0.0.1:7860 [forge]

Standard library only. Runs: accordion End 0.5 with a ``[PAG] Start`` axis of 0.2, 0.6 (expected: the host's
422 with PAG's message, before any cell); Start × End axes (every cell's infotext); a ``[PAG] Scale`` axis
with PAG off (expected: PAG turned on, a ``PAG note`` in every cell, cells that differ); layers ``zz`` (422);
with ``forge``: Forge's "PerturbedAttentionGuidance Integrated" and this PAG together (expected: a ``PAG note``
saying PAG is applied twice) and no sampling grids. Prints one JSON object.
"""
import json
import sys
import urllib.error
import urllib.request

URL = sys.argv[1].rstrip("/")
FORGE = len(sys.argv) > 2 and sys.argv[2] == "forge"
BASE = {"prompt": "a lighthouse", "negative_prompt": "", "steps": 3, "width": 128, "height": 128, "sampler_name": "Euler",
        "seed": 5, "cfg_scale": 5}


def post(body):
    req = urllib.request.Request(URL + "/sdapi/v1/txt2img", data=json.dumps({**BASE, **body}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(path):
    with urllib.request.urlopen(URL + path, timeout=60) as r:
        return json.loads(r.read())


out = {}
info = get("/sdapi/v1/script-info")
xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
labels = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
out["pag_axes"] = [l for l in labels if l.startswith("[PAG]")]


def xyz_args(label, values, label2=None, values2=""):
    return [labels.index(label), values, None, labels.index(label2) if label2 else 0, values2, None, 0, "", None,
            True, True, False, False, False, False, False, 0, True]


status, body = post({"script_name": "x/y/z plot", "script_args": xyz_args("[PAG] Start", "0.2, 0.6"),
                     "alwayson_scripts": {"pag": {"args": [{"enabled": True, "end": 0.5}]}}})
out["xyz_end_0.5_start_0.6"] = {"status": status, "body": body}
status, body = (0, {}) if FORGE else post({"script_name": "x/y/z plot", "script_args": xyz_args("[PAG] Start", "0, 0.4", "[PAG] End", "0.9, 0.5"),
                     "alwayson_scripts": {"pag": {"args": [{"enabled": True}]}}})
out["xyz_start_x_end_ok"] = {"status": status, "images": len(body.get("images", [])),
                             "infotexts": [t[-160:] for t in json.loads(body.get("info", "{}")).get("infotexts", [])]}
status, body = (0, {}) if FORGE else post({"script_name": "x/y/z plot", "script_args": xyz_args("[PAG] Scale", "1, 5"),
                     "alwayson_scripts": {"pag": {"args": [{"enabled": False}]}}})
texts = json.loads(body.get("info", "{}")).get("infotexts", [])
out["xyz_scale_accordion_off"] = {"status": status, "images": len(body.get("images", [])),
                                  "distinct_images": len(set(body.get("images", []))),
                                  "infotexts": [t[t.find("PAG "):] for t in texts]}
status, body = post({"alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "zz"}]}}})
out["api_zz"] = {"status": status, "body": body}
if FORGE:
    status, body = post({"alwayson_scripts": {"pag": {"args": [{"enabled": True, "layers": "mid"}]},
                                              "PerturbedAttentionGuidance Integrated": {"args": [True, 3.0, 0.0, 0.0, 1.0]}}})
    text = json.loads(body.get("info", "{}")).get("infotexts", [""])[0]
    out["forge_both_pags"] = {"status": status, "infotext": text[text.find("pagi") if "pagi" in text else 0:]}
print(json.dumps(out, indent=1))
