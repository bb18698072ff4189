"""Backend selection: the one place where dni_fast decides how a synthesizer runs.

Names:

* ``reference``: plain PyTorch autograd, the ground truth; runs everywhere.
* ``triton``: fused Triton kernels (CUDA; on the CPU only under ``TRITON_INTERPRET=1``, for tests).
* ``cuda``: the C++/CUDA extension (``dni_fast._C``) on CUDA tensors.
* ``cpp``: the same extension's CPU path: one C++ call per synthesizer step.
* ``auto`` (default): for a ``BasicSynthesizer``, the fastest available backend
  for the device, dtype and shape according to the measured table
  ``dni_fast/_autotable.json`` (written by ``python -m dni_fast bench
  --write-auto-table``); ``reference`` where the table has nothing better.
  It never picks the Triton interpreter.

The global choice comes from ``DNI_FAST_BACKEND``, ``set_backend`` or the
``use_backend`` context manager; an interface's ``backend=`` argument overrides
it. Custom synthesizers (anything but ``BasicSynthesizer``) always run through
autograd, whatever is chosen.
"""
from __future__ import annotations

import json
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "BACKENDS", "BackendUnavailableError", "FusedImpl", "set_backend", "get_backend", "use_backend",
    "available_backends", "backend_status", "resolve",
]

BACKENDS = ("auto", "reference", "triton", "cuda", "cpp")
FUSED_MAX_HIDDEN = 2

