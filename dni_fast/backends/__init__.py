"""Backends: the registry, and the one place where dni_fast decides how a synthesizer runs.

Each backend is one registered ``Backend`` object (``dni_fast/backends/<name>.py``)
stating its name, devices, dtypes, the largest ``n_hidden`` it fuses and how
to get it, and implementing the same entry points (docs/design.md §2):

* ``reference``: plain PyTorch autograd, the ground truth; runs everywhere,
  and always runs custom synthesizers;
* ``triton``: fused Triton kernels (CUDA; on the CPU only under
  ``TRITON_INTERPRET=1``, for tests);
* ``cuda``: the C++/CUDA extension (``dni_fast._C``) on CUDA tensors;
* ``cpp``: the same extension's CPU path, one native call per step;
* ``auto`` (default, not a backend): for a ``BasicSynthesizer``, the fastest
  available backend for the device, dtype and shape according to the measured
  table ``dni_fast/_autotable.json`` (``backends/auto.py``); never the Triton
  interpreter.

The global choice comes from ``DNI_FAST_BACKEND``, ``set_backend`` or the
``use_backend`` context manager; an interface's ``backend=`` overrides it.
Adding a backend is one file with a ``Backend`` subclass and one ``register``
line below.
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from dni_fast._autocast import autocast_on, compute_dtype
from dni_fast._overlap import PerformanceWarning
from dni_fast.backends.base import Backend, BackendUnavailableError, Primitives
from dni_fast.synthesizer import BasicSynthesizer

__all__ = [
    "Backend", "Primitives", "BackendUnavailableError", "register", "unregister", "get", "registered",
    "BACKENDS", "set_backend", "get_backend", "use_backend", "available_backends", "backend_status", "resolve",
    "clear_cache", "autocast_on", "compute_dtype",
]

_REGISTRY: Dict[str, Backend] = {}
_lock = threading.Lock()


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under ``backend.name`` (replacing one of that name)."""
    if not isinstance(backend, Backend) or not backend.name or backend.name == "auto":
        raise ValueError(f"register: expected a Backend with a name other than 'auto', got {backend!r}")
    if not isinstance(backend.name, str) or backend.name != backend.name.strip().lower():
        # names are chosen case-insensitively (an environment variable, a command line): stored in lower case
        raise ValueError(f"register: a backend's name must be lower case without spaces, got {backend.name!r}")
    with _lock:
        _REGISTRY[backend.name] = backend
    clear_cache()
    return backend


def unregister(name: str) -> None:
    """Remove a registered backend (``reference`` stays)."""
    if name == "reference":
        raise ValueError("the reference backend cannot be unregistered")
    with _lock:
        _REGISTRY.pop(name, None)
    clear_cache()


def registered() -> List[Backend]:
    """Every registered backend, ``reference`` first."""
    return list(_REGISTRY.values())


def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dni_fast backend {name!r}; choose one of {', '.join(_names())}") from None


def _names() -> Tuple[str, ...]:
    return ("auto", *_REGISTRY)


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in _names():
        raise ValueError(f"unknown dni_fast backend {name!r} ({where}); choose one of {', '.join(_names())}")
    return name.lower()


# ---------------------------------------------------------------------------
# The global choice
# ---------------------------------------------------------------------------
class _Global(threading.local):
    def __init__(self) -> None:
        self.stack: List[str] = []


_global = _Global()
_default: Optional[str] = None


def get_backend() -> str:
    """The backend name in force in this thread: the innermost ``use_backend``,
    else ``set_backend``'s, else ``$DNI_FAST_BACKEND``, else ``auto``."""
    if _global.stack:
        return _global.stack[-1]
    if _default is not None:
        return _default
    # read at every call (a test or a user may change it), checked once per value: this runs every step
    raw = os.environ.get("DNI_FAST_BACKEND")
    name = _env_checked.get(raw)
    if name is None:
        # empty means unset, and spaces do not count, as for the other DNI_FAST_* variables
        name = _check_name((raw or "").strip() or "auto", "from the DNI_FAST_BACKEND environment variable")
        _env_checked.clear()
        _env_checked[raw] = name
    return name


_env_checked: dict = {}  # the last value of $DNI_FAST_BACKEND seen -> its checked name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (overrides ``$DNI_FAST_BACKEND``);
    ``None`` goes back to the environment variable."""
    global _default
    _default = None if name is None else _check_name(name, "set_backend")


@contextmanager
def use_backend(name: str):
    """Use ``name`` for every interface without its own ``backend=`` in the scope (this thread)."""
    _global.stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _global.stack.pop()


# ---------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------
def backend_status(name: str, device: torch.device | str = "cpu") -> Tuple[bool, str]:
    """``(available, reason)`` for backend ``name`` on ``device``; the reason says how to get it."""
    name = _check_name(name, "backend_status")
    if name == "auto":
        return True, ""
    return get(name).status(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Names of the registered backends that can run on ``device`` now
    (``reference`` first). The Triton interpreter counts only when
    ``TRITON_INTERPRET=1`` is set."""
    device = torch.device(device)
    return [b.name for b in _REGISTRY.values() if b.status(device)[0]]


# ---------------------------------------------------------------------------
# resolve: called by every interface step
# ---------------------------------------------------------------------------
_cache: Dict[tuple, Backend] = {}
_CACHE_MAX = 4096  # resolutions kept (a miss costs ~9 us)
_warned_blocked: set = set()  # (backend, why) already said: a synthesizer the fused paths cannot run


