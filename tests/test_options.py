"""Options beyond dni-pytorch's behaviour: regression-target normalisation
(``BackwardInterface(normalize_targets=True)``), against a hand derivation in
plain autograd and on every backend."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast.testing import assert_close, compare_backends
from tests.conftest import fused_backends

D = 6


def _synth(seed=0):
    torch.manual_seed(seed)
    s = dni.BasicSynthesizer(D, n_hidden=1, hidden_dim=5)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return s


def test_default_state_dict_keys_are_dni_pytorchs():
    assert not any(k.startswith("target_") for k in dni.BackwardInterface(_synth()).state_dict())
    keys = dni.BackwardInterface(_synth(), normalize_targets=True).state_dict()
    assert {"target_sq_ema", "target_count"} <= set(keys)


def test_normalised_regression_matches_a_hand_derivation():
    m = 0.9
    iface = dni.BackwardInterface(_synth(), normalize_targets=True, target_momentum=m)
    oracle = copy.deepcopy(iface.synthesizer)
    ema, count = 0.0, 0
    for step in range(3):
        h = torch.randn(4, D, requires_grad=True)
        g = torch.randn(4, D) * (10.0 ** -step)  # targets of changing scale
        sigma = 1.0 if count == 0 else (ema / (1 - m ** count)) ** 0.5
        iface.synthesizer.zero_grad()
        oracle.zero_grad()
        out = iface(h)
        s = oracle(h.detach())
        assert_close(h.grad, sigma * s.detach(), rtol=1e-5, atol=1e-6, name=f"injection {step}")
        out.backward(g)
        ema_next, count_next = m * ema + (1 - m) * g.pow(2).mean().item(), count + 1
        # the regression: sum((S - g / sigma)^2) / B, with the prediction's sigma; a prediction made before any
        # target had set it is divided by the sigma observed with its own target (not by 1)
        sigma_fit = sigma if count else (ema_next / (1 - m ** count_next)) ** 0.5
        (((s - g / sigma_fit) ** 2).sum() / 4).backward()
        for (n, a), b in zip(iface.synthesizer.named_parameters(), oracle.parameters()):
            assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, name=f"{n} step {step}")
        ema, count = ema_next, count_next
        assert iface.target_sigma().item() == pytest.approx((ema / (1 - m ** count)) ** 0.5, rel=1e-5)


def test_all_zero_targets_are_skipped():
    iface = dni.BackwardInterface(_synth(), normalize_targets=True)
    iface(torch.randn(3, D, requires_grad=True)).backward(torch.zeros(3, D))
    assert iface.target_count.item() == 0 and iface.target_sigma().item() == 1.0
    iface(torch.randn(3, D, requires_grad=True)).backward(torch.full((3, D), 2.0))
    assert iface.target_count.item() == 1 and iface.target_sigma().item() == pytest.approx(2.0)


def test_make_trigger_passes_the_true_gradient_unchanged():
    iface = dni.BackwardInterface(_synth(), normalize_targets=True)
    iface(torch.randn(3, D, requires_grad=True)).backward(torch.full((3, D), 3.0))  # sigma = 3 now
    h = torch.randn(3, D, requires_grad=True)
    g = torch.randn(3, D)
    iface.make_trigger(h).backward(g)
    assert_close(h.grad, g, rtol=1e-6, atol=0)
    assert_close(iface.receive(h), iface.target_sigma() * iface.synthesizer(h).detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_every_backend_matches_reference(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1 = nn.Linear(5, D)
            self.iface = dni.BackwardInterface(_synth(), normalize_targets=True)
            self.lin2 = nn.Linear(D, 3)

        def forward(self, x):
            first = torch.randn(x.shape[0], D, requires_grad=True)
            self.iface(first).backward(torch.randn(x.shape[0], D))  # a first step: sigma is observed
            return self.lin2(torch.relu(self.iface(self.lin1(x))))

    compare_backends(Net, lambda m: m(torch.randn(7, 5)), backend).raise_if_failed()


def test_pipelined_with_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalize_targets"):
        dni.BackwardInterface(_synth(), normalize_targets=True, pipelined=True)


# -- found by review -------------------------------------------------------------------------------------------
def test_pipelined_interface_refuses_make_trigger_and_overriding_subclasses():
    """pipelined=True defers the update to the next forward(): make_trigger (which updates at once) and a
    subclass whose forward composes backward/make_trigger were silently not pipelined."""
    iface = dni.BackwardInterface(_synth(), pipelined=True, backend="reference")
    with pytest.raises(RuntimeError, match="pipelined"):
        iface.make_trigger(torch.randn(3, D, requires_grad=True))

    class Sub(dni.BackwardInterface):
        def backward(self, trigger, factor=1):
            return super().backward(trigger, factor)

    with pytest.raises(TypeError, match="pipelined"):
        Sub(_synth(), pipelined=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_pipelined_pending_update_follows_the_synthesizers_dtype_on_load(backend, src, dst):
    if not bk.get(backend).status(torch.device("cpu"))[0]:
        pytest.skip(f"{backend} not built")

    def make(dtype):
        torch.manual_seed(0)
        return dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1), pipelined=True, backend=backend).to(dtype)

    a = make(src)
    h = torch.randn(4, D, dtype=src, requires_grad=True)
    a(h).backward(torch.randn(4, D, dtype=src))
    state = a.state_dict()
    assert any(k.startswith("pipelined_pending.") for k in state)
    b = make(dst)
    b.load_state_dict(state)
    b(torch.randn(4, D, dtype=dst, requires_grad=True)).backward(torch.randn(4, D, dtype=dst))
    b.flush()
    assert all(p.grad is not None and p.grad.dtype == dst for p in b.parameters())


def test_statistics_agree_across_backends_with_several_triggers_per_backward():
    """One row per forward, in forward order, on every backend: the last-step values used to differ between
    reference (rows written at the backward) and cpp (rows reserved at the forward), and retain_graph counted
    two steps on some backends and one on others."""
    backends = ["reference"] + [b for b in fused_backends("cpu") if not bk.get(b).interpreted(torch.device("cpu"))]
    got = {}
    for backend in backends:
        torch.manual_seed(0)
        iface = dni.BackwardInterface(_synth(), backend=backend)
        h1, h2 = torch.randn(4, D, requires_grad=True), torch.randn(4, D, requires_grad=True)
        loss = (iface(h1) * torch.randn(4, D)).sum() + 3 * (iface(h2) * torch.randn(4, D)).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        got[backend] = iface.stats()
    ref = got["reference"]
    assert ref["count"] == 2
    for backend, st in got.items():
        for k in ("count", "loss", "cos", "rel_err", "s_norm", "g_norm", "loss_mean"):
            assert st[k] == pytest.approx(ref[k], rel=1e-5), (backend, k)
