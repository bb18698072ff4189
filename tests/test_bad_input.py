"""Bad input on every backend that runs here: empty batches, NaN and inf,
``check_finite``, a non-finite ``factor``, integer triggers, and what ``auto``
picked. Each case is a clear error or a documented no-op, never a silent wrong
answer or lost state."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast.testing import assert_close
from tests.conftest import fused_backends

D, H = 6, 5
BACKENDS = ["reference"] + fused_backends("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    bk.clear_cache()
    yield request.param
    bk.clear_cache()


def _synth(context_dim=None, seed=0):
    torch.manual_seed(seed)
    s = dni.BasicSynthesizer(D, n_hidden=1, hidden_dim=H, context_dim=context_dim)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # a fresh synthesizer predicts a constant: give it signal
    return s


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


# -- empty batches -------------------------------------------------------------------
@pytest.mark.parametrize("pipelined", [False, True])
def test_empty_batch_runs_and_changes_nothing(backend, pipelined):
    iface = dni.BackwardInterface(_synth(), backend=backend, pipelined=pipelined)
    lin = nn.Linear(3, D)
    h = lin(torch.randn(0, 3))
    out = iface(h)
    assert out.shape == (0, D) and not out.requires_grad
    assert iface.make_trigger(h).shape == (0, D)
    iface.backward(h, factor=0.5)
    assert iface.receive(h).shape == (0, D)
    (out.sum() + lin.weight.sum() * 0).backward()
    assert iface.n_steps == 0
    st = iface.stats()
    assert st["count"] == 0 and st["nonfinite"] == 0
    assert all(p.grad is None for p in iface.parameters())  # no regression step


def test_empty_batch_with_leading_dims(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    h = torch.randn(4, 0, D, requires_grad=True)
    assert iface(h).shape == (4, 0, D) and iface.n_steps == 0


def test_empty_send(backend):
    iface = dni.ForwardInterface(_synth(), backend=backend)
    out = iface(torch.randn(0, D), torch.randn(0, D))
    assert out.shape == (0, D)
    with pytest.raises(ValueError, match="message has shape"):
        iface(torch.randn(0, D + 1), torch.randn(0, D))
    assert iface.stats()["count"] == 0


# -- NaN and inf ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
def test_nonfinite_steps_are_counted_on_the_device(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    h = torch.randn(4, D, requires_grad=True)
    iface(h).sum().backward()  # a finite step
    bad = torch.randn(4, D)
    bad[1, 2] = float("nan")
    iface(bad.requires_grad_()).sum().backward()  # S is NaN
    out = iface(torch.randn(4, D, requires_grad=True))
    out.backward(torch.full((4, D), float("inf")))  # the true gradient is inf
    st = iface.stats()
    assert st["count"] == 1 and st["nonfinite"] == 2
    assert math.isfinite(st["loss"]) and math.isfinite(st["loss_mean"]) and math.isfinite(st["cos"])


def test_check_finite_raises_at_the_forward_naming_the_interface(backend):
    net = nn.Sequential(nn.Linear(3, D), dni.BackwardInterface(_synth(), backend=backend, check_finite=True))
    dni.name_interfaces(net)
    before = _params(net)
    x = torch.randn(4, 3)
    x[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"BackwardInterface '1'.*S\(h\) has NaN or inf"):
        net(x)
    assert all(p.grad is None for p in net.parameters())  # nothing injected
    after = _params(net)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_check_finite_raises_before_the_synthesizer_is_updated(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend, check_finite=True, name="layer3.dni")
    h = torch.randn(4, D, requires_grad=True)
    out = iface(h)
    g = torch.randn(4, D)
    g[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'layer3.dni'.*true gradient .* NaN or inf"):
        out.backward(g)
    assert all(p.grad is None for p in iface.synthesizer.parameters())
    assert iface.stats()["count"] == 0  # the update never ran
    iface(torch.randn(4, D, requires_grad=True)).sum().backward()  # and the interface still works
    assert iface.stats()["count"] == 1


def test_check_finite_global_switch_and_env(backend, monkeypatch):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    x = torch.full((2, D), float("nan"), requires_grad=True)
    iface(x)  # off by default: no error (the step is counted as non-finite)
    dni.set_check_finite(True)
    with pytest.raises(FloatingPointError):
        iface(x)
    monkeypatch.setenv("DNI_FAST_CHECK_FINITE", "1")
    dni.set_check_finite(None)  # back to the environment variable, read again
    with pytest.raises(FloatingPointError):
        iface(x)
    iface.check_finite = False  # the interface's own setting wins
    iface(x)


def test_check_finite_on_send(backend):
    iface = dni.ForwardInterface(_synth(), backend=backend, check_finite=True)
    m = torch.randn(3, D)
    m[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="message sent has NaN or inf"):
        iface(m, torch.randn(3, D))
    assert all(p.grad is None for p in iface.parameters())


def test_check_finite_gives_the_same_numbers(backend):
    """The checks only observe: the same step with and without them."""
    def run(check):
        iface = dni.BackwardInterface(_synth(), backend=backend, check_finite=check)
        lin = nn.Linear(3, D)
        torch.manual_seed(1)
        x, y = torch.randn(5, 3), torch.randn(5, D)
        F.mse_loss(iface(lin(x)), y).backward()
        return {n: p.grad for n, p in [*iface.named_parameters(), *lin.named_parameters()]}

    a, b = run(False), run(True)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_backward_with_a_nonfinite_factor_raises(factor):
    iface = dni.BackwardInterface(_synth())
    h = torch.randn(2, D, requires_grad=True)
    with pytest.raises(ValueError, match="factor"):
        iface.backward(h, factor=factor)
    assert h.grad is None


def test_backward_factor_scales_the_injection(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    h = torch.randn(3, D, requires_grad=True)
    iface.backward(h, factor=0.25)
    assert_close(h.grad, 0.25 * iface.receive(h), rtol=1e-6, atol=1e-7)


# -- dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reference", "cpp", "auto"])
def test_integer_trigger_gets_the_cast_advice_on_every_backend(name):
    if name == "cpp" and not dni.backend_status("cpp")[0]:
        pytest.skip("cpp backend unavailable")
    iface = dni.BackwardInterface(_synth(), backend=name)
    with pytest.raises(TypeError, match=r"floating-point.*cast it with \.float\(\)"):
        iface(torch.ones(2, D, dtype=torch.long))


def test_every_dtype_a_backend_lists_runs(backend):
    """The dtypes a backend states are the ones it runs (and the README lists)."""
    b = bk.get(backend)
    for dtype in b.dtypes:
        if backend == "triton" and dtype == torch.bfloat16:
            continue  # bf16 tl.dot is wrong in the interpreter; checked on a GPU
        iface = dni.BackwardInterface(_synth().to(dtype), backend=backend)
        h = torch.randn(3, D, dtype=dtype, requires_grad=True)
        iface(h).float().sum().backward()
        assert h.grad is not None and h.grad.dtype == dtype
        assert all(p.grad is not None for p in iface.parameters())
    missing = [d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16) if d not in b.dtypes]
    for dtype in missing:
        iface = dni.BackwardInterface(_synth().to(dtype), backend=backend)
        with pytest.raises(dni.BackendUnavailableError, match="does not support dtype"):
            iface(torch.randn(3, D, dtype=dtype, requires_grad=True))


# -- what auto picked -----------------------------------------------------------------------
def test_resolved_backend_and_stats_say_what_ran(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    h = torch.randn(3, D, requires_grad=True)
    assert iface.resolved_backend(h) == backend
    assert iface.stats()["backend"] is None
    iface(h).sum().backward()
    assert iface.stats()["backend"] == backend and f"last step: {backend}" in repr(iface)


def test_resolved_backend_of_a_custom_synthesizer_is_reference():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, trigger, context):
            return self.lin(trigger)

    iface = dni.BackwardInterface(Custom(), backend="cpp" if dni.backend_status("cpp")[0] else "auto")
    assert iface.resolved_backend(torch.randn(2, D)) == "reference"


def test_stats_relative_error_and_norms_match_a_hand_computation(backend):
    iface = dni.BackwardInterface(_synth(), backend=backend)
    h = torch.randn(4, D, requires_grad=True)
    s = iface.receive(h)
    g = torch.randn(4, D)
    iface(h).backward(g)
    st = iface.stats()
    s64, g64 = s.double(), g.double()
    assert st["rel_err"] == pytest.approx(((s64 - g64).norm() / g64.norm()).item(), rel=1e-5)
    assert st["s_norm"] == pytest.approx(s64.norm().item(), rel=1e-5)
    assert st["g_norm"] == pytest.approx(g64.norm().item(), rel=1e-5)
    assert st["cos"] == pytest.approx(F.cosine_similarity(s64.flatten(), g64.flatten(), dim=0).item(), rel=1e-5)
    assert st["loss"] == pytest.approx(((s64 - g64) ** 2).sum().item() / 4, rel=1e-5)


# -- found by review -------------------------------------------------------------------------------------------
def test_cpp_refuses_half_parameters_under_the_other_half_autocast_and_auto_avoids_it():
    if not bk.get("cpp").status(torch.device("cpu"))[0]:
        pytest.skip("cpp not built")
    synth = dni.BasicSynthesizer(8, n_hidden=1).half()
    h = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(bk.BackendUnavailableError, match="synthesizer parameters"):
            dni.BackwardInterface(synth, backend="cpp")(h)
        iface = dni.BackwardInterface(synth, backend="auto")
        out = iface(h)
        assert iface.resolved_backend(h) != "cpp"
    out.float().sum().backward()


def test_triton_refuses_parameters_of_mixed_dtypes():
    from dni_fast.kernels import synth_step as k

    if not bk.get("triton").status(torch.device("cpu"))[0]:
        pytest.skip("triton not importable")
    synth = dni.BasicSynthesizer(8, n_hidden=1)
    synth.layers[0].half()
    with pytest.raises(ValueError, match="share one dtype"):
        k.synth_forward_triton(torch.randn(4, 8), None, synth.flat_params())


def test_backend_names_are_lower_case_and_the_variable_may_be_empty(monkeypatch):
    class Mine(bk.ReferenceBackend):
        name = "MyRef"

    with pytest.raises(ValueError, match="lower case"):
        bk.register(Mine())
    for value in ("", " cpp ", "  "):
        monkeypatch.setenv("DNI_FAST_BACKEND", value)
        assert bk.get_backend() == (value.strip() or "auto")
