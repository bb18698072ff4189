"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` is decorated, so it is
set here, before a test module imports dni_fast.kernels, when no GPU exists.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import dni_fast  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate_backend_state():
    """Every test starts from the default backend with no open scopes."""
    dni_fast.backends._default = None
    torch.manual_seed(0)
    yield
    dni_fast.backends._default = None


def fused_backends(device="cpu"):
    """Concrete fused backends that can run on ``device`` here (the Triton
    interpreter counts on the CPU)."""
    return [b for b in ("triton", "cpp", "cuda") if dni_fast.backend_status(b, device)[0]]


DEVICES = ["cpu"] + (["cuda"] if _HAS_CUDA else [])


def backend_name(name, monkeypatch):
    """Yield a name for ``dni.use_backend``. ``primref`` is routed through the
    'cpp' slot to the pure-PyTorch primitives of kernels/synth_ref.py, so the
    fused autograd glue is tested even where no fast backend is built."""
    import dni_fast.backends as bk

    bk.clear_cache()
    if name == "primref":
        real_status = bk.backend_status
        monkeypatch.setattr(bk, "_load_impl", lambda n: bk.reference_impl())
        monkeypatch.setattr(bk, "backend_status",
                            lambda n, device="cpu": (True, "") if n == "cpp" else real_status(n, device))
        name = "cpp"
    yield name
    bk.clear_cache()
