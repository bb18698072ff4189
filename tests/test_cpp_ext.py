"""The C++/CUDA extension dni_fast._C against the fp32 twins in kernels/synth_ref.py.

Single-op equivalence (DESIGN.md section 6):
* fp32: allclose, rtol 1e-5, atol 1e-6 relative to the output's scale;
* fp64: against the same math done with torch ops in fp64, rtol 1e-10;
* bf16/fp16: max abs error against the fp32 reference at most 2x the max abs
  error of the same computation done with torch ops in that precision.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch

from dni_fast import _ext

try:
    from dni_fast.kernels.synth_ref import (
        n_hidden_of,
        synth_forward_ref,
        synth_pipelined_ref,
        synth_update_ref,
    )
except ImportError:  # a plain checkout on sys.path
    from kernels.synth_ref import n_hidden_of, synth_forward_ref, synth_pipelined_ref, synth_update_ref

_ok, _why = _ext.cpp_available()
if not _ok:
    pytest.skip(f"dni_fast._C is not available ({_why}); build it with "
                "`CFLAGS=-g0 pip install --no-build-isolation -e .`", allow_module_level=True)

C = _ext.get_ext()
_cuda_ok, _cuda_why = _ext.cuda_available()
needs_cuda = pytest.mark.skipif(not _cuda_ok, reason=f"cuda backend unavailable: {_cuda_why}")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def make_case(rows, dt, dc, hidden, do, n_hidden, dtype=torch.float32, device="cpu", context=True, seed=0):
    """Random x, c, params, g. Unlike BasicSynthesizer's init nothing is zeroed,
    so that every gradient is non-trivial."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h0 = hidden if n_hidden else do
    params = [rnd(h0, dt, scale=dt ** -0.5), rnd(h0, scale=0.1)]
    if context:
        params += [rnd(h0, dc, scale=dc ** -0.5), rnd(h0, scale=0.1)]
    for l in range(n_hidden):
        out = do if l == n_hidden - 1 else hidden
        params += [rnd(out, hidden, scale=hidden ** -0.5), rnd(out, scale=0.1)]
    x = rnd(rows, dt)
    c = rnd(rows, dc) if context else None
    g = rnd(rows, do)
    return x, c, params, g


def torch_forward(x, c, params):
    """The synthesizer forward written with torch ops in the input's dtype
    (the 'same-precision PyTorch reference')."""
    L = n_hidden_of(params, c is not None)
    w = [p.to(x.dtype) for p in params]
    z = torch.addmm(w[1], x, w[0].t())
    i = 2
    if c is not None:
        z = z + torch.addmm(w[3], c.to(x.dtype), w[2].t())
        i = 4
    zs = []
    for _ in range(L):
        zs.append(z)
        z = torch.addmm(w[i + 1], torch.relu(z), w[i].t())
        i += 2
    return z, zs


def torch_update(x, c, params, zs, s, g, scale, grad_scale=None):
    """synth_update_ref with torch ops in the input's dtype."""
    L = n_hidden_of(params, c is not None)
    dt = s.dtype
    w = [p.to(dt) for p in params]
    g = g.to(dt)
    diff = s - g
    partials = torch.stack([(diff * diff).sum(), (s * g).sum(), (s * s).sum(), (g * g).sum()]).float()
    d = diff * scale
    if grad_scale is not None:
        d = d * grad_scale.to(dt)
    first_hidden = 4 if c is not None else 2
    grads = [None] * len(params)
    for l in range(L, 0, -1):
        i = first_hidden + 2 * (l - 1)
        z = zs[l - 1]
        grads[i] = d.t() @ torch.relu(z)
        grads[i + 1] = d.sum(0)
        d = (d @ w[i]) * (z > 0)
    grads[0] = d.t() @ x
    grads[1] = d.sum(0)
    if c is not None:
        grads[2] = d.t() @ c.to(dt)
        grads[3] = grads[1].clone()
    return [gr.to(p.dtype) for gr, p in zip(grads, params)], partials


def _err_msg(name, got, exp):
    err = (got.double() - exp.double()).abs()
    return (f"{name}: shape {tuple(got.shape)} max abs err {err.max().item():.3e}, mean abs err "
            f"{err.mean().item():.3e}, max |expected| {exp.abs().max().item():.3e}")


