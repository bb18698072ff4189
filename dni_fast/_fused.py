"""The autograd glue shared by every fused backend.

A fused backend provides three primitives (``FusedImpl``; signatures and math
in ``kernels/synth_ref.py``). The ``autograd.Function`` s here call them, so
that

* the synthesizer forward (and what the update needs) is one call;
* the regression loss and every synthesizer parameter gradient is one call,
  made when the true gradient (or the true message) arrives;
* the gradients reach the parameters as the return values of ``backward``:
  hooks, gradient accumulation, DDP and ``zero_grad`` behave as in plain PyTorch.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dni_fast.backends import FusedImpl, autocast_on, compute_dtype

__all__ = ["SynthStats", "fused_trigger", "fused_send", "fused_receive", "grad_carrier", "flatten_inputs"]


class SynthStats:
    """Regression loss and cosine similarity of one interface, kept on the device.

    Each update writes its four partial sums into a row of a ring reserved at
    forward time (no device op: each ring is filled with NaN when it is made, and
    its rows are never reused, so a step whose true gradient never arrives is
    not counted). The loss and the cosine
    are derived only when ``read`` is called, or when the ring fills (every
    ``CAPACITY`` steps). Reading syncs; recording never does.
    """

    CAPACITY = 128

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._ring: Optional[Tensor] = None  # (CAPACITY, 4) fp32
        self._scales: List[float] = []
        self._sum: Optional[Tensor] = None  # (3,) running sums of (loss, cos, count)
        self._last: Optional[Tensor] = None  # (2,) last (loss, cos)

    def reserve(self, scale: float, device: torch.device) -> Tensor:
        """A fresh (4,) fp32 row for one step's partials
        ``[sum((s-g)^2), sum(s*g), sum(s^2), sum(g^2)]``; the loss is
        ``scale / 2 * partials[0]``."""
        if self._ring is None or self._ring.device != device or len(self._scales) == self.CAPACITY:
            self._fold()
            # A new ring rather than reuse: a row reserved by a step whose
            # backward has not run yet may still be written later.
            # NaN-filled once per CAPACITY steps instead of a fill per row (~3 us a step).
            self._ring = torch.full((self.CAPACITY, 4), float("nan"), dtype=torch.float32, device=device)
        row = self._ring[len(self._scales)]
        self._scales.append(scale)
        return row

    def record(self, partials: Tensor, scale: float) -> None:
        self.reserve(scale, partials.device).copy_(partials)

    def _fold(self) -> None:
        n = len(self._scales)
        if n == 0 or self._ring is None:
            return
        p = self._ring[:n]
        half = torch.tensor(self._scales, dtype=torch.float32).to(p.device, non_blocking=True) * 0.5
        valid = ~torch.isnan(p[:, 0])
        loss = p[:, 0] * half
        cos = p[:, 1] / torch.sqrt(p[:, 2] * p[:, 3]).clamp_min(1e-30)
        vals = torch.where(valid[:, None], torch.stack([loss, cos, torch.ones_like(loss)], 1), 0.0)
        s = vals.sum(0)
        last_idx = (valid * torch.arange(1, n + 1, device=p.device)).argmax()
        last = torch.where(valid.any(), vals[last_idx, :2],
                           self._last if self._last is not None else torch.full((2,), float("nan"), device=p.device))
        self._sum = s if self._sum is None else s + self._sum.to(s.device)
        self._last = last
        self._scales = []
        self._ring = None

    def read(self) -> dict:
        """``{'loss', 'loss_mean', 'cos', 'cos_mean', 'count'}`` as Python numbers (syncs)."""
        self._fold()
        count = int(self._sum[2].item()) if self._sum is not None else 0
        if count == 0:
            nan = float("nan")
            return {"loss": nan, "loss_mean": nan, "cos": nan, "cos_mean": nan, "count": 0}
        last = self._last.tolist()
        sums = self._sum.tolist()
        return {"loss": last[0], "loss_mean": sums[0] / count, "cos": last[1], "cos_mean": sums[1] / count,
                "count": count}


def partials_of(s: Tensor, g: Tensor) -> Tensor:
    """Reference partial sums for the statistics (fp32 (4,))."""
    sf, gf = s.detach().float(), g.detach().float()
    d = sf - gf
    return torch.stack([(d * d).sum(), (sf * gf).sum(), (sf * sf).sum(), (gf * gf).sum()])


def flatten_inputs(synth, trigger: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Validated 2-D views of trigger (N, Dt) and context (N, Dc) in the compute
    dtype (the autocast dtype under autocast), detached."""
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


