"""Fused Triton kernels for the synthesizer step (the ``triton`` backend).

Three primitives, with exactly the signatures and return conventions of their
fp32 PyTorch twins in :mod:`.synth_ref` (read that module for the math):

* :func:`synth_forward_triton`   -- the whole synthesizer forward, ONE launch;
* :func:`synth_update_triton`    -- regression delta, every parameter gradient
  and the four loss/cosine partial sums, ONE launch (n_hidden 0, 1 and 2);
* :func:`synth_pipelined_triton` -- step t+1's forward and step t's update in
  ONE launch (programs split between the two jobs, reading the same weights).

Every launcher bumps ``LAUNCHES[<kernel name>]`` so tests can count launches.

Notation (as in synth_ref): x (N, Dt), c (N, Dc), L = n_hidden in 0..2.
D0 is the width of the input layer's output (z_0, or S when L == 0), D1 and D2
the output widths of the hidden-layer weights (the last of them is Do).
So W_t is (D0, Dt), W_c (D0, Dc), W_1 (D1, D0), W_2 (D2, D1).

Design decisions (no GPU was available when this was written, so the numbers
below are estimates for H100, B=256, D=H=1024, and the alternatives are kept a
config switch away so the lead can measure them):

Forward ("rows" layout, the default). One program owns BLOCK_M rows and runs
every layer for them: it loops over output tiles of a layer, writes z_l to its
zs output (which must be written anyway for the update), then, after a CTA
barrier, reads those rows back for the next layer. The read-back hits L1/L2 (the
program just wrote them), and it makes any depth possible in one launch with no
atomics, no zero-filled scratch and deterministic results. Its weakness is
parallelism at small N (N / BLOCK_M programs; autotuning includes BLOCK_M=16 for
that). For L == 0 there is no dependency between output tiles, so the grid is
(row block x output tile), which is the other layout at no cost.
The "tiles" layout (``FWD_LAYOUT = "tiles"`` or env ``DNI_FAST_TRITON_FWD_LAYOUT``,
L == 1 only) uses a (row block, hidden tile) grid: each program computes one
z_0 tile and adds relu(z_0 tile) @ W_1[:, tile]^T into a zero-filled fp32 buffer
with atomics; the last program of a row block (an arrival counter in the same
buffer) adds nothing more but casts the sums to S. More programs (D0/BLOCK_N
times more), but it costs a zero fill (a second, tiny, GPU kernel from
``torch.zeros``), fp32 atomic traffic of N*D1*(D0/BLOCK_N) adds and it is not
bitwise deterministic. For L == 2 it would need a grid-wide dependency (z_1
needs all of z_0), so L == 2 always uses rows.

Update (programs own hidden tiles; the DESIGN lead). Backpropagating the
deltas is row-local, but every weight gradient is a reduction over all N rows.
A program that owns a tile of the last hidden layer computes
d[:, tile] = (delta @ W_L[:, tile]) * relu'(z[:, tile]) for the whole batch
(delta = scale*(s-g) is recomputed on the fly from s and g, never stored), and
then writes its columns of dW_L, its rows of dW_{L-1} or dW_t/dW_c and its slice
of the bias gradients: no atomics, deterministic. d[:, tile] for all N does not
fit on chip (N is a run-time value), so the program writes it once into a
workspace (N x D, compute dtype; the reference materialises the same tensor)
and reads it back after a CTA barrier; recomputing it instead would cost one
extra N*Do*D0 GEMM per output tile of dW_t.
L == 2 has a grid-wide dependency: d_0[:, tile] needs all columns of d_1. It is
still ONE launch: programs draw a ticket (an atomic counter) instead of using
their program id; tickets [0, PA) own tiles of H1 (d_1, dW_2, dW_1, db_1),
tickets [PA, PA+PB) own tiles of H0 and spin until all PA have published d_1
(a release/acquire counter). Because a ticket is only ever handed to a program
that is already running, the waited-on programs always make progress: no
deadlock whatever the residency (the same argument as CUB's decoupled
look-back). The alternative, two launches, would cost one launch latency
(~3-5 us plus ~10-20 us of Python launch overhead for Triton) to move the same
N*H1 workspace through L2; recomputing d_1 in every H0-tile program would
multiply that GEMM (N*Do*H1 MACs, 0.27 GMAC at the target) by D0/BLOCK_H (16x).
db_L and the partial sums are spread over the programs (output tiles of Do
dealt round-robin), each program writes its four partial sums to a slot, and
the last program to finish (an exit counter) adds the slots in a fixed order:
deterministic, no float atomics, no designated program streaming all of s, g.
The counters live in a small per-(device, stream) int32 buffer that the last
program resets to zero, so no launch needs a zero fill and concurrent streams
never share counters.

Widths (Dt, Dc, D0, D1, D2) are run-time arguments (one binary serves every
width; Triton still specialises the value 1 and multiples of 16) and autotune
keys; N is a run-time argument marked ``do_not_specialize`` so a new batch size
never compiles a new kernel. The autotune key holds a power-of-two bucket of N
(not N), so the tile choice can follow the batch size without retuning for
every batch size.
"""
from __future__ import annotations

import collections
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .synth_ref import n_hidden_of

__all__ = [
    "LAUNCHES",
    "triton_available",
    "synth_forward_triton",
    "synth_update_triton",
    "synth_pipelined_triton",
]

#: Kernel launches by kernel name (tests assert "one launch per primitive").
LAUNCHES: "collections.Counter[str]" = collections.Counter()

#: Forward layout: "rows" (default) or "tiles" (n_hidden == 1 only; see above).
FWD_LAYOUT = os.environ.get("DNI_FAST_TRITON_FWD_LAYOUT", "rows")

# TRITON_INTERPRET is read by triton when a kernel is decorated, so what matters
# is its value when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Tile sizes used under the interpreter (no autotuning there: it would run
#: every config through numpy). Large tiles are fast in the interpreter; tests
#: may lower them to exercise multi-tile loops and masks on small shapes.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_H": 32, "BLOCK_K": 32}

# Smallest BLOCK_H / BLOCK_M among the configs: workspaces whose size depends on
# the config chosen by the autotuner (slot counts) are sized for it.
_MIN_BLOCK_H = 32
_MIN_BLOCK_M = 16
_SLOT_BLOCK = 64  # slots reduced per step by the last program

try:  # the module must import without triton, so backend_status can say why
    import triton
    import triton.language as tl

    _TRITON_ERR = ""
except Exception as e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_ERR = f"{type(e).__name__}: {e}"


