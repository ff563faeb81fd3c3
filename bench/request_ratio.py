"""Whole-request cost of PAG on a running WebUI (A1111, Forge, reForge), through its HTTP API.

Sends txt2img requests to ``--url`` in rounds: one plain request and one per PAG setting, in
rotating order, each timed by the wall clock around the HTTP call (the server does all the work;
run nothing else on the machine). Prints the median seconds per configuration, its ratio to the
plain request, and last a line ``RATIO request=<x.xx>`` for the first PAG setting.

``--modes forge-builtin`` adds a row with Forge 2's own integrated PAG (the built-in script
"PerturbedAttentionGuidance Integrated") at the same ``--scale``, for comparison. That script always
perturbs the middle block, so compare it with ``--layers m0``. When this row is asked for, the host
must list that script at ``/sdapi/v1/scripts`` (otherwise the run stops with an error), and every
request sends the script's arguments: disabled in every other row (the plain row has both PAGs
off), and this extension's PAG is left off in the built-in row.

The WebUI must run with ``--api``. Nothing but the standard library is needed, so this runs from
any Python, e.g.::

    python bench/request_ratio.py --url http://127.0.0.1:7860 --width 256 --height 256 --steps 4

A warm-up round (not counted) comes first, so model loading and first-call costs stay out.
``--check`` also asserts that PAG off gives the plain image bit for bit and PAG on changes it
(the built-in row too).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib

# Forge 2's integrated PAG (extensions-builtin/sd_forge_perturbed_attention); its args: enabled, scale,
# attenuation (% of scale), start step, end step (fractions of the steps). It perturbs the middle block only.
FORGE_PAG = "PerturbedAttentionGuidance Integrated"


def get_json(url: str, path: str, timeout: float):
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        sys.exit(f"HTTP {e.code} from the WebUI at {path}: {e.read().decode(errors='replace')[:2000]}")
    except urllib.error.URLError as e:
        sys.exit(f"cannot reach the WebUI at {url}: {e.reason}")


def post(url: str, payload: dict, timeout: float) -> tuple[dict, float]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url.rstrip("/") + "/sdapi/v1/txt2img", data=data,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        sys.exit(f"HTTP {e.code} from the WebUI: {e.read().decode(errors='replace')[:2000]}")
    return body, time.perf_counter() - start


def png_scanlines(b64: str) -> bytes:
    """The PNG's decompressed image data: equal for equal pixels whatever its text chunks (infotext) say."""
    data = base64.b64decode(b64)
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def base_payload(args) -> dict:
    return {
        "prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed,
        "steps": args.steps, "cfg_scale": args.cfg, "width": args.width, "height": args.height,
        "sampler_name": args.sampler, "batch_size": args.batch_size, "n_iter": 1,
        "save_images": False, "send_images": True,
    }


