"""Fused InfoNCE (Greedy InfoMax / CPC) that never builds the score tensor.

One file for the whole op, in the style of flash-attention / Liger-Kernel:
the Triton kernels (forward and backward) and their launchers, a chunked
PyTorch engine that does the same on any device (the CPU path), the
``torch.autograd.Function`` that ties the projections to either engine, and
the pure-PyTorch fp32 twins :func:`infonce_ref` / :func:`sequence_infonce_ref`
that every path is tested against.

The math (docs/design.md section 7)
------------------------------
Vision (:func:`infonce`): ``z`` (B, C, H, W), context ``c`` of the same shape
(``c = z`` when not given), K bias-free 1x1 maps ``W_k`` (C, C). For step
k = 1..K the offset is ``o = k + skip``; ``f_k = W_k z[:, :, o:, :]`` and
``ctx_k = c[:, :, :H-o, :]`` are flattened to (P_k, C) rows in (y, x, b)
order, ``P_k = (H - o) * W * B``. Position p scores its positive
``s_p0 = <ctx_k[p], f_k[p]>`` and N negatives
``s_pn = <ctx_k[p], f_k[neg_idx[k-1][p, n-1]]>``;
``loss_k = mean_p (logsumexp_j s_pj - s_p0)``; the loss is ``mean_k loss_k``.

Sequence (:func:`sequence_infonce`, CPC): ``z`` (B, L, Cz), ``c`` (B, L, Cc),
``W_k`` (Cz, Cc). The prediction ``W_k c[b, t]`` (t < L - k, P_k = B (L - k)
positions in (b, t) order) scores ``z[b, t + k]`` (positive) against
``z`` rows ``neg_idx[k-1][p, :]`` of the (b, t)-flattened ``z`` (B L rows).

Both are one op: per step k a "query" row ``A_k[p]`` (vision: ``ctx``;
sequence: the prediction) is scored against gathered "key" rows of ``T_k``
(vision: ``f_k``; sequence: ``z``). With P_k = (T - k) R (vision: T = H - skip,
R = W B; sequence: T = L, R = B) the K steps are concatenated along rows, step
k starting at row ``R ((k-1) T - (k-1) k / 2)``, so one launch serves every k.

What the reference materialises, and what the fused paths do not
-----------------------------------------------------------------
GIM's code (and :func:`infonce_ref`) gathers the negatives into a
(P_k, N, C) tensor, multiplies, concatenates a (P_k, 1+N) score tensor and
takes a softmax, per k. The gathered negatives are N times the size of
``f_k`` and autograd keeps them (and the softmax) alive until the backward,
whose index backward builds another (P_k, N, C) tensor. The fused paths keep
only ``f_k`` (as the reference does) and one fp32 log-sum-exp per position;
the backward recomputes the scores from it (FlashAttention's trick).

What runs where, and why
------------------------
* The projections ``W_k z`` (sequence: ``W_k c``) are dense GEMMs of
  P_k x C x C MACs: cuBLAS / MKL through ``torch.mm``, written straight into
  one concatenated buffer (no copy). Their backward (``dF_k W_k`` and
  ``dF_k^T z``) is ``torch.mm`` too. These GEMMs dominate the FLOPs at GIM's
  shapes (C = 256 > N = 16); a kernel of ours would not beat cuBLAS at them.
* The scores are P (1+N) dot products of length C, each against a different
  gathered row: a batched GEMV, not a GEMM (every position has its own
  negatives), so ``tl.dot`` / tensor cores do not apply. The kernel
  multiplies and reduces in fp32 registers; each gathered element is used
  once, so it is bound by the (L2-resident) gathers. Forward: one program
  per (block of positions, k); positive first, then blocks of BLOCK_N
  negatives with an online max / sum (FlashAttention's online softmax), so
  any N works with registers bounded by BLOCK_P x BLOCK_N x BLOCK_C.
  It writes the LSE (saved) and the scaled NLL per position; the loss is one
  ``sum``.
* Backward: ``g_pj = (softmax_pj - [j = 0]) / (K P_k)`` is recomputed from
  the saved LSE. ``dA[p] += sum_j g_pj T[idx_pj]`` and the scatter
  ``dT[idx_pj] += g_pj A[p]`` use fp32 atomics: negatives are drawn with
  replacement, so any row may receive from any position. The alternative,
  a deterministic CSR transpose of the indices, costs a sort (several
  launches) per call, more than the atomics at these sizes. dA rows are
  only ever added to by the program that owns them (in the vision case it
  loops over k, since ``ctx_k`` rows are shared by every k), so those
  atomics are uncontended. The GPU backward is therefore not bitwise
  deterministic (fp32 addition order); it agrees with the reference to fp32
  rounding.
* The chunked engine (:func:`_scores_fwd_chunked` / ``_bwd``) does the same
  per chunk of positions with ``torch`` ops (gather, ``bmm``, ``logsumexp``,
  ``index_add_``): its temporaries are bounded by ``chunk x N x C`` whatever
  the problem size, and a chunk that stays in cache makes it faster than the
  reference on a CPU too. Its backward also goes one step at a time: step
  k's own gradient ((P_k, C), fp32) is handed to the projection's backward
  as soon as it is complete and freed, so one such buffer is alive, not K.
  It runs on any device; it is the CPU path, and deterministic.
* Not recomputed: ``f_k`` (``W_k z``) is saved, as the reference saves it.
  Recomputing it in the backward would save (sum P_k, C) but cost K more
  GEMMs, which at GIM's shapes are most of the op's FLOPs.

Launches on a GPU, forward: K ``mm`` + 1 kernel + 1 ``sum``; backward: two
zero fills, 1 kernel, 2K ``mm`` (+ casts for 16-bit inputs). The reference
takes about 10 ops per k forward and 15 backward.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_env import device_status, on_device

__all__ = [
    "infonce", "infonce_ref", "sequence_infonce", "sequence_infonce_ref",
    "vision_positions", "sequence_positions", "draw_negatives", "check_neg_idx",
    "triton_available", "LAUNCHES", "IMPLS",
]

#: Engines of the fused op: the Triton kernels or the chunked torch path.
IMPLS = ("triton", "chunked")

#: Kernel launches by kernel name (tests count them).
LAUNCHES: dict = {}

# TRITON_INTERPRET is read by triton when a kernel is decorated, so what
# matters is its value when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:  # this module must import without triton (the chunked path needs none)
    import triton
    import triton.language as tl

    _TRITON_ERR = ""
except Exception as e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_ERR = f"{type(e).__name__}: {e}"

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def triton_available(device) -> Tuple[bool, str]:
    """``(available, reason)``: whether the InfoNCE kernels can run on ``device``
    (a CUDA device with triton, or the CPU under ``TRITON_INTERPRET=1`` set
    before this module was imported)."""
    return device_status(device, _TRITON_ERR, _INTERPRET, "dni_fast.kernels.infonce")


# =============================================================================
# Geometry: the K steps concatenated along rows
# =============================================================================
class _Geom(NamedTuple):
    """P_k = (T - k) R rows for k = 1..K, concatenated; ``seq`` selects the
    sequence layout (queries per k, keys shared) over the vision one (queries
    shared, keys per k)."""

    seq: bool
    T: int
    R: int
    K: int
    N: int

    def P(self, k: int) -> int:
        return (self.T - k) * self.R

    def off(self, k: int) -> int:
        return self.R * ((k - 1) * self.T - (k - 1) * k // 2)

    @property
    def total(self) -> int:
        return self.off(self.K + 1)


def vision_positions(height: int, width: int, batch: int, k_steps: int, skip: int = 1) -> List[int]:
    """``[P_1, ..., P_K]``: positions per step of the vision loss,
    ``P_k = (H - k - skip) W B``. Raises ``ValueError`` if an offset reaches H."""
    if k_steps < 1:
        raise ValueError(f"k_steps must be at least 1, got {k_steps}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if k_steps + skip >= height:
        raise ValueError(
            f"InfoNCE with k_steps={k_steps} and skip={skip} predicts rows up to {k_steps + skip} ahead, but the "
            f"grid has only {height} rows (offsets o = k + skip must be < H = {height}); use k_steps <= "
            f"{height - skip - 1} or a taller grid")
    return [(height - k - skip) * width * batch for k in range(1, k_steps + 1)]


def sequence_positions(length: int, batch: int, k_steps: int) -> List[int]:
    """``[P_1, ..., P_K]`` of the sequence loss, ``P_k = B (L - k)``."""
    if k_steps < 1:
        raise ValueError(f"k_steps must be at least 1, got {k_steps}")
    if k_steps >= length:
        raise ValueError(f"SequenceInfoNCE with k_steps={k_steps} predicts {k_steps} steps ahead, but the sequence "
                         f"has only {length} steps (k must be < L = {length}); use k_steps <= {length - 1}")
    return [batch * (length - k) for k in range(1, k_steps + 1)]


def draw_negatives(positions: Sequence[int], pools: Sequence[int], n: int, device,
                   generator: Optional[torch.Generator] = None) -> List[Tensor]:
    """Negative indices drawn uniformly with replacement: ``[LongTensor (P_k, n)
    with values in [0, pools[k-1])]`` (a negative may equal the positive, as in
    GIM)."""
    return [torch.randint(pool, (p, n), device=device, generator=generator) for p, pool in zip(positions, pools)]


def check_neg_idx(neg_idx, positions: Sequence[int], pools: Sequence[int], device,
                  n: Optional[int] = None, check_range: bool = True) -> List[Tensor]:
    """Validate user-given negative indices: a sequence of K int64 tensors of
    shape (P_k, N) on ``device`` with values in ``[0, pools[k-1])`` (checking
    the range reads the values: one device sync on a GPU). Returns them as a
    list."""
    K = len(positions)
    if isinstance(neg_idx, Tensor) or not isinstance(neg_idx, (list, tuple)):
        raise TypeError(f"neg_idx must be a list of {K} LongTensors (one per prediction step, neg_idx[k-1] of shape "
                        f"(P_k, N)), got {type(neg_idx).__name__}")
    if len(neg_idx) != K:
        raise ValueError(f"neg_idx has {len(neg_idx)} entries, expected one per prediction step ({K})")
    out = []
    N = n
    for k, (t, P, pool) in enumerate(zip(neg_idx, positions, pools), start=1):
        if not isinstance(t, Tensor):
            raise TypeError(f"neg_idx[{k - 1}] must be a LongTensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"neg_idx[{k - 1}] must be a LongTensor (int64), got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != P or (N is not None and t.shape[1] != N) or t.shape[1] < 1:
            want = f"({P}, {N})" if N is not None else f"({P}, N)"
            raise ValueError(f"neg_idx[{k - 1}] has shape {tuple(t.shape)}, expected {want}: one row per position "
                             f"of step k={k}")
        N = t.shape[1]
        if t.device != torch.device(device):
            raise ValueError(f"neg_idx[{k - 1}] is on {t.device}, but z is on {device}")
        if check_range and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= pool:
                raise ValueError(f"neg_idx[{k - 1}] has values in [{lo}, {hi}], but step k={k} has only {pool} "
                                 f"candidate rows (values must be in [0, {pool}))")
        out.append(t)
    return out


def _check_float(name: str, t: Tensor, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() == 0:
        # the loss is a mean over positions: none would give NaN on one path and 0 on another
        raise ValueError(f"{name} has shape {tuple(t.shape)}: InfoNCE needs a non-empty batch and grid")


def _no_autocast(t: Tensor):
    """Autocast off for ``t``'s device type: the references compute in fp32 (or fp64), and the fused forward
    must compute its scores as its backward (which runs outside autocast) recomputes them."""
    try:
        return torch.autocast(t.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        return contextlib.nullcontext()


def _ref_dtype(*ts: Optional[Tensor]) -> torch.dtype:
    """fp32 for fp32 / fp16 / bf16 inputs, fp64 if any is fp64 (so that gradcheck can run on the references)."""
    dt = torch.float32
    for t in ts:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _check_vision(z: Tensor, c: Optional[Tensor], weights: Sequence[Tensor]) -> None:
    _check_float("z", z, 4)
    if c is not None:
        _check_float("c", c, 4)
        if c.shape != z.shape:
            raise ValueError(f"c has shape {tuple(c.shape)}, but z has {tuple(z.shape)}; they must match")
        if c.device != z.device:
            raise ValueError(f"c is on {c.device}, but z is on {z.device}")
    C = z.shape[1]
    if len(weights) < 1:
        raise ValueError("weights: need at least one W_k")
    for k, w in enumerate(weights, start=1):
        if not isinstance(w, Tensor) or w.numel() != C * C or w.shape[:2] != (C, C):
            raise ValueError(f"W_{k} must be ({C}, {C}) (or a ({C}, {C}, 1, 1) 1x1 conv weight) for {C} channels, "
                             f"got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if w.device != z.device:
            raise ValueError(f"W_{k} is on {w.device}, but z is on {z.device}")


def _check_sequence(z: Tensor, c: Tensor, weights: Sequence[Tensor]) -> None:
    _check_float("z", z, 3)
    _check_float("c", c, 3)
    if c.shape[:2] != z.shape[:2]:
        raise ValueError(f"c has shape {tuple(c.shape)} and z {tuple(z.shape)}: batch and length must match")
    if c.device != z.device:
        raise ValueError(f"c is on {c.device}, but z is on {z.device}")
    Cz, Cc = z.shape[2], c.shape[2]
    if len(weights) < 1:
        raise ValueError("weights: need at least one W_k")
    for k, w in enumerate(weights, start=1):
        if not isinstance(w, Tensor) or tuple(w.shape) != (Cz, Cc):
            raise ValueError(f"W_{k} must be ({Cz}, {Cc}) (z width, context width), got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if w.device != z.device:
            raise ValueError(f"W_{k} is on {w.device}, but z is on {z.device}")


# =============================================================================
# The fp32 references (the ground truth; written like GIM's code)
# =============================================================================
def infonce_ref(z: Tensor, c: Optional[Tensor], weights: Sequence[Tensor], neg_idx: Sequence[Tensor],
                skip: int = 1) -> Tensor:
    """Vision InfoNCE in plain PyTorch, computed in fp32.

    Args:
        z: (B, C, H, W) encodings.
        c: (B, C, H, W) context, or ``None`` for ``c = z``.
        weights: K tensors (C, C) or (C, C, 1, 1): ``W_k`` of step k.
        neg_idx: K LongTensors, ``neg_idx[k-1]`` (P_k, N) with
            P_k = (H - k - skip) W B; rows of ``f_k`` in (y, x, b) order.
        skip: offsets are ``o = k + skip``.

    Returns:
        the fp32 scalar loss ``mean_k mean_p (logsumexp_j s_pj - s_p0)``
        (fp64 for fp64 inputs; autocast is off inside).

    Materialises, per k, the gathered negatives (P_k, N, C) and the scores
    (P_k, 1+N), as GIM does.
    """
    _check_vision(z, c, weights)
    with _no_autocast(z):
        return _infonce_ref(z, c, weights, neg_idx, skip)


def _infonce_ref(z: Tensor, c: Optional[Tensor], weights: Sequence[Tensor], neg_idx: Sequence[Tensor],
                 skip: int) -> Tensor:
    B, C, H, W = z.shape
    K = len(weights)
    P = vision_positions(H, W, B, K, skip)
    neg_idx = check_neg_idx(neg_idx, P, P, z.device)
    dt = _ref_dtype(z, c)
    z32 = z.to(dt)
    c32 = z32 if c is None else c.to(dt)
    total = z32.new_zeros(())
    for k in range(1, K + 1):
        o = k + skip
        w = weights[k - 1].to(dt).reshape(C, C, 1, 1)
        f = F.conv2d(z32[:, :, o:, :], w).permute(2, 3, 0, 1).reshape(-1, C)  # (P_k, C), (y, x, b) rows
        ctx = c32[:, :, :H - o, :].permute(2, 3, 0, 1).reshape(-1, C)  # (P_k, C)
        pos = (ctx * f).sum(1, keepdim=True)  # (P_k, 1)
        neg = torch.einsum("pc,pnc->pn", ctx, f[neg_idx[k - 1]])  # (P_k, N)
        scores = torch.cat([pos, neg], 1)  # (P_k, 1+N)
        total = total - F.log_softmax(scores, 1)[:, 0].mean()
    return total / K


def sequence_infonce_ref(z: Tensor, c: Tensor, weights: Sequence[Tensor], neg_idx: Sequence[Tensor]) -> Tensor:
    """Sequence (CPC) InfoNCE in plain PyTorch, computed in fp32.

    Args:
        z: (B, L, Cz) encodings; c: (B, L, Cc) context.
        weights: K tensors (Cz, Cc), the bias-free ``Linear(Cc, Cz)`` of step k.
        neg_idx: K LongTensors, ``neg_idx[k-1]`` (B (L-k), N), rows of the
            (b, t)-flattened z (values in [0, B L)).

    Returns:
        the fp32 scalar loss (mean over positions, then over k; fp64 for fp64
        inputs; autocast is off inside).
    """
    _check_sequence(z, c, weights)
    with _no_autocast(z):
        return _sequence_infonce_ref(z, c, weights, neg_idx)


def _sequence_infonce_ref(z: Tensor, c: Tensor, weights: Sequence[Tensor], neg_idx: Sequence[Tensor]) -> Tensor:
    B, L, Cz = z.shape
    K = len(weights)
    P = sequence_positions(L, B, K)
    neg_idx = check_neg_idx(neg_idx, P, [B * L] * K, z.device)
    dt = _ref_dtype(z, c)
    z32, c32 = z.to(dt), c.to(dt)
    zf = z32.reshape(B * L, Cz)
    total = z32.new_zeros(())
    for k in range(1, K + 1):
        pred = (c32[:, :L - k] @ weights[k - 1].to(dt).t()).reshape(-1, Cz)  # (B(L-k), Cz), (b, t) rows
        pos = (pred * z32[:, k:].reshape(-1, Cz)).sum(1, keepdim=True)
        neg = torch.einsum("pc,pnc->pn", pred, zf[neg_idx[k - 1]])
        total = total - F.log_softmax(torch.cat([pos, neg], 1), 1)[:, 0].mean()
    return total / K


# =============================================================================
# Triton kernels
# =============================================================================
if triton is not None:

    @triton.jit
    def _rows(k, pid, T, R, BLOCK_P: tl.constexpr, SEQ: tl.constexpr):
        """Rows of program ``pid`` at step k: (p, mask, P_k, off_k, query row,
        key-row base, positive key row)."""
        P = (T - k) * R
        off = R * ((k - 1) * T - ((k - 1) * k) // 2)
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < P
        if SEQ:
            # query rows are the step's own predictions; keys are z (shared);
            # p = b (L-k) + t scores z row b L + t + k = p + k (b + 1)
            a_row = off + p
            t_base = 0
            pos = p + k * (p // (T - k) + 1)
        else:
            # queries are ctx rows 0..P_k-1 (shared by every k); keys f_k
            a_row = p
            t_base = off
            pos = p
        return p, pm, P, off, a_row, t_base, pos

    @triton.jit
    def _dot_rows(A, sA, a_row, Tt, sT, t_row, pm, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """fp32 <A[a_row], T[t_row]> per row of the block."""
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        cs = tl.arange(0, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            m = pm[:, None] & (cc[None, :] < C)
            a = tl.load(A + a_row.to(tl.int64)[:, None] * sA + cc[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(Tt + t_row.to(tl.int64)[:, None] * sT + cc[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(a * t, 1)
        return acc

    @triton.jit
    def _neg_scores(A, sA, a_row, Tt, sT, t_base, q, nmask, pm, C,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """fp32 (BLOCK_P, BLOCK_N) scores <A[a_row[p]], T[t_base + q[p, n]]>."""
        s = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        cs = tl.arange(0, BLOCK_C)
        trow = (t_base + q).to(tl.int64) * sT
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + cs
            cm = cc < C
            a = tl.load(A + a_row.to(tl.int64)[:, None] * sA + cc[None, :], mask=pm[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            t = tl.load(Tt + trow[:, :, None] + cc[None, None, :], mask=nmask[:, :, None] & cm[None, None, :],
                        other=0.0).to(tl.float32)
            s += tl.sum(a[:, None, :] * t, 2)
        return s

    @triton.jit(do_not_specialize=["T", "R"])
    def _infonce_fwd_kernel(A, sA, Tt, sT, IDX, LSE, NLL, T, R, N, C, inv_k,
                            SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """grid (cdiv(P_1, BLOCK_P), K): LSE and NLL / (K P_k) of a block of
        positions of step k = program_id(1) + 1, by an online log-sum-exp over
        blocks of negatives; no score ever leaves the registers."""
        pid = tl.program_id(0)
        k = tl.program_id(1) + 1
        p, pm, P, off, a_row, t_base, pos = _rows(k, pid, T, R, BLOCK_P, SEQ)
        if pid * BLOCK_P < P:
            s_pos = _dot_rows(A, sA, a_row, Tt, sT, t_base + pos, pm, C, BLOCK_P, BLOCK_C)
            m = s_pos
            l = tl.full((BLOCK_P,), 1.0, dtype=tl.float32)
            ns = tl.arange(0, BLOCK_N)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + ns
                nmask = pm[:, None] & (nn[None, :] < N)
                q = tl.load(IDX + (off + p).to(tl.int64)[:, None] * N + nn[None, :], mask=nmask, other=0)
                s = _neg_scores(A, sA, a_row, Tt, sT, t_base, q, nmask, pm, C, BLOCK_P, BLOCK_N, BLOCK_C)
                s = tl.where(nmask, s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
                m = m_new
            lse = m + tl.log(l)
            tl.store(LSE + off + p, lse, mask=pm)
            tl.store(NLL + off + p, (lse - s_pos) * (inv_k / P), mask=pm)

    @triton.jit(do_not_specialize=["T", "R"])
    def _infonce_bwd_kernel(A, sA, Tt, sT, IDX, LSE, GO, DA, DT, T, R, K, N, C, inv_k,
                            SEQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """Gradients of the loss w.r.t. the query rows (DA) and key rows (DT),
        both fp32 buffers of row stride C, zero-filled by the launcher.
        Vision: grid (cdiv(P_1, BLOCK_P), 1), each program loops over k (its
        query rows are shared by every k). Sequence: grid (.., K)."""
        pid = tl.program_id(0)
        if SEQ:
            k_lo = tl.program_id(1) + 1
            k_hi = k_lo + 1
        else:
            k_lo = 1
            k_hi = K + 1
        go = tl.load(GO).to(tl.float32)
        cs = tl.arange(0, BLOCK_C)
        ns = tl.arange(0, BLOCK_N)
        for k in range(k_lo, k_hi):
            p, pm, P, off, a_row, t_base, pos = _rows(k, pid, T, R, BLOCK_P, SEQ)
            if pid * BLOCK_P < P:
                lse = tl.load(LSE + off + p, mask=pm, other=0.0)
                coef = go * inv_k / P
                a_off = a_row.to(tl.int64)[:, None] * C
                # positive: g = (softmax - 1) * coef
                s_pos = _dot_rows(A, sA, a_row, Tt, sT, t_base + pos, pm, C, BLOCK_P, BLOCK_C)
                g0 = tl.where(pm, (tl.exp(s_pos - lse) - 1.0) * coef, 0.0)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + cs
                    m2 = pm[:, None] & (cc[None, :] < C)
                    a = tl.load(A + a_row.to(tl.int64)[:, None] * sA + cc[None, :], mask=m2, other=0.0)
                    t = tl.load(Tt + (t_base + pos).to(tl.int64)[:, None] * sT + cc[None, :], mask=m2, other=0.0)
                    tl.atomic_add(DA + a_off + cc[None, :], g0[:, None] * t.to(tl.float32), mask=m2)
                    tl.atomic_add(DT + (t_base + pos).to(tl.int64)[:, None] * C + cc[None, :],
                                  g0[:, None] * a.to(tl.float32), mask=m2)
                # negatives: g = softmax * coef, recomputed from the saved LSE
                for n0 in range(0, N, BLOCK_N):
                    nn = n0 + ns
                    nmask = pm[:, None] & (nn[None, :] < N)
                    q = tl.load(IDX + (off + p).to(tl.int64)[:, None] * N + nn[None, :], mask=nmask, other=0)
                    s = _neg_scores(A, sA, a_row, Tt, sT, t_base, q, nmask, pm, C, BLOCK_P, BLOCK_N, BLOCK_C)
                    g = tl.where(nmask, tl.exp(s - lse[:, None]) * coef, 0.0)
                    trow = (t_base + q).to(tl.int64)
                    for c0 in range(0, C, BLOCK_C):
                        cc = c0 + cs
                        cm = cc < C
                        m2 = pm[:, None] & cm[None, :]
                        m3 = nmask[:, :, None] & cm[None, None, :]
                        a = tl.load(A + a_row.to(tl.int64)[:, None] * sA + cc[None, :], mask=m2,
                                    other=0.0).to(tl.float32)
                        t = tl.load(Tt + trow[:, :, None] * sT + cc[None, None, :], mask=m3,
                                    other=0.0).to(tl.float32)
                        tl.atomic_add(DA + a_off + cc[None, :], tl.sum(g[:, :, None] * t, 1), mask=m2)
                        tl.atomic_add(DT + trow[:, :, None] * C + cc[None, None, :], g[:, :, None] * a[:, None, :],
                                      mask=m3)

    def _cfgs(rows):
        return [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=w, num_stages=s) for bp, bc, w, s in rows]

    # (BLOCK_P, BLOCK_C, warps, stages). The 3-D gather tile is
    # BLOCK_P x BLOCK_N x BLOCK_C fp32 values spread over the warps' threads:
    # 16 x 16 x 32 = 8 K values on 4 warps is 64 a thread. At GIM's shapes the
    # grid is only sum_k P_k / BLOCK_P (~200 programs at BLOCK_P = 16), so the
    # small BLOCK_P configs are there for occupancy.
    _CONFIGS = _cfgs([(8, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2),
                      (16, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)])
    _KEYS = ["N", "C", "SEQ", "BLOCK_N"]

    def _tuned(kernel, reset=None):
        kw = dict(configs=_CONFIGS, key=_KEYS)
        if reset:
            # the backward accumulates with atomics: every trial must start
            # from zeroed buffers
            kw["reset_to_zero"] = reset
        return triton.autotune(**kw)(kernel)

    if _INTERPRET or os.environ.get("DNI_FAST_TRITON_AUTOTUNE", "1") == "0":
        _fwd_launch, _bwd_launch, _AUTOTUNED = _infonce_fwd_kernel, _infonce_bwd_kernel, False
    else:
        _fwd_launch = _tuned(_infonce_fwd_kernel)
        _bwd_launch = _tuned(_infonce_bwd_kernel, ["DA", "DT"])
        _AUTOTUNED = True

#: Tiles in the interpreter (no autotuning there). Large tiles keep it fast;
#: tests lower them to cover the multi-block loops and the masks.
INTERPRET_CONFIG = {"BLOCK_P": 64, "BLOCK_C": 64, "BLOCK_N": 16}
#: Tiles on a GPU when autotuning is off (DNI_FAST_TRITON_AUTOTUNE=0).
_FIXED_GPU = {"BLOCK_P": 16, "BLOCK_C": 32, "num_warps": 4, "num_stages": 2}


def _block_n(N: int) -> int:
    if _INTERPRET:
        return min(INTERPRET_CONFIG["BLOCK_N"], triton.next_power_of_2(N))
    # N = 16 (GIM) or 10 (CPC) fits one block; more negatives go through the
    # online log-sum-exp in blocks of 16.
    return min(16, triton.next_power_of_2(N))


def _meta() -> dict:
    if _AUTOTUNED:
        return {}
    if _INTERPRET:
        return {"BLOCK_P": INTERPRET_CONFIG["BLOCK_P"], "BLOCK_C": INTERPRET_CONFIG["BLOCK_C"]}
    return dict(_FIXED_GPU)


def _count(name: str) -> None:
    LAUNCHES[name] = LAUNCHES.get(name, 0) + 1


def _require_triton(device) -> None:
    ok, why = triton_available(device)
    if not ok:
        raise RuntimeError(f"the InfoNCE Triton kernels cannot run here: {why}")


def _scores_fwd_triton(A: Tensor, Tt: Tensor, idx: Tensor, g: _Geom) -> Tuple[Tensor, Tensor]:
    _require_triton(A.device)
    lse = torch.empty(g.total, device=A.device, dtype=torch.float32)
    nll = torch.empty_like(lse)
    bn = _block_n(g.N)
    grid = lambda meta: (triton.cdiv(g.P(1), meta["BLOCK_P"]), g.K)  # noqa: E731
    with on_device(A):
        _fwd_launch[grid](A, A.stride(0), Tt, Tt.stride(0), idx, lse, nll, g.T, g.R, g.N, A.shape[1], 1.0 / g.K,
                          SEQ=g.seq, BLOCK_N=bn, **_meta())
    _count("infonce_fwd")
    return lse, nll


def _scores_bwd_triton(A: Tensor, Tt: Tensor, idx: Tensor, lse: Tensor, go: Tensor, g: _Geom, shared: Tensor,
                       on_step) -> None:
    """One launch for every k: accumulates the shared gradient (vision: the
    queries'; sequence: the keys') into ``shared`` (fp32, zero-filled) and
    hands each step's own gradient (fp32 rows of the concatenated buffer) to
    ``on_step(k, d_k)``."""
    _require_triton(A.device)
    C = A.shape[1]
    local = torch.zeros(g.total, C, device=A.device, dtype=torch.float32)
    dA, dT = (local, shared) if g.seq else (shared, local)
    bn = _block_n(g.N)
    grid = lambda meta: (triton.cdiv(g.P(1), meta["BLOCK_P"]), g.K if g.seq else 1)  # noqa: E731
    with on_device(A):
        _bwd_launch[grid](A, A.stride(0), Tt, Tt.stride(0), idx, lse, go.reshape(1).float(), dA, dT,
                          g.T, g.R, g.K, g.N, C, 1.0 / g.K, SEQ=g.seq, BLOCK_N=bn, **_meta())
    _count("infonce_bwd")
    for k in range(1, g.K + 1):
        on_step(k, local[g.off(k):g.off(k) + g.P(k)])


# =============================================================================
# The chunked engine (any device; the CPU path)
# =============================================================================
#: Bytes of gathered negatives per chunk. 2 MiB measured best on the 2-core
#: CI VM (L2 1 MiB/core, shared L3); the peak temporary is about twice this.
CHUNK_BYTES = 2 << 20


def _chunk_rows(g: _Geom, C: int, chunk_bytes: Optional[int]) -> int:
    b = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return max(1, b // max(1, g.N * C * 4))


def _step_views(A: Tensor, Tt: Tensor, g: _Geom, k: int):
    """Step k's query rows (P_k, C) and key rows."""
    P, off = g.P(k), g.off(k)
    if g.seq:
        return A[off:off + P], Tt
    return A[:P], Tt[off:off + P]


