"""No host–device synchronisation inside a UNet call, on every host path (issue 17).

On a GPU, every operation whose result the host must read (``.item()``, ``bool()``, ``nonzero()``, a
boolean-mask index, ``torch.equal``) or that copies host data to the device makes the host wait for the
device, so kernel launches stop running ahead of the GPU. Two independent checks, both on the CPU:

- ``SyncGuard``, a ``TorchDispatchMode`` switched on only while the UNet runs (forward pre-hook to
  forward hook), fails on every data-dependent operation and records host→device copies and tensors
  made from host data; the UNet's own code is measured the same way (a plain call) and PAG may add
  nothing to it. It runs the real ldm UNet (SD1.5) and the sgm double (SDXL) directly, and whole jobs
  through the A1111 1.10 double and the Forge 2 / reForge doubles — batched, forked and separate, every
  perturbation method and per-layer strengths < 1;
- the same direct calls on the ``meta`` device, where data-dependent operations cannot run at all.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lib_pag import AttentionPatch, Perturbation, RowMarks, build_catalog, resolve_layers
from lib_pag.fork import forking, register_original_forward
from lib_pag.layout import RowLayout
from unets import sd15_unet, sdxl_unet, unet_inputs

aten = torch.ops.aten
DATA_DEPENDENT = {"_local_scalar_dense", "is_nonzero", "nonzero", "argwhere", "equal", "masked_select", "masked_scatter",
                  "_unique", "_unique2", "unique_dim", "unique_consecutive", "item"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}  # torch.tensor(python data): a host→device copy on a GPU


class SyncGuard(TorchDispatchMode):
    """Records every operation that would make the host wait for the device, while ``armed``."""

    def __init__(self):
        super().__init__()
        self.armed = 0
        self.calls = 0  # UNet calls seen
        self.syncs: list[str] = []
        self.host_data = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed:
            name = func.overloadpacket.__name__
            if name in DATA_DEPENDENT:
                self.syncs.append(str(func))
            elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                    self.syncs.append(f"{func} with a boolean mask")
            elif name == "repeat_interleave" and "Tensor" in func._overloadname:
                self.syncs.append(f"{func} (the output size depends on data)")
            elif name in HOST_DATA:
                self.host_data[str(func)] += 1
            elif name in ("_to_copy", "copy_"):
                src = args[1] if name == "copy_" else args[0]
                dst = args[0].device if name == "copy_" else kwargs.get("device")
                if torch.is_tensor(src) and src.device.type == "cpu" and dst is not None and torch.device(dst).type != "cpu":
                    self.syncs.append(f"{func}: a host→device copy")
        return func(*args, **kwargs)

    def arm_inside(self, unet: torch.nn.Module):
        """Armed exactly while ``unet`` runs (nested calls counted)."""
        def enter(*_):
            self.armed += 1
            self.calls += 1

        def leave(*_):
            self.armed -= 1

        return [unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave, always_call=True)]


@pytest.fixture(scope="module", autouse=True)
def sgm_double_is_known():
    from tests.doubles import sgm_unet

    register_original_forward(sgm_unet.UNetModel.forward, "sgm")


@pytest.fixture(scope="module")
def sd15():
    return sd15_unet(seed=31)


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_unet("base", seed=32)


# [cond ×2, their twins, uncond ×2]; draw keys for the twins (image seeds), as the adapters build them
LAYOUT = RowLayout((0, 0, 1, 1, 0, 0), (0, 1, 0, 1, 4, 5), (None, None, (40, 0, 1), (41, 0, 1), None, None))
CASES = [("identity", "mid,up"), ("identity", "m0:0.5,u0-u2"), ("blur", "mid"), ("noise", "up"),
         ("identity", "d1,mid")]


def twin_batch(unet, device="cpu"):
    x, t, kw = unet_inputs(unet, batch=4)
    t = torch.tensor([700, 300, 700, 300])

    def lay(v):
        return torch.cat([v[:2], v[:2], v[2:]]).to(device)

    return lay(x), lay(t), {k: lay(v) for k, v in kw.items()}


def call(unet, spec, method, inputs, *, fork: bool, layout=LAYOUT):
    x, t, kw = inputs
    selection = resolve_layers(spec, build_catalog(unet))
    marks = RowMarks()
    perturbation = Perturbation(method, blur_sigma=2.0)
    with torch.no_grad(), AttentionPatch(unet, selection, perturbation, marks) as patch, \
            marks.marking(layout, (0, 3)):
        if fork:
            with forking(unet, selection, layout) as point:
                assert point is not None
                out = unet(x, t, **kw)
        else:
            out = unet(x, t, **kw)
    assert patch.perturbed_calls > 0
    return out


def guarded(unet, fn):
    guard = SyncGuard()
    handles = guard.arm_inside(unet)
    try:
        with guard:
            fn()
    finally:
        for h in handles:
            h.remove()
    assert guard.calls > 0, "the guard never saw the UNet run"
    return guard


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("method,spec", CASES)
@pytest.mark.parametrize("fork", [False, True], ids=["batched", "forked"])
def test_a_patched_unet_call_reads_nothing_back_from_the_device(model, method, spec, fork, request):
    unet = request.getfixturevalue(model)
    inputs = twin_batch(unet)
    with torch.no_grad():
        plain = guarded(unet, lambda: unet(inputs[0], inputs[1], **inputs[2]))
    call(unet, spec, method, inputs, fork=fork)  # the first call with a layout may build its indices
    guard = guarded(unet, lambda: call(unet, spec, method, inputs, fork=fork))
    assert guard.syncs == plain.syncs == [], guard.syncs
    assert guard.host_data == plain.host_data, guard.host_data


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("method,spec", CASES)
def test_the_same_calls_run_on_the_meta_device(model, method, spec, request):
    """``meta`` tensors have no data: any operation that reads it fails."""
    import copy

    unet = copy.deepcopy(request.getfixturevalue(model)).to("meta")
    inputs = twin_batch(unet, "meta")
    for fork in (False, True):
        out = call(unet, spec, method, inputs, fork=fork)
        assert out.device.type == "meta" and out.shape == inputs[0].shape


def test_interleaved_rows_use_a_cached_index(sd15):
    """hypertile-style attention batches (each row split into sub-rows next to each other) are too fragmented
    for views: one index, made on the first call, then reused."""
    spec, inputs = "u0", twin_batch(sd15)
    selection = resolve_layers(spec, build_catalog(sd15))
    attn = sd15.get_submodule(selection.paths[0])
    marks = RowMarks()
    with AttentionPatch(sd15, selection, marks=marks):
        pag_forward = attn.forward

        def tiling_after(x, *args, **kwargs):
            b, n, c = x.shape
            return pag_forward(x.reshape(b * 4, n // 4, c), *args, **kwargs).reshape(b, n, c)

        attn.forward = tiling_after
        try:
            with torch.no_grad(), marks.marking(LAYOUT):
                sd15(inputs[0], inputs[1], **inputs[2])
                guard = guarded(sd15, lambda: sd15(inputs[0], inputs[1], **inputs[2]))
        finally:
            attn.forward = pag_forward
    assert guard.syncs == [] and not guard.host_data


def test_the_guard_catches_what_the_old_hot_path_did(sd15):
    """The guard is not blind: boolean-mask indexing, ``bool()`` and a fresh index per call are caught."""
    x = torch.randn(6, 4, 8)
    rows = torch.tensor([False, False, True, True, False, False])
    guard = SyncGuard()
    guard.armed = 1
    with guard:
        x[rows]
        bool(rows.all())
        out = x.clone()
        out[rows] = 0.0
        torch.tensor([2, 3])
    assert len(guard.syncs) == 3 and guard.host_data


# --- whole jobs through the host doubles ----------------------------------------------------------------

A1111_JOBS = [
    {"enabled": True},
    {"enabled": True, "layers": "m0:0.5,u0-u3", "rescale": 0.5},
    {"enabled": True, "method": "blur"},
    {"enabled": True, "method": "noise"},
    {"enabled": True, "mode": "separate"},
    {"enabled": True, "layers": "d1,mid"},
]


@pytest.mark.parametrize("values", A1111_JOBS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v if k != "enabled") or "default")
def test_a1111_jobs_make_no_sync_inside_unet_calls(values):
    from a1111_harness import load_webui, txt2img, unload_webui
    from modules import processing, sd_models_double

    model = sd_models_double.make_sd15_model(seed=7)
    unet = model.model.diffusion_model
    load_webui(model)
    try:
        baseline = guarded(unet, lambda: processing.process_images(txt2img([False], steps=3, batch_size=2)))
        guard = guarded(unet, lambda: processing.process_images(txt2img([values], steps=3, batch_size=2)))
    finally:
        unload_webui()
    assert guard.syncs == baseline.syncs == [], guard.syncs
    assert sum(guard.host_data.values()) <= sum(baseline.host_data.values()) + 2, (guard.host_data, baseline.host_data)


@pytest.mark.parametrize("values", [{"layers": "mid,up"}, {"layers": "m0:0.5,u0-u3", "method": "noise"},
                                    {"layers": "mid,up", "mode": "separate"}, {"layers": "d1,up", "method": "blur"}],
                         ids=["fork", "strength-noise", "separate", "blur-input-fork"])
def test_forge_jobs_make_no_sync_inside_unet_calls(values):
    from lib_pag.params import PagParams
    from tests.test_forge import hosted, run

    failures = []
    for kind in ("forge2", "reforge"):
        with hosted(kind, sd15_unet(seed=3)) as host:
            params = PagParams(enabled=True, scale=3.0, **values)
            diffusion_model = host.patcher.model.diffusion_model  # the host's UNet class over the ldm modules
            plain = guarded(diffusion_model, lambda: run(host, PagParams(), batch=2))
            guard = guarded(diffusion_model, lambda: run(host, params, batch=2))
            assert guard.armed == 0 and host.unet is not diffusion_model
            if guard.syncs != plain.syncs:
                failures.append((kind, guard.syncs, plain.syncs))
            if sum(guard.host_data.values()) > sum(plain.host_data.values()) + 2:
                failures.append((kind, guard.host_data, plain.host_data))
    assert not failures, failures


def test_a1111_pag_reads_the_device_at_most_once_per_step_outside_the_unet():
    """Outside the UNet calls PAG reads the device once per step (the fork's deferred input check) and once
    per pass (the sampler's schedule, to count its model calls); the sigma is read only with a sigma window."""
    from a1111_harness import load_webui, txt2img, unload_webui
    from modules import processing, sd_models_double

    model = sd_models_double.make_sd15_model(seed=7)
    load_webui(model)
    counts = {}
    try:
        for name, values in (("plain", [False]), ("pag", [{"enabled": True}]),
                             ("sigma window", [{"enabled": True, "sigma_start": 50.0}])):
            guard = SyncGuard()
            guard.armed = 1
            with guard:
                processing.process_images(txt2img(values, steps=5, batch_size=2))
            counts[name] = len(guard.syncs)
    finally:
        unload_webui()
    # 5 steps: one deferred check each; once per pass: the host's get_sigmas (which itself reads the model's
    # sigma range) and one read of the schedule it returns
    assert counts["pag"] - counts["plain"] <= 5 + 3, counts
    assert counts["sigma window"] - counts["pag"] <= 5, counts
