"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` is decorated, so it is
set here, before a test module imports dni_fast.kernels, when no GPU exists.

The fused backends under test come from the registry (``fused_backends``),
plus ``primref``: a test backend whose primitives are the fp32 pure-PyTorch
twins of ``kernels/synth_ref.py``, registered like any other backend, so the
fused glue (``backends/fused.py``) is tested even where no fast backend is built.

When the C++ extension cannot be loaded, the run says so in one line at the
top and one at the bottom (and ``tests/test_build.py`` fails if the build
record says it was built).
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
import dni_fast.backends as bk  # noqa: E402
from dni_fast.backends.fused import FusedBackend  # noqa: E402
from dni_fast.backends.reference import ReferenceBackend  # noqa: E402


class PrimRefBackend(FusedBackend):
    """The fp32 reference primitives behind the fused glue (tests only)."""

    name = "primref"
    devices = ("cpu", "cuda")
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def _load_primitives(self):
        return ReferenceBackend().primitives


bk.register(PrimRefBackend())


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (bit-exact comparisons across threads
    and processes; the overlap worker then runs with max(1, 1 // 2) = 1 too),
    the caller's count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolate_backend_state():
    """Every test starts from the default backend with no open scopes."""
    bk.set_backend(None)
    dni_fast.set_check_finite(None)
    torch.manual_seed(0)
    yield
    bk.set_backend(None)
    dni_fast.set_check_finite(None)


def fused_backends(device="cpu"):
    """Registered fused backends that can run on ``device`` here (the Triton
    interpreter counts on the CPU), ``primref`` first."""
    dev = torch.device(device)
    return [b.name for b in bk.registered() if b.fused and b.status(dev)[0]]


DEVICES = ["cpu"] + (["cuda"] if _HAS_CUDA else [])


def _cpp_status():
    return dni_fast.backend_status("cpp", "cpu")


def pytest_report_header(config):
    ok, why = _cpp_status()
    line = f"dni_fast backends on cpu: {', '.join(dni_fast.available_backends('cpu'))}"
    if not ok:
        line += f"\n*** dni_fast: the cpp backend is NOT AVAILABLE and its tests are skipped: {why}"
    return line


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ok, why = _cpp_status()
    if not ok:
        terminalreporter.write_sep("!", "dni_fast: the C++ extension is NOT AVAILABLE: every cpp test was skipped",
                                   red=True, bold=True)
        terminalreporter.write_line(why)