def _no_autocast(x: Tensor):
    """Autocast off inside a fused call (the inputs are already in the compute
    dtype); a no-op context when autocast is off, which saves ~2 us a call."""
    return torch.autocast(x.device.type, enabled=False) if autocast_on(x) else contextlib.nullcontext()


def _unpack(ctx, n_mid: int):
    """Saved as ``x, [c], *mid (n_mid tensors), *zs, *params``: returns
    ``(x, c or None, mid, zs, params)``."""
    saved = ctx.saved_tensors
    i = 2 if ctx.has_c else 1
    c = saved[1] if ctx.has_c else None
    mid = saved[i: i + n_mid]
    zs = list(saved[i + n_mid: i + n_mid + ctx.n_z])
    return saved[0], c, mid, zs, list(saved[i + n_mid + ctx.n_z:])


class _TriggerUpdate(torch.autograd.Function):
    """Forward: ``S = synth(x, c)`` in one fused call; returns ``(trigger.clone(), S)``.
    Backward: the true gradient ``g`` passes to the trigger unchanged, and one
    fused call turns ``2/g.size(0) * (S - g)`` into every parameter gradient."""

    @staticmethod
    def forward(ctx, impl: FusedImpl, stats: Optional[SynthStats], trigger: Tensor, x: Tensor,
                c: Optional[Tensor], *params: Tensor):
        with _no_autocast(x):
            s, zs = impl.forward(x, c, list(params))
        ctx.impl, ctx.stats, ctx.has_c, ctx.n_z = impl, stats, c is not None, len(zs)
        ctx.save_for_backward(x, *(() if c is None else (c,)), s, *zs, *params)
        # Mark the tensor that is returned (a view of s), not s itself: else the
        # message carries a graph and backward gets a zero-filled gradient for it.
        s_out = s.view(*trigger.shape[:-1], s.shape[-1])
        ctx.mark_non_differentiable(s_out)
        ctx.set_materialize_grads(False)  # g is always defined: the clone is the only differentiable output
        return trigger.clone(), s_out

    @staticmethod
    def backward(ctx, g: Tensor, _unused: Optional[Tensor]):
        x, c, (s,), zs, params = _unpack(ctx, 1)
        scale = 2.0 / g.size(0)  # dni-pytorch: normalised by the first dimension
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != s.dtype:
            g2 = g2.to(s.dtype)
        grads, partials = ctx.impl.update(x, c, params, zs, s, g2, scale, None)
        if ctx.stats is not None:
            ctx.stats.record(partials, scale)
        return (None, None, g if ctx.needs_input_grad[2] else None, None, None, *grads)


class _SendRegression(torch.autograd.Function):
    """ForwardInterface.send: forward computes ``S`` (one fused call) and returns
    a 0-dim loss carrier plus ``S``; backward regresses ``S`` on the message ``m``
    with ``F.mse_loss``'s gradient ``2/m.numel() * (S - m)`` times the incoming
    loss gradient, in one fused call. The carrier's value is unspecified: the
    loss itself is computed in the update and kept in the interface's stats."""

    @staticmethod
    def forward(ctx, impl: FusedImpl, stats: Optional[SynthStats], x: Tensor, c: Optional[Tensor],
                m: Tensor, *params: Tensor):
        with _no_autocast(x):
            s, zs = impl.forward(x, c, list(params))
        ctx.impl, ctx.stats, ctx.has_c, ctx.n_z = impl, stats, c is not None, len(zs)
        ctx.save_for_backward(x, *(() if c is None else (c,)), m, s, *zs, *params)
        ctx.mark_non_differentiable(s)
        ctx.set_materialize_grads(False)  # grad_loss is always defined: the carrier is the only differentiable output
        return s.new_empty(()), s

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _unused: Optional[Tensor]):
        x, c, (m, s), zs, params = _unpack(ctx, 2)
        scale = 2.0 / m.numel()
        grads, partials = ctx.impl.update(x, c, params, zs, s, m, scale, grad_loss.detach())
        if ctx.stats is not None:
            ctx.stats.record(partials, scale)
        return (None, None, None, None, None, *grads)


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


def fused_trigger(impl, stats, trigger, x, c, params):
    return _TriggerUpdate.apply(impl, stats, trigger, x, c, *params)


def fused_send(impl, stats, x, c, m, params):
    return _SendRegression.apply(impl, stats, x, c, m, *params)


def fused_receive(impl: FusedImpl, x: Tensor, c: Optional[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``S`` alone, no graph (receive and backward(h, factor))."""
    with torch.no_grad(), _no_autocast(x):
        s, _ = impl.forward(x, c, [p.detach() for p in params])
    return s


def grad_carrier(grads: Tuple[Tensor, ...], params: Sequence[Tensor]) -> Tensor:
    return _GradCarrier.apply(tuple(grads), *params)