def assert_close(name, got, exp, rtol=1e-5, atol=1e-6, dtype=None):
    """allclose with atol relative to the output's scale (DESIGN.md section 6)."""
    assert got.shape == exp.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    if dtype is not None:
        assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    if got.numel() == 0:
        return
    scale = max(1.0, exp.abs().max().item())
    ok = torch.allclose(got.double(), exp.double(), rtol=rtol, atol=atol * scale)
    assert ok, _err_msg(name, got, exp)


def assert_lowp(name, got, exp32, torch_lowp, factor=2.0):
    """bf16/fp16 rule: max abs err of `got` vs the fp32 reference <= factor x that
    of the same computation in torch ops at that precision (floored at half an ulp
    of the output's scale, for outputs where torch happens to be exact)."""
    assert got.shape == exp32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exp32.shape)}"
    if got.numel() == 0:
        return
    e_got = (got.double() - exp32.double()).abs().max().item()
    e_ref = (torch_lowp.double() - exp32.double()).abs().max().item()
    eps = torch.finfo(torch_lowp.dtype).eps if torch_lowp.dtype in (torch.bfloat16, torch.float16) else 2 ** -8
    floor = 0.5 * eps * exp32.abs().max().item()
    assert e_got <= factor * e_ref + floor, (
        f"{_err_msg(name, got, exp32)}; torch ops in {torch_lowp.dtype}: max abs err {e_ref:.3e} "
        f"(limit {factor * e_ref + floor:.3e})")


def check_forward(got, exp, rtol=1e-5, atol=1e-6, dtype=None):
    s, zs = got
    s_ref, zs_ref = exp
    assert len(zs) == len(zs_ref), f"{len(zs)} zs, expected {len(zs_ref)}"
    assert_close("s", s, s_ref, rtol, atol, dtype)
    for l, (z, zr) in enumerate(zip(zs, zs_ref)):
        assert_close(f"zs[{l}]", z, zr, rtol, atol, dtype)


def check_update(got, exp, params, rtol=1e-5, atol=1e-6, partials_rtol=1e-5):
    grads, partials = got
    grads_ref, partials_ref = exp
    assert len(grads) == len(params), f"{len(grads)} grads for {len(params)} params"
    for i, (gr, gref, p) in enumerate(zip(grads, grads_ref, params)):
        assert_close(f"grads[{i}]", gr, gref, rtol, atol, dtype=p.dtype)
    assert partials.dtype == torch.float32 and partials.shape == (4,), (partials.dtype, partials.shape)
    assert_close("partials", partials, partials_ref, partials_rtol, atol)


# (rows, trigger width, context width, hidden width, output width)
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 37, 5, 19, 37),
    (129, 37, 11, 64, 37),
    (3, 1, 2, 7, 1),
]
BIG = (129, 1000, 13, 257, 1000)


# ---------------------------------------------------------------------------
# fp32 against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_update_fp32(shape, context, n_hidden):
    rows, dt, dc, h, do = shape
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, context=context)
    s, zs = C.synth_forward(x, c, params)
    check_forward((s, zs), synth_forward_ref(x, c, params), dtype=torch.float32)
    scale = 2.0 / rows
    got = C.synth_update(x, c, params, zs, s, g, scale)
    check_update(got, synth_update_ref(x, c, params, zs, s, g, scale), params)
    gs = torch.tensor(0.37)
    got = C.synth_update(x, c, params, zs, s, g, scale, gs)
    check_update(got, synth_update_ref(x, c, params, zs, s, g, scale, gs), params)


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_big_width_fp32(n_hidden):
    rows, dt, dc, h, do = BIG
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, context=True, seed=1)
    s, zs = C.synth_forward(x, c, params)
    check_forward((s, zs), synth_forward_ref(x, c, params), dtype=torch.float32)
    got = C.synth_update(x, c, params, zs, s, g, 2.0 / g.numel())
    check_update(got, synth_update_ref(x, c, params, zs, s, g, 2.0 / g.numel()), params)


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
def test_pipelined_fp32(context, n_hidden):
    rows, dt, dc, h, do = SHAPES[2]
    x, c, params, _ = make_case(rows, dt, dc, h, do, n_hidden, context=context, seed=2)
    xp, cp, params_prev, gp = make_case(rows, dt, dc, h, do, n_hidden, context=context, seed=3)
    sp, zsp = synth_forward_ref(xp, cp, params_prev)  # saved at step t, with the weights of step t
    s, zs, grads, partials = C.synth_pipelined(x, c, params, xp, cp, list(zsp), sp, gp, 0.5)
    s_r, zs_r, grads_r, partials_r = synth_pipelined_ref(x, c, params, xp, cp, zsp, sp, gp, 0.5)
    check_forward((s, zs), (s_r, zs_r), dtype=torch.float32)
    check_update((grads, partials), (grads_r, partials_r), params)


