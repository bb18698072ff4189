"""The fused primitives of every registered fused backend against
``kernels/synth_ref.py``: one op-level suite, parametrised over the backends
(and devices) that run here.

Single-op equivalence (docs/design.md §6):

* fp32 and fp64: ``dni_fast.testing.assert_close`` with the dtype's (rtol,
  atol) from ``dni_fast.testing.TOLERANCES``, relative to the output's scale
  (rtol 5e-4 where TF32 is on);
* fp16 and bf16 (and low-precision activations with fp32 parameters, as under
  autocast): the error against ``synth_ref(upcast=True)`` is at most twice the
  error of the same math in that precision, ``synth_ref(upcast=False)``
  (``assert_lowp_close``).

Every output and every gradient is compared; odd widths (1, 37, 100, 1000) and
batch sizes (0, 1, 3, 129). Backend-specific behaviour (error messages, launch
counts, tile configs, the CPU's low-precision products) is in
test_cpp_ext.py and test_triton.py.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch

import dni_fast.backends as bk
from dni_fast.kernels.synth_ref import synth_forward_ref, synth_pipelined_ref, synth_update_ref
from dni_fast.testing import assert_close, assert_lowp_close, tolerance
from tests.conftest import DEVICES, fused_backends

CASES = [(b, d) for d in DEVICES for b in fused_backends(d)]
INTERPRETED = any(b == "triton" and d == "cpu" for b, d in CASES)


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def op(request):
    """(primitives, device, backend name) of one fused backend."""
    name, device = request.param
    return bk.get(name).primitives, device, name


@contextlib.contextmanager
def interpreter_tiles(**tiles):
    """Tile sizes of the Triton kernels in the interpreter (no-op elsewhere)."""
    if not INTERPRETED:
        yield
        return
    from dni_fast.kernels import synth_step_tuning as T

    old = dict(T.INTERPRET_CONFIG)
    T.INTERPRET_CONFIG.update(tiles)
    try:
        yield
    finally:
        T.INTERPRET_CONFIG.clear()
        T.INTERPRET_CONFIG.update(old)


def skip_unsupported(name: str, device: str, dtype: torch.dtype) -> None:
    if dtype not in bk.get(name).dtypes:
        pytest.skip(f"{name} does not support {dtype}")
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; bf16 is checked on a GPU only")


# ---------------------------------------------------------------------------
# cases and checks (shared with test_cpp_ext.py and test_triton.py)
# ---------------------------------------------------------------------------
def make_case(rows, dt, dc, hidden, do, n_hidden, dtype=torch.float32, pdtype=None, device="cpu", seed=0):
    """Random ``x (rows, dt)``, ``c (rows, dc)`` (``None`` when ``dc`` is None),
    ``params`` and a target ``g (rows, do)``. Unlike BasicSynthesizer's init
    nothing is zeroed, so that every gradient is non-trivial. ``pdtype``: the
    parameters' dtype (default ``dtype``; fp32 with low-precision activations
    is autocast's case)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt_=None):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt_ or dtype)

    p_dt = pdtype or dtype
    h0 = hidden if n_hidden else do
    params = [rnd(h0, dt, scale=dt ** -0.5, dt_=p_dt), rnd(h0, scale=0.1, dt_=p_dt)]
    if dc is not None:
        params += [rnd(h0, dc, scale=dc ** -0.5, dt_=p_dt), rnd(h0, scale=0.1, dt_=p_dt)]
    for l in range(n_hidden):
        out = do if l == n_hidden - 1 else hidden
        params += [rnd(out, hidden, scale=hidden ** -0.5, dt_=p_dt), rnd(out, scale=0.1, dt_=p_dt)]
    x = rnd(rows, dt)
    c = rnd(rows, dc) if dc is not None else None
    g = rnd(rows, do)
    return x, c, params, g


def _tf32(device) -> bool:
    return str(device).startswith("cuda") and torch.backends.cuda.matmul.allow_tf32


def _exact_kind(x, params) -> bool:
    """fp32/fp64 activations and parameters: compared by tolerance, not by the 2x rule."""
    hp = (torch.float32, torch.float64)
    return x.dtype in hp and all(p.dtype in hp for p in params)


