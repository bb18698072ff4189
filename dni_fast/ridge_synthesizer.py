"""``RidgeSynthesizer``: a linear synthesizer fitted in closed form, with forgetting.

Why it exists (docs/synthetic_gradients.md, "A synthesizer that keeps up"):
in the RNN examples the map from the state to the true gradient at the
truncation boundary is predictable on a fixed model (held-out cos 0.8 from a
few hundred rows), but it moves as the model trains, faster than a
gradient-trained synthesizer follows it, and the gradient-trained one's ReLU
units die on the noisy targets meanwhile (causes 5 and 6 there). Exponentially
weighted ridge regression (recursive least squares with forgetting) has
neither problem: it has no units to die, and every fit is the exact
least-squares answer on the recent rows, so it tracks the map at the rate the
rows arrive.

The math, with features ``f = [trigger, context, 1]`` (one row per trigger
row) and targets ``g`` (the true gradient the interface hands over)::

    A <- forget * A + F^T F          (D+1, D+1), fp64
    B <- forget * B + F^T G          (D+1, Do),  fp64
    W  = (A + ridge * diag(diag(A)) + tiny * I)^-1 B
    S(trigger, context) = f @ W

The penalty is relative to each feature's own weighted energy, so the fit
does not depend on the features' scales (like ridge on standardised
features) and needs no tuning per model. ``1 / (1 - forget)`` is the memory
in observations (0.98: about 50 steps).

The interfaces hand the true gradient to :meth:`fit` instead of
backpropagating a regression loss (the ``reference`` backend checks for
``fit``; docs/design.md, "Closed-form synthesizers"). The synthesizer has no
parameters, so no optimizer sees it; its state is buffers, and
``state_dict`` checkpoints it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from dni_fast._autocast import autocast_on, compute_dtype, no_autocast

__all__ = ["RidgeSynthesizer"]


class RidgeSynthesizer(nn.Module):
    """Linear synthesizer ``S = [trigger, context, 1] @ W``, with ``W`` the
    exponentially weighted ridge fit of the true gradients it has been handed.

    Args:
        output_dim: width ``Do`` of the synthesized message.
        trigger_dim: trigger width ``Dt``, default ``output_dim``.
        context_dim: context width ``Dc``; ``None`` means no context (a context
            passed in is then ignored, as ``BasicSynthesizer`` does).
        forget: weight of the past per observation, in ``(0, 1]``; the memory is
            about ``1 / (1 - forget)`` observations (1.0: never forget).
        ridge: penalty relative to each feature's weighted energy, ``>= 0``.
        refit_every: solve for ``W`` after every this many observations (the
            statistics are accumulated every time); the solve costs
            ``O((Dt+Dc+1)^3)``, the accumulation ``O(rows * (Dt+Dc+1)^2)``.

    Shapes: ``trigger (*, Dt)``, ``context (*, Dc)`` broadcastable against the
    trigger's leading dims, output ``(*, Do)`` in the trigger's dtype (under
    autocast, the autocast dtype; the product runs in ``weight``'s dtype).

    Buffers (in ``state_dict``): ``gram (D+1, D+1)`` and ``cross (D+1, Do)`` in
    fp64, ``weight (D+1, Do)`` in the module's float dtype, ``n_fits`` (the
    observations folded in). ``.to(device)`` moves them; ``.float()``/``.half()``
    cast ``weight`` only (the statistics stay fp64).

    Set ``fitting = False`` to freeze it (the interfaces then only predict).
    """

    #: the interfaces hand this synthesizer its targets through ``fit`` (docs/design.md)
    closed_form = True

    def __init__(self, output_dim: int, trigger_dim: Optional[int] = None, context_dim: Optional[int] = None,
                 forget: float = 0.98, ridge: float = 1e-3, refit_every: int = 1) -> None:
        super().__init__()
        for name, v in (("output_dim", output_dim), ("trigger_dim", trigger_dim), ("context_dim", context_dim),
                        ("refit_every", refit_every)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"RidgeSynthesizer: {name} must be a positive int, got {v!r}")
        if not isinstance(forget, (int, float)) or not 0.0 < forget <= 1.0:
            raise ValueError(f"RidgeSynthesizer: forget must be in (0, 1], got {forget!r}")
        if not isinstance(ridge, (int, float)) or not ridge >= 0.0:
            raise ValueError(f"RidgeSynthesizer: ridge must be a non-negative number, got {ridge!r}")
        self.output_dim = output_dim
        self.trigger_dim = output_dim if trigger_dim is None else trigger_dim
        self.context_dim = context_dim
        self.forget, self.ridge, self.refit_every = float(forget), float(ridge), refit_every
        self.fitting = True
        self._pending = 0  # observations since the last solve
        d = self.trigger_dim + (context_dim or 0) + 1
        self.register_buffer("gram", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("cross", torch.zeros(d, output_dim, dtype=torch.float64))
        # W starts at 0: a fresh synthesizer predicts 0, as the paper's zero-initialised last layer
        # nearly does (BasicSynthesizer keeps nn.Linear's bias there, for dni-pytorch's numbers).
        self.register_buffer("weight", torch.zeros(d, output_dim))
        self.register_buffer("n_fits", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"output_dim={self.output_dim}, trigger_dim={self.trigger_dim}, context_dim={self.context_dim}, "
                f"forget={self.forget}, ridge={self.ridge}, refit_every={self.refit_every}")

    def _apply(self, fn, recurse=True):
        # .double()/.half() and friends cast every float buffer; the statistics must stay fp64
        # (a Gram matrix of fp16 rows overflows, and fp32 loses the small directions).
        # fn replaces each buffer with a new tensor, so the fp64 originals are intact: on a cast,
        # keep them (moved to wherever fn put the copies) instead of casting the copies back.
        gram, cross = self.gram, self.cross
        super()._apply(fn, recurse)
        if self.gram.dtype != torch.float64:
            self.gram = gram.to(self.gram.device)
            self.cross = cross.to(self.cross.device)
        return self

    # -- inputs ----------------------------------------------------------------
    def check_inputs(self, trigger: Any, context: Any, any_dtype: bool = False) -> Optional[Tensor]:
        """Validate ``trigger`` and ``context``; return the context to use
        (``None`` when this synthesizer takes none). Raises naming the problem.
        ``any_dtype``: accept any float trigger dtype (``fit`` computes in fp64;
        its trigger may come from an autocast forward whose backward runs
        outside autocast)."""
        if not isinstance(trigger, Tensor):
            raise TypeError(f"RidgeSynthesizer: trigger must be a tensor, got {type(trigger).__name__}")
        if not trigger.is_floating_point():
            raise TypeError(f"RidgeSynthesizer: trigger must be a floating-point tensor, got dtype {trigger.dtype}; "
                            "cast it with .float()")
        if trigger.dim() == 0 or trigger.shape[-1] != self.trigger_dim:
            raise ValueError(f"RidgeSynthesizer: trigger has shape {tuple(trigger.shape)}, but its last dim must be "
                             f"trigger_dim={self.trigger_dim}")
        w = self.weight
        if trigger.device != w.device:
            raise RuntimeError(f"RidgeSynthesizer: trigger is on {trigger.device} but the synthesizer's state is on "
                               f"{w.device}; move one of them (e.g. interface.to({trigger.device}))")
        if trigger.dtype != w.dtype and not any_dtype and not autocast_on(trigger):
            raise TypeError(f"RidgeSynthesizer: trigger dtype {trigger.dtype} differs from the synthesizer's "
                            f"{w.dtype} outside autocast; cast one of them, or run under torch.autocast")
        if self.context_dim is None:
            return None
        if context is None:
            raise ValueError(f"RidgeSynthesizer: context_dim={self.context_dim} is set but no context was given; "
                             "wrap the call in `with dni.synthesizer_context(context):`")
        if not isinstance(context, Tensor) or not context.is_floating_point():
            what = type(context).__name__ if not isinstance(context, Tensor) else f"dtype {context.dtype}"
            raise TypeError(f"RidgeSynthesizer: context must be a floating-point tensor, got {what} "
                            "(one-hot labels: F.one_hot(y, n).float())")
        if context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(f"RidgeSynthesizer: context has shape {tuple(context.shape)}, but its last dim must be "
                             f"context_dim={self.context_dim}")
        if context.device != w.device:
            raise RuntimeError(f"RidgeSynthesizer: context is on {context.device} but the synthesizer is on {w.device}")
        try:
            ok = torch.broadcast_shapes(trigger.shape[:-1], context.shape[:-1]) == trigger.shape[:-1]
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"RidgeSynthesizer: context leading dims {tuple(context.shape[:-1])} do not broadcast "
                             f"against the trigger's {tuple(trigger.shape[:-1])}")
        return context

    def _features(self, trigger: Tensor, context: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """``[trigger, context, 1]`` as rows ``(N, D+1)`` in ``dtype``."""
        x = trigger.detach().reshape(-1, self.trigger_dim).to(dtype)
        parts = [x]
        if context is not None:
            c = context.detach().expand(*trigger.shape[:-1], self.context_dim)
            parts.append(c.reshape(-1, self.context_dim).to(dtype))
        parts.append(x.new_ones(x.shape[0], 1))
        return torch.cat(parts, 1)

    # -- prediction and fit ------------------------------------------------------
    def forward(self, trigger: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``S``: ``trigger (*, Dt)``, ``context (*, Dc)`` -> ``(*, Do)``, no graph
        (the synthesizer learns through :meth:`fit`, not through autograd)."""
        context = self.check_inputs(trigger, context)
        # In the weights' dtype, autocast off; the output in the dtype the step computes in (the
        # autocast dtype under autocast, as BasicSynthesizer's, else the trigger's).
        with torch.no_grad(), no_autocast(trigger):
            w = self.weight
            s = self._features(trigger, context, w.dtype) @ w
        return s.reshape(*trigger.shape[:-1], self.output_dim).to(compute_dtype(trigger))

    @torch.no_grad()
    def fit(self, trigger: Tensor, context: Optional[Tensor], target: Tensor) -> None:
        """Fold the rows ``(trigger (*, Dt), context (*, Dc), target (*, Do))``
        into the statistics and, every ``refit_every`` calls, solve for ``W``.
        A no-op when ``fitting`` is off or the batch is empty; a batch holding
        a NaN or inf is skipped (decided on the device: no host sync)."""
        if not self.fitting or target.numel() == 0:
            return
        context = self.check_inputs(trigger, context, any_dtype=True)
        if target.shape[:-1] != trigger.shape[:-1] or target.shape[-1] != self.output_dim:
            raise ValueError(f"RidgeSynthesizer.fit: target has shape {tuple(target.shape)}, expected "
                             f"{tuple(trigger.shape[:-1]) + (self.output_dim,)} for a trigger of shape "
                             f"{tuple(trigger.shape)}")
        with no_autocast(trigger):
            self._accumulate(trigger, context, target)
        self._pending += 1  # a host counter: reading n_fits would sync with the device every step
        if self._pending >= self.refit_every:
            self.refit()

    def _accumulate(self, trigger: Tensor, context: Optional[Tensor], target: Tensor) -> None:
        f = self._features(trigger, context, torch.float64)
        g = target.detach().reshape(-1, self.output_dim).to(torch.float64)
        # A batch with a NaN or inf (a diverged model) would poison the statistics for good: it is
        # skipped, decided on the device (no host sync); the interfaces' statistics count it as nonfinite.
        ok = torch.isfinite(f).all() & torch.isfinite(g).all()
        f = torch.where(ok, f, 0.0)
        g = torch.where(ok, g, 0.0)
        keep = torch.where(ok, self.forget, 1.0)
        # in place: the buffers keep their storage (a user's reference to them stays live)
        self.gram.mul_(keep).addmm_(f.T, f)
        self.cross.mul_(keep).addmm_(f.T, g)
        self.n_fits += ok.long()

    @torch.no_grad()
    def refit(self) -> None:
        """Solve for ``W`` from the statistics now (``fit`` calls it)."""
        a = self.gram
        diag = a.diagonal()
        # Relative ridge, plus a floor that keeps A positive definite when a
        # feature has never been non-zero (a dead input, an unused context).
        floor = 1e-12 * diag.abs().max().clamp_min(1e-300)
        reg = a + torch.diag_embed(self.ridge * diag + floor)
        chol, info = torch.linalg.cholesky_ex(reg)
        # info != 0 only for a non-finite Gram matrix (a NaN target): W becomes
        # NaN too, and the interfaces' finite check names it. No host sync here.
        w = torch.cholesky_solve(self.cross, chol)
        self.weight.copy_(w.to(self.weight.dtype))
        self._pending = 0

    def reset(self) -> None:
        """Forget every observation: ``W`` back to 0."""
        for b in (self.gram, self.cross, self.weight, self.n_fits):
            b.zero_()
        self._pending = 0