_SUPPORTED_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_HOW_TO_GET = {
    "triton": "install Triton (`pip install triton`) and run on a CUDA device "
              "(on the CPU, only for tests, with TRITON_INTERPRET=1 set before dni_fast is imported)",
    "cpp": "build the extension: `CFLAGS=-g0 pip install --no-build-isolation -e .` in the dni_fast checkout",
    "cuda": "build the extension where torch has CUDA: `DNI_FAST_FORCE_CUDA=TRUE pip install --no-build-isolation -e .`",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this synthesizer call."""


@dataclass(frozen=True)
class FusedImpl:
    """The three primitives of a fused backend (signatures: kernels/synth_ref.py)."""

    name: str
    forward: Callable
    update: Callable
    pipelined: Callable
    # Optional: the whole BackwardInterface step in one native call
    # (trigger, x, c, params, stats_slot, inject_into) -> (out, s); see csrc/step.cpp.
    step: Optional[Callable] = None


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown dni_fast backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}")
    return name.lower()


class _Global(threading.local):
    def __init__(self) -> None:
        self.stack: List[str] = []


_global = _Global()
_default: Optional[str] = None


def get_backend() -> str:
    """The backend in force in this thread: the innermost ``use_backend``,
    else ``set_backend``'s, else ``$DNI_FAST_BACKEND``, else ``auto``."""
    if _global.stack:
        return _global.stack[-1]
    if _default is not None:
        return _default
    return _check_name(os.environ.get("DNI_FAST_BACKEND", "auto"), "from the DNI_FAST_BACKEND environment variable")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (overrides ``$DNI_FAST_BACKEND``)."""
    global _default
    _default = _check_name(name, "set_backend")


@contextmanager
def use_backend(name: str):
    """Use ``name`` for every interface without its own ``backend=`` in the scope."""
    _global.stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _global.stack.pop()


# ---------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------
def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str, device: torch.device | str = "cpu") -> Tuple[bool, str]:
    """``(available, reason)`` for backend ``name`` on ``device``."""
    name = _check_name(name, "backend_status")
    device = torch.device(device)
    if name in ("reference", "auto"):
        return True, ""
    if name == "triton":
        try:
            from dni_fast.kernels.synth_step import triton_available
        except Exception as e:  # ImportError, or triton failing to initialise
            return False, f"triton kernels cannot be imported ({type(e).__name__}: {e}); {_HOW_TO_GET['triton']}"
        ok, why = triton_available(device)
        return ok, ("" if ok else f"{why}; {_HOW_TO_GET['triton']}")
    if name == "cpp" and device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors, not {device}; use 'cuda', 'triton' or 'auto'"
    if name == "cuda" and device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors, not {device}; use 'cpp' or 'auto' on the CPU"
    try:
        from dni_fast import _ext
    except ImportError as e:  # a broken checkout; the extension itself is optional
        return False, f"dni_fast._ext cannot be imported ({e}); {_HOW_TO_GET[name]}"
    ok, why = _ext.cpp_available() if name == "cpp" else _ext.cuda_available()
    return ok, ("" if ok else f"{why}; {_HOW_TO_GET[name]}")


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Concrete backends that can run on ``device`` now (``reference`` first).
    The Triton interpreter counts only when ``TRITON_INTERPRET=1`` is set."""
    return [n for n in BACKENDS[1:] if backend_status(n, device)[0]]


def _load_impl(name: str) -> FusedImpl:
    if name == "triton":
        from dni_fast.kernels import synth_step as k

        return FusedImpl("triton", k.synth_forward_triton, k.synth_update_triton, k.synth_pipelined_triton)
    from dni_fast import _ext

    C = _ext.get_ext()
    return FusedImpl(name, C.synth_forward, C.synth_update, C.synth_pipelined, getattr(C, "trigger_step", None))


def reference_impl() -> FusedImpl:
    """The fp32 pure-PyTorch twins as a ``FusedImpl`` (used by the pipelined
    mode on the reference backend, and as the oracle in tests)."""
    from dni_fast.kernels import synth_ref as r

    return FusedImpl("reference", r.synth_forward_ref, r.synth_update_ref, r.synth_pipelined_ref)


# ---------------------------------------------------------------------------
# auto: the measured table
# ---------------------------------------------------------------------------
_TABLE_PATH = os.path.join(os.path.dirname(__file__), "_autotable.json")
_table: Optional[list] = None


def _auto_rules() -> list:
    global _table
    if _table is None:
        try:
            with open(_TABLE_PATH) as f:
                _table = json.load(f).get("rules", [])
        except (OSError, ValueError):
            _table = []
    return _table


def _auto_pick(device: torch.device, dtype: torch.dtype, rows: int, width: int) -> str:
    """First rule of the measured table that matches and whose backend is available."""
    dt = str(dtype).replace("torch.", "")
    for rule in _auto_rules():
        if rule.get("device") != device.type or rule.get("dtype") != dt:
            continue
        if not (rule.get("min_rows", 0) <= rows <= rule.get("max_rows", math.inf)):
            continue
        if not (rule.get("min_width", 0) <= width <= rule.get("max_width", math.inf)):
            continue
        b = rule.get("backend", "reference")
        if b == "triton" and device.type != "cuda":
            continue  # never the interpreter
        if b == "reference" or backend_status(b, device)[0]:
            return b
    return "reference"


def autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is enabled for ``t``'s device type."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # device types without autocast (meta, ...)
        return False


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a synthesizer step computes in: the autocast dtype under
    autocast, else the tensor's own. Autocast leaves fp64 alone, and so do we."""
    if t.dtype != torch.float64 and autocast_on(t):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


# ---------------------------------------------------------------------------
# resolve: called by every interface step
# ---------------------------------------------------------------------------
_cache: Dict[tuple, Optional[FusedImpl]] = {}
_Basic = None  # dni_fast.synthesizer.BasicSynthesizer, imported on first use (import cycle)


def resolve(requested: Optional[str], synthesizer, trigger: torch.Tensor) -> Optional[FusedImpl]:
    """The fused implementation to run ``synthesizer`` on ``trigger`` with, or
    ``None`` for plain autograd. Raises ``BackendUnavailableError`` when an
    explicitly requested backend cannot run it, saying how to get it."""
    global _Basic
    if _Basic is None:
        from dni_fast.synthesizer import BasicSynthesizer as _Basic
    if not isinstance(synthesizer, _Basic):
        return None  # custom synthesizers always run through autograd
    name = requested if requested is not None else get_backend()
    if name == "reference":
        return None
    device, dtype = trigger.device, compute_dtype(trigger)
    rows = trigger.numel() // max(trigger.shape[-1], 1) if trigger.dim() else 1
    # Bucket rows by powers of two so the cache stays small when batch sizes vary.
    key = (name, device.type, dtype, synthesizer.n_hidden, rows.bit_length(), synthesizer.output_dim,
           synthesizer.hidden_dim)
    try:
        return _cache[key]
    except KeyError:
        pass
    if name == "auto":
        if synthesizer.n_hidden > FUSED_MAX_HIDDEN:
            impl = None
        else:
            pick = _auto_pick(device, dtype, rows, max(synthesizer.output_dim, synthesizer.hidden_dim))
            impl = None if pick == "reference" else _load_impl(pick)
    else:
        ok, why = backend_status(name, device)
        if not ok:
            raise BackendUnavailableError(f"dni_fast backend {name!r} is not available: {why}")
        if dtype not in _SUPPORTED_DTYPES[name]:
            ok_list = ", ".join(str(d).replace("torch.", "") for d in _SUPPORTED_DTYPES[name])
            raise BackendUnavailableError(f"dni_fast backend {name!r} does not support dtype {dtype} "
                                          f"(it supports {ok_list}); use backend='reference' or 'auto'")
        if synthesizer.n_hidden > FUSED_MAX_HIDDEN:
            raise BackendUnavailableError(
                f"dni_fast backend {name!r} fuses BasicSynthesizers with n_hidden <= {FUSED_MAX_HIDDEN}, "
                f"this one has n_hidden={synthesizer.n_hidden}; use backend='reference' or 'auto'")
        impl = _load_impl(name)
    _cache[key] = impl
    return impl


def clear_cache() -> None:
    """Forget resolved backends (after building the extension in-process, or editing the table)."""
    global _table
    _cache.clear()
    _table = None
