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

``W`` is never formed when it need not be: a refit factors the regularised
``A = L L^T`` (``D^3 / 3`` flops) and keeps ``B``; a prediction for ``N``
rows is ``S = (L^-T L^-1 F^T)^T B``, two triangular solves with ``N``
right-hand sides (``2 D^2 N`` flops) instead of the ``2 D^2 Do`` of solving
for ``W``. In an RNN example (``N = 32`` rows, ``Do = D = 512``) that is
16 times fewer flops for the solve; with as many rows as outputs ``W`` is
formed once per refit and cached (``weight``).

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

from dni_fast._autocast import compute_dtype, no_autocast
from dni_fast.synthesizer import check_trigger_context

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
        refit_every: refactor after every this many observations (the
            statistics are accumulated every time; predictions use the last
            fit); the factorisation costs ``(Dt+Dc+1)^3 / 3`` flops, the
            accumulation ``2 * rows * (Dt+Dc+1)^2``.

    Shapes: ``trigger (*, Dt)``, ``context (*, Dc)`` broadcastable against the
    trigger's leading dims, output ``(*, Do)``. Everything is computed in fp64
    (a Gram matrix in fp16 overflows, and fp32 loses its small directions);
    the output is in the dtype the step computes in: the trigger's, or the
    autocast dtype under autocast. Any float trigger dtype is accepted.

    Buffers (in ``state_dict``, fp64): ``gram (D+1, D+1)`` and ``cross
    (D+1, Do)``, the statistics; ``factor (D+1, D+1)`` and ``cross_fit
    (D+1, Do)``, the last fit; ``n_fits``, the observations folded in.
    ``.to(device)`` moves them; dtype casts (``.half()``, ``.double()``)
    leave them in fp64.

    Set ``fitting = False`` to freeze it (the interfaces then only predict).

    Where its target is bootstrapped from its own output (an RNN's
    ``sg_factor`` near 1), or from the synthesizer above it in a deep stack of
    interfaces, an exact fit can feed its own growth: nothing damps the loop
    as an optimiser's small steps do. Watch ``interface.stats()["s_norm"]``.
    (A divergence once measured in 5- and 6-layer cDNI FCNs with
    ``normalize_targets=True``, norms of 1e12 within 100 steps, was the
    interface handing the first target over unnormalised, which this fit
    then kept; fixed, those nets train as without normalisation:
    docs/synthetic_gradients.md, "MNIST FCN".)
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
        self._pending = 0  # observations since the last fit
        self._w: Optional[Tensor] = None  # W of the last fit, formed on demand (weight)
        d = self.trigger_dim + (context_dim or 0) + 1
        f64 = torch.float64
        self.register_buffer("gram", torch.zeros(d, d, dtype=f64))
        self.register_buffer("cross", torch.zeros(d, output_dim, dtype=f64))
        # The fit starts at W = 0 (factor I, cross_fit 0): a fresh synthesizer predicts 0, as the paper's
        # zero-initialised last layer nearly does (BasicSynthesizer keeps nn.Linear's bias there, for
        # dni-pytorch's numbers).
        self.register_buffer("factor", torch.eye(d, dtype=f64))
        self.register_buffer("cross_fit", torch.zeros(d, output_dim, dtype=f64))
        self.register_buffer("n_fits", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._forget_cache)

    def _forget_cache(self, *args, **kwargs) -> None:
        self._w = None

    def extra_repr(self) -> str:
        return (f"output_dim={self.output_dim}, trigger_dim={self.trigger_dim}, context_dim={self.context_dim}, "
                f"forget={self.forget}, ridge={self.ridge}, refit_every={self.refit_every}")

    def _apply(self, fn, recurse=True):
        # fn replaces each buffer with a new tensor, so the fp64 originals are intact: on a dtype cast
        # keep them (moved to wherever fn put the copies) instead of casting the copies back.
        old = {k: self._buffers[k] for k in ("gram", "cross", "factor", "cross_fit")}
        super()._apply(fn, recurse)
        for k, t in old.items():
            if self._buffers[k].dtype != torch.float64:
                self._buffers[k] = t.to(self._buffers[k].device)
        self._w = None
        return self

    @property
    def weight(self) -> Tensor:
        """``W (D+1, Do)`` of the last fit, fp64 (rows: trigger, context, bias). Formed from the factor on
        first use after each fit (``D^2 Do`` flops) and kept until the next."""
        if self._w is None:
            self._w = torch.cholesky_solve(self.cross_fit, self.factor)
        return self._w

    # -- inputs ----------------------------------------------------------------
    def check_inputs(self, trigger: Any, context: Any) -> Optional[Tensor]:
        """Validate ``trigger`` and ``context``; return the context to use
        (``None`` when this synthesizer takes none). Raises naming the problem
        (``check_trigger_context``; any float dtype: the fit computes in fp64)."""
        return check_trigger_context("RidgeSynthesizer", "statistics", trigger, context, self.trigger_dim,
                                     self.context_dim, self.gram.device)

    def _features(self, trigger: Tensor, context: Optional[Tensor]) -> Tensor:
        """``[trigger, context, 1]`` as rows ``(N, D+1)``, fp64."""
        x = trigger.detach().reshape(-1, self.trigger_dim).double()
        parts = [x]
        if context is not None:
            c = context.detach().expand(*trigger.shape[:-1], self.context_dim)
            parts.append(c.reshape(-1, self.context_dim).double())
        parts.append(x.new_ones(x.shape[0], 1))
        return torch.cat(parts, 1)

    # -- prediction and fit ------------------------------------------------------
    def forward(self, trigger: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``S``: ``trigger (*, Dt)``, ``context (*, Dc)`` -> ``(*, Do)``, no graph
        (the synthesizer learns through :meth:`fit`, not through autograd)."""
        context = self.check_inputs(trigger, context)
        with torch.no_grad(), no_autocast(trigger):
            f = self._features(trigger, context)
            if f.shape[0] < self.output_dim:
                # Fewer rows than outputs: through the factor, S = (A^-1 F^T)^T B_fit (2 D^2 N flops), W unformed.
                # Decided by the row count alone, never by whether W happens to be cached (a .weight read, a
                # larger batch): the two paths round differently, and a resume (which drops the cache) must
                # predict bit for bit what the uninterrupted run predicts.
                s = torch.cholesky_solve(f.T, self.factor).T @ self.cross_fit
            else:
                s = f @ self.weight
        return s.reshape(*trigger.shape[:-1], self.output_dim).to(compute_dtype(trigger))

    @torch.no_grad()
    def fit(self, trigger: Tensor, context: Optional[Tensor], target: Tensor) -> None:
        """Fold the rows ``(trigger (*, Dt), context (*, Dc), target (*, Do))``
        into the statistics and, every ``refit_every`` calls, refit.
        A no-op when ``fitting`` is off or the batch is empty; a batch holding
        a NaN or inf is skipped (decided on the device: no host sync)."""
        if not self.fitting or target.numel() == 0:
            return
        context = self.check_inputs(trigger, context)
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
        f = self._features(trigger, context)
        g = target.detach().reshape(-1, self.output_dim).double()
        # A batch with a NaN or inf (a diverged model) would poison the statistics for good: it is
        # skipped, decided on the device (no host sync); the interfaces' statistics count it as nonfinite.
        ok = torch.isfinite(f).all() & torch.isfinite(g).all()
        f = torch.where(ok, f, 0.0)
        g = torch.where(ok, g, 0.0)
        keep = 1.0 + (self.forget - 1.0) * ok.to(torch.float64)  # fp64 (where() with floats gives fp32)
        # in place: the buffers keep their storage (a user's reference to them stays live)
        self.gram.mul_(keep).addmm_(f.T, f)
        self.cross.mul_(keep).addmm_(f.T, g)
        self.n_fits += ok.long()

    @torch.no_grad()
    def refit(self) -> None:
        """Fit to the statistics now (``fit`` calls it): factor the regularised Gram matrix."""
        a = self.gram
        diag = a.diagonal()
        # Relative ridge, plus a floor that keeps A positive definite when a
        # feature has never been non-zero (a dead input, an unused context).
        floor = 1e-12 * diag.abs().max().clamp_min(1e-300)
        chol, info = torch.linalg.cholesky_ex(a + torch.diag_embed(self.ridge * diag + floor))
        # info != 0 only for a non-finite Gram matrix: the predictions become
        # NaN, and the interfaces' finite check names it. No host sync here.
        self.factor.copy_(chol)
        self.cross_fit.copy_(self.cross)
        self._w = None
        self._pending = 0

    # The host counter of observations since the last fit is part of the state (with refit_every > 1 a resumed
    # run must refit at the same step as an uninterrupted one); saved beside the buffers, not as one, so that
    # fit() never reads it back from the device.
    _PENDING_KEY = "pending_fits"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + self._PENDING_KEY] = torch.tensor(self._pending, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        pending = state_dict.pop(prefix + self._PENDING_KEY, None)  # absent in checkpoints made before it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._w = None
        self._pending = int(pending) if pending is not None else 0

    def reset(self) -> None:
        """Forget every observation: back to predicting 0."""
        for b in (self.gram, self.cross, self.cross_fit, self.n_fits):
            b.zero_()
        self.factor.copy_(torch.eye(self.factor.shape[0], dtype=self.factor.dtype, device=self.factor.device))
        self._w = None
        self._pending = 0
