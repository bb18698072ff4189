"""Lazy, failure-tolerant loader of the optional C++/CUDA extension ``dni_fast._C``.

``import dni_fast`` never imports the extension; the first call below does, once.
A missing or broken extension only makes the ``cpp`` / ``cuda`` backends
unavailable, with a reason that says how to build it.
"""
from __future__ import annotations

import threading
from types import ModuleType
from typing import Optional, Tuple

__all__ = ["get_ext", "cpp_available", "cuda_available", "BUILD_HINT", "CUDA_BUILD_HINT"]

BUILD_HINT = "build it from the dni_fast checkout with `CFLAGS=-g0 pip install --no-build-isolation -e .`"
CUDA_BUILD_HINT = ("build it where torch has CUDA and nvcc is installed, with "
                   "`DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 pip install --no-build-isolation -e .`")

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error = ""


def _load() -> Tuple[Optional[ModuleType], str]:
    global _loaded, _module, _error
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    import torch  # noqa: F401  (loads libtorch, which _C links against)
                    from dni_fast import _C  # type: ignore[attr-defined]

                    _module, _error = _C, ""
                except ModuleNotFoundError as e:
                    if e.name in ("dni_fast._C", "dni_fast"):
                        _error = "the C++ extension dni_fast._C is not built"
                    else:
                        _error = f"the C++ extension dni_fast._C failed to load ({e})"
                except ImportError as e:  # e.g. an undefined symbol: built against another torch
                    _error = (f"the C++ extension dni_fast._C failed to load ({e}); it was probably built "
                              "against another torch version: rebuild it")
                except Exception as e:  # OSError and the like from the dynamic loader
                    _error = f"the C++ extension dni_fast._C failed to load ({type(e).__name__}: {e})"
                _loaded = True
    return _module, _error


def get_ext() -> ModuleType:
    """The extension module, or a RuntimeError that says what failed and how to build it."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"{err}; {BUILD_HINT} (for the CUDA part: {CUDA_BUILD_HINT})")
    return mod


def cpp_available() -> Tuple[bool, str]:
    """(True, "") when the extension's CPU path can run, else (False, reason)."""
    mod, err = _load()
    if mod is None:
        return False, err
    return True, ""


def cuda_available() -> Tuple[bool, str]:
    """(True, "") when the extension was built with CUDA and a CUDA device is present."""
    mod, err = _load()
    if mod is None:
        return False, err
    if not getattr(mod, "WITH_CUDA", False):
        return False, "dni_fast._C was built without CUDA"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""