def triton_available(device) -> Tuple[bool, str]:
    """``(available, reason)``: whether these kernels can run on ``device``.

    True on a CUDA device with triton installed, and on the CPU only when
    ``TRITON_INTERPRET=1`` was set before this module was imported.
    """
    if triton is None:
        return False, f"triton cannot be imported ({_TRITON_ERR})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch"
        return True, ""
    if device.type == "cpu":
        if _INTERPRET:
            return True, ""
        why = "Triton kernels run on CUDA devices; on the CPU only under TRITON_INTERPRET=1"
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            why += " set before dni_fast.kernels.synth_step is imported (it was set too late)"
        return False, why
    return False, f"Triton kernels do not run on {device.type} devices"


# =============================================================================
# Kernels
# =============================================================================
if triton is not None:

    @triton.jit
    def _ld(ptr, r, c, s0, s1, R, C, CG: tl.constexpr):
        """Masked (len(r), len(c)) tile of a strided 2-D tensor, zeros outside.
        64-bit offsets: N * stride can exceed 2**31. CG: bypass L1 (data written
        by other programs of this launch)."""
        m = (r[:, None] < R) & (c[None, :] < C)
        p = ptr + r[:, None].to(tl.int64) * s0 + c[None, :].to(tl.int64) * s1
        if CG:
            v = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
        else:
            v = tl.load(p, mask=m, other=0.0)
        return v

    @triton.jit
    def _st(ptr, r, c, s0, s1, R, C, v):
        m = (r[:, None] < R) & (c[None, :] < C)
        p = ptr + r[:, None].to(tl.int64) * s0 + c[None, :].to(tl.int64) * s1
        tl.store(p, v.to(ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _delta(s, ss0, ss1, g, sg0, sg1, r, c, R, C, coef):
        """fp32 tile of delta = coef * (s - g); never stored."""
        sv = _ld(s, r, c, ss0, ss1, R, C, False).to(tl.float32)
        gv = _ld(g, r, c, sg0, sg1, R, C, False).to(tl.float32)
        return (sv - gv) * coef

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _fwd_layer(rows, N, n_lo, n_hi,
                   a, sa0, sa1, K, w, sw0, sw1, b, sb,
                   a2, sa20, sa21, K2, w2, sw20, sw21, b2, sb2,
                   o, so0, so1, NOUT,
                   RELU: tl.constexpr, HAS2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """o[rows, n_lo:n_hi] = act(a[rows]) @ w^T + b (+ a2[rows] @ w2^T + b2)."""
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                av = _ld(a, rows, ks, sa0, sa1, N, K, False)
                if RELU:
                    av = tl.maximum(av, 0.0)
                # W^T tile straight from W's strides; weights are cast to the
                # compute dtype as they are loaded (fp32 master weights under
                # autocast cost no extra pass).
                wv = _ld(w, ks, cols, sw1, sw0, K, NOUT, False)
                acc = tl.dot(av.to(DT), wv.to(DT), acc, input_precision=PREC)
            bias = tl.load(b + cols * sb, mask=cols < NOUT, other=0.0).to(tl.float32)
            if HAS2:
                for k0 in range(0, K2, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    av = _ld(a2, rows, ks, sa20, sa21, N, K2, False)
                    wv = _ld(w2, ks, cols, sw21, sw20, K2, NOUT, False)
                    acc = tl.dot(av.to(DT), wv.to(DT), acc, input_precision=PREC)
                bias += tl.load(b2 + cols * sb2, mask=cols < NOUT, other=0.0).to(tl.float32)
            acc += bias[None, :]
            _st(o, rows, cols, so0, so1, N, NOUT, acc)

    @triton.jit
    def _fwd_rows(pid, N,
                  x, sx0, sx1, c, sc0, sc1,
                  wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
                  w1, sw10, sw11, b1, sb1, w2, sw20, sw21, b2, sb2,
                  o0, so00, so01, o1, so10, so11, o2, so20, so21,
                  Dt, Dc, D0, D1, D2,
                  L: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows layout: program `pid` owns BLOCK_M rows and runs every layer."""
        DT: tl.constexpr = x.dtype.element_ty
        if L == 0:
            # No layer follows: output tiles are independent, so split them
            # over the grid too ((row block, output tile) layout).
            nt = tl.cdiv(D0, BLOCK_N)
            pid_m = pid // nt
            n_lo = (pid % nt) * BLOCK_N
            n_hi = n_lo + BLOCK_N
        else:
            pid_m = pid
            n_lo = 0
            n_hi = D0
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        _fwd_layer(rows, N, n_lo, n_hi,
                   x, sx0, sx1, Dt, wt, swt0, swt1, bt, sbt,
                   c, sc0, sc1, Dc, wc, swc0, swc1, bc, sbc,
                   o0, so00, so01, D0,
                   False, HAS_C, DT, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        if L >= 1:
            # z_0 rows were written by other threads of this CTA: the barrier
            # makes them visible (bar.sync orders global memory within a CTA).
            tl.debug_barrier()
            _fwd_layer(rows, N, 0, D1,
                       o0, so00, so01, D0, w1, sw10, sw11, b1, sb1,
                       o0, so00, so01, 0, w1, sw10, sw11, b1, sb1,
                       o1, so10, so11, D1,
                       True, False, DT, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        if L >= 2:
            tl.debug_barrier()
            _fwd_layer(rows, N, 0, D2,
                       o1, so10, so11, D1, w2, sw20, sw21, b2, sb2,
                       o1, so10, so11, 0, w2, sw20, sw21, b2, sb2,
                       o2, so20, so21, D2,
                       True, False, DT, PREC, BLOCK_M, BLOCK_N, BLOCK_K)

    @triton.jit
    def _fwd_tiles_l1(pid, N,
                      x, sx0, sx1, c, sc0, sc1,
                      wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
                      w1, sw10, sw11, b1, sb1,
                      o0, so00, so01, o1, so10, so11,
                      ws, Dt, Dc, D0, D1,
                      HAS_C: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tiles layout, n_hidden == 1: program = (row block, tile of D0).
        ws: zero-filled fp32 buffer, N*D1 partial sums of S, then one int32
        arrival counter per row block (bit pattern 0 is 0 in both types)."""
        DT: tl.constexpr = x.dtype.element_ty
        nh = tl.cdiv(D0, BLOCK_N)
        pid_m = pid // nh
        pid_h = pid % nh
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        hc = pid_h * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, Dt, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            av = _ld(x, rows, ks, sx0, sx1, N, Dt, False)
            wv = _ld(wt, ks, hc, swt1, swt0, Dt, D0, False)
            acc = tl.dot(av.to(DT), wv.to(DT), acc, input_precision=PREC)
        bias = tl.load(bt + hc * sbt, mask=hc < D0, other=0.0).to(tl.float32)
        if HAS_C:
            for k0 in range(0, Dc, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                av = _ld(c, rows, ks, sc0, sc1, N, Dc, False)
                wv = _ld(wc, ks, hc, swc1, swc0, Dc, D0, False)
                acc = tl.dot(av.to(DT), wv.to(DT), acc, input_precision=PREC)
            bias += tl.load(bc + hc * sbc, mask=hc < D0, other=0.0).to(tl.float32)
        acc += bias[None, :]
        _st(o0, rows, hc, so00, so01, N, D0, acc)
        # Round to the stored dtype first: the rows layout reads z_0 back from
        # zs, so both layouts feed the same values to the next layer.
        a = tl.maximum(acc.to(o0.dtype.element_ty), 0.0).to(DT)
        rm = rows < N
        for k0 in range(0, D1, BLOCK_K):
            oc = k0 + tl.arange(0, BLOCK_K)
            wv = _ld(w1, hc, oc, sw11, sw10, D0, D1, False)  # W_1^T[tile, oc]
            part = tl.dot(a, wv.to(DT), input_precision=PREC)
            bv = tl.load(b1 + oc * sb1, mask=oc < D1, other=0.0).to(tl.float32)
            part += tl.where(pid_h == 0, bv, 0.0)[None, :]
            m = rm[:, None] & (oc[None, :] < D1)
            tl.atomic_add(ws + rows[:, None].to(tl.int64) * D1 + oc[None, :], part, mask=m)
        # Every thread's adds precede the arrival (barrier + acq_rel atomic).
        tl.debug_barrier()
        cnt = (ws + N.to(tl.int64) * D1).to(tl.pointer_type(tl.int32), bitcast=True)
        old = tl.atomic_add(cnt + pid_m, 1, sem="acq_rel")
        if old == nh - 1:  # last program of this row block: S = fp32 sums, cast
            for k0 in range(0, D1, BLOCK_K):
                oc = k0 + tl.arange(0, BLOCK_K)
                v = _ld(ws, rows, oc, D1, 1, N, D1, True)
                _st(o1, rows, oc, so10, so11, N, D1, v)

    @triton.jit(do_not_specialize=["N", "N_BUCKET"])
    def _synth_fwd_kernel(
        x, sx0, sx1, c, sc0, sc1,
        wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
        w1, sw10, sw11, b1, sb1, w2, sw20, sw21, b2, sb2,
        o0, so00, so01, o1, so10, so11, o2, so20, so21,
        ws,
        N, Dt, Dc, D0, D1, D2, N_BUCKET,
        L: tl.constexpr, HAS_C: tl.constexpr, TILES: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if TILES:
            _fwd_tiles_l1(pid, N, x, sx0, sx1, c, sc0, sc1,
                          wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
                          w1, sw10, sw11, b1, sb1,
                          o0, so00, so01, o1, so10, so11,
                          ws, Dt, Dc, D0, D1,
                          HAS_C, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _fwd_rows(pid, N, x, sx0, sx1, c, sc0, sc1,
                      wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
                      w1, sw10, sw11, b1, sb1, w2, sw20, sw21, b2, sb2,
                      o0, so00, so01, o1, so10, so11, o2, so20, so21,
                      Dt, Dc, D0, D1, D2,
                      L, HAS_C, PREC, BLOCK_M, BLOCK_N, BLOCK_K)

    # ------------------------------------------------------------------- update
    @triton.jit
    def _stats_cols(c_lo, N, NC, s, ss0, ss1, g, sg0, sg1, coef, db, db2,
                    DUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """For columns [c_lo, c_lo+BLOCK_C) of s and g: store db = colsum(delta)
        (and into db2 when DUP) and return the four partial sums over them."""
        cols = c_lo + tl.arange(0, BLOCK_C)
        q = tl.zeros((BLOCK_C,), dtype=tl.float32)
        q0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        q1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        q2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        q3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            sv = _ld(s, rows, cols, ss0, ss1, N, NC, False).to(tl.float32)
            gv = _ld(g, rows, cols, sg0, sg1, N, NC, False).to(tl.float32)
            dv = (sv - gv) * coef
            q += tl.sum(dv, 0)
            q0 += tl.sum((sv - gv) * (sv - gv), 0)
            q1 += tl.sum(sv * gv, 0)
            q2 += tl.sum(sv * sv, 0)
            q3 += tl.sum(gv * gv, 0)
        cm = cols < NC
        tl.store(db + cols, q.to(db.dtype.element_ty), mask=cm)
        if DUP:
            tl.store(db2 + cols, q.to(db2.dtype.element_ty), mask=cm)
        return tl.sum(q0, 0), tl.sum(q1, 0), tl.sum(q2, 0), tl.sum(q3, 0)

    @triton.jit
    def _backprop_tile(h_lo, N, K, NH,
                       src, ssrc0, ssrc1, s, ss0, ss1, g, sg0, sg1, coef,
                       w, sw0, sw1, z, sz0, sz1, dst,
                       FROM_SG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """dst[:, tile] = (d_in @ w[:, tile]) * (z[:, tile] > 0) for all N rows,
        with d_in (N, K) = coef*(s-g) when FROM_SG, else the workspace `src`;
        w is (K, NH); dst is a contiguous (N, NH) workspace. Returns the fp32
        column sums of the new delta (its bias gradient)."""
        hc = h_lo + tl.arange(0, BLOCK_H)
        dbias = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                if FROM_SG:
                    dv = _delta(s, ss0, ss1, g, sg0, sg1, rows, ks, N, K, coef)
                else:
                    dv = _ld(src, rows, ks, ssrc0, ssrc1, N, K, True)
                wv = _ld(w, ks, hc, sw0, sw1, K, NH, False)
                acc = tl.dot(dv.to(DT), wv.to(DT), acc, input_precision=PREC)
            zv = _ld(z, rows, hc, sz0, sz1, N, NH, False)
            dn = tl.where(zv > 0, acc, 0.0)
            _st(dst, rows, hc, NH, 1, N, NH, dn)
            dbias += tl.sum(dn, 0)
        return dbias

    @triton.jit
    def _wgrad(r_lo, N, NR, NC,
               a, sa0, sa1, a2, sa20, sa21, b, sb0, sb1, b2, sb20, sb21, coef,
               o, so0, so1,
               A_MODE: tl.constexpr, B_MODE: tl.constexpr, A_CG: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """o[tile of NR, :NC] = A[:, tile]^T @ B[:, :NC], a reduction over the N
        rows, for one owned tile of A's columns and every column of B.
        Operand modes: 0 plain, 1 relu (activations from zs), 2 delta =
        coef*(a - a2) (resp. b - b2) from s and g."""
        rr = r_lo + tl.arange(0, BLOCK_R)
        for c0 in range(0, NC, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                if A_MODE == 2:
                    av = _delta(a, sa0, sa1, a2, sa20, sa21, rows, rr, N, NR, coef)
                else:
                    av = _ld(a, rows, rr, sa0, sa1, N, NR, A_CG)
                    if A_MODE == 1:
                        av = tl.maximum(av, 0.0)
                if B_MODE == 2:
                    bv = _delta(b, sb0, sb1, b2, sb20, sb21, rows, cc, N, NC, coef)
                else:
                    bv = _ld(b, rows, cc, sb0, sb1, N, NC, False)
                    if B_MODE == 1:
                        bv = tl.maximum(bv, 0.0)
                acc = tl.dot(tl.trans(av.to(DT)), bv.to(DT), acc, input_precision=PREC)
            _st(o, rr, cc, so0, so1, NR, NC, acc)

    @triton.jit
    def _stats_tiles(first, stride, N, NC, s, ss0, ss1, g, sg0, sg1, coef, db,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """_stats_cols over the column tiles first, first + stride, ... of [0, NC):
        stores db for them and returns the four partial sums, summed."""
        p0 = coef * 0.0
        p1 = coef * 0.0
        p2 = coef * 0.0
        p3 = coef * 0.0
        for ot in range(first, tl.cdiv(NC, BLOCK_C), stride):
            q0, q1, q2, q3 = _stats_cols(ot * BLOCK_C, N, NC, s, ss0, ss1, g, sg0, sg1, coef, db, db,
                                         False, BLOCK_N, BLOCK_C)
            p0 += q0
            p1 += q1
            p2 += q2
            p3 += q3
        return p0, p1, p2, p3

    @triton.jit
    def _put_slot(slots, i, p0, p1, p2, p3):
        tl.store(slots + i * 4 + 0, p0)
        tl.store(slots + i * 4 + 1, p1)
        tl.store(slots + i * 4 + 2, p2)
        tl.store(slots + i * 4 + 3, p3)

    @triton.jit
    def _upd_body(vpid, N,
                  x, sx0, sx1, c, sc0, sc1,
                  w1, sw10, sw11, w2, sw20, sw21,
                  z0, sz00, sz01, z1, sz10, sz11,
                  s, ss0, ss1, g, sg0, sg1,
                  gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
                  part, ws, ctr, gs, scale,
                  Dt, Dc, D0, D1, D2, SCR_OFF1, SCR_OFF0,
                  L: tl.constexpr, HAS_C: tl.constexpr, HAS_GS: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                  SLOT_BLOCK: tl.constexpr):
        """The whole update; `vpid` in [0, n_update_programs) is the program's
        index among the update programs (replaced by a ticket when L == 2)."""
        DT: tl.constexpr = x.dtype.element_ty
        coef = tl.cast(scale, tl.float32)
        if HAS_GS:
            coef = coef * tl.load(gs).to(tl.float32)
        slots = ws.to(tl.pointer_type(tl.float32), bitcast=True)
        if L == 0:
            # d_0 = delta: program owns a tile of Do (= D0) rows of dW_t/dW_c.
            t = vpid
            total = tl.cdiv(D0, BLOCK_H)
            n_slots = total
            h_lo = t * BLOCK_H
            p0, p1, p2, p3 = _stats_cols(h_lo, N, D0, s, ss0, ss1, g, sg0, sg1, coef, gbt, gbc,
                                         HAS_C, BLOCK_N, BLOCK_H)
            _put_slot(slots, t, p0, p1, p2, p3)
            _wgrad(h_lo, N, D0, Dt, s, ss0, ss1, g, sg0, sg1, x, sx0, sx1, x, sx0, sx1, coef,
                   gwt, Dt, 1, 2, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
            if HAS_C:
                _wgrad(h_lo, N, D0, Dc, s, ss0, ss1, g, sg0, sg1, c, sc0, sc1, c, sc0, sc1, coef,
                       gwc, Dc, 1, 2, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
        elif L == 1:
            t = vpid
            total = tl.cdiv(D0, BLOCK_H)
            n_slots = total
            h_lo = t * BLOCK_H
            hc = h_lo + tl.arange(0, BLOCK_H)
            scr0 = (ws + SCR_OFF0).to(tl.pointer_type(DT), bitcast=True)
            # d_0[:, tile] = (delta @ W_1[:, tile]) * relu'(z_0[:, tile]) -> workspace
            db0 = _backprop_tile(h_lo, N, D1, D0, scr0, 0, 0, s, ss0, ss1, g, sg0, sg1, coef,
                                 w1, sw10, sw11, z0, sz00, sz01, scr0,
                                 True, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
            # dW_1[:, tile] = delta^T @ relu(z_0[:, tile]), computed as its
            # transpose (tile rows) and stored with swapped strides.
            _wgrad(h_lo, N, D0, D1, z0, sz00, sz01, z0, sz00, sz01, s, ss0, ss1, g, sg0, sg1, coef,
                   gw1, 1, D0, 1, 2, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
            # db_1 and the partial sums: output tiles of Do dealt round-robin.
            p0, p1, p2, p3 = _stats_tiles(t, total, N, D1, s, ss0, ss1, g, sg0, sg1, coef, gb1, BLOCK_N, BLOCK_K)
            _put_slot(slots, t, p0, p1, p2, p3)
            tl.debug_barrier()  # this CTA's d_0 rows are in the workspace
            _wgrad(h_lo, N, D0, Dt, scr0, D0, 1, scr0, D0, 1, x, sx0, sx1, x, sx0, sx1, coef,
                   gwt, Dt, 1, 0, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
            if HAS_C:
                _wgrad(h_lo, N, D0, Dc, scr0, D0, 1, scr0, D0, 1, c, sc0, sc1, c, sc0, sc1, coef,
                       gwc, Dc, 1, 0, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
            tl.store(gbt + hc, db0.to(gbt.dtype.element_ty), mask=hc < D0)
            if HAS_C:
                tl.store(gbc + hc, db0.to(gbc.dtype.element_ty), mask=hc < D0)
        else:
            # L == 2. A ticket, not the program id, picks the role, so every
            # program waited on has already started (no deadlock).
            t = tl.atomic_add(ctr + 0, 1, sem="relaxed")
            PA = tl.cdiv(D1, BLOCK_H)
            total = PA + tl.cdiv(D0, BLOCK_H)
            n_slots = PA
            scr1 = (ws + SCR_OFF1).to(tl.pointer_type(DT), bitcast=True)
            scr0 = (ws + SCR_OFF0).to(tl.pointer_type(DT), bitcast=True)
            if t < PA:
                h_lo = t * BLOCK_H
                hc = h_lo + tl.arange(0, BLOCK_H)
                # d_1[:, tile] = (delta @ W_2[:, tile]) * relu'(z_1[:, tile])
                db1 = _backprop_tile(h_lo, N, D2, D1, scr1, 0, 0, s, ss0, ss1, g, sg0, sg1, coef,
                                     w2, sw20, sw21, z1, sz10, sz11, scr1,
                                     True, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                _wgrad(h_lo, N, D1, D2, z1, sz10, sz11, z1, sz10, sz11, s, ss0, ss1, g, sg0, sg1, coef,
                       gw2, 1, D1, 1, 2, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                p0, p1, p2, p3 = _stats_tiles(t, PA, N, D2, s, ss0, ss1, g, sg0, sg1, coef, gb2, BLOCK_N, BLOCK_K)
                _put_slot(slots, t, p0, p1, p2, p3)
                tl.debug_barrier()
                # dW_1[tile, :] = d_1[:, tile]^T @ relu(z_0): needs only own d_1.
                _wgrad(h_lo, N, D1, D0, scr1, D1, 1, scr1, D1, 1, z0, sz00, sz01, z0, sz00, sz01, coef,
                       gw1, D0, 1, 0, 1, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                tl.store(gb1 + hc, db1.to(gb1.dtype.element_ty), mask=hc < D1)
                # Publish d_1: every thread's stores, then one release add.
                tl.debug_barrier()
                tl.atomic_add(ctr + 1, 1, sem="release")
            else:
                h_lo = (t - PA) * BLOCK_H
                hc = h_lo + tl.arange(0, BLOCK_H)
                cnt = tl.atomic_add(ctr + 1, 0, sem="acquire")
                while cnt < PA:
                    cnt = tl.atomic_add(ctr + 1, 0, sem="acquire")
                tl.debug_barrier()
                # d_0[:, tile] = (d_1 @ W_1[:, tile]) * relu'(z_0[:, tile]);
                # d_1 comes from other programs: L1-bypassing loads.
                db0 = _backprop_tile(h_lo, N, D1, D0, scr1, D1, 1, s, ss0, ss1, g, sg0, sg1, coef,
                                     w1, sw10, sw11, z0, sz00, sz01, scr0,
                                     False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                tl.debug_barrier()
                _wgrad(h_lo, N, D0, Dt, scr0, D0, 1, scr0, D0, 1, x, sx0, sx1, x, sx0, sx1, coef,
                       gwt, Dt, 1, 0, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                if HAS_C:
                    _wgrad(h_lo, N, D0, Dc, scr0, D0, 1, scr0, D0, 1, c, sc0, sc1, c, sc0, sc1, coef,
                           gwc, Dc, 1, 0, 0, False, DT, PREC, BLOCK_N, BLOCK_H, BLOCK_K)
                tl.store(gbt + hc, db0.to(gbt.dtype.element_ty), mask=hc < D0)
                if HAS_C:
                    tl.store(gbc + hc, db0.to(gbc.dtype.element_ty), mask=hc < D0)
        # Exit: the last program adds the slots in a fixed order (deterministic)
        # and resets the counters for the next launch on this stream.
        tl.debug_barrier()
        old = tl.atomic_add(ctr + 2, 1, sem="acq_rel")
        if old == total - 1:
            acc = tl.zeros((SLOT_BLOCK, 4), dtype=tl.float32)
            for i0 in range(0, n_slots, SLOT_BLOCK):
                ii = i0 + tl.arange(0, SLOT_BLOCK)
                acc += _ld(slots, ii, tl.arange(0, 4), 4, 1, n_slots, 4, True)
            tl.store(part + tl.arange(0, 4), tl.sum(acc, 0))
            tl.atomic_xchg(ctr + 0, 0)
            tl.atomic_xchg(ctr + 1, 0)
            tl.atomic_xchg(ctr + 2, 0)

    @triton.jit(do_not_specialize=["N", "N_BUCKET"])
    def _synth_upd_kernel(
        x, sx0, sx1, c, sc0, sc1,
        w1, sw10, sw11, w2, sw20, sw21,
        z0, sz00, sz01, z1, sz10, sz11,
        s, ss0, ss1, g, sg0, sg1,
        gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
        part, ws, ctr, gs, scale,
        N, Dt, Dc, D0, D1, D2, N_BUCKET, SCR_OFF1, SCR_OFF0,
        L: tl.constexpr, HAS_C: tl.constexpr, HAS_GS: tl.constexpr, PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        SLOT_BLOCK: tl.constexpr,
    ):
        _upd_body(tl.program_id(0), N,
                  x, sx0, sx1, c, sc0, sc1, w1, sw10, sw11, w2, sw20, sw21,
                  z0, sz00, sz01, z1, sz10, sz11, s, ss0, ss1, g, sg0, sg1,
                  gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
                  part, ws, ctr, gs, scale,
                  Dt, Dc, D0, D1, D2, SCR_OFF1, SCR_OFF0,
                  L, HAS_C, HAS_GS, PREC, BLOCK_N, BLOCK_H, BLOCK_K, SLOT_BLOCK)

    @triton.jit(do_not_specialize=["N", "NP", "N_BUCKET"])
    def _synth_pipe_kernel(
        # step t+1's forward
        x, sx0, sx1, c, sc0, sc1,
        wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
        w1, sw10, sw11, b1, sb1, w2, sw20, sw21, b2, sb2,
        o0, so00, so01, o1, so10, so11, o2, so20, so21,
        # step t's update
        xp, sxp0, sxp1, cp, scp0, scp1,
        z0, sz00, sz01, z1, sz10, sz11,
        s, ss0, ss1, g, sg0, sg1,
        gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
        part, ws, ctr, gs, scale,
        N, NP, Dt, Dc, D0, D1, D2, N_BUCKET, SCR_OFF1, SCR_OFF0,
        L: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
        SLOT_BLOCK: tl.constexpr,
    ):
        """Programs [0, U) run the update (dispatched first: with L == 2 it is
        the longer, two-phase critical path), programs [U, U + F) the forward."""
        pid = tl.program_id(0)
        if L == 2:
            U = tl.cdiv(D1, BLOCK_H) + tl.cdiv(D0, BLOCK_H)
        else:
            U = tl.cdiv(D0, BLOCK_H)
        if pid < U:
            _upd_body(pid, NP,
                      xp, sxp0, sxp1, cp, scp0, scp1, w1, sw10, sw11, w2, sw20, sw21,
                      z0, sz00, sz01, z1, sz10, sz11, s, ss0, ss1, g, sg0, sg1,
                      gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
                      part, ws, ctr, gs, scale,
                      Dt, Dc, D0, D1, D2, SCR_OFF1, SCR_OFF0,
                      L, HAS_C, False, PREC, BLOCK_N, BLOCK_H, BLOCK_K, SLOT_BLOCK)
        else:
            _fwd_rows(pid - U, N, x, sx0, sx1, c, sc0, sc1,
                      wt, swt0, swt1, bt, sbt, wc, swc0, swc1, bc, sbc,
                      w1, sw10, sw11, b1, sb1, w2, sw20, sw21, b2, sb2,
                      o0, so00, so01, o1, so10, so11, o2, so20, so21,
                      Dt, Dc, D0, D1, D2,
                      L, HAS_C, PREC, BLOCK_N, BLOCK_H, BLOCK_K)

    # ----------------------------------------------------------- autotuning
    def _cfgs(names, rows):
        return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]

    # Hopper-oriented: tiles 64/128 on the big dims (wgmma wants M >= 64 per
    # warpgroup), plus 16/32-row or 32-column tiles because at the target size
    # (B=256, D=1024) the grids are otherwise 4-16 programs on 132 SMs.
    _FWD_CONFIGS = _cfgs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 128, 8, 4), (64, 64, 128, 4, 4),
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    ])
    _UPD_CONFIGS = _cfgs(("BLOCK_N", "BLOCK_H", "BLOCK_K"), [
        (32, 32, 64, 4, 4), (64, 32, 64, 4, 3), (128, 32, 128, 4, 4), (64, 64, 64, 4, 3),
        (64, 64, 128, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3),
    ])
    _KEYS = ["Dt", "Dc", "D0", "D1", "D2", "N_BUCKET", "L", "HAS_C", "PREC"]

    def _prune(names):
        """Drop configs whose pipelined operand tiles cannot fit in Hopper's
        228 KB of shared memory (fp32 operands with 128x128 tiles): compiling
        them only to fail at launch would waste autotuning time."""
        bm, bn, bk = names

        def prune(configs, named_args, **kwargs):
            es = named_args["x"].element_size()
            keep = []
            for cfg in configs:
                kw = cfg.kwargs
                a = kw[bm] * kw[bk] + kw[bk] * kw[bn] + kw[bm] * kw[bn]
                if cfg.num_stages * a * es <= 200 * 1024:
                    keep.append(cfg)
            return keep or configs[:1]

        return {"early_config_prune": prune}

    def _tune(configs, names):
        kw = dict(configs=configs, key=_KEYS, prune_configs_by=_prune(names))
        try:  # tuning results cached on disk across processes (triton >= 3.2)
            return triton.autotune(cache_results=True, **kw)
        except TypeError:  # pragma: no cover
            return triton.autotune(**kw)

    if _INTERPRET or os.environ.get("DNI_FAST_TRITON_AUTOTUNE", "1") == "0":
        _fwd_launch = _synth_fwd_kernel
        _upd_launch = _synth_upd_kernel
        _pipe_launch = _synth_pipe_kernel
        _AUTOTUNED = False
    else:
        _fwd_launch = _tune(_FWD_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))(_synth_fwd_kernel)
        _upd_launch = _tune(_UPD_CONFIGS, ("BLOCK_N", "BLOCK_H", "BLOCK_K"))(_synth_upd_kernel)
        _pipe_launch = _tune(_UPD_CONFIGS, ("BLOCK_N", "BLOCK_H", "BLOCK_K"))(_synth_pipe_kernel)
        _AUTOTUNED = True


# =============================================================================
# Host side
# =============================================================================
_FIXED_GPU = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_H": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _meta(names):
    """Explicit meta-parameters when not autotuning (interpreter or disabled)."""
    if _AUTOTUNED:
        return {}
    src = INTERPRET_CONFIG if _INTERPRET else _FIXED_GPU
    out = {k: src[k] for k in names}
    if not _INTERPRET:
        out["num_warps"] = src["num_warps"]
        out["num_stages"] = src["num_stages"]
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _n_bucket(n: int) -> int:
    # Autotune key for the batch size: a power of two in [16, 4096].
    b = 16
    while b < n and b < 4096:
        b *= 2
    return b


def _prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit inputs


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(f"the triton backend needs triton ({_TRITON_ERR}); pip install triton")


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_ESIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _check_2d(name: str, t: Tensor, rows: Optional[int], cols: Optional[int], device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the trigger's device)")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has width {t.shape[1]}, expected {cols}")


def _check_forward(x: Tensor, c: Optional[Tensor], params: Sequence[Tensor], xname="x", cname="c"):
    """Validate (x, c, params); returns (L, Dt, Dc, (D0, D1, D2))."""
    _require_triton()
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{xname} must be a 2-D tensor (N, Dt), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    dev = x.device
    _check_2d(xname, x, None, None, dev)
    if c is not None:
        _check_2d(cname, c, x.shape[0], None, dev)
    L = n_hidden_of(params, c is not None)
    if L > 2:
        raise ValueError(f"the triton kernels support n_hidden 0..2, got {L}")
    Dt = x.shape[1]
    Dc = c.shape[1] if c is not None else 0
    wt, bt = params[0], params[1]
    _check_2d("params[0] (input_trigger.weight)", wt, None, Dt, dev)
    D0 = wt.shape[0]
    i = 2
    if c is not None:
        _check_2d("params[2] (input_context.weight)", params[2], D0, Dc, dev)
        i = 4
    widths = [D0]
    for l in range(L):
        _check_2d(f"params[{i + 2 * l}] (layers.{l}.weight)", params[i + 2 * l], None, widths[-1], dev)
        widths.append(params[i + 2 * l].shape[0])
    # biases
    outs = [D0] + ([D0] if c is not None else []) + widths[1:]
    for j, (b, n) in enumerate(zip(params[1::2], outs)):
        if not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"params[{2 * j + 1}] (a bias) must have shape ({n},), got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if b.device != dev:
            raise ValueError(f"params[{2 * j + 1}] is on {b.device}, expected {dev} (the trigger's device)")
        if b.dtype not in _FLOAT:
            raise ValueError(f"params[{2 * j + 1}] must be a float tensor, got {b.dtype}")
    if min([Dt] + widths + ([Dc] if c is not None else [])) < 1:
        raise ValueError("every width must be at least 1")
    while len(widths) < 3:
        widths.append(0)
    return L, Dt, Dc, tuple(widths)


def _split_params(params: Sequence[Tensor], has_c: bool, L: int):
    """(wt, bt, wc, bc, [w1, b1], [w2, b2]) with dummies for what is absent."""
    wt, bt = params[0], params[1]
    if has_c:
        wc, bc, i = params[2], params[3], 4
    else:
        wc, bc, i = wt, bt, 2
    w1, b1 = (params[i], params[i + 1]) if L >= 1 else (wt, bt)
    w2, b2 = (params[i + 2], params[i + 3]) if L >= 2 else (w1, b1)
    return wt, bt, wc, bc, w1, b1, w2, b2


def _s2(t: Optional[Tensor], like: Tensor):
    """(tensor, stride0, stride1), with a harmless stand-in for an absent tensor."""
    if t is None:
        return (like, 0, 0)
    return (t, t.stride(0), t.stride(1))


_COUNTERS: dict = {}


def _counters(device: torch.device) -> Tensor:
    """Per-(device, stream) int32 counters (tickets, done, exit) of the update.
    Kept zero between launches by the last program of each launch, so no launch
    pays for a zero fill; per stream so concurrent streams never share them."""
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(4, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _round256(n: int) -> int:
    return (n + 255) // 256 * 256


def _update_workspace(L: int, N: int, D0: int, D1: int, dtype: torch.dtype, device):
    """One uint8 workspace: fp32 partial-sum slots, then (L >= 1) the delta
    scratch for the owned hidden tiles in the compute dtype. Returns
    (ws, SCR_OFF1, SCR_OFF0) with byte offsets."""
    owned = D1 if L == 2 else D0
    slot_bytes = _round256(_cdiv(owned, _MIN_BLOCK_H) * 16)
    es = _ESIZE[dtype]
    off1 = slot_bytes
    off0 = off1 + (_round256(N * D1 * es) if L == 2 else 0)
    total = off0 + (_round256(N * D0 * es) if L >= 1 else 0)
    return torch.empty(total, dtype=torch.uint8, device=device), off1, off0


def _n_update_programs(L: int, D0: int, D1: int, bh: int) -> int:
    return _cdiv(D1, bh) + _cdiv(D0, bh) if L == 2 else _cdiv(D0, bh)


def _n_forward_programs(L: int, N: int, D0: int, bm: int, bn: int) -> int:
    return _cdiv(N, bm) * (_cdiv(D0, bn) if L == 0 else 1)


def synth_forward_triton(x: Tensor, c: Optional[Tensor], params: Sequence[Tensor]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The synthesizer forward in one launch.

    x (N, Dt), c (N, Dc) or None, params as in ``synth_ref`` (n_hidden 0..2).
    Computes in x's dtype with fp32 accumulation (weights of another dtype are
    cast as they are loaded). Inputs may be non-contiguous.

    Returns ``(s, zs)``: s (N, Do) and the L pre-activations zs, each (N, H),
    all in x's dtype and freshly allocated.
    """
    L, Dt, Dc, (D0, D1, D2) = _check_forward(x, c, params)
    N = x.shape[0]
    dev, dt = x.device, x.dtype
    outs = [torch.empty((N, d), dtype=dt, device=dev) for d in (D0, D1, D2)[: L + 1]]
    s, zs = outs[-1], tuple(outs[:-1])
    if N == 0:
        return s, zs
    wt, bt, wc, bc, w1, b1, w2, b2 = _split_params(params, c is not None, L)
    o = outs + [outs[-1]] * (3 - len(outs))
    tiles = FWD_LAYOUT == "tiles" and L == 1
    ws = x
    if tiles:
        # fp32 partial sums of S, then one int32 arrival counter per row block
        # (sized for the smallest BLOCK_M of the configs).
        ws = torch.zeros(N * D1 + _cdiv(N, _MIN_BLOCK_M), dtype=torch.float32, device=dev)
        LAUNCHES["fill(torch.zeros)"] += 1
    args = [*_s2(x, x), *_s2(c, x),
            wt, wt.stride(0), wt.stride(1), bt, bt.stride(0),
            wc, wc.stride(0), wc.stride(1), bc, bc.stride(0),
            w1, w1.stride(0), w1.stride(1), b1, b1.stride(0),
            w2, w2.stride(0), w2.stride(1), b2, b2.stride(0),
            o[0], o[0].stride(0), o[0].stride(1), o[1], o[1].stride(0), o[1].stride(1),
            o[2], o[2].stride(0), o[2].stride(1),
            ws, N, Dt, Dc, D0, D1, D2, _n_bucket(N)]

    def grid(meta):
        if tiles:
            return (_cdiv(N, meta["BLOCK_M"]) * _cdiv(D0, meta["BLOCK_N"]),)
        return (_n_forward_programs(L, N, D0, meta["BLOCK_M"], meta["BLOCK_N"]),)

    _fwd_launch[grid](*args, L=L, HAS_C=c is not None, TILES=tiles, PREC=_prec(dt),
                      **_meta(("BLOCK_M", "BLOCK_N", "BLOCK_K")))
    LAUNCHES["synth_forward"] += 1
    return s, zs


def _check_update(x, c, params, zs, s, g, L, D, xname="x", zname="zs", sname="s", gname="g"):
    N = x.shape[0]
    dev = x.device
    D0, D1, D2 = D
    if not isinstance(zs, (list, tuple)) or len(zs) != L:
        raise ValueError(f"{zname} must hold n_hidden={L} tensors, got "
                         f"{len(zs) if isinstance(zs, (list, tuple)) else type(zs).__name__}")
    for l, z in enumerate(zs):
        _check_2d(f"{zname}[{l}]", z, N, (D0, D1)[l], dev)
    Do = (D0, D1, D2)[L]
    _check_2d(sname, s, N, Do, dev)
    _check_2d(gname, g, N, Do, dev)


def _grads_like(params: Sequence[Tensor]):
    # Fresh tensors: they are returned from an autograd.Function's backward.
    return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]


def _update_args(x, c, params, zs, s, g, L, has_c, grads, partials, ws, ctr):
    _, _, _, _, w1, _, w2, _ = _split_params(params, has_c, L)
    gwt, gbt = grads[0], grads[1]
    gwc, gbc = (grads[2], grads[3]) if has_c else (gwt, gbt)
    i = 4 if has_c else 2
    gw1, gb1 = (grads[i], grads[i + 1]) if L >= 1 else (gwt, gbt)
    gw2, gb2 = (grads[i + 2], grads[i + 3]) if L >= 2 else (gw1, gb1)
    z0 = zs[0] if L >= 1 else None
    z1 = zs[1] if L >= 2 else None
    return [*_s2(x, x), *_s2(c, x),
            w1, w1.stride(0), w1.stride(1), w2, w2.stride(0), w2.stride(1),
            *_s2(z0, x), *_s2(z1, x), *_s2(s, x), *_s2(g, x),
            gwt, gbt, gwc, gbc, gw1, gb1, gw2, gb2,
            partials, ws, ctr]


def synth_update_triton(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    s: Tensor,
    g: Tensor,
    scale: float,
    grad_scale: Optional[Tensor] = None,
) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """Regression delta, every parameter gradient and the loss partials, one launch.

    x (N, Dt), c (N, Dc) or None, params as in ``synth_ref``, zs the L saved
    pre-activations (N, H), s and g (N, Do). ``delta = scale * (s - g)`` times
    ``grad_scale`` (an optional 0-dim tensor on the device, read in the kernel:
    no host sync). Computes in x's dtype, accumulates in fp32.

    Returns ``(grads, partials)``: one fresh gradient per parameter, in that
    parameter's dtype (db_c equals db_t), and fp32 (4,)
    ``[sum((s-g)^2), sum(s*g), sum(s^2), sum(g^2)]``.
    """
    L, Dt, Dc, D = _check_forward(x, c, params)
    _check_update(x, c, params, zs, s, g, L, D)
    if grad_scale is not None:
        if not isinstance(grad_scale, Tensor) or grad_scale.numel() != 1 or grad_scale.device != x.device:
            raise ValueError("grad_scale must be a 1-element (0-dim) tensor on the trigger's device")
    N = x.shape[0]
    D0, D1, D2 = D
    dev = x.device
    has_c = c is not None
    grads = _grads_like(params)
    partials = torch.empty(4, dtype=torch.float32, device=dev)
    ws, off1, off0 = _update_workspace(L, N, D0, D1, x.dtype, dev)
    ctr = _counters(dev)
    args = _update_args(x, c, params, zs, s, g, L, has_c, grads, partials, ws, ctr)
    args += [grad_scale if grad_scale is not None else partials, float(scale),
             N, Dt, Dc, D0, D1, D2, _n_bucket(N), off1, off0]

    def grid(meta):
        return (_n_update_programs(L, D0, D1, meta["BLOCK_H"]),)

    _upd_launch[grid](*args, L=L, HAS_C=has_c, HAS_GS=grad_scale is not None, PREC=_prec(x.dtype),
                      SLOT_BLOCK=_SLOT_BLOCK, **_meta(("BLOCK_N", "BLOCK_H", "BLOCK_K")))
    LAUNCHES["synth_update"] += 1
    return tuple(grads), partials


def synth_pipelined_triton(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    x_prev: Tensor,
    c_prev: Optional[Tensor],
    zs_prev: Sequence[Tensor],
    s_prev: Tensor,
    g_prev: Tensor,
    scale: float,
) -> Tuple[Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
    """Step t+1's forward and step t's update in one launch (same weights).

    x (N, Dt), c (N, Dc) or None: step t+1's inputs. x_prev (NP, Dt), c_prev,
    zs_prev, s_prev, g_prev: step t's saved inputs, pre-activations and output,
    and its true gradient (NP may differ from N). Both jobs use ``params`` as
    they are now; s and zs are in x's dtype, the update computes in x_prev's.

    Returns ``(s, zs, grads_prev, partials_prev)`` as
    :func:`synth_forward_triton` and :func:`synth_update_triton`.
    """
    if (c is None) != (c_prev is None):
        raise ValueError("c and c_prev must both be given or both be None")
    L, Dt, Dc, D = _check_forward(x, c, params)
    _check_forward(x_prev, c_prev, params, "x_prev", "c_prev")
    _check_update(x_prev, c_prev, params, zs_prev, s_prev, g_prev, L, D, "x_prev", "zs_prev", "s_prev", "g_prev")
    if x_prev.device != x.device:
        raise ValueError(f"x_prev is on {x_prev.device}, expected {x.device}")
    if x_prev.dtype != x.dtype:
        raise ValueError(f"x_prev has dtype {x_prev.dtype}, x has {x.dtype}: one launch computes in one dtype")
    N, NP = x.shape[0], x_prev.shape[0]
    D0, D1, D2 = D
    dev, dt = x.device, x.dtype
    has_c = c is not None
    outs = [torch.empty((N, d), dtype=dt, device=dev) for d in (D0, D1, D2)[: L + 1]]
    s, zs = outs[-1], tuple(outs[:-1])
    o = outs + [outs[-1]] * (3 - len(outs))
    wt, bt, wc, bc, w1, b1, w2, b2 = _split_params(params, has_c, L)
    grads = _grads_like(params)
    partials = torch.empty(4, dtype=torch.float32, device=dev)
    ws, off1, off0 = _update_workspace(L, NP, D0, D1, dt, dev)
    ctr = _counters(dev)
    upd = _update_args(x_prev, c_prev, params, zs_prev, s_prev, g_prev, L, has_c, grads, partials, ws, ctr)
    # the update's (x, c) and (w1, w2) are passed by the forward's part below;
    # keep only x_prev/c_prev and what follows w1/w2.
    args = [*_s2(x, x), *_s2(c, x),
            wt, wt.stride(0), wt.stride(1), bt, bt.stride(0),
            wc, wc.stride(0), wc.stride(1), bc, bc.stride(0),
            w1, w1.stride(0), w1.stride(1), b1, b1.stride(0),
            w2, w2.stride(0), w2.stride(1), b2, b2.stride(0),
            o[0], o[0].stride(0), o[0].stride(1), o[1], o[1].stride(0), o[1].stride(1),
            o[2], o[2].stride(0), o[2].stride(1),
            *upd[0:6], *upd[12:],
            partials, float(scale),
            N, NP, Dt, Dc, D0, D1, D2, _n_bucket(max(N, NP)), off1, off0]

    def grid(meta):
        return (_n_update_programs(L, D0, D1, meta["BLOCK_H"])
                + _n_forward_programs(L, N, D0, meta["BLOCK_N"], meta["BLOCK_H"]),)

    _pipe_launch[grid](*args, L=L, HAS_C=has_c, PREC=_prec(dt), SLOT_BLOCK=_SLOT_BLOCK,
                       **_meta(("BLOCK_N", "BLOCK_H", "BLOCK_K")))
    LAUNCHES["synth_pipelined"] += 1
    return s, zs, tuple(grads), partials