def check_forward(got, x, c, params, name=""):
    """``got = (s, zs)`` from a fused forward, against the references."""
    s, zs = got
    s32, zs32 = synth_forward_ref(x, c, params)
    assert s.dtype == x.dtype and s.shape == s32.shape and len(zs) == len(zs32), (s.dtype, s.shape, len(zs))
    if _exact_kind(x, params):
        rtol, atol = tolerance(x.dtype, _tf32(x.device))
        assert_close(s, s32, rtol, atol, f"{name}s")
        for l, (z, zr) in enumerate(zip(zs, zs32)):
            assert_close(z, zr, rtol, atol, f"{name}zs[{l}]")
        return
    s_lp, zs_lp = synth_forward_ref(x, c, params, upcast=False)
    assert_lowp_close(s, s_lp, s32, name=f"{name}s")
    for l, (z, zl, zr) in enumerate(zip(zs, zs_lp, zs32)):
        assert_lowp_close(z, zl, zr, name=f"{name}zs[{l}]")


def check_update(got, x, c, params, zs, s, g, scale, grad_scale=None, name=""):
    """``got = (grads, partials)`` from a fused update, against the references."""
    grads, partials = got
    assert len(grads) == len(params)
    for i, (gr, p) in enumerate(zip(grads, params)):
        assert gr.shape == p.shape and gr.dtype == p.dtype, f"{name}grads[{i}]: {gr.shape} {gr.dtype} vs {p.shape}"
    assert partials.dtype == torch.float32 and partials.shape == (4,)
    g32, p32 = synth_update_ref(x, c, params, zs, s, g, scale, grad_scale)
    # the partials are fp32 sums of the very same s and g, whatever the dtype
    assert_close(partials, p32, *((1e-4, 1e-5) if not _exact_kind(x, params) else
                                  tolerance(torch.float32, _tf32(x.device))), name=f"{name}partials")
    if _exact_kind(x, params):
        rtol, atol = tolerance(x.dtype, _tf32(x.device))
        for i, (gr, gref) in enumerate(zip(grads, g32)):
            assert_close(gr, gref, rtol, atol, f"{name}grads[{i}]")
        return
    g_lp, _ = synth_update_ref(x, c, params, zs, s, g, scale, grad_scale, upcast=False)
    for i, (gr, gl, gref) in enumerate(zip(grads, g_lp, g32)):
        assert_lowp_close(gr, gl, gref, name=f"{name}grads[{i}]")