def test_pipelined_rows_differ():
    """Step t and step t+1 may have different batch sizes."""
    x, c, params, _ = make_case(5, 37, 11, 19, 37, 1, seed=4)
    xp, cp, _, gp = make_case(3, 37, 11, 19, 37, 1, seed=5)
    sp, zsp = synth_forward_ref(xp, cp, params)
    got = C.synth_pipelined(x, c, params, xp, cp, list(zsp), sp, gp, 1.0)
    exp = synth_pipelined_ref(x, c, params, xp, cp, zsp, sp, gp, 1.0)
    check_forward(got[:2], exp[:2])
    check_update(got[2:], exp[2:], params)


def test_noncontiguous_inputs():
    rows, dt, dc, h, do = 7, 37, 11, 19, 37
    x, c, params, g = make_case(rows, dt, dc, h, do, 2, seed=6)
    x_nc = x.t().contiguous().t()                      # column-major
    c_nc = torch.stack([c, c], 2)[:, :, 0]            # strided columns
    assert not x_nc.is_contiguous() and not c_nc.is_contiguous()
    w0_nc = params[0].t().contiguous().t()            # a column-major weight too
    params_nc = [w0_nc] + params[1:]
    s, zs = C.synth_forward(x_nc, c_nc, params_nc)
    check_forward((s, zs), synth_forward_ref(x, c, params))
    s_nc = s.t().contiguous().t()
    g_nc = torch.stack([g, g], 1)[:, 0]               # padded rows
    zs_nc = [z.t().contiguous().t() for z in zs]
    got = C.synth_update(x_nc, c_nc, params_nc, zs_nc, s_nc, g_nc, 0.25)
    check_update(got, synth_update_ref(x, c, params, zs, s, g, 0.25), params)


def test_zero_rows():
    x, c, params, g = make_case(0, 5, 3, 4, 5, 1)
    s, zs = C.synth_forward(x, c, params)
    assert s.shape == (0, 5) and zs[0].shape == (0, 4)
    grads, partials = C.synth_update(x, c, params, zs, s, g, 1.0)
    assert all(gr.shape == p.shape and not gr.any() for gr, p in zip(grads, params))
    assert not partials.any()


def test_no_autograd_graph_and_fresh_outputs():
    x, c, params, g = make_case(3, 5, 3, 4, 5, 1)
    params = [p.requires_grad_() for p in params]
    x.requires_grad_()
    s, zs = C.synth_forward(x, c, params)
    assert s.grad_fn is None and not s.requires_grad and all(z.grad_fn is None for z in zs)
    grads, partials = C.synth_update(x, c, params, zs, s, g, 1.0)
    assert all(gr.grad_fn is None and not gr.requires_grad for gr in grads)
    assert not partials.requires_grad
    # the two input biases' gradients are equal but distinct tensors
    assert torch.equal(grads[1], grads[3]) and grads[1].data_ptr() != grads[3].data_ptr()


def test_target_in_another_dtype():
    """g in fp64 with fp32 s is cast, not rejected."""
    x, c, params, g = make_case(3, 5, 3, 4, 5, 1)
    s, zs = C.synth_forward(x, c, params)
    got = C.synth_update(x, c, params, zs, s, g.double(), 1.0)
    check_update(got, synth_update_ref(x, c, params, zs, s, g, 1.0), params)