def request(payload: dict, pag: dict | None, overrides: dict, args, builtin: bool | None = None) -> dict:
    """The base request with its overrides and, unless ``pag`` is None, the PAG script args; unless
    ``builtin`` is None, also Forge's integrated PAG, enabled or not, at ``--scale`` over all steps."""
    out = {**payload, **overrides}
    scripts = {}
    if pag is not None:
        scripts["PAG"] = {"args": [{"enabled": True, "scale": args.scale, "layers": args.layers, **pag}]}
    if builtin is not None:
        scripts[FORGE_PAG] = {"args": [builtin, args.scale, 0.0, 0.0, 1.0]}
    if scripts:
        out["alwayson_scripts"] = scripts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    ap.add_argument("--negative", default="blurry")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--scale", type=float, default=3.0, help="PAG scale")
    ap.add_argument("--layers", default="m0", help="PAG layers (default: the middle block)")
    ap.add_argument("--modes", default="batched,separate",
                    help="comma-separated PAG variants to time beside the plain request: batched, separate, "
                         "pag-only (CFG 1 with PAG), forge-builtin (Forge 2's integrated PAG at --scale, middle "
                         "block; compare with --layers m0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--check", action="store_true",
                    help="assert: PAG disabled gives the plain pixels; PAG on (and forge-builtin) changes them; "
                         "infotext has the keys")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds: must be at least 1")

    # name -> (this extension's PAG args or None for PAG off, request overrides, Forge's integrated PAG on)
    configs: dict[str, tuple[dict | None, dict, bool]] = {"plain": (None, {}, False)}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode == "pag-only":
            configs["pag-only"] = ({}, {"cfg_scale": 1.0}, False)
        elif mode in ("batched", "separate"):
            configs[f"pag-{mode}"] = ({"mode": mode}, {}, False)
        elif mode == "forge-builtin":
            configs["forge-builtin"] = (None, {}, True)
        else:
            sys.exit(f"--modes: unknown variant {mode!r}; allowed: batched, separate, pag-only, forge-builtin")
    if len(configs) == 1:
        sys.exit("--modes: name at least one PAG variant")

    use_builtin = "forge-builtin" in configs
    if use_builtin:
        scripts = get_json(args.url, "/sdapi/v1/scripts", args.timeout).get("txt2img", [])
        if FORGE_PAG.lower() not in [str(s).lower() for s in scripts]:
            sys.exit(f"--modes forge-builtin: this WebUI has no txt2img script {FORGE_PAG!r} (Forge 2's integrated PAG, "
                     f"extensions-builtin/sd_forge_perturbed_attention); /sdapi/v1/scripts lists: {', '.join(scripts)}")
        if args.layers.strip().lower() not in ("m0", "mid", "middle"):
            print(f"note: Forge's integrated PAG perturbs the middle block only; --layers {args.layers!r} applies to "
                  "this extension's rows (use --layers m0 for a like-for-like comparison)", file=sys.stderr)

    def build(name: str, pag: dict | None = None) -> dict:
        """The request of a configuration; ``pag`` replaces its PAG args (for the disabled-PAG check)."""
        ours, overrides, builtin_on = configs[name]
        return request(payload, ours if pag is None else pag, overrides, args, builtin_on if use_builtin else None)

    payload = base_payload(args)
    print(f"# {args.url}  {args.width}x{args.height}  {args.steps} steps  {args.sampler}  CFG {args.cfg}  "
          f"batch {args.batch_size}  PAG scale {args.scale} layers {args.layers!r}"
          + (f"  (forge-builtin: {FORGE_PAG}, scale {args.scale}, middle block)" if use_builtin else ""))

    warm = {}
    for name in configs:  # warm-up round, not timed
        warm[name], secs = post(args.url, build(name), args.timeout)
        print(f"warm-up {name:14s} {secs:8.2f} s", flush=True)

    if args.check:
        plain = png_scanlines(warm["plain"]["images"][0])
        off, _ = post(args.url, build("plain", {"enabled": False}), args.timeout)
        assert png_scanlines(off["images"][0]) == plain, "PAG disabled changed the image"
        for name, body in warm.items():
            text = json.loads(body["info"])["infotexts"][0]
            if name == "plain":
                assert "PAG scale" not in text and "pagi_enabled" not in text, f"plain: a PAG is on: {text}"
                continue
            if name != "pag-only":  # pag-only runs at another CFG scale: different anyway
                assert png_scanlines(body["images"][0]) != plain, f"{name}: PAG on left the image unchanged"
            keys = ("pagi_enabled: True", "pagi_scale") if name == "forge-builtin" else ("PAG scale", "PAG layers")
            for key in keys:
                assert key in text, f"{name}: infotext lacks {key!r}: {text}"
            if name == "forge-builtin":
                assert "PAG scale" not in text, f"{name}: this extension's PAG is on too: {text}"
        print("check: ok (PAG off == plain pixels, PAG on changes them, infotext has the keys"
              + (", forge-builtin changes them too" if use_builtin else "") + ")")

    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _, secs = post(args.url, build(name), args.timeout)
            times[name].append(secs)
            print(f"round {r + 1} {name:14s} {secs:8.2f} s", flush=True)

    base = statistics.median(times["plain"])
    print(f"\n{'config':16s} {'median s':>9s} {'ratio':>6s}   all (s)")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:16s} {med:9.2f} {med / base:6.2f}   " + " ".join(f"{t:.2f}" for t in times[name]))
    if "pag-only" in times and "pag-batched" in times:
        ratio = statistics.median(times["pag-only"]) / statistics.median(times["pag-batched"])
        print(f"pag-only / pag-batched: {ratio:.2f}")
    first = next((n for n in names if n != "plain"), None)
    if first:
        print(f"RATIO request={statistics.median(times[first]) / base:.2f}")


if __name__ == "__main__":
    main()
