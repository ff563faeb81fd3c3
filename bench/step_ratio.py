"""Cost of one sampler step with PAG, relative to plain CFG: batched twins, the shared-prefix fork, separate pass.

Two paths (``--path``), both interleaved round-robin in one process and reported as medians:

``extension`` (default): the real extension code path. Each configuration is a real txt2img job on the
A1111 1.10 double (``tests/webui``) with ``scripts/pag.py`` loaded like the host loads it, the model a
``TinyLatentDiffusion`` around the real ldm ``UNetModel`` (SD1.5 layout) or the sgm double (SDXL
layout). ``process_images`` runs the script hooks, the conds and the k-diffusion sampler; the sampling
function is replaced by one that parks the job at its first step, so every configuration stays alive
at once and a timed step is one denoiser call ``sampler.model_wrap_cfg(x, sigma, cond=…, uncond=…,
cond_scale=…, s_min_uncond=0, image_cond=…)`` exactly as k-diffusion makes it: ``CFGDenoiser.forward``,
the extension's CFG callbacks and inner-model wrapper (``AttentionPatch``, ``lib_pag.fork``), the
k-diffusion ``CompVisDenoiser`` and the UNet.

    cfg           PAG off                               UNet [cond, uncond]
    batched       PAG on, SD_WEBUI_PAG_NO_FORK=1        UNet [cond, twins, uncond]
    batched+fork  PAG on (the default)                  the same, prefix before the first PAG layer on 2B rows
    separate      PAG on, mode "separate"               UNet [cond, uncond] + [cond]
    pag-only      PAG on, CFG 1, SD_WEBUI_PAG_NO_FORK=1 UNet [cond, twins] (twins in the uncond slot)
    pag-only+fork PAG on, CFG 1                         the same, forked

``unet``: the UNet calls alone, built with the extension's row layouts, the real ``AttentionPatch``/
``RowMarks`` and ``lib_pag.fork`` (no WebUI, no sampler).

``forge2`` / ``reforge``: one denoiser step of real jobs on the Forge 2 / reForge doubles
(``tests/forge_double``): ``lib_pag.forge.apply`` installs PAG on a clone of the host's UNet patcher as
``process_before_every_sampling`` does, the step runs the host's sampling function, patcher, UNet class
(its forward mirrored over the same UNet's modules) and attention; configurations cfg, batched
(``SD_WEBUI_PAG_NO_FORK=1``), batched+fork (``lib_pag.forge_fork``), separate. ``--path`` takes a comma
list, e.g. ``extension,forge2,reforge`` times the three hosts on the same UNet in one run and prints a
``RATIO[<path>]`` line for each.

Defaults (CPU, reduced widths, real SD1.5 / SDXL block layouts) finish in under 3 minutes on 2 cores.
On a GPU: ``--device cuda --fp16 --full-sdxl`` (SDXL at its real sizes, random weights; ``--full-sd15``
likewise). ``--dry-run`` builds every model and configuration with tiny widths and runs one step of
each (on the CPU when CUDA is missing), to check a flag combination without the hardware. The last
line is ``RATIO fork=… batched=… separate=…`` for the first ``--layers`` setting (default ``mid``) of
the last model run (default: the SDXL layout).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import queue
import statistics
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from lib_pag import AttentionPatch, Perturbation, RowMarks, build_catalog, resolve_layers  # noqa: E402
from lib_pag.patch import Branch  # noqa: E402
from lib_pag.fork import DISABLE_ENV, first_perturbed_stage, forking, register_original_forward  # noqa: E402
from lib_pag.forge_fork import fork_point  # noqa: E402
from lib_pag.layout import RowLayout  # noqa: E402

CONFIGS = ("cfg", "batched", "batched+fork", "separate", "pag-only", "pag-only+fork", "pag+seg+tpg", "pag+seg+tpg separate")
# the three-guidance job: PAG on the given layers, SEG (σ = ∞, the official default) on mid, TPG on the paper's
# SDXL down transformers (SD1.5 has no d2.2-9: its deepest down blocks d4, d5 instead)
TPG_LAYERS = {"sdxl": "d2.2-9,d3", "sd15": "d4,d5"}


def three_guidances(model: str) -> list:
    return [{"method": "seg", "scale": 3.0, "layers": "mid", "blur_sigma": float("inf")},
            {"method": "tpg", "scale": 3.0, "layers": TPG_LAYERS[model]}]
PATHS = {
    "extension": "extension: one denoiser step (CFGDenoiser + scripts/pag.py + k-diffusion wrapper + UNet) of real "
                 "txt2img jobs on the A1111 1.10 double",
    "unet": "unet: the UNet calls of one step, extension row layouts + AttentionPatch + lib_pag.fork",
    "forge2": "forge2: one denoiser step (sampling function + patcher + lib_pag.forge + UNet) on the Forge 2 double",
    "reforge": "reforge: one denoiser step (sampling function + patcher + lib_pag.forge + UNet) on the reForge double",
}


@dataclass
class Result:
    """One table: a path, a model, a layer setting; median step time per configuration."""

    path: str
    model: str
    spec: str
    point: object  # where the fork joins (None: off)
    times: dict  # configuration -> median seconds
    memory: dict  # configuration -> peak bytes (or None)
    err: float | None  # fork vs unforked output, max relative difference
    extra: dict | None = None  # rows per UNet call, PAG vs CFG difference
    spread: dict | None = None  # configuration -> (25th, 75th percentile) seconds


class Clock:
    """Times one step. ``cpu``: process CPU time (immune to other processes on shared cores); ``wall``:
    perf_counter with the device synchronised around the step; ``cuda``: CUDA events recorded around the
    step on an idle device (``synchronize`` first), i.e. the device-side time from the step's first kernel
    to its last, gaps where the host fell behind included — what a GPU user waits."""

    def __init__(self, kind: str, device: torch.device):
        self.kind, self.device = kind, device

    def time(self, fn):
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        if self.kind == "wall":
            sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            return time.perf_counter() - t0, out
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out


def medians(samples: dict) -> tuple[dict, dict]:
    """(median, (25th, 75th percentile)) per configuration."""
    med, spread = {}, {}
    for c, v in samples.items():
        v = sorted(v)
        med[c] = statistics.median(v)
        q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
        spread[c] = (q[0], q[2])
    return med, spread


# --- models ---------------------------------------------------------------------------------------

@dataclass
class Sizes:
    channels: int
    context_dim: int
    adm: int | None
    latent: int
    tokens: int
    full: bool  # the model's real sizes


def model_sizes(name, args) -> Sizes:
    sdxl = name == "sdxl"
    full = args.full_sdxl if sdxl else args.full_sd15
    if args.dry_run:
        return Sizes(32, 32, 32 if sdxl else None, 8, 4, False)
    if full:
        return Sizes(320, 2048, 2816, 128, 77, True) if sdxl else Sizes(320, 768, None, 64, 77, True)
    return Sizes(args.channels, args.context_dim, 256 if sdxl else None, args.latent, args.tokens, False)


def build_sd15(sizes, device, dtype):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from unets import randomize_zero_init

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=64, in_channels=4, out_channels=4, model_channels=sizes.channels,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
        use_spatial_transformer=True, transformer_depth=1, context_dim=sizes.context_dim, legacy=False,
    )
    randomize_zero_init(unet)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    unet.dtype = dtype  # what A1111 sets (ldm casts x to it)
    return unet


def build_sdxl(sizes, device, dtype):
    from tests.doubles import sgm_unet

    register_original_forward(sgm_unet.UNetModel.forward, "sgm")
    if sizes.full:
        unet = sgm_unet.make_sdxl_base(tiny=False, device=device, dtype=dtype)
    else:
        unet = sgm_unet.make_sdxl_base(tiny=False, model_channels=sizes.channels, num_head_channels=32,
                                       context_dim=sizes.context_dim, adm_in_channels=sizes.adm, device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl}


# --- unet path: one step per configuration, the UNet calls alone ------------------------------------

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


def twin_layout(batch, rest):
    """The extension's layout: ``batch`` cond rows, their twins, ``rest`` more plain rows."""
    return RowLayout((0,) * batch + (1,) * batch + (0,) * rest,
                     tuple(range(batch)) * 2 + tuple(range(2 * batch, 2 * batch + rest)))