# ---------------------------------------------------------------------------
# fp64
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
def test_fp64(context, n_hidden):
    rows, dt, dc, h, do = SHAPES[2]
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, dtype=torch.float64, context=context)
    s, zs = C.synth_forward(x, c, params)
    check_forward((s, zs), torch_forward(x, c, params), rtol=1e-10, atol=1e-12, dtype=torch.float64)
    gs = torch.tensor(1.5, dtype=torch.float64)
    got = C.synth_update(x, c, params, zs, s, g, 2.0 / rows, gs)
    check_update(got, torch_update(x, c, params, zs, s, g, 2.0 / rows, gs), params, rtol=1e-10, atol=1e-12)
    # and the fp32 reference, at fp32 precision (it computes in fp32)
    check_update(got, synth_update_ref(x, c, params, zs, s, g, 2.0 / rows, gs), params, rtol=1e-5, atol=1e-6)
    s2, zs2, grads, partials = C.synth_pipelined(x, c, params, x, c, zs, s, g, 2.0 / rows)
    assert torch.equal(s2, s) and all(torch.equal(a, b) for a, b in zip(zs2, zs))
    check_update((grads, partials), torch_update(x, c, params, zs, s, g, 2.0 / rows), params, rtol=1e-10,
                 atol=1e-12)


def test_baseline_isa_path():
    """The glue loops' baseline (non-AVX2) build, forced in a fresh process."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.path.insert(0, {tests!r}); import test_cpp_ext as T\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    for L in (0, 2):\n"
        "        x, c, p, g = T.make_case(5, 37, 11, 19, 37, L, dtype=dt, seed=11)\n"
        "        s, zs = T.C.synth_forward(x, c, p)\n"
        "        got = T.C.synth_update(x, c, p, zs, s, g, 0.5)\n"
        "        f = lambda t: None if t is None else t.float()\n"
        "        exp = T.synth_update_ref(f(x), f(c), [q.float() for q in p], [z.float() for z in zs], s.float(),\n"
        "                                 g.float(), 0.5)\n"
        "        tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "        T.check_update((got[0], got[1]), exp, p, rtol=tol, atol=tol, partials_rtol=1e-4)\n"
    ).format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DNI_FAST_CPU_BASELINE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# bf16 / fp16 and autocast (fp32 parameters, low-precision activations)
# ---------------------------------------------------------------------------
def _check_lowp(x, c, params, g, scale, gs, autocast):
    """Our call, the fp32 reference on the same (rounded) inputs, and torch ops at
    the low precision, for forward and update."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    p32 = [p.float() for p in params]
    s, zs = C.synth_forward(x, c, params)
    assert s.dtype == x.dtype and all(z.dtype == x.dtype for z in zs)
    s_ref, zs_ref = synth_forward_ref(f32(x), f32(c), p32)
    s_lp, zs_lp = torch_forward(x, c, params)
    assert_lowp("s", s, s_ref, s_lp)
    for l, (z, zr, zl) in enumerate(zip(zs, zs_ref, zs_lp)):
        assert_lowp(f"zs[{l}]", z, zr, zl)
    # update on identical low-precision inputs
    grads, partials = C.synth_update(x, c, params, zs, s, g, scale, gs)
    grads_ref, partials_ref = synth_update_ref(f32(x), f32(c), p32, [z.float() for z in zs], s.float(), g.float(),
                                               scale, gs)
    grads_lp, partials_lp = torch_update(x, c, params, zs, s, g, scale, gs)
    for i, (gr, gref, glp, p) in enumerate(zip(grads, grads_ref, grads_lp, params)):
        assert gr.dtype == p.dtype, f"grads[{i}] dtype {gr.dtype}, expected {p.dtype}"
        if autocast:  # torch's grads went through the low precision before the cast to fp32
            glp = glp.to(x.dtype)
        assert_lowp(f"grads[{i}]", gr, gref, glp)
    assert partials.dtype == torch.float32
    # partials: accumulated in fp32 from the rounded inputs, so as good as the reference
    assert_close("partials", partials, partials_ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["native", "fp32"])
def lowp_gemm(request):
    """Both ways the CPU path runs bf16/fp16 products: natively, or in fp32."""
    C._set_cpu_lowp_gemm(request.param)
    yield request.param
    C._set_cpu_lowp_gemm("auto")


