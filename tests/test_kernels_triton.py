"""The Triton kernels (kernels/synth_step.py) against their fp32 PyTorch twins
(kernels/synth_ref.py).

On a machine without CUDA they run in the Triton interpreter, which must be
switched on before triton decorates any kernel, hence the first lines.
Tolerances (DESIGN.md section 6):

* fp32: allclose with rtol 1e-5 and atol 1e-6 relative to the output's scale
  (rtol 5e-4 on a GPU where TF32 is allowed);
* fp16/bf16: max abs error against the fp32 reference at most 2x that of the
  same computation done by PyTorch in the low dtype (a twin below), with a floor
  of one unit of rounding at the output's scale (for tensors that the twin
  happens to get exactly right).
"""
import os

try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    from dni_fast.kernels import synth_step as K
    from dni_fast.kernels.synth_ref import synth_forward_ref, synth_pipelined_ref, synth_update_ref
except ImportError:  # not pip-installed: the kernels/ folder as a top-level package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels import synth_step as K
    from kernels.synth_ref import synth_forward_ref, synth_pipelined_ref, synth_update_ref

DEV = "cuda" if _CUDA else "cpu"
_ok, _why = K.triton_available(DEV)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton kernels unavailable: {_why}")

BF16_SKIP = pytest.mark.skipif(
    not _CUDA, reason="bf16 tl.dot is wrong in the Triton interpreter; bf16 is checked on a GPU only")

RTOL32 = 5e-4 if (_CUDA and torch.backends.cuda.matmul.allow_tf32) else 1e-5
ATOL32 = 1e-6


# ----------------------------------------------------------------------------- helpers
def make_params(L, Dt, H, Do, Dc, dtype=torch.float32, device=DEV):
    """dni-pytorch's flat order; fan-in scaled so activations stay O(1)."""
    D0 = Do if L == 0 else H
    shapes = [(D0, Dt)] + ([(D0, Dc)] if Dc else [])
    prev = D0
    for l in range(L):
        out = Do if l == L - 1 else H
        shapes.append((out, prev))
        prev = out
    ps = []
    for o, i in shapes:
        ps.append((torch.randn(o, i) / i ** 0.5).to(dtype).to(device))
        ps.append((0.1 * torch.randn(o)).to(dtype).to(device))
    return ps


def make_case(L, N, Dt, H, Do, Dc, dtype=torch.float32, pdtype=None, noncontig=False):
    pdtype = pdtype or dtype
    params = make_params(L, Dt, H, Do, Dc, pdtype)
    if noncontig:  # transposed and strided views; the kernels take strides
        x = torch.randn(Dt, N, device=DEV).to(dtype).t()
        c = torch.randn(N, 2 * Dc, device=DEV).to(dtype)[:, ::2] if Dc else None
        params[0] = params[0].t().contiguous().t()  # column-major weight
    else:
        x = torch.randn(N, Dt, device=DEV).to(dtype)
        c = torch.randn(N, Dc, device=DEV).to(dtype) if Dc else None
    return x, c, params


def rand_target(N, Do, dtype, noncontig=False):
    if noncontig:
        return torch.randn(Do, N, device=DEV).to(dtype).t()
    return torch.randn(N, Do, device=DEV).to(dtype)


def f32(ts):
    if ts is None:
        return None
    if isinstance(ts, torch.Tensor):
        return ts.float()
    return [t.float() for t in ts]


def _errs(out, ref):
    e = (out.float() - ref.float()).abs()
    return e.max().item() if e.numel() else 0.0, e.mean().item() if e.numel() else 0.0


def check32(name, out, ref, rtol=RTOL32, atol=ATOL32):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    scale = max(ref.float().abs().max().item() if ref.numel() else 0.0, 1e-30)
    ok = torch.allclose(out.float() / scale, ref.float() / scale, rtol=rtol, atol=atol)
    mx, mean = _errs(out, ref)
    assert ok, f"{name}: max abs err {mx:.3e}, mean abs err {mean:.3e} (scale {scale:.3e}, rtol {rtol}, atol {atol})"


