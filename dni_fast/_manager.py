"""Synthesizer context and deferred backward: dni-pytorch's ``_Manager``.

State is thread-local: a ``defer_backward`` scope or a ``synthesizer_context``
opened in one thread never leaks into another (autograd's worker threads, or a
pipeline stage running in its own thread).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["synthesizer_context", "defer_backward", "backward", "current_context", "is_deferring"]


class _State(threading.local):
    def __init__(self) -> None:
        self.context_stack: List[Any] = []
        self.deferring: bool = False
        self.deferred: List[Tuple[Tensor, Tensor]] = []


_state = _State()


def current_context() -> Optional[Any]:
    """The context of the innermost ``synthesizer_context`` scope, else ``None``."""
    stack = _state.context_stack
    return stack[-1] if stack else None


def is_deferring() -> bool:
    """Whether a ``defer_backward`` scope is open in this thread."""
    return _state.deferring


@contextmanager
def synthesizer_context(context: Any):
    """Condition every synthesizer call in the scope on ``context``.

    Scopes nest; the innermost wins. ``context`` is usually a tensor of shape
    ``(*batch, context_dim)`` (one-hot labels in the paper's cDNI), broadcast
    against the trigger's leading dims.
    """
    _state.context_stack.append(context)
    try:
        yield
    finally:
        _state.context_stack.pop()


@contextmanager
def defer_backward():
    """Accumulate every ``dni.backward`` call in the scope (the interfaces' own
    included) and run them as one ``torch.autograd.backward`` at its end.

    Use it when real and synthetic gradients pass through one graph (RNNs
    trained with truncated BPTT). Scopes cannot be nested: nesting raises
    ``RuntimeError``. If the body raises, the accumulated gradients are dropped.
    """
    if _state.deferring:
        raise RuntimeError("cannot nest defer_backward: a defer_backward scope is already open in this thread")
    _state.deferring = True
    _state.deferred = []
    try:
        yield
        if _state.deferred:
            tensors, grads = zip(*_state.deferred)
            # Clear before running: a hook that calls dni.backward must not see stale entries.
            _state.deferred = []
            _state.deferring = False
            torch.autograd.backward(list(tensors), list(grads))
    finally:
        _state.deferring = False
        _state.deferred = []


def require_grad_mode(what: str, hint: str = "use forward() to only evaluate") -> None:
    """Raise, naming ``what`` (a training step), when autograd is off (``torch.no_grad()``,
    ``torch.inference_mode()``): the step would fail deep in autograd, or silently not train."""
    if not torch.is_grad_enabled():
        raise RuntimeError(f"{what} trains, so it needs autograd: it was called under torch.no_grad() or "
                           f"torch.inference_mode(); {hint}")


def backward(variable: Tensor, gradient: Optional[Tensor] = None) -> None:
    """``variable.backward(gradient)``, or accumulate it inside ``defer_backward``.

    ``gradient`` defaults to ones of ``variable``'s shape (dni-pytorch's rule,
    which differs from PyTorch's only in also allowing non-scalars). The
    parameter is named ``variable``, as in dni-pytorch.
    """
    if not isinstance(variable, Tensor):
        raise TypeError(f"dni.backward expects a tensor, got {type(variable).__name__}")
    if gradient is None:
        gradient = torch.ones_like(variable)
    elif gradient.shape != variable.shape:
        raise ValueError(f"dni.backward: gradient of shape {tuple(gradient.shape)} does not match tensor of shape "
                         f"{tuple(variable.shape)}")
    if _state.deferring:
        _state.deferred.append((variable, gradient))
    else:
        _run_backward(variable, gradient)


def _run_backward(tensor: Tensor, gradient: Tensor) -> None:
    # The interfaces inject one gradient per step: calling the engine directly
    # skips torch.autograd.backward's Python argument handling (_make_grads and
    # its symbolic-shape checks), ~10 us a call measured on this 2-core CPU,
    # which is a third of the DNI part of a small interface step. Shapes are
    # checked above; the engine itself checks dtype and device.
    if not tensor.requires_grad:
        raise RuntimeError("dni.backward: the tensor does not require grad and has no grad_fn")
    _engine.run_backward((tensor,), (gradient,), False, False, (), allow_unreachable=True, accumulate_grad=True)


try:
    from torch.autograd.variable import Variable as _Variable

    _engine = _Variable._execution_engine
    _engine.run_backward  # noqa: B018  (probe: a private API)
except Exception:  # pragma: no cover - a torch without it: the public path
    def _run_backward(tensor: Tensor, gradient: Tensor) -> None:  # noqa: F811
        torch.autograd.backward(tensor, gradient)
