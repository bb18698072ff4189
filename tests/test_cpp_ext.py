"""The C++/CUDA extension dni_fast._C: what is specific to it.

The equivalence of its primitives with ``kernels/synth_ref.py`` (fp32, fp64,
fp16, bf16, autocast, odd shapes, every gradient) is tests/test_ops.py, for
every fused backend. Here: the CPU's two ways of running low-precision
products, the pipelined call against the separate ones, the glue loops'
baseline-ISA build, its argument checks and messages, and the loader.
"""
from __future__ import annotations

import pytest
import torch

from dni_fast import _ext
from dni_fast.testing import assert_close
from tests.test_ops import make_case, run_case

_ok, _why = _ext.cpp_available()
if not _ok:
    pytest.skip(f"dni_fast._C is not available ({_why})", allow_module_level=True)

C = _ext.get_ext()
_cuda_ok, _cuda_why = _ext.cuda_available()
needs_cuda = pytest.mark.skipif(not _cuda_ok, reason=f"cuda backend unavailable: {_cuda_why}")


class _Prims:
    """The extension's primitives, as a backend's ``Primitives``."""
    forward = staticmethod(C.synth_forward)
    update = staticmethod(C.synth_update)
    pipelined = staticmethod(C.synth_pipelined)


def test_target_in_another_dtype():
    """g in fp64 with fp32 s is cast, not rejected."""
    x, c, params, g = make_case(3, 5, 3, 4, 5, 1)
    s, zs = C.synth_forward(x, c, params)
    a = C.synth_update(x, c, params, zs, s, g.double(), 1.0)
    b = C.synth_update(x, c, params, zs, s, g, 1.0)
    for u, v in zip((*a[0], a[1]), (*b[0], b[1])):
        assert torch.equal(u, v)


def test_baseline_isa_path():
    """The glue loops' baseline (non-AVX2) build, forced in a fresh process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, torch; sys.path.insert(0, {root!r})\n"
        "from dni_fast import _ext\n"
        "from tests.test_cpp_ext import _Prims\n"
        "from tests.test_ops import run_case\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    for L in (0, 2):\n"
        "        run_case(_Prims, 5, 37, 11, 19, 37, L, dtype=dt, seed=11)\n"
    ).format(root=root)
    env = dict(os.environ, DNI_FAST_CPU_BASELINE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# bf16 / fp16: native products or fp32 products
# ---------------------------------------------------------------------------
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_hidden", [0, 2])
@pytest.mark.parametrize("pdtype", [None, torch.float32], ids=["lowp-params", "fp32-params"])
def test_low_precision_in_both_product_modes(lowp_gemm, dtype, n_hidden, pdtype):
    run_case(_Prims, 129, 37, 9, 50, 45, n_hidden, dtype=dtype, pdtype=pdtype, grad_scale=0.5, seed=7)


def test_bf16_big_width(lowp_gemm):
    run_case(_Prims, 64, 1000, 37, 1000, 1000, 1, dtype=torch.bfloat16, seed=9)


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


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def _case():
    return make_case(3, 5, 3, 4, 6, 1)


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
    with pytest.raises(RuntimeError, match="built without its CUDA part"):
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
# CUDA (runs only with a GPU and the CUDA build; equivalence is in test_ops.py)
# ---------------------------------------------------------------------------
@needs_cuda
@pytest.mark.gpu
def test_cuda_noncontiguous_and_errors():
    x, c, params, g = make_case(7, 37, 11, 19, 37, 2, device="cuda")
    x_nc = x.t().contiguous().t()
    s, zs = C.synth_forward(x_nc, c, params)
    s_ref, _ = C.synth_forward(x, c, params)
    assert_close(s, s_ref, rtol=5e-4, atol=5e-4)  # TF32 may be on
    with pytest.raises(RuntimeError, match="is on cpu"):
        C.synth_forward(x, c, [params[0].cpu()] + params[1:])
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
        C.synth_forward(x.double(), c.double(), [p.double() for p in params])