def _interpreted_bf16(backend: Backend, device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 in the Triton interpreter: its tl.dot is wrong for bf16 (numbers off by 1e9, measured)."""
    interpreted = getattr(backend, "interpreted", None)
    return dtype == torch.bfloat16 and interpreted is not None and bool(interpreted(device))


def _fuses(backend: Backend, synth) -> bool:
    return backend.max_hidden is None or synth.n_hidden <= backend.max_hidden


def resolve(requested: Optional[str], synthesizer: nn.Module, trigger: Tensor) -> Backend:
    """The backend to run ``synthesizer`` on ``trigger`` with.

    Custom synthesizers (anything but a ``BasicSynthesizer``) always get
    ``reference``, and so does a ``BasicSynthesizer`` the fused paths cannot
    compute exactly (``fused_blocker()``: an overridden ``forward``, module
    hooks, a replaced layer; a named fused backend warns once,
    ``PerformanceWarning``). An explicitly requested backend that cannot run
    this call raises ``BackendUnavailableError`` saying why and how to get it."""
    ref = _REGISTRY["reference"]
    if not isinstance(synthesizer, BasicSynthesizer):
        return ref
    name = requested if requested is not None else get_backend()
    if name == "reference":
        return ref
    why = synthesizer.fused_blocker()
    if why is not None:
        # The fused paths read the layers' parameters and would skip what the modules add. Such a synthesizer is
        # a custom one for the contract (docs/design.md §1): plain autograd whatever the backend, never an error.
        if name != "auto" and (name, why) not in _warned_blocked:  # (once: this runs every step)
            _warned_blocked.add((name, why))
            warnings.warn(f"dni_fast backend {name!r} cannot fuse this BasicSynthesizer ({why}; the fused backends "
                          f"read its layers' parameters without calling its modules): it runs on 'reference', "
                          f"through its modules", PerformanceWarning, stacklevel=2)
        return ref
    if not isinstance(trigger, Tensor):
        synthesizer.check_inputs(trigger, None)  # raises: the trigger must be a tensor
    device, dtype = trigger.device, compute_dtype(trigger)
    rows = trigger.numel() // max(trigger.shape[-1], 1) if trigger.dim() else 1
    # Only `auto` decides by the row count, with the table's exact limits: it keys on the rows themselves (a
    # coarser bucket let the first call in it decide for the others, across a limit); a named backend does not.
    pdt = synthesizer.weight_probe().dtype  # (no parametrization run: this runs every step)
    key = (name, device.type, dtype, pdt, synthesizer.n_hidden, rows if name == "auto" else None,
           synthesizer.output_dim, synthesizer.hidden_dim)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if name == "auto":
        from dni_fast.backends import auto

        def usable(n: str) -> bool:
            b = _REGISTRY.get(n)
            return (b is not None and _fuses(b, synthesizer) and dtype in b.dtypes and b.status(device)[0]
                    and not _interpreted_bf16(b, device, dtype) and b.takes_params(dtype, pdt))

        pick = _REGISTRY[auto.pick(device, dtype, rows, max(synthesizer.output_dim, synthesizer.hidden_dim), usable)]
    else:
        pick = get(name)
        ok, why = pick.status(device)
        if not ok:
            raise BackendUnavailableError(f"dni_fast backend {name!r} is not available: {why}")
        if not dtype.is_floating_point:
            synthesizer.check_inputs(trigger, None)  # raises the same "cast it with .float()" error as reference
        if dtype not in pick.dtypes:
            raise BackendUnavailableError(f"dni_fast backend {name!r} does not support dtype {dtype} (it supports "
                                          f"{pick.dtype_names()}); use backend='reference' or 'auto'")
        if not pick.takes_params(dtype, pdt):
            raise BackendUnavailableError(f"dni_fast backend {name!r} cannot compute in {dtype} with {pdt} "
                                          f"synthesizer parameters (it takes parameters of the compute dtype, or "
                                          f"float32 ones under autocast); cast the synthesizer, or use "
                                          f"backend='reference' or 'auto'")
        if _interpreted_bf16(pick, device, dtype):
            raise BackendUnavailableError(f"dni_fast backend {name!r} runs in the Triton interpreter here "
                                          f"(TRITON_INTERPRET=1), whose bf16 tl.dot gives wrong results; use "
                                          f"float32/float16, or backend='reference' or 'auto', or a GPU")
        if not _fuses(pick, synthesizer):
            raise BackendUnavailableError(
                f"dni_fast backend {name!r} fuses BasicSynthesizers with n_hidden <= {pick.max_hidden}, this one "
                f"has n_hidden={synthesizer.n_hidden}; use backend='reference' or 'auto'")
    if len(_cache) >= _CACHE_MAX:  # `auto` keys on the row count: inputs of ever new lengths must not grow it
        _cache.clear()
    _cache[key] = pick
    return pick


def clear_cache() -> None:
    """Forget resolved backends, loaded primitives and the auto table (after
    building the extension in-process, registering a backend or editing the table)."""
    _cache.clear()
    _env_checked.clear()
    _warned_blocked.clear()
    for b in _REGISTRY.values():
        b.__dict__.pop("_primitives", None)
    from dni_fast.backends import auto

    auto.reload()


# ---------------------------------------------------------------------------
# The registrations: one line per backend.
# ---------------------------------------------------------------------------
from dni_fast.backends.reference import ReferenceBackend  # noqa: E402
from dni_fast.backends.triton import TritonBackend  # noqa: E402
from dni_fast.backends.cuda import CudaBackend  # noqa: E402
from dni_fast.backends.cpp import CppBackend  # noqa: E402

register(ReferenceBackend())
register(TritonBackend())
register(CudaBackend())
register(CppBackend())

#: The names a backend may be chosen by at import (``auto`` and every registered backend).
BACKENDS = _names()