def step_fns(unet, selection, cond, uncond, batch, model="sdxl"):
    marks = RowMarks()
    cfg_in = rows(cond, uncond)
    twin_in = rows(cond, cond, uncond)
    pag_in = rows(cond, cond)
    twin_mask = twin_layout(batch, batch)
    pag_mask = twin_layout(batch, 0)
    all_mask = RowLayout((1,) * batch)

    def patched(inputs, mask, fork=False):
        with ExitStack() as stack:
            stack.enter_context(AttentionPatch(unet, selection, marks=marks))
            stack.enter_context(marks.marking(mask))
            if fork:
                point = stack.enter_context(forking(unet, selection, mask))
                if point is None:
                    raise SystemExit(f"the fork is off for layers {selection.names[:3]}…")
            return call(unet, inputs)

    # three guidances: PAG (1), SEG (2), TPG (3): their twins in one call, each joining at its own point
    catalog = selection.catalog
    extra = three_guidances(model)
    selections = {1: selection, 2: resolve_layers(extra[0]["layers"], catalog), 3: resolve_layers(extra[1]["layers"], catalog)}
    branches = [Branch(1, selection, Perturbation()),
                Branch(2, selections[2], Perturbation("seg", blur_sigma=extra[0]["blur_sigma"])),
                Branch(3, selections[3], Perturbation("tpg"))]
    three_in = rows(cond, cond, cond, cond, uncond)
    three_layout = RowLayout((0,) * batch + tuple(label for label in (1, 2, 3) for _ in range(batch)) + (0,) * batch,
                             tuple(range(batch)) * 4 + tuple(range(4 * batch, 5 * batch)),
                             (None,) * batch + tuple((i, label) for label in (1, 2, 3) for i in range(batch)) + (None,) * batch)

    def three(inputs, layout, fork=True):
        with ExitStack() as stack:
            stack.enter_context(AttentionPatch(unet, branches=branches, marks=marks))
            stack.enter_context(marks.marking(layout, (0, 0)))
            if fork:
                stack.enter_context(forking(unet, selections, layout, marks=marks))
            return call(unet, inputs)

    def three_separate():
        call(unet, cfg_in)
        for label in (1, 2, 3):
            three(cond, RowLayout((label,) * batch, None, tuple((i, label) for i in range(batch))), fork=False)

    return {
        "cfg": lambda: call(unet, cfg_in),
        "batched": lambda: patched(twin_in, twin_mask),
        "batched+fork": lambda: patched(twin_in, twin_mask, fork=True),
        "separate": lambda: (call(unet, cfg_in), patched(cond, all_mask)),
        "pag-only": lambda: patched(pag_in, pag_mask),
        "pag-only+fork": lambda: patched(pag_in, pag_mask, fork=True),
        "pag+seg+tpg": lambda: three(three_in, three_layout),
        "pag+seg+tpg separate": three_separate,
    }


