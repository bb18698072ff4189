"""Device code of the fused synthesizer step (the ``triton`` backend): every
``@triton.jit`` function, and nothing else. The host side (checks, workspaces,
launchers with named arguments) is ``synth_step.py``; the autotune tables are
``synth_step_tuning.py``; why the kernels are laid out as they are is in
docs/triton_kernels.md.

Notation (as in ``synth_ref``): x (N, Dt), c (N, Dc), L = n_hidden in 0..2; D0
is the width of the input layer's output (z_0, or S when L == 0), D1 and D2
the output widths of the hidden-layer weights (the last of them is Do). So
W_t is (D0, Dt), W_c (D0, Dc), W_1 (D1, D0), W_2 (D2, D1). Tensor arguments
come with their strides, named ``s<name>0`` and ``s<name>1`` (``s<name>`` for
a vector): the host builds the argument dict by these names.

ReLU propagates NaN (``propagate_nan=ALL``), as ``torch.relu`` does: a NaN
trigger must give a NaN synthetic gradient (which the statistics count), not
a silently finite one.
"""
from __future__ import annotations

try:  # importable without triton, so that the backend can say why it is unavailable
    import triton
    import triton.language as tl

    TRITON_ERROR = ""
except Exception as e:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"

if triton is not None:

    @triton.jit
    def _relu(v):
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)

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
                    av = _relu(av)
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
        a = _relu(acc.to(o0.dtype.element_ty)).to(DT)
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
                        av = _relu(av)
                if B_MODE == 2:
                    bv = _delta(b, sb0, sb1, b2, sb20, sb21, rows, cc, N, NC, coef)
                else:
                    bv = _ld(b, rows, cc, sb0, sb1, N, NC, False)
                    if B_MODE == 1:
                        bv = _relu(bv)
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
