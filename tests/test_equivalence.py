"""Every fused backend against ``reference``, through the public API.

The backends: every registered fused backend that runs here (the registry:
``triton`` in the interpreter on the CPU, ``cpp`` and ``cuda`` where built) and
``primref`` (tests/conftest.py: the fp32 pure-PyTorch primitives of
kernels/synth_ref.py behind the fused glue, so the glue is tested even where
no fast backend is built).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast.testing import assert_close, compare_backends, compare_training
from tests.conftest import fused_backends

BACKENDS = fused_backends("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    bk.clear_cache()
    yield request.param
    bk.clear_cache()


def _perturb(model, std=0.2):
    """Fresh synthesizers have zeroed last layers; give every parameter signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


class _Net(nn.Module):
    def __init__(self, din, d, dout, n_hidden, hidden, context_dim, **kw):
        super().__init__()
        self.lin1 = nn.Linear(din, d)
        self.iface = dni.BackwardInterface(
            dni.BasicSynthesizer(d, n_hidden=n_hidden, hidden_dim=hidden, context_dim=context_dim), **kw)
        self.lin2 = nn.Linear(d, dout)

    def forward(self, x):
        return self.lin2(torch.relu(self.iface(self.lin1(x))))


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("rows,width,hidden", [(1, 1, 1), (3, 37, 20), (129, 16, 37)])
def test_update_unlock_one_step(backend, n_hidden, context, rows, width, hidden):
    cdim = 5 if context else None

    def make():
        return _perturb(_Net(7, width, 3, n_hidden, hidden, cdim))

    def run(m):
        x = torch.randn(rows, 7)
        if context:
            with dni.synthesizer_context(torch.randn(rows, cdim)):
                return m(x)
        return m(x)

    compare_backends(make, run, backend).raise_if_failed()


def test_update_unlock_wide(backend):
    def make():
        return _perturb(_Net(5, 1000, 2, 1, 64, None), std=0.02)

    compare_backends(make, lambda m: m(torch.randn(3, 5)), backend).raise_if_failed()


def test_leading_dims_noncontiguous_and_broadcast_context(backend):
    def make():
        return _perturb(_Net(6, 9, 4, 1, 11, 3))

    def run(m):
        h = m.lin1(torch.randn(5, 4, 6)).transpose(0, 1)  # (4, 5, 9), non-contiguous trigger
        with dni.synthesizer_context(torch.randn(5, 3)):  # broadcast over the leading dim
            return m.lin2(torch.relu(m.iface(h)))

    compare_backends(make, run, backend).raise_if_failed()