def model_key(label: str) -> str:
    """``sdxl`` or ``sd15`` from a table's model label."""
    return "sdxl" if label.startswith("sdxl") else "sd15"


# --- extension path: one denoiser step of a real txt2img job per configuration ------------------------

EXTENSION_CONFIGS = {  # name: (PAG enabled, PAG mode, CFG scale 1, fork switched off, three guidances)
    "cfg": (False, "batched", False, False, False),
    "batched": (True, "batched", False, True, False),
    "batched+fork": (True, "batched", False, False, False),
    "separate": (True, "separate", False, False, False),
    "pag-only": (True, "batched", True, True, False),
    "pag-only+fork": (True, "batched", True, False, False),
    "pag+seg+tpg": (True, "batched", False, False, True),
    "pag+seg+tpg separate": (True, "separate", False, False, True),
}


def import_webui(device, dtype):
    """The WebUI double and the harness, with ``devices`` set as A1111 sets them for this device/dtype."""
    if device.type == "cuda":
        os.environ["WEBUI_DOUBLE_DEVICE"] = str(device)  # read when modules.devices is imported
    import a1111_harness  # puts tests/webui on sys.path
    from modules import devices

    devices.device = device
    devices.dtype = devices.dtype_unet = dtype  # fp16: devices.autocast() is torch.autocast, as in A1111
    return a1111_harness


