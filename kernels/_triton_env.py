"""Whether Triton kernels can run on a device, and why not: one answer for every fused op."""
from __future__ import annotations

import contextlib
import os
from typing import Tuple

import torch


def on_device(t: torch.Tensor):
    """A context for one launch: Triton launches on the *current* CUDA device and its current stream, not on
    the tensors' device, so a tensor on ``cuda:1`` while ``cuda:0`` is current would be read through the wrong
    device. Makes ``t``'s device current (a no-op when it already is, and off CUDA)."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def device_status(device, import_error: str, interpret: bool, module: str) -> Tuple[bool, str]:
    """``(available, reason)`` for the kernels of ``module`` on ``device``.

    ``import_error`` is why ``import triton`` failed (empty when it worked);
    ``interpret`` whether ``TRITON_INTERPRET`` was set when ``module`` was
    imported (triton reads it when a kernel is decorated, so a later value
    does not count). True on a CUDA device, and on the CPU under the
    interpreter only."""
    if import_error:
        return False, f"triton cannot be imported ({import_error})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch"
        return True, ""
    if device.type == "cpu":
        if interpret:
            return True, ""
        why = "Triton kernels run on CUDA devices; on the CPU only under TRITON_INTERPRET=1"
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            why += f" set before {module} is imported (it was set too late)"
        return False, why
    return False, f"Triton kernels do not run on {device.type} devices"
