"""Numerical-equivalence checks between backends, for users and for our tests.

* ``assert_close``: dtype-aware tolerances (docs/design.md §6), scale-relative atol,
  and a failure report with the max and mean error, the mismatch count and
  the first mismatches.
* ``assert_lowp_close``: flash-attention's rule for fp16/bf16: the fast path's
  error against an fp32 reference is at most ``factor`` (2) times the error of
  the same-precision PyTorch reference.
* ``compare_backends``: one model, one step, outputs and every gradient.
* ``compare_training``: one model trained for N SGD steps (no momentum) on
  two backends from one seed; every parameter compared by relative norm.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dni_fast.backends import use_backend

__all__ = ["TOLERANCES", "tolerance", "assert_close", "assert_lowp_close", "compare_backends", "compare_training",
           "Report"]

# (rtol, atol); atol is relative to the expected tensor's scale (its max abs value).
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}
TF32_RTOL = 5e-4  # where TF32 or tl.dot's default precision is in use


def tolerance(dtype: torch.dtype, tf32: bool = False) -> Tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; ``tf32=True`` loosens fp32 to rtol 5e-4."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    if tf32 and dtype == torch.float32:
        rtol, atol = TF32_RTOL, TF32_RTOL
    return rtol, atol


def _describe(actual: Tensor, expected: Tensor, bad: Tensor, name: str, limit: int = 5) -> str:
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    n_bad = int(bad.sum())
    lines = [f"{name}: {n_bad} of {bad.numel()} elements mismatch; max abs err {err.max().item():.3e}, "
             f"mean abs err {err.mean().item():.3e}, scale {e.abs().max().item():.3e}, shape {tuple(e.shape)}"]
    idx = bad.nonzero()[:limit]
    for i in idx.tolist():
        i = tuple(i)
        lines.append(f"    at {i}: got {a[i].item():.6e}, expected {e[i].item():.6e}")
    return "\n".join(lines)


def assert_close(actual: Tensor, expected: Tensor, rtol: Optional[float] = None, atol: Optional[float] = None,
                 name: str = "tensor") -> None:
    """``|a - e| <= atol * scale + rtol * |e|`` elementwise, with ``scale`` the
    max abs of ``expected`` (1 if it is all zeros). Tolerances default to the
    table for ``expected.dtype``. Raises ``AssertionError`` with a report."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    drt, dat = tolerance(expected.dtype)
    rtol = drt if rtol is None else rtol
    atol = dat if atol is None else atol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    # the scale over the finite expected values: an infinity would make every tolerance infinite (an infinity
    # must be matched exactly, below)
    fin = e[torch.isfinite(e)]
    scale = fin.abs().max().item() if fin.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    # NaN where the reference has NaN, and the same infinity, are agreement (inf - inf would be NaN)
    # an expected infinity is matched exactly (rtol * inf would accept anything)
    close = torch.where(torch.isfinite(e), (a - e).abs() <= atol * scale + rtol * e.abs(), False)
    ok = close | (a == e) | (torch.isnan(a) & torch.isnan(e))
    bad = ~ok
    if bool(bad.any()):
        raise AssertionError(_describe(a, e, bad, name))


def assert_lowp_close(fast: Tensor, ref_lowp: Tensor, ref_fp32: Tensor, factor: float = 2.0,
                      name: str = "tensor") -> None:
    """Flash-attention's rule: ``max|fast - ref_fp32| <= factor * max|ref_lowp - ref_fp32|``
    (plus one ulp of the low-precision dtype at the output's scale, so that an
    exactly representable result does not demand bit equality)."""
    if not fast.shape == ref_lowp.shape == ref_fp32.shape:
        raise AssertionError(f"{name}: shapes {tuple(fast.shape)} (fast), {tuple(ref_lowp.shape)} (low-precision "
                             f"reference) and {tuple(ref_fp32.shape)} (fp32 reference) differ")
    f, lp, hp = fast.detach().double().cpu(), ref_lowp.detach().double().cpu(), ref_fp32.detach().double().cpu()
    err_fast = (f - hp).abs().max().item() if hp.numel() else 0.0
    err_ref = (lp - hp).abs().max().item() if hp.numel() else 0.0
    scale = hp.abs().max().item() if hp.numel() else 0.0
    floor = torch.finfo(fast.dtype).eps * max(scale, 1e-30)
    if not err_fast <= factor * err_ref + floor:
        mean_fast = (f - hp).abs().mean().item()
        raise AssertionError(f"{name}: max abs err vs fp32 reference {err_fast:.3e} (mean {mean_fast:.3e}) exceeds "
                             f"{factor}x the same-precision PyTorch reference's {err_ref:.3e} (+ floor {floor:.1e})")