def check_low(name, out, ref32, twin, dtype):
    """max|out - ref32| <= 2 * max|twin - ref32| (+ one rounding unit at scale)."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    mx, mean = _errs(out, ref32)
    tw, _ = _errs(twin, ref32)
    scale = ref32.float().abs().max().item() if ref32.numel() else 0.0
    bound = max(2 * tw, torch.finfo(dtype).eps * scale)
    assert mx <= bound, (f"{name} ({dtype}): max abs err {mx:.3e}, mean abs err {mean:.3e}, "
                         f"bound {bound:.3e} (PyTorch {dtype} twin: {tw:.3e})")


# The low-precision twin: synth_ref's math with every tensor in `dt`, as PyTorch
# itself would run the reference module in that dtype.
def twin_forward(x, c, params, dt):
    w = [p.to(dt) for p in params]
    L = (len(params) - 2 - (2 if c is not None else 0)) // 2
    z = torch.addmm(w[1], x.to(dt), w[0].t())
    i = 2
    if c is not None:
        z = z + torch.addmm(w[3], c.to(dt), w[2].t())
        i = 4
    zs = []
    for _ in range(L):
        zs.append(z)
        z = torch.addmm(w[i + 1], torch.relu(z), w[i].t())
        i += 2
    return z, zs


def twin_update(x, c, params, zs, s, g, scale, dt, grad_scale=None):
    L = len(zs)
    d = (s.to(dt) - g.to(dt)) * scale
    if grad_scale is not None:
        d = d * grad_scale.to(dt)
    w = [p.to(dt) for p in params]
    fh = 4 if c is not None else 2
    grads = [None] * len(params)
    for l in range(L, 0, -1):
        i = fh + 2 * (l - 1)
        z = zs[l - 1].to(dt)
        grads[i] = d.t() @ torch.relu(z)
        grads[i + 1] = d.sum(0)
        d = (d @ w[i]) * (z > 0)
    grads[0] = d.t() @ x.to(dt)
    grads[1] = d.sum(0)
    if c is not None:
        grads[2] = d.t() @ c.to(dt)
        grads[3] = grads[1].clone()
    return grads


def check_forward(x, c, params, s, zs, dtype):
    L = len(zs)
    if dtype == torch.float32:
        s_ref, zs_ref = synth_forward_ref(x, c, params)
        check32("s", s, s_ref)
        for l in range(L):
            check32(f"zs[{l}]", zs[l], zs_ref[l])
        return
    s32, zs32 = synth_forward_ref(f32(x), f32(c), f32(params))
    s_tw, zs_tw = twin_forward(x, c, params, dtype)
    check_low("s", s, s32, s_tw, dtype)
    for l in range(L):
        check_low(f"zs[{l}]", zs[l], zs32[l], zs_tw[l], dtype)


def check_update(x, c, params, zs, s, g, scale, grads, partials, dtype, grad_scale=None):
    assert len(grads) == len(params)
    for i, (gr, p) in enumerate(zip(grads, params)):
        assert gr.shape == p.shape and gr.dtype == p.dtype, f"grads[{i}]: {gr.shape} {gr.dtype} vs {p.shape} {p.dtype}"
    assert partials.dtype == torch.float32 and partials.shape == (4,)
    g_ref, p_ref = synth_update_ref(f32(x), f32(c), f32(params), f32(zs), f32(s), f32(g), scale,
                                    None if grad_scale is None else grad_scale.float())
    # the partials are fp32 sums of the very same s and g in every dtype
    check32("partials", partials, p_ref, rtol=max(RTOL32, 1e-5), atol=1e-6)
    if dtype == torch.float32 and all(p.dtype == torch.float32 for p in params):
        for i in range(len(params)):
            check32(f"grads[{i}]", grads[i], g_ref[i])
        return
    tw = twin_update(x, c, params, zs, s, g, scale, dtype, grad_scale)
    for i in range(len(params)):
        check_low(f"grads[{i}]", grads[i], g_ref[i], tw[i], dtype)


def run_all(L, N, Dt, H, Do, Dc, dtype=torch.float32, pdtype=None, noncontig=False, NP=None, pipelined=True):
    """forward, update and pipelined on one case, each checked against the refs."""
    x, c, params = make_case(L, N, Dt, H, Do, Dc, dtype, pdtype, noncontig)
    # forward
    s, zs = K.synth_forward_triton(x, c, params)
    assert s.dtype == x.dtype and s.shape == (N, Do) and len(zs) == L
    check_forward(x, c, params, s, zs, dtype)
    # update, on the kernel's own forward outputs
    g = rand_target(N, Do, dtype, noncontig)
    scale = 2.0 / N
    grads, partials = K.synth_update_triton(x, c, params, zs, s, g, scale)
    check_update(x, c, params, zs, s, g, scale, grads, partials, dtype)
    if not pipelined:
        return
    # pipelined: step t+1 with another batch size, step t's update from above
    NP1 = NP if NP is not None else max(1, N // 2 + 1)
    x1, c1, _ = make_case(L, NP1, Dt, H, Do, Dc, dtype, pdtype, noncontig)
    s1, zs1, grads0, partials0 = K.synth_pipelined_triton(x1, c1, params, x, c, zs, s, g, scale)
    check_forward(x1, c1, params, s1, zs1, dtype)
    check_update(x, c, params, zs, s, g, scale, grads0, partials0, dtype)
    if dtype == torch.float32:  # and against the pipelined oracle itself
        ref = synth_pipelined_ref(x1, c1, params, x, c, zs, s, g, scale)
        check32("pipelined s", s1, ref[0])
        for i, gr in enumerate(grads0):
            check32(f"pipelined grads[{i}]", gr, ref[2][i])
        check32("pipelined partials", partials0, ref[3])


@pytest.fixture
def small_tiles():
    """Small tiles in the interpreter so that odd widths span several tiles."""
    old = dict(K.INTERPRET_CONFIG)
    K.INTERPRET_CONFIG.update(BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, BLOCK_K=16)
    yield
    K.INTERPRET_CONFIG.clear()
    K.INTERPRET_CONFIG.update(old)


# ----------------------------------------------------------------------------- fp32
# (N, Dt, H, Do, Dc): widths 1, 37 and a larger non-multiple (100); N 1, 3, 129.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 37, 37, 37, 5),
    (129, 37, 50, 45, 9),
    (3, 100, 37, 1, 37),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-Dt%d-H%d-Do%d-Dc%d" % s)
@pytest.mark.parametrize("ctx", [False, True], ids=["noctx", "ctx"])
@pytest.mark.parametrize("L", [0, 1, 2])
def test_fp32(L, ctx, shape):
    N, Dt, H, Do, Dc = shape
    run_all(L, N, Dt, H, Do, Dc if ctx else None)


@pytest.mark.parametrize("L", [0, 1, 2])
def test_fp32_multi_tile(L, small_tiles):
    """Several tiles in every dimension, ragged edges, N = 129 not a tile multiple."""
    run_all(L, 129, 37, 40, 35, 9, NP=33)


def _autotune_cases():
    """Every tile config the GPU autotuner may pick, as interpreter meta-parameters."""
    if not hasattr(K, "_FWD_CONFIGS"):
        return []
    fwd = [("fwd", {k: c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}) for c in K._FWD_CONFIGS]
    upd = [("upd", {k: c.kwargs[k] for k in ("BLOCK_N", "BLOCK_H", "BLOCK_K")}) for c in K._UPD_CONFIGS]
    return fwd + upd


@pytest.mark.skipif(_CUDA, reason="on a GPU the autotuner itself runs these configs")
@pytest.mark.parametrize("case", _autotune_cases(), ids=lambda c: c[0] + "-" + "x".join(str(v) for v in c[1].values()))
def test_fp32_every_autotune_config(case):
    """The interpreter normally runs one tile config; the GPU autotuner picks
    any of these, so each runs once on a shape that is ragged against all of
    them (n_hidden=2, context, N=37)."""
    old = dict(K.INTERPRET_CONFIG)
    K.INTERPRET_CONFIG.update(case[1])
    try:
        run_all(2, 37, 40, 45, 35, 9, NP=20)
    finally:
        K.INTERPRET_CONFIG.clear()
        K.INTERPRET_CONFIG.update(old)


@pytest.mark.parametrize("L", [1, 2])
def test_fp32_noncontiguous(L):
    run_all(L, 129, 37, 45, 37, 9, noncontig=True)


def test_fp32_wide():
    """A width of 1000 (not a multiple of any tile)."""
    old = dict(K.INTERPRET_CONFIG)
    if not _CUDA:  # bigger tiles: the interpreter's cost is per tile, not per flop
        K.INTERPRET_CONFIG.update(BLOCK_M=64, BLOCK_N=64, BLOCK_H=64, BLOCK_K=64)
    try:
        run_all(1, 3, 1000, 1000, 1000, None, pipelined=_CUDA)
    finally:
        K.INTERPRET_CONFIG.clear()
        K.INTERPRET_CONFIG.update(old)


def test_fp32_empty_batch():
    x, c, params = make_case(1, 0, 7, 9, 5, None)
    s, zs = K.synth_forward_triton(x, c, params)
    assert s.shape == (0, 5) and zs[0].shape == (0, 9)
    grads, partials = K.synth_update_triton(x, c, params, zs, s, torch.empty_like(s), 1.0)
    assert all(bool((gr == 0).all()) for gr in grads) and bool((partials == 0).all())


# ----------------------------------------------------------------------------- low precision
LOW_SHAPES = [(129, 37, 50, 45, 9), (3, 1, 37, 1, 1)]


@pytest.mark.parametrize("shape", LOW_SHAPES, ids=lambda s: "N%d-Dt%d-H%d-Do%d-Dc%d" % s)
@pytest.mark.parametrize("ctx", [False, True], ids=["noctx", "ctx"])
@pytest.mark.parametrize("L", [0, 1, 2])
def test_fp16(L, ctx, shape):
    N, Dt, H, Do, Dc = shape
    run_all(L, N, Dt, H, Do, Dc if ctx else None, dtype=torch.float16)


@pytest.mark.parametrize("L", [1, 2])
def test_fp16_inputs_fp32_params(L):
    """Autocast: fp16 inputs with fp32 master weights; grads come out fp32."""
    run_all(L, 129, 37, 45, 37, 9, dtype=torch.float16, pdtype=torch.float32, noncontig=True)


@BF16_SKIP
@pytest.mark.parametrize("ctx", [False, True], ids=["noctx", "ctx"])
@pytest.mark.parametrize("L", [0, 1, 2])
def test_bf16(L, ctx):
    run_all(L, 129, 37, 100, 45, 9 if ctx else None, dtype=torch.bfloat16)


@BF16_SKIP
@pytest.mark.parametrize("L", [1, 2])
def test_bf16_inputs_fp32_params(L):
    run_all(L, 256, 1024, 1024, 1024, None, dtype=torch.bfloat16, pdtype=torch.float32)


# ----------------------------------------------------------------------------- grad_scale
@pytest.mark.parametrize("L", [0, 2])
def test_grad_scale(L):
    x, c, params = make_case(L, 33, 20, 24, 18, 6)
    s, zs = K.synth_forward_triton(x, c, params)
    g = rand_target(33, 18, torch.float32)
    gs = torch.tensor(0.37, device=DEV)
    grads, partials = K.synth_update_triton(x, c, params, zs, s, g, 2.0 / 33, gs)
    check_update(x, c, params, zs, s, g, 2.0 / 33, grads, partials, torch.float32, grad_scale=gs)
    ref, _ = synth_update_ref(x, c, params, zs, s, g, 2.0 / 33)
    check32("grads[0] scaled", grads[0], ref[0] * 0.37)


# ----------------------------------------------------------------------------- launches & state
@pytest.mark.parametrize("L", [0, 1, 2])
def test_one_launch_each(L):
    x, c, params = make_case(L, 17, 20, 24, 18, 6)
    g = rand_target(17, 18, torch.float32)
    K.LAUNCHES.clear()
    s, zs = K.synth_forward_triton(x, c, params)
    assert K.LAUNCHES == {"synth_forward": 1}
    K.LAUNCHES.clear()
    K.synth_update_triton(x, c, params, zs, s, g, 0.1)
    assert K.LAUNCHES == {"synth_update": 1}
    K.LAUNCHES.clear()
    K.synth_pipelined_triton(x, c, params, x, c, zs, s, g, 0.1)
    assert K.LAUNCHES == {"synth_pipelined": 1}


def test_counters_reset_and_repeat():
    """The update's counters are reset by its last program, so back-to-back
    launches (n_hidden=2 uses tickets) give identical results."""
    x, c, params = make_case(2, 20, 17, 40, 13, None)
    s, zs = K.synth_forward_triton(x, c, params)
    g = rand_target(20, 13, torch.float32)
    g1, p1 = K.synth_update_triton(x, c, params, zs, s, g, 0.1)
    assert bool((K._counters(x.device) == 0).all())
    g2, p2 = K.synth_update_triton(x, c, params, zs, s, g, 0.1)
    for a, b in zip(g1 + (p1,), g2 + (p2,)):
        assert torch.equal(a, b)  # no float atomics: deterministic


def test_grads_are_fresh():
    x, c, params = make_case(1, 5, 6, 7, 8, 3)
    s, zs = K.synth_forward_triton(x, c, params)
    grads, _ = K.synth_update_triton(x, c, params, zs, s, torch.zeros_like(s), 0.5)
    ptrs = {p.data_ptr() for p in params}
    assert len({gr.data_ptr() for gr in grads}) == len(grads)
    assert not ptrs & {gr.data_ptr() for gr in grads}
    torch.testing.assert_close(grads[3], grads[1])  # db_c == db_t


def test_tiles_layout(monkeypatch):
    """The alternative (row block, hidden tile) forward layout for n_hidden=1."""
    monkeypatch.setattr(K, "FWD_LAYOUT", "tiles")
    for ctx in (None, 5):
        x, c, params = make_case(1, 129, 37, 45, 20, ctx)
        K.LAUNCHES.clear()
        s, zs = K.synth_forward_triton(x, c, params)
        assert K.LAUNCHES["synth_forward"] == 1
        check_forward(x, c, params, s, zs, torch.float32)


def test_triton_available():
    ok, why = K.triton_available(DEV)
    assert ok and why == ""
    ok, why = K.triton_available("meta")
    assert not ok and "meta" in why


# ----------------------------------------------------------------------------- validation
def test_validation_errors():
    x, c, params = make_case(1, 4, 6, 7, 5, 3)
    with pytest.raises(ValueError, match="2-D"):
        K.synth_forward_triton(x[0], c, params)
    with pytest.raises(ValueError, match="width"):
        K.synth_forward_triton(x[:, :5], c, params)
    with pytest.raises(ValueError, match="rows"):
        K.synth_forward_triton(x, c[:3], params)
    with pytest.raises(ValueError, match="parameter list"):
        K.synth_forward_triton(x, None, params[:-1])
    with pytest.raises(ValueError, match="float"):
        K.synth_forward_triton(x.to(torch.int32), c, params)
    with pytest.raises(ValueError, match="meta"):
        K.synth_forward_triton(x, c, [params[0].to("meta")] + params[1:])
    with pytest.raises(ValueError, match="n_hidden 0..2"):
        K.synth_forward_triton(x, None, make_params(3, 6, 7, 5, None))
    s, zs = K.synth_forward_triton(x, c, params)
    with pytest.raises(ValueError, match="zs"):
        K.synth_update_triton(x, c, params, (), s, s, 1.0)
    with pytest.raises(ValueError, match="g has width"):
        K.synth_update_triton(x, c, params, zs, s, s[:, :2], 1.0)
    with pytest.raises(ValueError, match="grad_scale"):
        K.synth_update_triton(x, c, params, zs, s, s, 1.0, torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="c_prev"):
        K.synth_pipelined_triton(x, c, params, x, None, zs, s, s, 1.0)


@pytest.mark.skipif(not _CUDA, reason="compilation caches exist on a GPU only")
def test_new_batch_size_does_not_recompile():
    x, c, params = make_case(1, 37, 20, 24, 18, None)
    K.synth_forward_triton(x, c, params)
    kern = K._synth_fwd_kernel
    before = sum(len(v[0]) for v in kern.device_caches.values())
    for n in (35, 200, 1):
        K.synth_forward_triton(torch.randn(n, 20, device=DEV), None, params)
    assert sum(len(v[0]) for v in kern.device_caches.values()) == before


# ----------------------------------------------------------------------------- GPU compile (no GPU)
@pytest.mark.slow
@pytest.mark.skipif(_CUDA, reason="with a GPU the other tests compile the kernels")
@pytest.mark.skipif(os.environ.get("DNI_FAST_TEST_COMPILE", "0") != "1",
                    reason="slow (1-4 minutes on 2 CPU cores); set DNI_FAST_TEST_COMPILE=1 to run it")
def test_kernels_compile_for_sm90():
    """The interpreter does not compile; check that the most involved variants
    (n_hidden=2, context, bf16 and fp32) go through Triton's compiler and ptxas
    for Hopper, with the smallest and largest tiles of the autotune lists."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path.insert(0, {root!r})
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        try:
            from dni_fast.kernels import synth_step as k, synth_ref as r
        except ImportError:
            from kernels import synth_step as k, synth_ref as r
        TY = {{torch.float32: "fp32", torch.bfloat16: "bf16", torch.int32: "i32", torch.uint8: "u8"}}
        cap = {{}}
        class Cap:
            def __init__(self, n): self.n = n
            def __getitem__(self, grid):
                def f(*a, **kw): cap[self.n] = (a, kw)
                return f
        k._fwd_launch, k._upd_launch, k._pipe_launch = Cap("fwd"), Cap("upd"), Cap("pipe")
        k._AUTOTUNED = True
        JIT = {{"fwd": k._synth_fwd_kernel, "upd": k._synth_upd_kernel, "pipe": k._synth_pipe_kernel}}
        CFG = {{"fwd": k._FWD_CONFIGS, "upd": k._UPD_CONFIGS, "pipe": k._UPD_CONFIGS}}
        def build(name, cfg):
            args, kw = cap[name]
            fn = JIT[name]
            kw = dict(kw, **cfg.kwargs)
            sig, const = {{}}, {{}}
            for i, an in enumerate(fn.arg_names):
                if i < len(args):
                    v = args[i]
                    sig[an] = ("*" + TY[v.dtype]) if isinstance(v, torch.Tensor) else ("fp32" if isinstance(v, float) else "i32")
                else:
                    sig[an], const[an] = "constexpr", kw[an]
            triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        for dt in (torch.bfloat16, torch.float32):
            ps = [p.float() for p in [torch.randn(64, 64), torch.randn(64), torch.randn(64, 8), torch.randn(64),
                                      torch.randn(64, 64), torch.randn(64), torch.randn(64, 64), torch.randn(64)]]
            x, c = torch.randn(64, 64, dtype=dt), torch.randn(64, 8, dtype=dt)
            s, zs = r.synth_forward_ref(x, c, ps)
            k.synth_forward_triton(x, c, ps)
            k.synth_update_triton(x, c, ps, zs, s, s, 0.1, torch.tensor(1.0))
            k.synth_pipelined_triton(x, c, ps, x, c, zs, s, s, 0.1)
            for name in ("fwd", "upd", "pipe"):
                for cfg in (CFG[name][0], CFG[name][-1]):
                    build(name, cfg)
        print("compiled")
    """)
    env = {kk: v for kk, v in os.environ.items() if kk != "TRITON_INTERPRET"}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("compiling took too long here")
    if r.returncode != 0 and ("ptxas" in r.stderr and "No such file" in r.stderr):
        pytest.skip("no ptxas in this triton installation")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