def test_lowp_gemm_switch():
    C._set_cpu_lowp_gemm("native")
    assert C._cpu_lowp_gemm(torch.bfloat16) == "native"
    C._set_cpu_lowp_gemm("fp32")
    assert C._cpu_lowp_gemm(torch.bfloat16) == "fp32"
    C._set_cpu_lowp_gemm("auto")
    assert C._cpu_lowp_gemm(torch.bfloat16) in ("native", "fp32")
    assert C._cpu_lowp_gemm(torch.float32) == "native"
    with pytest.raises(RuntimeError, match="expected 'auto', 'native' or 'fp32'"):
        C._set_cpu_lowp_gemm("tf32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
def test_low_precision(shape, context, n_hidden, dtype, lowp_gemm):
    rows, dt, dc, h, do = shape
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, dtype=dtype, context=context, seed=7)
    _check_lowp(x, c, params, g, 2.0 / rows, torch.tensor(0.5), autocast=False)


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_autocast_bf16_activations_fp32_params(n_hidden, lowp_gemm):
    rows, dt, dc, h, do = SHAPES[2]
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, dtype=torch.float32, context=True, seed=8)
    x, g = x.bfloat16(), g.bfloat16()
    _check_lowp(x, c, params, g, 2.0 / rows, None, autocast=True)  # c stays fp32: cast inside


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_pipelined_matches_separate_calls(autocast, lowp_gemm):
    x, c, params, g = make_case(9, 37, 11, 19, 37, 2, dtype=torch.float32 if autocast else torch.bfloat16, seed=10)
    x, c, g = x.bfloat16(), c.bfloat16(), g.bfloat16()
    xp, cp = x.flip(0), c.flip(0)
    sp, zsp = C.synth_forward(xp, cp, params)
    s, zs, grads, partials = C.synth_pipelined(x, c, params, xp, cp, zsp, sp, g, 0.5)
    s2, zs2 = C.synth_forward(x, c, params)
    grads2, partials2 = C.synth_update(xp, cp, params, zsp, sp, g, 0.5)
    assert torch.equal(s, s2) and all(torch.equal(a, b) for a, b in zip(zs, zs2))
    assert all(a.dtype == p.dtype and torch.equal(a, b) for a, b, p in zip(grads, grads2, params))
    assert torch.equal(partials, partials2)


def test_bf16_big_width(lowp_gemm):
    rows, dt, dc, h, do = BIG
    x, c, params, g = make_case(rows, dt, dc, h, do, 1, dtype=torch.bfloat16, context=True, seed=9)
    _check_lowp(x, c, params, g, 2.0 / g.numel(), None, autocast=False)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def _case():
    return make_case(3, 5, 3, 4, 6, 1, context=True)


def test_error_wrong_trigger_width():
    x, c, params, g = _case()
    with pytest.raises(RuntimeError, match="wrong trigger width"):
        C.synth_forward(x[:, :4], c, params)


def test_error_wrong_context_width():
    x, c, params, g = _case()
    with pytest.raises(RuntimeError, match="wrong context width"):
        C.synth_forward(x, c[:, :2], params)


def test_error_wrong_list_length():
    x, c, params, g = _case()
    with pytest.raises(RuntimeError, match="bad parameter list length 5 with a context"):
        C.synth_forward(x, c, params[:-1])
    with pytest.raises(RuntimeError, match="bad parameter list length 1 without a context"):
        C.synth_forward(x, None, params[:1])


def test_error_hidden_shape():
    x, c, params, g = _case()
    bad = list(params)
    bad[4] = torch.zeros(6, 5)
    with pytest.raises(RuntimeError, match=r"layers\.0\.weight has shape"):
        C.synth_forward(x, c, bad)


def test_error_dtype_mismatch():
    x, c, params, g = _case()
    with pytest.raises(RuntimeError, match="all synthesizer parameters must share one dtype"):
        C.synth_forward(x, c, [params[0].double()] + params[1:])
    with pytest.raises(RuntimeError, match=r"x has dtype torch\.float64 but the parameters have dtype torch\.float32"):
        C.synth_forward(x.double(), c, params)
    with pytest.raises(RuntimeError, match="must be floating point"):
        C.synth_forward(x.long(), c, params)
    s, zs = C.synth_forward(x, c, params)
    with pytest.raises(RuntimeError, match=r"zs\[0\] has dtype torch\.float64"):
        C.synth_update(x, c, params, [zs[0].double()], s, g, 1.0)


