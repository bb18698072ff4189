"""The ``reference`` backend: the synthesizer module through plain autograd.

The ground truth. It computes in the input's dtype, as PyTorch would, runs any
synthesizer (custom ones always run here) on any device, and gives
dni-pytorch's numbers. Its primitives (for the pipelined mode) are the fp32
twins of ``kernels/synth_ref.py``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from dni_fast import _overlap
from dni_fast._manager import backward as _backward
from dni_fast.backends.base import Backend, Primitives
from dni_fast.regression import RegressionLoss
from dni_fast.stats import apply_with_row, partials_of

__all__ = ["ReferenceBackend"]


def _detached(context: Any) -> Any:
    return context.detach() if isinstance(context, Tensor) else context


class _RefUpdater(torch.autograd.Function):
    """dni-pytorch's synthetic-gradient updater: identity forward; backward
    passes the true gradient ``g`` through and sends ``scale * (S - g)``
    (``scale = 2/g.size(0)``, ``regression.BACKWARD_LOSS``) into the
    synthesizer's graph. ``params``: under overlap, the synthesizer's
    parameters; else nothing, or a 0-element leaf that only makes the output
    require grad (a statistics-only node)."""

    @staticmethod
    def forward(ctx, row: Optional[Tensor], scale: float, overlap, trigger: Tensor, s: Tensor,
                *params: Tensor) -> Tensor:
        # overlap: None, or (params, S with its graph). S is then not an input
        # (the main backward must neither traverse nor free its graph: the
        # worker backpropagates through it); the synthesizer's parameters are,
        # so that this node can tell whether the backward accumulates into
        # them, and hand them their gradients when it does not.
        ctx.row, ctx.scale, ctx.overlap = row, scale, overlap
        ctx.save_for_backward(s)
        return trigger.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (s,) = ctx.saved_tensors
        _write_row(ctx, s, g)
        g_in = g if ctx.needs_input_grad[3] else None
        rest = (None,) * (len(ctx.needs_input_grad) - 5)  # the parameters (or an anchor) get no gradient here
        if ctx.overlap is None and not ctx.needs_input_grad[4]:  # a frozen synthesizer: statistics only
            return (None, None, None, g_in, None) + rest
        delta = ctx.scale * (s - g)
        if ctx.overlap is None:
            return (None, None, None, g_in, delta) + rest
        params, s_graph = ctx.overlap
        # Overlap: the synthesizer's own backward (the products for its
        # parameter gradients) runs on the worker; the main backward goes on.
        # Only under a plain backward(): under torch.autograd.grad or
        # backward(inputs=...) the engine decides where each gradient goes, so
        # the products run here and their gradients are this node's outputs,
        # exactly as without overlap.
        if not _overlap.plain_backward(ctx, len(params)):
            grads = torch.autograd.grad(s_graph, params, delta, retain_graph=True, allow_unused=True)
            return (None, None, None, g_in, None, *grads)

        def compute():
            return torch.autograd.grad(s_graph, params, delta, retain_graph=True, allow_unused=True)

        _overlap.submit(compute, params, (s_graph, delta), s.device)
        return (None, None, None, g_in, None) + rest


class _RefFitter(torch.autograd.Function):
    """The updater of a closed-form synthesizer (``synth.closed_form``, e.g.
    ``RidgeSynthesizer``): identity forward; backward passes the true gradient
    ``g`` through and hands ``(trigger, context, g)`` to ``synth.fit``, in
    place of a regression loss's backward (docs/design.md, "Closed-form
    synthesizers"). ``anchor``: a 0-element leaf that makes the output
    require grad (the synthesizer has no graph)."""

    @staticmethod
    def forward(ctx, row: Optional[Tensor], scale: float, synth: nn.Module, context: Any, trigger: Tensor,
                s: Tensor, anchor: Tensor) -> Tensor:
        ctx.row, ctx.scale, ctx.synth, ctx.context, ctx.s = row, scale, synth, context, s
        ctx.save_for_backward(trigger.detach())
        return trigger.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        _write_row(ctx, ctx.s, g)  # the loss the statistics report: as for a regression
        ctx.synth.fit(x, ctx.context, g)
        return None, None, None, None, (g if ctx.needs_input_grad[4] else None), None, None


def _write_row(ctx, s: Tensor, g: Tensor) -> None:
    """The step's statistics row (reserved at its forward: ``SynthStats.step_row``), by its first backward."""
    row = ctx.row
    if row is not None:
        ctx.row = None
        partials_of(s, g, out=row)


def closed_form(synth: nn.Module) -> bool:
    """Whether ``synth`` learns through ``fit(trigger, context, target)`` rather than a loss's gradient."""
    return bool(getattr(synth, "closed_form", False))


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    max_hidden = None  # any synthesizer
    fused = False

    def status(self, device: torch.device) -> Tuple[bool, str]:
        return True, ""  # runs wherever PyTorch does

    def _load_primitives(self) -> Primitives:
        from dni_fast.kernels import synth_ref as r

        return Primitives(r.synth_forward_ref, r.synth_update_ref, r.synth_pipelined_ref)

    def _synth_graph(self, synth: nn.Module, trigger: Tensor, context: Any) -> Tensor:
        """``S`` with a graph over the synthesizer's parameters only (trigger and
        context detached: the regression must not reach their producers)."""
        return synth(trigger.detach(), _detached(context))

    def receive(self, synth, trigger, context):
        with torch.no_grad():
            return synth(trigger.detach(), _detached(context))

    def trigger(self, synth, trigger, context, stats, scale, inject_into, overlap=False):
        if closed_form(synth):
            # Fitted inline even under overlap: the fit writes the weights the next forward reads.
            s = self.receive(synth, trigger, context)
            if inject_into is not None:
                _backward(inject_into, s)
            if not getattr(synth, "fitting", True):  # not learning: measured only
                if stats is None or not trigger.requires_grad:
                    return trigger, s
                return apply_with_row(_RefUpdater, stats, scale, s, None, trigger, s), s
            anchor = s.new_empty(0).requires_grad_()
            return apply_with_row(_RefFitter, stats, scale, s, synth, _detached(context), trigger, s, anchor), s
        s = self._synth_graph(synth, trigger, context)
        if inject_into is not None:
            _backward(inject_into, s.detach())
        if not s.requires_grad:  # frozen synthesizer: nothing to update, but S is still measured against g
            if stats is None or not trigger.requires_grad:
                return trigger, s.detach()
            return apply_with_row(_RefUpdater, stats, scale, s, None, trigger, s.detach()), s.detach()
        params = [p for p in synth.parameters() if p.requires_grad] if overlap else ()
        if overlap and not _overlap.update_inline(params):
            return apply_with_row(_RefUpdater, stats, scale, s, (params, s), trigger, s.detach(), *params), s.detach()
        return apply_with_row(_RefUpdater, stats, scale, s, None, trigger, s), s.detach()

    def send(self, synth, trigger, context, message, stats, loss: RegressionLoss, scale):
        s = self._synth_graph(synth, trigger, context)
        if s.shape != message.shape:
            raise ValueError(f"send: message has shape {tuple(message.shape)} but the synthesizer predicts "
                             f"{tuple(s.shape)} from a trigger of shape {tuple(trigger.shape)}")
        m = message.detach()
        if stats is not None:
            stats.record(partials_of(s, m), scale)
        if closed_form(synth):
            if torch.is_grad_enabled():  # as the interfaces regress only where they would backpropagate
                synth.fit(trigger, _detached(context), m)
            return None, s
        return (loss.torch_loss(s, m) if s.requires_grad else None), s.detach()