def wrap_model(name, unet, sizes, device):
    """What ``make_sd15_model`` / ``make_sdxl_model`` build, with ``sizes.tokens`` tokens per prompt chunk
    (the factories fix the tests' 4; CLIP gives 77) and the real or reduced widths."""
    from modules.sd_models_double import TinyLatentDiffusion

    if name == "sdxl":
        model = TinyLatentDiffusion(unet, is_sdxl=True, context_dim=sizes.context_dim, adm_in_channels=sizes.adm,
                                    tokens_per_chunk=sizes.tokens, title="bench-sdxl")
    else:
        model = TinyLatentDiffusion(unet, conditioning_key="crossattn", context_dim=sizes.context_dim,
                                    tokens_per_chunk=sizes.tokens, title="bench-sd15")
    return model.to(device).eval().requires_grad_(False)  # the UNet keeps its dtype; the schedule stays fp32


class ParkedJob:
    """One real txt2img job, in its own thread, parked at its first sampler step.

    ``processing.process_images`` runs the script hooks (``process`` starts the PAG job), builds the
    conds and the k-diffusion sampler; the sampler's function (``sample_euler``, replaced while the
    sampler is created) parks there and serves requests: each runs one denoiser step the way
    k-diffusion calls it. ``release`` lets the job finish (``postprocess`` ends the PAG job).
    """

    def __init__(self, name, p, processing, threads, no_fork):
        self.name, self.p, self.processing = name, p, processing
        self.threads, self.no_fork = threads, no_fork
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"job {name}", daemon=True)
        self.denoiser = self.x = self.sigmas = self.extra = None

    def _run(self):
        torch.set_num_threads(self.threads)  # per thread for OpenMP
        try:
            self.processing.process_images(self.p)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.replies.put(("error", err))
        else:
            self.replies.put(("done", None))

    def _sampling(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        self.denoiser, self.x, self.sigmas, self.extra = model, x, sigmas, extra_args
        self.replies.put(("ready", None))
        while True:
            request = self.requests.get()
            if request is None:
                return x
            try:
                self.replies.put(("ok", request()))
            except BaseException as err:  # noqa: BLE001
                self.replies.put(("error", err))

    def _reply(self, expected):
        kind, value = self.replies.get()
        if kind == "error":
            raise RuntimeError(f"{self.name}: the txt2img job failed") from value
        if kind != expected:
            raise RuntimeError(f"{self.name}: job answered {kind!r}, not {expected!r}")
        return value

    def start(self):
        import k_diffusion.sampling

        original = k_diffusion.sampling.sample_euler
        k_diffusion.sampling.sample_euler = self._sampling  # KDiffusionSampler.__init__ looks it up
        try:
            self.thread.start()
            self._reply("ready")
        finally:
            k_diffusion.sampling.sample_euler = original
        return self

    def run(self, fn):
        """``fn()`` in the job's thread, inside its sampler (no_grad, autocast as the host sets them)."""
        self.requests.put(fn)
        return self._reply("ok")

    def step(self):
        """One denoiser call at the first sigma, as ``sample_euler`` makes it (step counter kept at 0)."""
        if self.no_fork:
            os.environ[DISABLE_ENV] = "1"
        else:
            os.environ.pop(DISABLE_ENV, None)
        self.denoiser.step = 0
        sigma = self.sigmas[0] * self.x.new_ones([self.x.shape[0]])
        return self.denoiser(self.x, sigma, **self.extra)

    def release(self):
        if self.thread.is_alive():
            self.requests.put(None)
            self._reply("done")
            self.thread.join()


@contextmanager
def row_probe(unet):
    """Rows of every UNet call made inside the block, and how many of them ran the first input block."""
    calls = []

    def on_unet(module, args):
        calls.append([int(args[0].shape[0]), 0])

    def on_first_block(module, args):
        if calls:
            calls[-1][1] += int(args[0].shape[0])

    # the first input block's conv: every host calls it as a module (reForge runs its blocks as functions)
    hooks = [unet.register_forward_pre_hook(on_unet), unet.input_blocks[0][0].register_forward_pre_hook(on_first_block)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def describe_rows(calls):
    return "+".join(f"{n}" if prefix == n else f"{n} (prefix {prefix})" for n, prefix in calls) or "none"


def bench_model_extension(name, model, sizes, args, device, sampler, harness):
    from modules import processing, shared

    unet = model.model.diffusion_model
    catalog = build_catalog(unet)
    shared.opts.data["batch_cond_uncond"] = True  # the host's default: cond and uncond rows in one UNet call
    harness.load_webui(model, with_xyz=False)
    clock = Clock(args.clock, device)
    results = []
    try:
        for spec in args.layers:
            point = first_perturbed_stage(resolve_layers(spec, catalog))
            names = [c for c in CONFIGS if point is not None or "fork" not in c]
            jobs = {}
            try:
                for c in names:
                    enabled, mode, cfg1, no_fork, three = EXTENSION_CONFIGS[c]
                    values = {"enabled": enabled, "scale": 3.0, "layers": spec, "mode": mode}
                    if three:
                        values["branches"] = three_guidances(model_key(name))
                    p = harness.txt2img([values],
                                        width=8 * sizes.latent, height=8 * sizes.latent, steps=args.steps,
                                        batch_size=args.batch, cfg_scale=1.0 if cfg1 else 5.0, sampler_name="Euler")
                    jobs[c] = ParkedJob(c, p, processing, args.threads, no_fork).start()

                def timed(job):
                    return job.run(lambda: clock.time(job.step))

                layouts, outs = {}, {}
                for c in names:  # warm-up, with the rows of each UNet call recorded
                    with row_probe(unet) as calls:
                        outs[c] = timed(jobs[c])[1]
                    layouts[c] = describe_rows(calls)
                for _ in range(args.warmup - 1):
                    for c in names:
                        timed(jobs[c])
                times = {c: [] for c in names}
                for _ in range(args.repeats):  # round-robin, so drift hits every configuration alike
                    for c in names:
                        times[c].append(timed(jobs[c])[0])
                memory = {}
                with sampler.exact_rss():  # after the timings: it slows allocation down
                    for c in names:
                        memory[c] = peak_memory(lambda job=jobs[c]: job.run(job.step), device, sampler)
            finally:
                for job in jobs.values():
                    job.release()
            err = None
            if point is not None:
                err = max(relative_difference(outs["batched"], outs["batched+fork"]),
                          relative_difference(outs["pag-only"], outs["pag-only+fork"]))
            pag_effect = relative_difference(outs["cfg"], outs["batched"])
            med, spread = medians(times)
            results.append(Result("extension", name, spec, point, med, memory, err,
                                  {"rows": layouts, "pag_effect": pag_effect}, spread))
    finally:
        os.environ.pop(DISABLE_ENV, None)
        harness.unload_webui()
    return results


def relative_difference(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max()) / max(1.0, float(a.abs().max()))


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


def bench_model_unet(name, unet, sizes, args, device, dtype, sampler):
    catalog = build_catalog(unet)
    cond, uncond = make_inputs(args.batch, sizes.latent, sizes.tokens, sizes.context_dim, sizes.adm, device, dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    clock = Clock(args.clock, device)
    results = []
    for spec in args.layers:
        selection = resolve_layers(spec, catalog)
        point = first_perturbed_stage(selection)
        fns = step_fns(unet, selection, cond, uncond, args.batch, model_key(name))
        names = [c for c in CONFIGS if point is not None or "fork" not in c]

        def timed(fn):
            return clock.time(fn)[0]

        times = {c: [] for c in names}
        memory = {}
        with torch.inference_mode(), autocast:
            check = (fns["batched"](), fns["batched+fork"]()) if point is not None else None
            for _ in range(args.warmup):
                for c in names:
                    fns[c]()
            for _ in range(args.repeats):  # round-robin, so drift hits every configuration alike
                for c in names:
                    times[c].append(timed(fns[c]))
            with sampler.exact_rss():  # after the timings: it slows allocation down
                for c in names:
                    memory[c] = peak_memory(fns[c], device, sampler)
        err = relative_difference(*check) if check is not None else None
        med, spread = medians(times)
        results.append(Result("unet", name, spec, point, med, memory, err, None, spread))
    return results


# --- main -----------------------------------------------------------------------------------------


# --- forge2 / reforge paths: denoiser steps through the Forge-family host doubles --------------------

FORGE_CONFIGS = ("cfg", "batched", "batched+fork", "separate", "pag+seg+tpg", "pag+seg+tpg separate")


class SdxlConds(dict):
    """SDXL conds as the WebUI hands them over (``DictWithShape``): indexing with a list of rows slices both."""

    def __getitem__(self, key):
        if isinstance(key, list):
            return SdxlConds({k: v[key] for k, v in self.items()})
        return super().__getitem__(key)


@contextmanager
def forge_host(kind):
    """Put one Forge-family double (``tests/forge_double/<kind>``) on sys.path; PAG detects that host."""
    from lib_pag import forge

    root = str(ROOT / "tests" / "forge_double" / kind)

    def purge():
        for mod in list(sys.modules):
            if mod.split(".")[0] in ("backend", "ldm_patched"):
                del sys.modules[mod]

    purge()
    sys.path.insert(0, root)
    try:
        if forge.detect_host(refresh=True) != kind:
            raise SystemExit(f"could not load the {kind} double from {root}")
        yield forge
    finally:
        sys.path.remove(root)
        purge()
        forge.detect_host(refresh=True)


def bench_model_forge(name, unet, sizes, args, device, dtype, kind):
    """One denoiser step of real jobs on the Forge 2 / reForge double (``tests/forge_double``): ``lib_pag.forge``
    installed by ``apply`` as the host's ``process_before_every_sampling`` does, the host's sampling function,
    patcher, UNet class (its forward mirrored over this UNet's modules) and attention."""
    from lib_pag.params import PagParams

    clock = Clock(args.clock, device)
    results = []
    with forge_host(kind) as forge:
        from tests.forge_double.webui import Forge2Denoiser, Processing, ReForgeDenoiser, SdModel

        if kind == "forge2":
            from backend.modules.k_model import KModel
            from backend.patcher.unet import UnetPatcher

            patcher, denoiser = UnetPatcher(KModel(unet)), Forge2Denoiser
        else:
            from ldm_patched.modules.model_base import BaseModel
            from ldm_patched.modules.model_patcher import ModelPatcher

            patcher, denoiser = ModelPatcher(BaseModel(unet)), ReForgeDenoiser
        host_unet = patcher.model.diffusion_model
        catalog = build_catalog(host_unet)
        g = torch.Generator().manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        b = args.batch
        x = rnd(b, 4, sizes.latent, sizes.latent)
        cond, uncond = rnd(b, sizes.tokens, sizes.context_dim), rnd(b, sizes.tokens, sizes.context_dim)
        if sizes.adm:
            cond, uncond = SdxlConds(crossattn=cond, vector=rnd(b, sizes.adm)), SdxlConds(crossattn=uncond, vector=rnd(b, sizes.adm))
        sigma = torch.full((b,), 2.0, device=device)
        conds_list = [[(i, 1.0)] for i in range(b)]
        try:
            for spec in args.layers:
                os.environ.pop(DISABLE_ENV, None)
                point = fork_point(resolve_layers(spec, catalog))  # Forge's fork splits at block boundaries
                names = [c for c in FORGE_CONFIGS if point is not None or "fork" not in c]
                dens = {}
                for c in names:
                    values = {"enabled": c != "cfg", "scale": 3.0, "layers": spec,
                              "mode": "separate" if c.endswith("separate") else "batched"}
                    if c.startswith("pag+seg+tpg"):
                        values["branches"] = three_guidances(model_key(name))
                    params = PagParams.from_dict(values)
                    if c == "batched":
                        os.environ[DISABLE_ENV] = "1"  # read when the job installs itself
                    else:
                        os.environ.pop(DISABLE_ENV, None)
                    p = Processing(SdModel(patcher), [params.to_dict()], denoiser, steps=args.steps)
                    p.seeds = list(range(b))
                    den = p.sample_pass(lambda pp: forge.apply(pp, pp.script_args))
                    den.total_steps = args.steps
                    dens[c] = den
                os.environ.pop(DISABLE_ENV, None)

                def step(c):
                    den = dens[c]
                    den.step = 0  # the first step of the job each time (and Forge 2 loads this job's patcher)
                    with torch.no_grad():
                        return clock.time(lambda: den(x, sigma, uncond, cond, conds_list, 5.0))

                layouts, outs = {}, {}
                for c in names:  # warm-up, with the rows of each UNet call recorded
                    with row_probe(host_unet) as calls:
                        outs[c] = step(c)[1]
                    layouts[c] = describe_rows(calls)
                for _ in range(args.warmup - 1):
                    for c in names:
                        step(c)
                times = {c: [] for c in names}
                for _ in range(args.repeats):
                    for c in names:
                        times[c].append(step(c)[0])
                err = relative_difference(outs["batched"], outs["batched+fork"]) if point is not None else None
                med, spread = medians(times)
                results.append(Result(kind, f"{name} [{kind} double]", spec, point, med, {}, err,
                                      {"rows": layouts, "pag_effect": relative_difference(outs["cfg"], outs["batched"])},
                                      spread))
        finally:
            os.environ.pop(DISABLE_ENV, None)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="extension",
                    help="comma list: extension (denoiser steps of real txt2img jobs on the A1111 double, default), "
                         "forge2 / reforge (denoiser steps on the Forge 2 / reForge doubles), unet (the UNet calls "
                         "alone); e.g. extension,forge2,reforge times every host side by side")
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
    ap.add_argument("--tokens", type=int, default=77, help="text tokens per prompt of the reduced models")
    ap.add_argument("--steps", type=int, default=20, help="extension path: the jobs' sampling steps (sets the sigma)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 7 CPU, 50 GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration first (default 1 CPU, 5 GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on shared cores, multi-threaded ops stall on a busy core)")
    ap.add_argument("--clock", choices=("auto", "cpu", "wall", "cuda"), default="auto",
                    help="cpu: process CPU time, immune to other processes on shared cores (auto on CPU); "
                         "cuda: CUDA events around each step on an idle device (auto on CUDA); "
                         "wall: perf_counter with cuda.synchronize")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny widths, one timed step: check that a flag combination builds and runs "
                         "(on the CPU when CUDA is missing)")
    args = ap.parse_args(argv)
    paths = [x.strip() for x in args.path.split(",") if x.strip()]
    unknown = [x for x in paths if x not in PATHS]
    if unknown or not paths:
        ap.error(f"--path: {', '.join(unknown) or 'empty'}; allowed: {', '.join(PATHS)}")

    device = torch.device(args.device)
    note = ""
    if args.dry_run and device.type == "cuda" and not torch.cuda.is_available():
        device, note = torch.device("cpu"), " (dry run: no CUDA here, on the CPU instead)"
    if args.fp16 and device.type != "cuda" and not args.dry_run:
        ap.error("--fp16 needs --device cuda (the UNets run fp16 under autocast, as in A1111)")
    dtype = torch.float16 if args.fp16 else torch.float32
    weights = dtype  # the UNet's parameters: fp16 like A1111 with --fp16
    if dtype != torch.float32 and device.type == "cpu":  # a dry run: CPU group_norm wants fp32 parameters
        weights = torch.float32
        note += f"; fp32 weights, autocast to {dtype if paths == ['unet'] else torch.get_autocast_dtype('cpu')} on the CPU"
    torch.set_num_threads(args.threads)
    if args.clock == "auto":
        args.clock = "cuda" if device.type == "cuda" else "wall" if args.threads != 1 else "cpu"
    if args.clock == "cuda" and device.type != "cuda":
        args.clock = "wall"
    if args.repeats is None:
        args.repeats = 1 if args.dry_run else 50 if device.type == "cuda" else 7
    if args.warmup is None:
        args.warmup = 1 if args.dry_run or device.type != "cuda" else 5
    args.warmup = max(args.warmup, 1)
    sampler = RssSampler()
    mem_note = ("torch.cuda.max_memory_allocated above the level before the step" if device.type == "cuda" else
                "peak RSS above the level before the step, sampled from /proc every 0.5 ms, glibc set to unmap "
                "freed tensors at once" if sampler.available else "n/a (no /proc)")
    clocks = {"cpu": "process CPU time", "wall": "wall-clock time", "cuda": "CUDA-event time"}
    print(f"torch {torch.__version__}, device {device}{note}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {dtype}, "
          f"threads {torch.get_num_threads()}, batch {args.batch} image(s), {args.warmup} warm-up + "
          f"{args.repeats} timed steps each, {clocks[args.clock]}")
    for x in paths:
        print(f"path {PATHS[x]}")
    print(f"memory: {mem_note}", flush=True)

    webui = import_webui(device, dtype) if "extension" in paths else None
    saved_env = os.environ.get(DISABLE_ENV)
    everything: list[Result] = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            t0 = time.perf_counter()
            sizes = model_sizes(name, args)
            unet = BUILDERS[name](sizes, device, weights)
            params = sum(p.numel() for p in unet.parameters()) / 1e6
            label = (f"{name}{'' if sizes.full else '-shaped'}{' (dry run)' if args.dry_run else ''} "
                     f"({params:.0f}M params, model_channels {unet.model_channels}, latent {sizes.latent}², "
                     f"{sizes.tokens} tokens)")
            for path in paths:
                t1 = time.perf_counter()
                if path == "extension":
                    model = wrap_model(name, unet, sizes, device)
                    results = bench_model_extension(label, model, sizes, args, device, sampler, webui)
                    del model
                elif path == "unet":
                    results = bench_model_unet(label, unet, sizes, args, device, dtype, sampler)
                else:
                    results = bench_model_forge(label, unet, sizes, args, device, dtype, path)
                everything += results
                print_table(results)  # each path's tables as soon as they are done
                print(f"  ({path}: {time.perf_counter() - t1:.0f} s)", flush=True)
            print_overhead([r for r in everything if r.model == label or r.model.startswith(label + " [")])
            print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
            del unet
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if saved_env is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = saved_env

    first = [r for r in everything if r.spec == args.layers[0] and r.point is not None]
    if len(paths) > 1:  # a side-by-side run: one line per path, then the first path's as RATIO
        for path in paths:
            print(f"RATIO[{path}] {ratio_line([r for r in first if r.path == path])}")
    print(f"RATIO {ratio_line([r for r in first if r.path == paths[0]])}")


def ratio_line(rows):
    if not rows:
        return "fork=n/a batched=n/a separate=n/a"
    times = rows[-1].times
    cfg = times["cfg"]
    line = f"fork={times['batched+fork'] / cfg:.2f} batched={times['batched'] / cfg:.2f} separate={times['separate'] / cfg:.2f}"
    if "pag-only+fork" in times:
        line += f" pag-only={times['pag-only+fork'] / cfg:.2f}"
    if "pag+seg+tpg" in times:
        line += (f" pag+seg+tpg={times['pag+seg+tpg'] / cfg:.2f}"
                 f" pag+seg+tpg-separate={times['pag+seg+tpg separate'] / cfg:.2f}")
    return line


def host_overhead(extension: Result, unet: Result, config: str = "batched+fork") -> float | None:
    """PAG's own host-side cost per step: (extension PAG step − unet PAG step) − (extension CFG step − unet CFG
    step), i.e. what the extension path adds around the same UNet calls for PAG beyond what it adds for CFG
    (the WebUI double's own cost cancels)."""
    if config not in extension.times or config not in unet.times:
        return None
    return (extension.times[config] - unet.times[config]) - (extension.times["cfg"] - unet.times["cfg"])


def print_overhead(results):
    by = {(r.path, r.spec): r for r in results}
    for (path, spec), r in by.items():
        if path != "extension" or ("unet", spec) not in by:
            continue
        for config in ("batched+fork", "batched", "pag-only+fork"):
            value = host_overhead(r, by[("unet", spec)], config)
            if value is not None:
                print(f"  PAG host-side overhead per step ({spec!r}, {config}): {value * 1e3:+.2f} ms "
                      "(extension − unet, PAG minus CFG)")


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2 ** 20:8.1f} MiB"


def print_table(results):
    for r in results:
        print()
        print(f"{r.model}, PAG layers {r.spec!r}, fork before {r.point if r.point is not None else '— (off)'}")
        print(f"  {'configuration':<15}{'median step':>14}{'IQR':>18}{'× CFG':>8}{'peak memory':>16}"
              + ("  rows per UNet call" if r.extra else ""))
        cfg = r.times["cfg"]
        for c, t in r.times.items():
            lo, hi = (r.spread or {}).get(c, (t, t))
            line = f"  {c:<15}{t * 1e3:>11.1f} ms{lo * 1e3:>8.1f}–{hi * 1e3:<7.1f}ms{t / cfg:>6.2f}{fmt_mem(r.memory.get(c)):>16}"
            if r.extra:
                line += f"  {r.extra['rows'][c]}"
            print(line)
        if r.err is not None:
            print(f"  fork vs batched: max relative difference {r.err:.1e}")
        if r.extra:
            print(f"  PAG vs CFG output: max relative difference {r.extra['pag_effect']:.1e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