def _pos_rows(g: _Geom, k: int, p0: int, p1: int, device) -> Tensor:
    p = torch.arange(p0, p1, device=device)
    return p + k * (torch.div(p, g.T - k, rounding_mode="floor") + 1)


def _chunk_scores(a: Tensor, Tk: Tensor, q: Tensor, g: _Geom, k: int, p0: int, p1: int):
    """(key rows of the positives, gathered negatives (n, N, C), s_pos (n,),
    s_neg (n, N)), all fp32."""
    if g.seq:
        t_pos = Tk.index_select(0, _pos_rows(g, k, p0, p1, a.device))
    else:
        t_pos = Tk[p0:p1]
    tn = Tk.index_select(0, q.reshape(-1)).view(q.shape[0], q.shape[1], -1)
    a32, t_pos, tn = a.float(), t_pos.float(), tn.float()
    s_pos = (a32 * t_pos).sum(1)
    s_neg = torch.bmm(tn, a32.unsqueeze(2)).squeeze(2)
    return a32, t_pos, tn, s_pos, s_neg


def _scores_fwd_chunked(A: Tensor, Tt: Tensor, idx: Tensor, g: _Geom,
                        chunk_bytes: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    lse = torch.empty(g.total, device=A.device, dtype=torch.float32)
    nll = torch.empty_like(lse)
    rows = _chunk_rows(g, A.shape[1], chunk_bytes)
    for k in range(1, g.K + 1):
        P, off = g.P(k), g.off(k)
        Ak, Tk = _step_views(A, Tt, g, k)
        for p0 in range(0, P, rows):
            p1 = min(P, p0 + rows)
            _, _, _, s_pos, s_neg = _chunk_scores(Ak[p0:p1], Tk, idx[off + p0:off + p1], g, k, p0, p1)
            lse_c = torch.logaddexp(s_pos, torch.logsumexp(s_neg, 1))
            lse[off + p0:off + p1] = lse_c
            torch.mul(lse_c - s_pos, 1.0 / (g.K * P), out=nll[off + p0:off + p1])
            # release this chunk's temporaries before the next is gathered
            # (a loop variable otherwise keeps them alive one chunk longer)
            del s_pos, s_neg, lse_c
    return lse, nll


def _scores_bwd_chunked(A: Tensor, Tt: Tensor, idx: Tensor, lse: Tensor, go: Tensor, g: _Geom, shared: Tensor,
                        on_step, chunk_bytes: Optional[int] = None) -> None:
    """As :func:`_scores_bwd_triton`, one step at a time: step k's own
    gradient lives only until ``on_step`` has used it, so the backward holds
    one (P_k, C) buffer instead of all K."""
    C = A.shape[1]
    rows = _chunk_rows(g, C, chunk_bytes)
    go = go.float()
    for k in range(1, g.K + 1):
        P, off = g.P(k), g.off(k)
        Ak, Tk = _step_views(A, Tt, g, k)
        local = torch.zeros(P, C, device=A.device, dtype=torch.float32)
        # vision: queries shared by every k, keys f_k local; sequence: the reverse
        dAk, dTk = (local, shared) if g.seq else (shared[:P], local)
        coef = go / (g.K * P)
        for p0 in range(0, P, rows):
            p1 = min(P, p0 + rows)
            q = idx[off + p0:off + p1]
            a32, t_pos, tn, s_pos, s_neg = _chunk_scores(Ak[p0:p1], Tk, q, g, k, p0, p1)
            l = lse[off + p0:off + p1]
            g_pos = (torch.exp(s_pos - l) - 1.0) * coef  # (n,)
            g_neg = torch.exp(s_neg - l[:, None]) * coef  # (n, N)
            # dA: sum_j g_pj T[idx_pj]
            da = torch.baddbmm(g_pos[:, None, None] * t_pos[:, None, :], g_neg.unsqueeze(1), tn).squeeze(1)
            dAk[p0:p1] += da
            # dT: scatter g_pj A[p] into the key rows
            if g.seq:
                dTk.index_add_(0, _pos_rows(g, k, p0, p1, A.device), g_pos[:, None] * a32)
            else:
                dTk[p0:p1] += g_pos[:, None] * a32
            # the weighted query rows overwrite the gathered keys (no longer
            # needed): one chunk-sized temporary instead of two
            prod = torch.mul(g_neg.unsqueeze(2), a32.unsqueeze(1), out=tn)
            dTk.index_add_(0, q.reshape(-1), prod.view(-1, C))
            del a32, t_pos, tn, prod, s_pos, s_neg, g_pos, g_neg, da
        on_step(k, local)
        del local


# =============================================================================
# autograd
# =============================================================================
def _engine_fwd(impl: str, A, Tt, idx, g, chunk_bytes):
    if impl == "triton":
        return _scores_fwd_triton(A, Tt, idx, g)
    return _scores_fwd_chunked(A, Tt, idx, g, chunk_bytes)


def _engine_bwd(impl: str, A, Tt, idx, lse, go, g, shared, on_step, chunk_bytes):
    if impl == "triton":
        return _scores_bwd_triton(A, Tt, idx, lse, go, g, shared, on_step)
    return _scores_bwd_chunked(A, Tt, idx, lse, go, g, shared, on_step, chunk_bytes)


class _InfoNCEFunction(torch.autograd.Function):
    """loss = InfoNCE over every k, with the projections inside.

    Vision: ``src`` = z rows (HWB, C), ``other`` = ctx rows (HWB, C) (the
    queries); the keys ``F = [W_k z rows]`` are computed here. Sequence:
    ``src`` = c (B, L, Cc), ``other`` = z rows (BL, Cz) (the keys); the
    queries ``[W_k c[:, :L-k]]`` are computed here. Saved: the inputs, the
    projected rows and one fp32 LSE per position.

    Backward, per step k as soon as its own gradient is complete: the
    projection's backward (``d_src += dP_k W_k``, ``dW_k = dP_k^T src_k``),
    accumulated in fp32 and cast once at the end.
    """

    @staticmethod
    def forward(ctx, g: _Geom, impl: str, chunk_bytes, skip_rows, src: Tensor, other: Tensor, idx: Tensor,
                *weights: Tensor):
        # Autocast off: under it the chunked engine's bmm would score in bf16 and save that LSE, while the
        # backward (autocast off as well) recomputes the scores in the inputs' dtype: mismatched softmax weights.
        with _no_autocast(src):
            proj = _project(g, skip_rows, src, weights)
            A, Tt = (proj, other) if g.seq else (other, proj)
            lse, nll = _engine_fwd(impl, A, Tt, idx, g, chunk_bytes)
        ctx.save_for_backward(src, other, idx, proj, lse, *weights)
        ctx.g, ctx.impl, ctx.chunk_bytes, ctx.skip_rows = g, impl, chunk_bytes, skip_rows
        ctx.same = other is src
        return nll.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable: refuse double backward
    def backward(ctx, go: Tensor):
        src, other, idx, proj, lse, *weights = ctx.saved_tensors
        g = ctx.g
        A, Tt = (proj, other) if g.seq else (other, proj)
        need_src, need_other = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        need_w = ctx.needs_input_grad[7:]
        # the gradient shared by every k (vision: the queries'; sequence: the keys')
        shared = torch.zeros(other.shape, device=other.device, dtype=torch.float32)
        if ctx.same:
            # c = z (GIM): one tensor is both the queries and the projections'
            # input, so both gradients go into one fp32 buffer, saving two
            # (HWB, C) buffers and autograd's sum of them
            d_src32 = shared
        else:
            d_src32 = torch.zeros(src.shape, device=src.device, dtype=torch.float32) if need_src else None
        d_ws: List[Optional[Tensor]] = [None] * g.K

        def on_step(k: int, dp: Tensor) -> None:
            d_ws[k - 1] = _project_backward_k(g, k, ctx.skip_rows, src, weights[k - 1], dp, d_src32, need_w[k - 1])

        # Autocast off here too: a backward called inside autocast (GradientIsolated.step under it) would
        # recompute the scores in bf16 against the fp32 LSE the forward saved.
        with _no_autocast(go):
            _engine_bwd(ctx.impl, A, Tt, idx, lse, go, g, shared, on_step, ctx.chunk_bytes)
        if ctx.same:
            return (None, None, None, None, None, shared.to(src.dtype), None, *d_ws)
        d_src = d_src32.to(src.dtype) if need_src else None
        d_other = shared.to(other.dtype) if need_other else None
        return (None, None, None, None, d_src, d_other, None, *d_ws)


def _project(g: _Geom, skip_rows: int, src: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """The per-k projections written into one (sum P_k, C_out) buffer."""
    C_out = weights[0].shape[0]
    out = torch.empty(g.total, C_out, device=src.device, dtype=src.dtype)
    for k in range(1, g.K + 1):
        P, off = g.P(k), g.off(k)
        w = weights[k - 1]
        if g.seq:
            L = g.T
            B = src.shape[0]
            torch.matmul(src[:, :L - k], w.t(), out=out[off:off + P].view(B, L - k, C_out))
        else:
            first = (k + skip_rows) * g.R  # f_k rows start at row o_k of the (y, x, b) grid
            torch.mm(src[first:], w.t(), out=out[off:off + P])
    return out


def _project_backward_k(g: _Geom, k: int, skip_rows: int, src: Tensor, w: Tensor, dp: Tensor,
                        d_src32: Optional[Tensor], need_w: bool) -> Optional[Tensor]:
    """Backward of step k's projection from its fp32 gradient ``dp`` (P_k, C_out):
    adds ``dp W_k`` into the fp32 ``d_src32`` (when given) and returns
    ``dW_k = dp^T src_k`` in src's dtype (when needed)."""
    w32 = w if w.dtype == torch.float32 else w.float()
    dp_low = dp if dp.dtype == src.dtype else dp.to(src.dtype)
    if g.seq:
        L, B = g.T, src.shape[0]
        if d_src32 is not None:
            d_src32[:, :L - k] += dp.view(B, L - k, -1) @ w32
        return (dp_low.t() @ src[:, :L - k].reshape(-1, src.shape[2])) if need_w else None
    first = (k + skip_rows) * g.R
    if d_src32 is not None:
        d_src32[first:].addmm_(dp, w32)
    return (dp_low.t() @ src[first:]) if need_w else None


def _resolve_impl(impl: str, device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown InfoNCE engine {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "triton":
        _require_triton(device)
    return impl


def _rows_of(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (H W B, C) rows in (y, x, b) order, unit column stride."""
    B, C, H, W = x.shape
    r = x.permute(2, 3, 0, 1).reshape(H * W * B, C)
    return r if r.stride(1) == 1 else r.contiguous()


def infonce(z: Tensor, c: Optional[Tensor], weights: Sequence[Tensor], neg_idx: Sequence[Tensor], skip: int = 1,
            impl: str = "chunked", chunk_bytes: Optional[int] = None, check_range: bool = True) -> Tensor:
    """Vision InfoNCE, fused: same signature and value as :func:`infonce_ref`.

    Args:
        z: (B, C, H, W) encodings, fp32 / fp16 / bf16.
        c: (B, C, H, W) context (same dtype as z), or ``None`` for ``c = z``.
        weights: K tensors (C, C) or (C, C, 1, 1); cast to z's dtype.
        neg_idx: K LongTensors (P_k, N), P_k = (H - k - skip) W B, values in
            [0, P_k): rows of ``f_k`` in (y, x, b) order.
        skip: offsets ``o = k + skip``.
        impl: ``"triton"`` (the kernels) or ``"chunked"`` (torch, any device).
        chunk_bytes: the chunked engine's gathered bytes per chunk.
        check_range: validate the index values (a device sync on a GPU).

    Returns:
        the fp32 scalar loss, differentiable w.r.t. z, c and the weights.
        Scores accumulate in fp32 whatever the input dtype; ``W_k z`` is
        computed in z's dtype (as the layer would be).
    """
    _check_vision(z, c, weights)
    impl = _resolve_impl(impl, z.device)
    B, C, H, W = z.shape
    K = len(weights)
    P = vision_positions(H, W, B, K, skip)
    idx = torch.cat(check_neg_idx(neg_idx, P, P, z.device, check_range=check_range), 0)
    if c is not None and c.dtype != z.dtype:
        raise TypeError(f"c is {c.dtype} but z is {z.dtype}; they must match")
    if z.dtype not in _FLOAT:
        raise TypeError(f"z must be float32, float16 or bfloat16 for the fused InfoNCE, got {z.dtype}")
    g = _Geom(False, H - skip, W * B, K, idx.shape[1])
    # (y, x, b) rows: one transposing copy of z (and of c), so that every f_k
    # and ctx_k is a contiguous row range
    z_rows = _rows_of(z)
    c_rows = z_rows if c is None else _rows_of(c)
    ws = [w.reshape(C, C).to(z.dtype) for w in weights]
    return _InfoNCEFunction.apply(g, impl, chunk_bytes, skip, z_rows, c_rows, idx, *ws)


def sequence_infonce(z: Tensor, c: Tensor, weights: Sequence[Tensor], neg_idx: Sequence[Tensor],
                     impl: str = "chunked", chunk_bytes: Optional[int] = None, check_range: bool = True) -> Tensor:
    """Sequence (CPC) InfoNCE, fused: same signature and value as
    :func:`sequence_infonce_ref` (plus ``impl``, ``chunk_bytes``,
    ``check_range`` as in :func:`infonce`).

    Shapes: z (B, L, Cz), c (B, L, Cc), weights K x (Cz, Cc), neg_idx K x
    LongTensor (B (L-k), N) with values in [0, B L). Returns the fp32 loss.
    """
    _check_sequence(z, c, weights)
    impl = _resolve_impl(impl, z.device)
    B, L, Cz = z.shape
    K = len(weights)
    P = sequence_positions(L, B, K)
    idx = torch.cat(check_neg_idx(neg_idx, P, [B * L] * K, z.device, check_range=check_range), 0)
    if c.dtype != z.dtype:
        raise TypeError(f"c is {c.dtype} but z is {z.dtype}; they must match")
    if z.dtype not in _FLOAT:
        raise TypeError(f"z must be float32, float16 or bfloat16 for the fused InfoNCE, got {z.dtype}")
    g = _Geom(True, L, B, K, idx.shape[1])
    z_rows = z.reshape(B * L, Cz)
    if z_rows.stride(1) != 1:
        z_rows = z_rows.contiguous()
    ws = [w.to(z.dtype) for w in weights]
    return _InfoNCEFunction.apply(g, impl, chunk_bytes, 0, c, z_rows, idx, *ws)
