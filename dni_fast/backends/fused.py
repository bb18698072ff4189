"""``FusedBackend``: the entry points of every fused backend, on three primitives.

A fused backend supplies ``Primitives`` (forward, update, pipelined; the
contract is ``kernels/synth_ref.py``). The ``autograd.Function`` s here call
them, so that

* the synthesizer forward (and what the update needs) is one call;
* the regression loss and every synthesizer parameter gradient is one call,
  made when the true gradient (or the true message) arrives;
* the gradients reach the parameters as the return values of ``backward``:
  hooks, gradient accumulation, DDP and ``zero_grad`` behave as in plain
  PyTorch (never a write to ``.grad`` behind autograd's back).

A backend with a native whole-step call (the C++ extension's
``trigger_step``) overrides :meth:`FusedBackend.trigger`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from dni_fast import _overlap
from dni_fast._autocast import compute_dtype, no_autocast
from dni_fast._manager import _run_backward, backward as _backward
from dni_fast.backends.base import Backend, Primitives
from dni_fast.stats import apply_with_row, partials_of

__all__ = ["FusedBackend", "flatten_inputs", "grad_carrier"]


def flatten_inputs(synth, trigger: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Validated 2-D views of trigger ``(N, Dt)`` and context ``(N, Dc)`` in the
    compute dtype (the autocast dtype under autocast), detached."""
    context = synth.check_inputs(trigger, context)
    dtype = compute_dtype(trigger)
    # Each no-op view or cast below costs 1-2 us in Python; at B=16, D=128 the
    # whole cpp step is ~200 us, so skip them when the trigger is already 2-D
    # and in the compute dtype (the common case).
    x = trigger.detach()
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        x = x.to(dtype)
    c = None
    if context is not None:
        c = context.detach()
        if c.shape[:-1] != trigger.shape[:-1]:
            c = c.expand(*trigger.shape[:-1], c.shape[-1])
        c = c.reshape(-1, c.shape[-1]).to(dtype)
    return x, c


def _unpack(ctx, n_mid: int):
    """Saved as ``x, [c], *mid (n_mid tensors), *zs, *params``: returns
    ``(x, c or None, mid, zs, params)``."""
    saved = ctx.saved_tensors
    i = 2 if ctx.has_c else 1
    c = saved[1] if ctx.has_c else None
    mid = saved[i: i + n_mid]
    zs = list(saved[i + n_mid: i + n_mid + ctx.n_z])
    return saved[0], c, mid, zs, list(saved[i + n_mid + ctx.n_z:])


_CREATE_GRAPH = ("dni_fast: backward with create_graph=True (double backward, a gradient penalty) through a "
                 "synthesizer on a fused backend: its update is computed outside autograd, so its gradients would "
                 "not be differentiable; use backend='reference'")
_MODIFIED = ("dni_fast overlap: the trigger or the context of an overlapped synthesizer update was modified in place "
             "after the backward that queued the update, before the update ran: change them only after a "
             "synchronisation point (dni.synchronize(), optimizer.step()), or train without overlap")


def _versions(*ts: Optional[Tensor]) -> tuple:
    return tuple(t._version for t in ts if t is not None)


class _TriggerUpdate(torch.autograd.Function):
    """Forward: ``S = synth(x, c)`` in one fused call; returns ``(trigger.clone(), S)``.
    Backward: the true gradient ``g`` passes to the trigger unchanged, and one
    fused call turns ``scale * (S - g)`` into every parameter gradient."""

    @staticmethod
    def forward(ctx, prims: Primitives, row: Optional[Tensor], scale: float, overlap: bool, trigger: Tensor,
                x: Tensor, c: Optional[Tensor], *params: Tensor):
        with no_autocast(x):
            s, zs = prims.forward(x, c, list(params))
        # row: the step's statistics row (reserved at this forward, SynthStats.step_row), written by the first
        # backward only (a second one, retain_graph, updates again but is the same step)
        ctx.prims, ctx.row, ctx.scale, ctx.has_c, ctx.n_z = prims, row, scale, c is not None, len(zs)
        ctx.overlap = overlap
        # The parameters themselves, for the overlap worker's delivery: under saved-tensor hooks that copy
        # (torch.autograd.graph.save_on_cpu) the saved ones unpack as copies, which no optimizer holds.
        ctx.params = params if overlap else None
        ctx.save_for_backward(x, *(() if c is None else (c,)), s, *zs, *params)
        # Mark the tensor that is returned (a view of s), not s itself: else the
        # message carries a graph and backward gets a zero-filled gradient for it.
        s_out = s.view(*trigger.shape[:-1], s.shape[-1])
        ctx.mark_non_differentiable(s_out)
        ctx.set_materialize_grads(False)  # S's gradient is never used: autograd must not materialise zeros for it
        ctx.trigger_shape = trigger.shape
        return trigger.clone(), s_out

    @staticmethod
    def backward(ctx, g: Optional[Tensor], _unused: Optional[Tensor]):
        if torch.is_grad_enabled():  # create_graph=True: the fused update below is not differentiable
            raise RuntimeError(_CREATE_GRAPH)
        x, c, (s,), zs, params = _unpack(ctx, 1)
        if g is None:  # the output was not used downstream: the true gradient is zero (as on reference)
            g = s.new_zeros(ctx.trigger_shape)
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != s.dtype:
            g2 = g2.to(s.dtype)
        g_in = g if ctx.needs_input_grad[4] else None
        prims, scale = ctx.prims, ctx.scale
        row, ctx.row = ctx.row, None
        if ctx.overlap and _overlap.plain_backward(ctx, len(params)):
            # Overlap: the fused update runs on the worker, and writes the step's
            # statistics row there. (Under torch.autograd.grad or
            # backward(inputs=...) the engine decides where the gradients go:
            # inline, below, as without overlap.)
            # The worker reads x and c later: a legal in-place change after this backward (a reused context
            # buffer) would silently change the update. Checked before and after it runs.
            versions = _versions(x, c)

            def compute():
                if _versions(x, c) != versions:
                    raise RuntimeError(_MODIFIED)
                with torch.no_grad():
                    grads, partials = prims.update(x, c, params, zs, s, g2, scale, None)
                if _versions(x, c) != versions:
                    raise RuntimeError(_MODIFIED)
                if row is not None:
                    row.copy_(partials)
                return grads

            # the row too: written on the side stream, it must outlive a ring dropped meanwhile (reset_stats)
            _overlap.submit(compute, ctx.params, (x, c, s, g2, *zs, *params, row), s.device)
            return (None, None, None, None, g_in, None, None, *([None] * len(params)))
        grads, partials = prims.update(x, c, params, zs, s, g2, scale, None)
        if row is not None:
            row.copy_(partials)
        return (None, None, None, None, g_in, None, None, *grads)


