"""Cost of one sampler step with PAG, relative to plain CFG: batched twins, the shared-prefix fork, separate pass.

Every configuration makes the UNet calls the A1111 adapter makes for one CFG denoiser step, with the
row layouts it builds and the real ``AttentionPatch``/``RowMarks`` (and ``lib_pag.fork`` for the
fork rows); timings are interleaved round-robin in one process and reported as medians.

    cfg           [cond, uncond]                       unpatched
    batched       [cond, twins, uncond]                patched, twins marked
    batched+fork  [cond, twins, uncond]                patched, prefix before the first PAG layer on 2B rows
    separate      [cond, uncond] + [cond]              second call patched, all rows marked
    pag-only      [cond, twins] (CFG 1)                patched
    pag-only+fork [cond, twins] (CFG 1)                patched and forked

Defaults (CPU, reduced widths, real SD1.5 / SDXL block layouts) finish in well under 3 minutes on
2 cores. On a GPU: ``--device cuda --fp16 --full-sdxl`` (SDXL at its real sizes, random weights;
``--full-sd15`` likewise). The last line is ``RATIO fork=… batched=… separate=…`` for the first
``--layers`` setting (default ``mid``) of the last model run (default: the SDXL layout).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from lib_pag import AttentionPatch, RowMarks, build_catalog, resolve_layers  # noqa: E402
from lib_pag.fork import first_perturbed_stage, forking, register_original_forward  # noqa: E402
from lib_pag.rows import perturbed_mask  # noqa: E402

CONFIGS = ("cfg", "batched", "batched+fork", "separate", "pag-only", "pag-only+fork")


# --- models ---------------------------------------------------------------------------------------

def build_sd15(args, device, dtype):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from unets import randomize_zero_init

    full = args.full_sd15
    torch.manual_seed(0)
    unet = UNetModel(
        image_size=64, in_channels=4, out_channels=4, model_channels=320 if full else args.channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
        use_spatial_transformer=True, transformer_depth=1, context_dim=768 if full else args.context_dim, legacy=False,
    )
    randomize_zero_init(unet)
    unet = unet.to(device=device, dtype=dtype).eval()
    unet.dtype = dtype  # what A1111 sets (ldm casts x to it)
    latent = 64 if full else args.latent
    return unet, latent, 77, (768 if full else args.context_dim), None


def build_sdxl(args, device, dtype):
    from tests.doubles import sgm_unet

    register_original_forward(sgm_unet.UNetModel.forward, "sgm")
    if args.full_sdxl:
        unet = sgm_unet.make_sdxl_base(tiny=False, device=device, dtype=dtype)
        return unet.eval(), 128, 77, 2048, 2816
    unet = sgm_unet.make_sdxl_base(tiny=False, model_channels=args.channels, num_head_channels=32,
                                   context_dim=args.context_dim, adm_in_channels=256, device=device, dtype=dtype)
    return unet.eval(), args.latent, 77, args.context_dim, 256


# --- one step per configuration -------------------------------------------------------------------

def make_inputs(batch, latent, tokens, ctx_dim, adm, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cond = {"x": rnd(batch, 4, latent, latent), "t": torch.full((batch,), 500.0, device=device),
            "context": rnd(batch, tokens, ctx_dim)}
    uncond = {"x": cond["x"], "t": cond["t"], "context": rnd(batch, tokens, ctx_dim)}
    if adm:
        cond["y"], uncond["y"] = rnd(batch, adm), rnd(batch, adm)
    return cond, uncond


def rows(*parts):
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def call(unet, inputs):
    return unet(inputs["x"], inputs["t"], context=inputs["context"], **({"y": inputs["y"]} if "y" in inputs else {}))


def step_fns(unet, selection, cond, uncond, batch):
    marks = RowMarks()
    cfg_in = rows(cond, uncond)
    twin_in = rows(cond, cond, uncond)
    pag_in = rows(cond, cond)
    twin_mask = perturbed_mask(batch, batch)
    pag_mask = perturbed_mask(batch, 0)
    all_mask = torch.ones(batch, dtype=torch.bool)

    def patched(inputs, mask, fork=False):
        with ExitStack() as stack:
            stack.enter_context(AttentionPatch(unet, selection, marks=marks))
            stack.enter_context(marks.marking(mask))
            if fork:
                point = stack.enter_context(forking(unet, selection, mask))
                if point is None:
                    raise SystemExit(f"fork is off for layers {selection.names[:3]}…: pick mid/up layers")
            return call(unet, inputs)

    return {
        "cfg": lambda: call(unet, cfg_in),
        "batched": lambda: patched(twin_in, twin_mask),
        "batched+fork": lambda: patched(twin_in, twin_mask, fork=True),
        "separate": lambda: (call(unet, cfg_in), patched(cond, all_mask)),
        "pag-only": lambda: patched(pag_in, pag_mask),
        "pag-only+fork": lambda: patched(pag_in, pag_mask, fork=True),
    }


# --- measuring ------------------------------------------------------------------------------------

class RssSampler:
    """Peak resident memory above the level at start, sampled every ~0.5 ms from /proc (Linux)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self.libc = None

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def measure(self, fn):
        if not self.available:
            fn()
            return None
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        base = peak = self.rss()
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self.rss())
                time.sleep(0.0005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak, self.rss()) - base


    @contextmanager
    def exact_rss(self):
        """glibc keeps freed blocks; a fixed 64 KiB mmap threshold makes RSS follow the live tensors.

        Afterwards the thresholds go to what glibc's dynamic threshold settles at for big tensors
        (32 MiB mmap, 64 MiB trim), so later timings are not slowed by page faults.
        """
        libc = None
        if self.available:
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
                libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)
                libc.malloc_trim(0)
            except (OSError, AttributeError):
                libc = None
        self.libc = libc
        try:
            yield
        finally:
            self.libc = None
            if libc is not None:
                libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
                libc.mallopt(M_TRIM_THRESHOLD, 64 * 2 ** 20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def peak_memory(fn, device, sampler):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return sampler.measure(fn)


def bench_model(name, unet, latent, tokens, ctx_dim, adm, args, device, dtype, sampler):
    catalog = build_catalog(unet)
    cond, uncond = make_inputs(args.batch, latent, tokens, ctx_dim, adm, device, dtype)
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext()
    results = []
    for spec in args.layers:
        selection = resolve_layers(spec, catalog)
        point = first_perturbed_stage(selection)
        fns = step_fns(unet, selection, cond, uncond, args.batch)
        names = [c for c in CONFIGS if point is not None or "fork" not in c]

        clock = time.process_time if args.clock == "cpu" else time.perf_counter

        def timed(fn):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return clock() - t0

        times = {c: [] for c in names}
        memory = {}
        with torch.inference_mode(), autocast:
            check = (fns["batched"](), fns["batched+fork"]()) if point is not None else None
            for c in names:  # warm-up
                fns[c]()
            for _ in range(args.repeats):  # round-robin, so drift hits every configuration alike
                for c in names:
                    times[c].append(timed(fns[c]))
            with sampler.exact_rss():  # after the timings: it slows allocation down
                for c in names:
                    memory[c] = peak_memory(fns[c], device, sampler)
        err = None
        if check is not None:
            a, b = (t.float() for t in check)
            err = float((a - b).abs().max()) / max(1.0, float(a.abs().max()))
        results.append((name, spec, point, {c: statistics.median(v) for c, v in times.items()}, memory, err))
    return results


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp16", action="store_true", help="half precision (autocast on CUDA, like A1111)")
    ap.add_argument("--full-sdxl", action="store_true", help="SDXL at its real sizes (320 ch, 2048 ctx, 128² latent)")
    ap.add_argument("--full-sd15", action="store_true", help="SD1.5 at its real sizes (320 ch, 768 ctx, 64² latent)")
    ap.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    ap.add_argument("--layers", nargs="+", default=["mid"], help="PAG layer specs to time (first one gives RATIO)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (cond rows)")
    ap.add_argument("--channels", type=int, default=64, help="model_channels of the reduced models")
    ap.add_argument("--context-dim", type=int, default=256, help="text-embedding width of the reduced models")
    ap.add_argument("--latent", type=int, default=32, help="latent side of the reduced models")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 7 CPU, 20 GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on shared cores, multi-threaded ops stall on a busy core)")
    ap.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                    help="cpu: process CPU time, immune to other processes on shared cores (auto on CPU); "
                         "wall: perf_counter with cuda.synchronize (auto on CUDA)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.fp16 and device.type != "cuda":
        ap.error("--fp16 needs --device cuda (the UNets run fp16 under autocast, as in A1111)")
    dtype = torch.float16 if args.fp16 else torch.float32
    torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "wall" if device.type == "cuda" or args.threads != 1 else "cpu"
    if args.repeats is None:
        args.repeats = 20 if device.type == "cuda" else 7
    sampler = RssSampler()
    mem_note = ("torch.cuda.max_memory_allocated above the weights and inputs" if device.type == "cuda" else
                "peak RSS above the level before the step, sampled from /proc every 0.5 ms, glibc set to unmap "
                "freed tensors at once" if sampler.available else "n/a (no /proc)")
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {dtype}, "
          f"threads {torch.get_num_threads()}, batch {args.batch} image(s), {args.repeats} timed steps each, "
          f"{'process CPU' if args.clock == 'cpu' else 'wall-clock'} time")
    print(f"memory: {mem_note}")

    builders = {"sd15": build_sd15, "sdxl": build_sdxl}
    everything = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        unet, latent, tokens, ctx_dim, adm = builders[name](args, device, dtype)
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        full = args.full_sdxl if name == "sdxl" else args.full_sd15
        label = f"{name}{'' if full else '-shaped'} ({params:.0f}M params, model_channels {unet.model_channels}, latent {latent}²)"
        results = bench_model(label, unet, latent, tokens, ctx_dim, adm, args, device, dtype, sampler)
        everything += results
        print_table(results)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        del unet
        gc.collect()

    first = [r for r in everything if r[1] == args.layers[0] and r[2] is not None]
    if not first:
        print("RATIO fork=n/a batched=n/a separate=n/a")
        return
    _, _, _, times, _, _ = first[-1]
    cfg = times["cfg"]
    print(f"RATIO fork={times['batched+fork'] / cfg:.2f} batched={times['batched'] / cfg:.2f} "
          f"separate={times['separate'] / cfg:.2f}")


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2 ** 20:8.1f} MiB"


def print_table(results):
    for name, spec, point, times, memory, err in results:
        print()
        print(f"{name}, PAG layers {spec!r}, fork before {point if point is not None else '— (off)'}")
        print(f"  {'configuration':<15}{'median step':>14}{'× CFG':>8}{'peak memory':>16}")
        cfg = times["cfg"]
        for c, t in times.items():
            print(f"  {c:<15}{t * 1e3:>11.1f} ms{t / cfg:>8.2f}{fmt_mem(memory.get(c)):>16}")
        if err is not None:
            print(f"  fork vs batched: max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
