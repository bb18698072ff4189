"""dni_fast: a fast, drop-in backend for Decoupled Neural Interfaces.

``import dni_fast as dni`` runs code written for dni-pytorch, with the same
numbers on the ``reference`` backend, and fused Triton / C++ / CUDA paths for
``BasicSynthesizer`` steps.
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
from dni_fast.interfaces import BackwardInterface, BidirectionalInterface, ForwardInterface, UnidirectionalInterface
from dni_fast.synthesizer import BasicSynthesizer

__version__ = "0.1.0"

__all__ = [
    "BasicSynthesizer", "UnidirectionalInterface", "ForwardInterface", "BackwardInterface", "BidirectionalInterface",
    "synthesizer_context", "defer_backward", "backward", "current_context",
    "BACKENDS", "BackendUnavailableError", "available_backends", "backend_status", "get_backend", "set_backend",
    "use_backend", "__version__",
]
