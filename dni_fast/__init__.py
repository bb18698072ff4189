"""dni_fast: a fast, drop-in backend for Decoupled Neural Interfaces.

``import dni_fast as dni`` runs code written for dni-pytorch, with the same
numbers on the ``reference`` backend, and fused Triton / C++ / CUDA paths for
``BasicSynthesizer`` steps. The layout is described in docs/design.md.

Importing dni_fast imports neither Triton, nor the C++ extension, nor the
examples' data loaders, nor the benchmark harness: each loads on first use.
"""
from dni_fast._manager import backward, current_context, defer_backward, synthesizer_context
from dni_fast.backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from dni_fast.interfaces import (
    BackwardInterface,
    BidirectionalInterface,
    ForwardInterface,
    UnidirectionalInterface,
    get_check_finite,
    name_interfaces,
    set_check_finite,
)
from dni_fast._overlap import OverlapError, PerformanceWarning, get_overlap, overlap, set_overlap, synchronize
from dni_fast.synthesizer import BasicSynthesizer
from dni_fast.ridge_synthesizer import RidgeSynthesizer
from dni_fast.decoupled import DecoupledSequential

__version__ = "0.2.0"

__all__ = [
    "BasicSynthesizer", "RidgeSynthesizer", "UnidirectionalInterface", "ForwardInterface", "BackwardInterface", "BidirectionalInterface",
    "synthesizer_context", "defer_backward", "backward", "current_context",
    "BACKENDS", "BackendUnavailableError", "available_backends", "backend_status", "get_backend", "set_backend",
    "use_backend", "set_check_finite", "get_check_finite", "name_interfaces",
    "overlap", "set_overlap", "get_overlap", "synchronize", "OverlapError", "PerformanceWarning", "DecoupledSequential",
    "__version__",
]