def run_case(prims, rows, dt, dc, hidden, do, n_hidden, dtype=torch.float32, pdtype=None, device="cpu",
             grad_scale: Optional[float] = None, noncontig=False, next_rows=None, seed=0):
    """forward, update and pipelined on one case, each against the references."""
    x, c, params, g = make_case(rows, dt, dc, hidden, do, n_hidden, dtype, pdtype, device, seed)
    if noncontig:  # column-major and strided views, as a user's tensors may be
        x = x.t().contiguous().t()
        c = None if c is None else torch.stack([c, c], 2)[:, :, 0]
        g = torch.stack([g, g], 1)[:, 0]
        params = [params[0].t().contiguous().t()] + params[1:]
    s, zs = prims.forward(x, c, params)
    check_forward((s, zs), x, c, params)
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    scale = 2.0 / max(rows, 1)
    check_update(prims.update(x, c, params, zs, s, g, scale, gs), x, c, params, zs, s, g, scale, gs)
    # pipelined: step t+1 (another batch size), step t's update with the saved s, zs
    rows1 = next_rows if next_rows is not None else max(1, rows // 2 + 1)
    x1, c1, _, _ = make_case(rows1, dt, dc, hidden, do, n_hidden, dtype, pdtype, device, seed + 1)
    s1, zs1, grads0, partials0 = prims.pipelined(x1, c1, params, x, c, list(zs), s, g, scale)
    check_forward((s1, zs1), x1, c1, params, "pipelined ")
    check_update((grads0, partials0), x, c, params, zs, s, g, scale, name="pipelined ")


# ---------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------
# (rows, Dt, Dc, H, Do): widths 1, 37 and larger non-multiples of every tile; rows 1, 3, 129
SHAPES = [(1, 1, 1, 1, 1), (3, 37, 5, 37, 37), (129, 37, 9, 50, 45), (3, 100, 37, 37, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-Dt%d-Dc%d-H%d-Do%d" % s)
@pytest.mark.parametrize("context", [False, True], ids=["noctx", "ctx"])
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_fp32(op, shape, context, n_hidden):
    prims, device, _ = op
    rows, dt, dc, h, do = shape
    run_case(prims, rows, dt, dc if context else None, h, do, n_hidden, device=device,
             grad_scale=0.37 if n_hidden != 1 else None)


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_fp32_noncontiguous(op, n_hidden):
    prims, device, _ = op
    run_case(prims, 7, 37, 11, 19, 37, n_hidden, device=device, noncontig=True)


def test_fp32_wide(op):
    """Widths of 1000: not a multiple of any tile."""
    prims, device, _ = op
    with interpreter_tiles(BLOCK_M=64, BLOCK_N=64, BLOCK_H=64, BLOCK_K=64):  # the interpreter's cost is per tile
        run_case(prims, 3, 1000, None, 1000, 1000, 1, device=device, seed=1)


def test_empty_batch(op):
    prims, device, _ = op
    x, c, params, g = make_case(0, 5, 3, 4, 5, 1, device=device)
    s, zs = prims.forward(x, c, params)
    assert s.shape == (0, 5) and zs[0].shape == (0, 4)
    grads, partials = prims.update(x, c, params, zs, s, g, 1.0, None)
    assert all(gr.shape == p.shape and not gr.any() for gr, p in zip(grads, params))
    assert not partials.any()


def test_no_graph_and_fresh_outputs(op):
    prims, device, _ = op
    x, c, params, g = make_case(3, 5, 3, 4, 5, 1, device=device)
    params = [p.requires_grad_() for p in params]
    with torch.no_grad():
        s, zs = prims.forward(x, c, params)
        grads, partials = prims.update(x, c, params, zs, s, g, 1.0, None)
    assert s.grad_fn is None and all(z.grad_fn is None for z in zs)
    assert all(gr.grad_fn is None for gr in grads) and partials.grad_fn is None
    ptrs = {p.data_ptr() for p in params}
    assert len({gr.data_ptr() for gr in grads}) == len(grads) and not ptrs & {gr.data_ptr() for gr in grads}
    assert torch.equal(grads[1], grads[3])  # db_c == db_t, distinct tensors


def test_deterministic(op):
    """Repeated calls give identical results (no float atomics in the updates)."""
    prims, device, _ = op
    x, c, params, g = make_case(20, 17, None, 40, 13, 2, device=device)
    s, zs = prims.forward(x, c, params)
    a = prims.update(x, c, params, zs, s, g, 0.1, None)
    b = prims.update(x, c, params, zs, s, g, 0.1, None)
    for u, v in zip((*a[0], a[1]), (*b[0], b[1])):
        assert torch.equal(u, v)


def test_pipelined_against_its_oracle(op):
    """The pipelined call against synth_pipelined_ref itself: step t's update
    with step t's saved s and zs and the weights as they are now."""
    prims, device, _ = op
    x, c, params, _ = make_case(9, 37, 11, 19, 37, 2, device=device, seed=2)
    xp, cp, params_prev, gp = make_case(5, 37, 11, 19, 37, 2, device=device, seed=3)
    sp, zsp = synth_forward_ref(xp, cp, params_prev)  # computed at step t, with step t's weights
    got = prims.pipelined(x, c, params, xp, cp, list(zsp), sp, gp, 0.5)
    exp = synth_pipelined_ref(x, c, params, xp, cp, zsp, sp, gp, 0.5)
    rtol, atol = tolerance(torch.float32, _tf32(device))
    assert_close(got[0], exp[0], rtol, atol, "s")
    for i, (a, e) in enumerate(zip(got[2], exp[2])):
        assert_close(a, e, rtol, atol, f"grads[{i}]")
    assert_close(got[3], exp[3], rtol, atol, "partials")


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True], ids=["noctx", "ctx"])
def test_fp64(op, n_hidden, context):
    prims, device, name = op
    skip_unsupported(name, device, torch.float64)
    run_case(prims, 129, 37, 9 if context else None, 50, 45, n_hidden, dtype=torch.float64, device=device,
             grad_scale=1.5)


LOW_SHAPES = [(129, 37, 9, 50, 45), (3, 1, 1, 37, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", LOW_SHAPES, ids=lambda s: "N%d-Dt%d-Dc%d-H%d-Do%d" % s)
@pytest.mark.parametrize("context", [False, True], ids=["noctx", "ctx"])
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_low_precision(op, dtype, shape, context, n_hidden):
    prims, device, name = op
    skip_unsupported(name, device, dtype)
    rows, dt, dc, h, do = shape
    run_case(prims, rows, dt, dc if context else None, h, do, n_hidden, dtype=dtype, device=device,
             grad_scale=0.5, seed=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n_hidden", [1, 2])
def test_low_precision_activations_fp32_parameters(op, dtype, n_hidden):
    """Autocast's case: fp16/bf16 activations, fp32 master weights; gradients come back in fp32."""
    prims, device, name = op
    skip_unsupported(name, device, dtype)
    run_case(prims, 129, 37, 9, 45, 37, n_hidden, dtype=dtype, pdtype=torch.float32, device=device,
             noncontig=True, seed=8)
