"""Double of ``modules/devices.py`` (A1111 1.10): device/dtype globals and autocast helpers.

CPU float32 by default. ``WEBUI_DOUBLE_DEVICE=cuda`` (test-only switch) selects CUDA when available,
for the GPU checks; the dtype stays float32 there too unless a test changes ``dtype``/``dtype_unet``.
"""
from __future__ import annotations

import contextlib
import os

import torch

cpu = torch.device("cpu")
"""Mirrors ``devices.cpu``."""


def get_optimal_device_name():
    """Mirrors ``devices.get_optimal_device_name`` (double: honours ``WEBUI_DOUBLE_DEVICE``)."""
    wanted = os.environ.get("WEBUI_DOUBLE_DEVICE", "cpu")
    if wanted.startswith("cuda") and torch.cuda.is_available():
        return wanted
    return "cpu"


def get_optimal_device():
    """Mirrors ``devices.get_optimal_device``."""
    return torch.device(get_optimal_device_name())


def get_device_for(task):
    """Mirrors ``devices.get_device_for``."""
    return get_optimal_device()


device = get_optimal_device()
"""Mirrors ``devices.device`` (the UNet's device)."""
device_interrogate = device_gfpgan = device_esrgan = device_codeformer = device

dtype = torch.float32
"""Mirrors ``devices.dtype``."""
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False


class NansException(Exception):
    """Mirrors ``devices.NansException``."""


def cond_cast_unet(input):
    """Mirrors ``devices.cond_cast_unet``: cast to the UNet dtype when it needs upcasting."""
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    """Mirrors ``devices.cond_cast_float``."""
    return input.float() if unet_needs_upcast else input


def torch_gc():
    """Mirrors ``devices.torch_gc``: release cached CUDA memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_npu_set_device():
    """Mirrors ``devices.torch_npu_set_device``; no NPU in the double."""


def enable_tf32():
    """Mirrors ``devices.enable_tf32``; a no-op in the double."""


def autocast(disable=False):
    """Mirrors ``devices.autocast``: the host returns a null context for float32 (always here)."""
    if disable or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type)


def without_autocast(disable=False):
    """Mirrors ``devices.without_autocast``."""
    if torch.is_autocast_enabled() and not disable:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def test_for_nans(x, where):
    """Mirrors ``devices.test_for_nans``: raise ``NansException`` only when *every* value is NaN."""
    from modules import shared

    if getattr(shared.cmd_opts, "disable_nan_check", False):
        return
    if x.numel() == 0 or not torch.isnan(x[(0,) * len(x.shape)]).item():
        return
    if not torch.all(torch.isnan(x)).item():
        return
    raise NansException(f"A tensor with all NaNs was produced in {where}.")


def first_time_calculation():
    """Mirrors ``devices.first_time_calculation``; a no-op in the double."""


def randn(seed, shape, generator=None):
    """Mirrors ``devices.randn``: a seeded normal tensor on ``device`` (generated on CPU)."""
    g = torch.Generator(device=cpu).manual_seed(int(seed))
    return torch.randn(shape, generator=g, device=cpu).to(device)


def randn_local(seed, shape):
    """Mirrors ``devices.randn_local``: like ``randn`` without touching the global generator."""
    return randn(seed, shape)


def randn_like(x):
    """Mirrors ``devices.randn_like``."""
    return torch.randn(x.shape, dtype=x.dtype, device=cpu).to(x.device)


def randn_without_seed(shape, generator=None):
    """Mirrors ``devices.randn_without_seed``."""
    return torch.randn(shape, device=cpu, generator=generator).to(device)


def manual_seed(seed):
    """Mirrors ``devices.manual_seed``."""
    torch.manual_seed(int(seed))