def test_error_device_mismatch():
    x, c, params, g = _case()
    with pytest.raises(RuntimeError, match="input_trigger.bias\\) is on meta but the trigger x is on cpu"):
        C.synth_forward(x, c, [params[0], params[1].to("meta")] + params[2:])
    with pytest.raises(RuntimeError, match="the context c is on meta"):
        C.synth_forward(x, c.to("meta"), params)


def test_error_update_shapes():
    x, c, params, g = _case()
    s, zs = C.synth_forward(x, c, params)
    with pytest.raises(RuntimeError, match="expected 1 saved pre-activations"):
        C.synth_update(x, c, params, [], s, g, 1.0)
    with pytest.raises(RuntimeError, match=r"the target g must have shape \(3, 6\)"):
        C.synth_update(x, c, params, zs, s, g[:, :5], 1.0)
    with pytest.raises(RuntimeError, match=r"s must have shape \(3, 6\)"):
        C.synth_update(x, c, params, zs, s[:2], g, 1.0)
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim"):
        C.synth_update(x, c, params, zs, s, g, 1.0, torch.ones(2))
    with pytest.raises(RuntimeError, match="c and c_prev must both be tensors or both be None"):
        C.synth_pipelined(x, c, params, x, None, zs, s, g, 1.0)


def test_error_cuda_tensor_without_cuda_build():
    if C.WITH_CUDA:
        pytest.skip("the extension has CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make a CUDA tensor with")
    x, c, params, g = make_case(3, 5, 3, 4, 6, 1, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        C.synth_forward(x, c, params)


# ---------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------
def test_loader():
    assert _ext.get_ext() is C
    assert _ext.cpp_available() == (True, "")
    ok, why = _ext.cuda_available()
    assert ok == (C.WITH_CUDA and torch.cuda.is_available())
    assert ok or why


# ---------------------------------------------------------------------------
# CUDA (runs only with a GPU and the CUDA build)
# ---------------------------------------------------------------------------
def _to(t, device, dtype=None):
    return None if t is None else t.to(device=device, dtype=dtype or t.dtype)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [BIG], ids=lambda s: "x".join(map(str, s)))
def test_cuda_fp32(shape, context, n_hidden):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        rows, dt, dc, h, do = shape
        x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, context=context, device="cuda")
        s, zs = C.synth_forward(x, c, params)
        check_forward((s, zs), synth_forward_ref(x, c, params), dtype=torch.float32)
        gs = torch.tensor(0.37, device="cuda")
        got = C.synth_update(x, c, params, zs, s, g, 2.0 / rows, gs)
        check_update(got, synth_update_ref(x, c, params, zs, s, g, 2.0 / rows, gs), params)
        got = C.synth_pipelined(x, c, params, x, c, zs, s, g, 2.0 / rows)
        exp = synth_pipelined_ref(x, c, params, x, c, zs, s, g, 2.0 / rows)
        check_forward(got[:2], exp[:2])
        check_update(got[2:], exp[2:], params)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
def test_cuda_low_precision(context, n_hidden, dtype):
    rows, dt, dc, h, do = SHAPES[2]
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, dtype=dtype, context=context, device="cuda")
    _check_lowp(x, c, params, g, 2.0 / rows, torch.tensor(0.5, device="cuda"), autocast=False)
    x, c, params, g = make_case(rows, dt, dc, h, do, n_hidden, context=context, device="cuda", seed=1)
    _check_lowp(x.to(dtype), c, params, g.to(dtype), 2.0 / rows, None, autocast=True)


@needs_cuda
@pytest.mark.gpu
def test_cuda_noncontiguous_and_errors():
    x, c, params, g = make_case(7, 37, 11, 19, 37, 2, device="cuda")
    x_nc = x.t().contiguous().t()
    s, zs = C.synth_forward(x_nc, c, params)
    check_forward((s, zs), synth_forward_ref(x, c, params), rtol=5e-4)  # TF32 may be on
    with pytest.raises(RuntimeError, match="is on cpu"):
        C.synth_forward(x, c, [params[0].cpu()] + params[1:])
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        C.synth_forward(x.double(), _to(c, "cuda", torch.float64), [p.double() for p in params])
