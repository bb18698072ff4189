"""Lazy loader of the C++/CUDA extension ``dni_fast._C``.

``import dni_fast`` never imports the extension; the first call below does,
once. A missing or broken extension makes the ``cpp`` / ``cuda`` backends
unavailable with a reason that says which of these it is, from the build
record ``dni_fast/_build_info.json`` that ``setup.py`` writes:

* never built (no record: a checkout used without ``pip install``), or its
  build did not finish or failed (the record says why);
* skipped on purpose (``DNI_FAST_BUILD_EXT=FALSE``);
* built against another torch than the one running;
* built without its CUDA part (and why), for the ``cuda`` backend.
"""
from __future__ import annotations

import json
import os
import threading
from types import ModuleType
from typing import Optional, Tuple

__all__ = ["get_ext", "cpp_available", "cuda_available", "build_info", "BUILD_HINT", "CUDA_BUILD_HINT"]

BUILD_HINT = ("build it from the dni_fast checkout with `CFLAGS=-g0 pip install --no-build-isolation -e .` "
              "(torch installed first)")
CUDA_BUILD_HINT = ("build it where torch has CUDA and the full CUDA toolkit is installed, with "
                   "`DNI_FAST_FORCE_CUDA=TRUE CFLAGS=-g0 pip install --no-build-isolation -e .`")
_INFO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_error = ""


def build_info() -> Optional[dict]:
    """The build record written by setup.py, or ``None`` when there is none."""
    try:
        with open(_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _why_missing(info: Optional[dict]) -> str:
    if info is None:
        return ("dni_fast._C was never built: this dni_fast has no build record (it was not installed with "
                "`pip install`, or installed before the extension existed)")
    if info.get("requested") is False:
        return "dni_fast._C was skipped on purpose: dni_fast was installed with DNI_FAST_BUILD_EXT=FALSE"
    status = info.get("status")
    if status == "failed":
        return f"dni_fast._C was never built: its build failed ({info.get('reason', 'no reason recorded')})"
    if status == "building":
        return "dni_fast._C was never built: its build did not finish (it was interrupted, or only metadata was made)"
    return "dni_fast._C is missing although its build record says it was built (was the .so deleted?)"


def _other_torch(info: Optional[dict]) -> Optional[str]:
    import torch

    built = (info or {}).get("torch")
    if info and info.get("built") and built and built != torch.__version__:
        return built
    return None


def _load() -> Tuple[Optional[ModuleType], str]:
    global _loaded, _module, _error
    if not _loaded:
        with _lock:
            if not _loaded:
                info = build_info()
                try:
                    import torch  # loads libtorch, which _C links against

                    from dni_fast import _C  # type: ignore[attr-defined]

                    other = _other_torch(info)
                    if other is not None:
                        # It loaded, but an extension built against another
                        # torch can crash or compute garbage: refuse it.
                        _error = (f"dni_fast._C was built against another torch ({other}) than this one "
                                  f"({torch.__version__}): rebuild it")
                    else:
                        _module = _C
                except ModuleNotFoundError as e:
                    if e.name in ("dni_fast._C", "dni_fast"):
                        _error = _why_missing(info)
                    else:
                        _error = f"dni_fast._C failed to load ({e})"
                except ImportError as e:  # an undefined symbol, typically
                    other = _other_torch(info)
                    if other is not None:
                        _error = (f"dni_fast._C was built against another torch ({other}) than this one and "
                                  f"fails to load ({e}): rebuild it")
                    else:
                        _error = f"dni_fast._C failed to load ({e})"
                except Exception as e:  # OSError and the like from the dynamic loader
                    _error = f"dni_fast._C failed to load ({type(e).__name__}: {e})"
                _loaded = True
    return _module, _error


def get_ext() -> ModuleType:
    """The extension module, or a RuntimeError that says what failed and how to build it."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(f"{err}; {BUILD_HINT}")
    return mod


def cpp_available() -> Tuple[bool, str]:
    """(True, "") when the extension's CPU path can run, else (False, reason with the fix)."""
    mod, err = _load()
    if mod is None:
        return False, f"{err}; {BUILD_HINT}"
    return True, ""


def cuda_available() -> Tuple[bool, str]:
    """(True, "") when the extension was built with CUDA and a CUDA device is present."""
    mod, err = _load()
    if mod is None:
        return False, f"{err}; {CUDA_BUILD_HINT}"
    if not getattr(mod, "WITH_CUDA", False):
        why = (build_info() or {}).get("cuda_reason") or "unknown reason"
        return False, f"dni_fast._C was built without its CUDA part ({why}); {CUDA_BUILD_HINT}"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


def _reset() -> None:
    """Forget the load attempt (tests; after building in-process)."""
    global _loaded, _module, _error
    with _lock:
        _loaded, _module, _error = False, None, ""
