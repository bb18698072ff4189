"""The Triton kernels (kernels/synth_step*.py): what is specific to them.

The equivalence of the three primitives with ``kernels/synth_ref.py`` (every
dtype, odd shapes, every gradient) is tests/test_ops.py, for every fused
backend. Here: several tiles in every dimension, every autotune tile config,
the alternative forward layout, one launch per primitive, the update's
counters, the host-side checks, and (opt-in, slow) compilation for Hopper.

On a machine without CUDA they run in the Triton interpreter, switched on by
tests/conftest.py before triton decorates any kernel.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dni_fast.kernels import synth_step as K
from dni_fast.kernels import synth_step_kernels as KD
from dni_fast.kernels import synth_step_tuning as T
from tests.test_ops import check_forward, interpreter_tiles, make_case, run_case

_CUDA = torch.cuda.is_available()
DEV = "cuda" if _CUDA else "cpu"
_ok, _why = K.triton_available(DEV)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton kernels unavailable: {_why}")


class _Prims:
    forward = staticmethod(K.synth_forward_triton)
    update = staticmethod(K.synth_update_triton)
    pipelined = staticmethod(K.synth_pipelined_triton)


@pytest.mark.parametrize("L", [0, 1, 2])
def test_multi_tile(L):
    """Several tiles in every dimension, ragged edges, N = 129 not a tile multiple."""
    with interpreter_tiles(BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, BLOCK_K=16):
        run_case(_Prims, 129, 37, 9, 40, 35, L, device=DEV, next_rows=33)


def _autotune_cases():
    """Every tile config the GPU autotuner may pick, as interpreter meta-parameters."""
    if not hasattr(T, "_FWD_CONFIGS"):
        return []
    fwd = [("fwd", {k: c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}) for c in T._FWD_CONFIGS]
    upd = [("upd", {k: c.kwargs[k] for k in ("BLOCK_N", "BLOCK_H", "BLOCK_K")}) for c in T._UPD_CONFIGS]
    return fwd + upd


@pytest.mark.skipif(_CUDA, reason="on a GPU the autotuner itself runs these configs")
@pytest.mark.parametrize("case", _autotune_cases(), ids=lambda c: c[0] + "-" + "x".join(str(v) for v in c[1].values()))
def test_every_autotune_config(case):
    """The interpreter normally runs one tile config; the GPU autotuner picks
    any of these, so each runs once on a shape that is ragged against all of
    them (n_hidden=2, context, N=37)."""
    with interpreter_tiles(**case[1]):
        run_case(_Prims, 37, 40, 9, 45, 35, 2, device=DEV, next_rows=20)


def test_tiles_layout(monkeypatch):
    """The alternative (row block, hidden tile) forward layout for n_hidden=1."""
    monkeypatch.setattr(K, "FWD_LAYOUT", "tiles")
    for dc in (None, 5):
        x, c, params, _ = make_case(129, 37, dc, 45, 20, 1, device=DEV)
        K.LAUNCHES.clear()
        s, zs = K.synth_forward_triton(x, c, params)
        assert K.LAUNCHES["synth_forward"] == 1
        check_forward((s, zs), x, c, params)


@pytest.mark.parametrize("L", [0, 1, 2])
def test_one_launch_each(L):
    x, c, params, g = make_case(17, 20, 6, 24, 18, L, device=DEV)
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
    launches (n_hidden=2 draws tickets) give identical results."""
    x, c, params, g = make_case(20, 17, None, 40, 13, 2, device=DEV)
    s, zs = K.synth_forward_triton(x, c, params)
    g1, p1 = K.synth_update_triton(x, c, params, zs, s, g, 0.1)
    assert bool((K._counters(x.device) == 0).all())
    g2, p2 = K.synth_update_triton(x, c, params, zs, s, g, 0.1)
    for a, b in zip(g1 + (p1,), g2 + (p2,)):
        assert torch.equal(a, b)  # no float atomics: deterministic


