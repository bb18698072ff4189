"""The dtype a synthesizer step computes in (one definition for every backend)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_on", "compute_dtype", "no_autocast"]


def autocast_on(t: Tensor) -> bool:
    """Whether autocast is enabled for ``t``'s device type."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # device types without autocast (meta, ...)
        return False


def compute_dtype(t: Tensor) -> torch.dtype:
    """The autocast dtype under autocast, else ``t``'s own. Autocast leaves
    fp64 alone, and so do we."""
    if t.dtype != torch.float64 and autocast_on(t):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def no_autocast(x: Tensor):
    """Autocast off inside a fused call (its inputs are already in the compute
    dtype); a no-op context when autocast is off, which saves ~2 us a call."""
    return torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext()