class _SendRegression(torch.autograd.Function):
    """ForwardInterface.send: forward computes ``S`` (one fused call) and returns
    a 0-dim loss carrier plus ``S``; backward regresses ``S`` on the message ``m``
    with ``scale * (S - m)`` (``F.mse_loss``'s gradient) times the incoming loss
    gradient, in one fused call. The carrier's value is unspecified: the loss
    itself is computed in the update and kept in the interface's stats."""

    @staticmethod
    def forward(ctx, prims: Primitives, row: Optional[Tensor], scale: float, x: Tensor, c: Optional[Tensor],
                m: Tensor, *params: Tensor):
        with no_autocast(x):
            s, zs = prims.forward(x, c, list(params))
        ctx.prims, ctx.row, ctx.scale, ctx.has_c, ctx.n_z = prims, row, scale, c is not None, len(zs)
        ctx.save_for_backward(x, *(() if c is None else (c,)), m, s, *zs, *params)
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # grad_loss is always defined: the carrier is the only differentiable output
        return s.new_empty(()), s

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _unused: Optional[Tensor]):
        if torch.is_grad_enabled():
            raise RuntimeError(_CREATE_GRAPH)
        x, c, (m, s), zs, params = _unpack(ctx, 2)
        grads, partials = ctx.prims.update(x, c, params, zs, s, m, ctx.scale, grad_loss.detach())
        row, ctx.row = ctx.row, None
        if row is not None:
            row.copy_(partials)
        return (None, None, None, None, None, None, *grads)


class _GradCarrier(torch.autograd.Function):
    """A 0-dim node whose backward hands precomputed gradients to ``params``
    (the pipelined mode: step t's update is computed during step t+1's forward
    and delivered through autograd with step t+1's injection)."""

    @staticmethod
    def forward(ctx, grads: Tuple[Tensor, ...], *params: Tensor):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, _g: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("dni_fast: a pipelined update was delivered twice")
        return (None, *grads)


def grad_carrier(grads: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    return _GradCarrier.apply(tuple(grads), *params)


def deliver(carrier: Tensor) -> None:
    """Run a carrier's backward: its gradients accumulate into its parameters.
    The engine directly (``carrier.backward()``'s Python layer cost ~12 us a
    call); the carrier is its own incoming gradient, which its backward ignores."""
    _run_backward(carrier, carrier)


class FusedBackend(Backend):
    """Entry points of a fused backend on its ``primitives`` (a ``BasicSynthesizer``)."""

    fused = True
    max_hidden = 2

    def receive(self, synth, trigger, context):
        x, c = flatten_inputs(synth, trigger, context)
        if x.shape[0] == 0:
            return x.new_empty(*trigger.shape[:-1], synth.output_dim)
        with torch.no_grad(), no_autocast(x):
            s, _ = self.primitives.forward(x, c, [p.detach() for p in synth.flat_params()])
        return s.view(*trigger.shape[:-1], s.shape[-1])

    def trigger(self, synth, trigger, context, stats, scale, inject_into, overlap=False):
        x, c = flatten_inputs(synth, trigger, context)
        params = synth.flat_params()
        if overlap and _overlap.update_inline(params):  # (hooked or parametrized: see update_inline)
            overlap = False
        out, s = apply_with_row(_TriggerUpdate, stats, scale, x, overlap, trigger, x, c, *params,
                                lead=(self.primitives,))
        if inject_into is not None:
            _backward(inject_into, s)
        return out, s

    def send(self, synth, trigger, context, message, stats, loss, scale):
        x, c = flatten_inputs(synth, trigger, context)
        out_shape = (*trigger.shape[:-1], synth.output_dim)
        if tuple(message.shape) != out_shape:
            raise ValueError(f"send: message has shape {tuple(message.shape)} but the synthesizer predicts "
                             f"{out_shape} from a trigger of shape {tuple(trigger.shape)}")
        m = message.detach().reshape(-1, message.shape[-1])
        if m.dtype != x.dtype:
            m = m.to(x.dtype)
        carrier, s = apply_with_row(_SendRegression, stats, scale, x, x, c, m, *synth.flat_params(),
                                    lead=(self.primitives,))
        if not carrier.requires_grad:  # a frozen synthesizer (or no grad): no backward will record S against m
            if stats is not None:
                stats.record(partials_of(s, m), scale)
            return None, s.view(out_shape)
        return carrier, s.view(out_shape)