def test_relu_propagates_nan():
    """A NaN trigger gives a NaN synthetic gradient, as torch.relu would (PTX's
    max, and the interpreter's, would return 0 for it)."""
    x, c, params, _ = make_case(4, 8, None, 8, 8, 1, device=DEV)
    x[1, 3] = float("nan")
    s, zs = K.synth_forward_triton(x, c, params)
    assert torch.isnan(s[1]).all() and not torch.isnan(s[[0, 2, 3]]).any()


def test_triton_available():
    ok, why = K.triton_available(DEV)
    assert ok and why == ""
    ok, why = K.triton_available("meta")
    assert not ok and "meta" in why


def test_validation_errors():
    x, c, params, g = make_case(4, 6, 3, 7, 5, 1, device=DEV)
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
        K.synth_forward_triton(x, None, make_case(4, 6, None, 7, 5, 3, device=DEV)[2])
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
    x, c, params, _ = make_case(37, 20, None, 24, 18, 1, device=DEV)
    K.synth_forward_triton(x, c, params)
    kern = KD._synth_fwd_kernel
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
        from dni_fast.kernels import synth_step as k, synth_ref as r, synth_step_kernels as kd
        from dni_fast.kernels import synth_step_tuning as t
        TY = {{torch.float32: "fp32", torch.bfloat16: "bf16", torch.int32: "i32", torch.uint8: "u8"}}
        cap = {{}}
        class Cap:
            def __init__(self, n): self.n = n
            def __getitem__(self, grid):
                def f(**kw): cap[self.n] = ((), kw)
                return f
        t.fwd_launch, t.upd_launch, t.pipe_launch = Cap("fwd"), Cap("upd"), Cap("pipe")
        t.AUTOTUNED = True
        JIT = {{"fwd": kd._synth_fwd_kernel, "upd": kd._synth_upd_kernel, "pipe": kd._synth_pipe_kernel}}
        CFG = {{"fwd": t._FWD_CONFIGS, "upd": t._UPD_CONFIGS, "pipe": t._UPD_CONFIGS}}
        def build(name, cfg):
            args, kw = cap[name]
            fn = JIT[name]
            kw = dict(kw, **cfg.kwargs)
            sig, const = {{}}, {{}}
            for p in fn.params:  # every argument is passed by name
                v = kw[p.name]
                if p.is_constexpr:
                    sig[p.name], const[p.name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[p.name] = "*" + TY[v.dtype]
                else:
                    sig[p.name] = "fp32" if isinstance(v, float) else "i32"
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


def test_the_autotune_prune_finds_x_among_keyword_arguments():
    """Triton's autotuner passes the prune function only the positional arguments as named_args; our launchers
    pass everything by keyword (kwargs). The prune found x in named_args only, which raised KeyError on every
    autotuned launch on a GPU. It keeps only the configs whose pipelined tiles fit shared memory: the
    forward's x tile and weight tile (``wt``), each in its own dtype, within sm_90's 227 KB; the update's
    three tiles in x's dtype within 200 KB (calibrated by benchmarks/check_triton_sm90.py --all)."""
    for configs, names in ((T._FWD_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
                           (T._UPD_CONFIGS, ("BLOCK_N", "BLOCK_H", "BLOCK_K"))):
        prune = T._prune(names)["early_config_prune"]
        forward = names[0] == "BLOCK_M"
        for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float32)):
            kept = prune(configs, {}, x=torch.zeros(2, dtype=dtype), wt=torch.zeros(2, dtype=wdtype), other=1)
            es = torch.zeros(0, dtype=dtype).element_size()
            ew = torch.zeros(0, dtype=wdtype).element_size()

            def need(c):
                m, n, k = (c.kwargs[x] for x in names)
                if forward:
                    return c.num_stages * (m * k * es + k * n * ew), T._SMEM
                return c.num_stages * es * (m * k + k * n + m * n), 200 * 1024

            assert kept and all(need(c)[0] <= need(c)[1] for c in kept)
            assert all(need(c)[0] > need(c)[1] for c in configs if c not in kept)
        assert prune(configs, {"x": torch.zeros(2)}) == prune(configs, {}, x=torch.zeros(2))