@dataclass
class Report:
    """What ``compare_backends`` / ``compare_training`` compared."""

    backend: str
    compared: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)

    def raise_if_failed(self) -> "Report":
        if self.failures:
            raise AssertionError(f"backend {self.backend!r} differs from 'reference' in {len(self.failures)} of "
                                 f"{len(self.compared)} tensors:\n" + "\n".join(self.failures))
        return self


def _as_tuple(out) -> Tuple[Tensor, ...]:
    """Every tensor in ``out``: a tensor, or any nesting of dicts, lists and tuples of them (a dict of logits was
    compared as nothing)."""
    from torch.utils._pytree import tree_leaves

    return tuple(o for o in tree_leaves(out) if isinstance(o, Tensor))


def _run_once(make_model: Callable[[], nn.Module], run: Callable[[nn.Module], object], backend: str, seed: int):
    torch.manual_seed(seed)
    model = make_model()
    with use_backend(backend):
        torch.manual_seed(seed + 1)
        outs = _as_tuple(run(model))
        gen = torch.Generator().manual_seed(seed + 2)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs
                   if o.requires_grad)
        if isinstance(loss, Tensor):
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads, model


def compare_backends(make_model: Callable[[], nn.Module], run: Callable[[nn.Module], object], backend: str,
                     reference: str = "reference", seed: int = 0, rtol: Optional[float] = None,
                     atol: Optional[float] = None) -> Report:
    """Run one step of ``run(make_model())`` on ``reference`` and on ``backend``
    from the same seed, backpropagate a fixed random projection of the outputs
    and compare the outputs and every parameter gradient (including those the
    interfaces produce during the forward pass). Returns a ``Report``; call
    ``raise_if_failed()`` on it (or read ``failures``)."""
    outs_r, grads_r, _ = _run_once(make_model, run, reference, seed)
    outs_b, grads_b, _ = _run_once(make_model, run, backend, seed)
    rep = Report(backend)
    if len(outs_b) != len(outs_r):
        rep.failures.append(f"run returned {len(outs_b)} tensors on {backend!r} but {len(outs_r)} on {reference!r}")
    for i, (a, e) in enumerate(zip(outs_b, outs_r)):
        _check(rep, f"output[{i}]", a, e, rtol, atol)
    for n in sorted(set(grads_r) | set(grads_b)):
        if n not in grads_b or n not in grads_r:
            rep.compared.append(n)
            rep.failures.append(f"grad of {n}: present only on {'reference' if n in grads_r else backend}")
            continue
        _check(rep, f"grad of {n}", grads_b[n], grads_r[n], rtol, atol)
    if not rep.compared:  # a check that compares nothing must not pass
        rep.failures.append("nothing was compared: run returned no tensor and no parameter has a gradient")
    return rep


def _check(rep: Report, name: str, a: Tensor, e: Tensor, rtol, atol) -> None:
    rep.compared.append(name)
    try:
        assert_close(a, e, rtol, atol, name)
    except AssertionError as err:
        rep.failures.append(str(err))


def compare_training(make_model: Callable[[], nn.Module], step: Callable[[nn.Module, int], object], backend: str,
                     steps: int = 5, lr: float = 0.05, reference: str = "reference", seed: int = 0,
                     max_rel: float = 1e-4) -> Report:
    """Train ``make_model()`` for ``steps`` steps of SGD (no momentum) on
    ``reference`` and on ``backend`` from one seed and compare every parameter
    by relative norm ``|a - e| / |e| <= max_rel`` (1e-4 in fp32, docs/design.md §6).

    ``step(model, i)`` runs the forward pass and any backward calls of step
    ``i`` (the interfaces' own happen inside the forward); ``compare_training``
    zeroes the gradients before and applies SGD after each step.
    """
    finals = []
    for b in (reference, backend):
        torch.manual_seed(seed)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
        with use_backend(b):
            for i in range(steps):
                torch.manual_seed(seed + 1000 + i)
                opt.zero_grad(set_to_none=True)
                step(model, i)
                opt.step()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    rep = Report(backend)
    for n, e in finals[0].items():
        a = finals[1][n]
        rep.compared.append(n)
        denom = e.double().norm().item()
        rel = (a.double() - e.double()).norm().item() / (denom if denom > 0 else 1.0)
        if not rel <= max_rel:
            rep.failures.append(f"{n}: relative norm difference {rel:.3e} > {max_rel:.1e} after {steps} steps "
                                f"(max abs {(a.double() - e.double()).abs().max().item():.3e})")
    return rep