def test_complete_unlock(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = nn.Linear(6, 10), nn.Linear(10, 3)
            self.bi = dni.BidirectionalInterface(dni.BasicSynthesizer(10, n_hidden=1, trigger_dim=6),
                                                 dni.BasicSynthesizer(10, n_hidden=2, hidden_dim=7))

        def forward(self, x):
            return self.lin2(self.bi(self.lin1(x), x))

    compare_backends(lambda: _perturb(Net()), lambda m: m(torch.randn(9, 6)), backend).raise_if_failed()


def test_send_receive(backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)
            self.fi = dni.ForwardInterface(dni.BasicSynthesizer(8, n_hidden=1, trigger_dim=6, context_dim=2))

        def forward(self, x):
            with dni.synthesizer_context(torch.randn(x.shape[0], 2)):
                m = self.lin(x)
                self.fi.send(m, x)
                return self.fi.receive(x), self.fi(m, x)

    compare_backends(lambda: _perturb(Net()), lambda m: m(torch.randn(13, 6)), backend).raise_if_failed()


class _RNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(4 + 12, 12)
        self.iface = dni.BackwardInterface(dni.BasicSynthesizer(12, n_hidden=1, hidden_dim=9))

    def forward(self, segments, factor=0.3):
        hidden = torch.zeros(3, 12)
        total = 0
        for xs in segments:
            with dni.defer_backward():
                h = self.iface.make_trigger(hidden)
                for x in xs:
                    h = torch.tanh(self.cell(torch.cat([x, h], -1)))
                loss = (h ** 2).sum()
                dni.backward(loss)
                self.iface.backward(h, factor=factor)
            total = total + loss.detach()
            hidden = h.detach()
        return total


def test_rnn_defer_backward(backend):
    def run(m):
        return m([torch.randn(3, 3, 4) for _ in range(3)])

    compare_backends(lambda: _perturb(_RNN()), run, backend).raise_if_failed()


def test_training_equivalence(backend):
    def make():
        return nn.Sequential(nn.Linear(10, 16), nn.ReLU(),
                             dni.BackwardInterface(dni.BasicSynthesizer(16, n_hidden=1, hidden_dim=24)),
                             nn.Linear(16, 16), nn.ReLU(),
                             dni.BackwardInterface(dni.BasicSynthesizer(16, n_hidden=2, context_dim=4)),
                             nn.Linear(16, 4))

    def step(m, i):
        x, y = torch.randn(32, 10), torch.randint(0, 4, (32,))
        with dni.synthesizer_context(F.one_hot(y, 4).float()):
            F.cross_entropy(m(x), y).backward()

    compare_training(make, step, backend, steps=6, lr=0.1).raise_if_failed()


def test_stats_match_reference(backend):
    def run(b):
        torch.manual_seed(0)
        m = _perturb(_Net(5, 8, 2, 1, 8, None))
        with dni.use_backend(b):
            for _ in range(3):
                m(torch.randn(4, 5)).sum().backward()
        return m.iface.stats()

    ref, fast = run("reference"), run(backend)
    assert fast["count"] == ref["count"] == 3
    for k in ("loss", "loss_mean", "cos", "cos_mean"):
        assert fast[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


def test_fp64_and_bf16_autocast_where_supported(backend):
    # cpp (and primref through its slot) support fp64; triton does not and must say so.
    make = lambda: _perturb(_Net(5, 8, 2, 1, 8, None))  # noqa: E731
    if backend == "triton":
        m = make().double()
        with dni.use_backend("triton"), pytest.raises(dni.BackendUnavailableError, match="does not support dtype"):
            m(torch.randn(4, 5, dtype=torch.float64))
        return
    compare_backends(lambda: make().double(), lambda m: m(torch.randn(4, 5, dtype=torch.float64)),
                     backend).raise_if_failed()


def test_pipelined_matches_plain_pytorch_schedule(backend):
    """Pipelined mode: step t's update runs during step t+1's forward, with S
    and the activations saved at step t and the weights as they are then."""
    steps, lr, B = 4, 0.1, 6
    torch.manual_seed(0)
    net = _perturb(_Net(5, 8, 3, 1, 10, None, pipelined=True))
    ref = copy.deepcopy(net)
    data = [(torch.randn(B, 5), torch.randint(0, 3, (B,))) for _ in range(steps)]

    opt = torch.optim.SGD(net.parameters(), lr=lr)
    with dni.use_backend(backend):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        opt.zero_grad()
        net.iface.flush()
        opt.step()

    # the same schedule in plain PyTorch
    syn = ref.iface.synthesizer
    w1, b1 = syn.input_trigger.weight, syn.input_trigger.bias
    w2, b2 = syn.layers[0].weight, syn.layers[0].bias
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    pending = None

    def pending_grads(p):
        x, z, s, g = p
        delta = 2.0 / g.shape[0] * (s - g)
        zl = z.clone().requires_grad_()
        a = torch.relu(zl)
        w2l, b2l = w2.detach().clone().requires_grad_(), b2.detach().clone().requires_grad_()
        torch.autograd.backward(F.linear(a, w2l, b2l), delta)
        w1l, b1l = w1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
        torch.autograd.backward(F.linear(x, w1l, b1l), zl.grad)
        return [w1l.grad, b1l.grad, w2l.grad, b2l.grad]

    for item in data + [None]:
        opt.zero_grad()
        if pending is not None:
            for p, gr in zip((w1, b1, w2, b2), pending_grads(pending)):
                p.grad = gr
        if item is None:
            opt.step()
            break
        x, y = item
        h = ref.lin1(x)
        with torch.no_grad():
            z = F.linear(h, w1, b1)
            s = F.linear(torch.relu(z), w2, b2)
        h.backward(s, retain_graph=True)
        hd = h.detach().requires_grad_()
        F.cross_entropy(ref.lin2(torch.relu(hd)), y).backward()
        pending = (h.detach(), z, s, hd.grad)
        opt.step()

    for (n, a), e in zip(net.named_parameters(), ref.parameters()):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=n)
