"""dni-pytorch's contract on the reference backend, checked gradient by
gradient against hand derivations written with plain autograd."""
import copy

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.testing import assert_close

B, DIN, D, DOUT = 5, 4, 6, 3


def _nonzero(synth):
    """A fresh synthesizer predicts only its bias; perturb the zeroed layer so the tests see real gradients."""
    with torch.no_grad():
        for p in synth.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return synth


def _grads(*mods):
    return [p.grad.clone() if p.grad is not None else None for m in mods for p in m.parameters()]


def _assert_grads(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what}[{i}]: gradient presence differs"
        if a is not None:
            assert_close(a, e, name=f"{what}[{i}]")


# ---------------------------------------------------------------------------
# BasicSynthesizer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_hidden", [0, 1, 2])
@pytest.mark.parametrize("context_dim", [None, 3])
def test_basic_synthesizer_init_matches_dni_pytorch_order(n_hidden, context_dim):
    torch.manual_seed(1)
    s = dni.BasicSynthesizer(D, n_hidden=n_hidden, hidden_dim=7, trigger_dim=4, context_dim=context_dim)
    torch.manual_seed(1)
    top = D if n_hidden == 0 else 7
    layers = [nn.Linear(4, top)] + ([nn.Linear(context_dim, top)] if context_dim else [])
    layers += [nn.Linear(7, 7 if i < n_hidden - 1 else D) for i in range(n_hidden)]
    if n_hidden:
        nn.init.zeros_(layers[-1].weight)
    else:
        for lin in layers:
            nn.init.zeros_(lin.weight)
    expected = [t for lin in layers for t in (lin.weight, lin.bias)]
    got = list(s.parameters())
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
    keys = ["input_trigger.weight", "input_trigger.bias"]
    keys += ["input_context.weight", "input_context.bias"] if context_dim else []
    keys += [f"layers.{i}.{k}" for i in range(n_hidden) for k in ("weight", "bias")]
    assert list(s.state_dict()) == keys


def test_basic_synthesizer_forward_and_leading_dims():
    s = _nonzero(dni.BasicSynthesizer(D, n_hidden=2, hidden_dim=8, trigger_dim=4, context_dim=3))
    x, c = torch.randn(2, 3, 4), torch.randn(3, 3)  # context broadcast over the leading dim
    z = s.input_trigger(x) + s.input_context(c)
    for layer in s.layers:
        z = layer(F.relu(z))
    assert_close(s(x, c), z)
    assert s(x, c).shape == (2, 3, D)


def test_context_ignored_without_context_dim():
    s = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    x = torch.randn(B, D)
    assert torch.equal(s(x, torch.randn(B, 11)), s(x, None))


# ---------------------------------------------------------------------------
# Feed-forward update unlock (with and without context)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_context", [False, True])
def test_update_unlock_gradients(with_context):
    lin1, lin2 = nn.Linear(DIN, D), nn.Linear(D, DOUT)
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1, context_dim=DOUT if with_context else None))
    iface = dni.BackwardInterface(synth)
    lin1_r, lin2_r, synth_r = map(copy.deepcopy, (lin1, lin2, synth))
    x = torch.randn(B, DIN)
    y = F.one_hot(torch.arange(B) % DOUT, DOUT).float()
    ctx = y if with_context else None

    with dni.synthesizer_context(ctx):
        h = lin1(x)
        out = lin2(iface(h))
    loss = (out ** 2).sum()
    # the part before the interface has its gradient already, before the loss' backward
    g_lin1_early = _grads(lin1)
    assert all(g is not None for g in g_lin1_early)
    loss.backward()

    # hand derivation
    h_r = lin1_r(x)
    s = synth_r(h_r.detach(), ctx)
    h_r.backward(s.detach())
    hd = h_r.detach().requires_grad_()
    (lin2_r(hd) ** 2).sum().backward()
    (((s - hd.grad) ** 2).sum() / B).backward()

    _assert_grads(_grads(lin1), _grads(lin1_r), "lin1")
    _assert_grads(_grads(lin2), _grads(lin2_r), "lin2")
    _assert_grads(_grads(synth), _grads(synth_r), "synth")
    assert torch.equal(out, lin2_r(h_r))


def test_first_dim_normalisation_and_leading_dims():
    """dni-pytorch normalises the regression by g.size(0), not the row count."""
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=0))
    iface = dni.BackwardInterface(synth)
    synth_r = copy.deepcopy(synth)
    h = torch.randn(3, 4, D, requires_grad=True)
    g = torch.randn(3, 4, D)
    iface(h).backward(g)
    s = synth_r(h.detach(), None)
    (((s - g) ** 2).sum() / 3).backward()
    _assert_grads(_grads(synth), _grads(synth_r), "synth")


# ---------------------------------------------------------------------------
# Complete unlock
# ---------------------------------------------------------------------------
def test_complete_unlock_gradients():
    lin1, lin2 = nn.Linear(DIN, D), nn.Linear(D, DOUT)
    fwd = _nonzero(dni.BasicSynthesizer(D, n_hidden=1, trigger_dim=DIN))
    bwd = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    bi = dni.BidirectionalInterface(fwd, bwd)
    lin1_r, lin2_r, fwd_r, bwd_r = map(copy.deepcopy, (lin1, lin2, fwd, bwd))
    x = torch.randn(B, DIN)

    h = lin1(x)
    m = bi(h, x)
    (lin2(m) ** 2).sum().backward()

    h_r = lin1_r(x)
    sf = fwd_r(x, None)
    F.mse_loss(sf, h_r.detach()).backward()
    h_r.backward(bwd_r(h_r.detach(), None).detach())
    msg = sf.detach()
    sb = bwd_r(msg, None)
    md = msg.clone().requires_grad_()
    (lin2_r(md) ** 2).sum().backward()
    (((sb - md.grad) ** 2).sum() / B).backward()

    assert_close(m, msg)
    for name, a, e in (("lin1", lin1, lin1_r), ("lin2", lin2, lin2_r), ("fwd", fwd, fwd_r), ("bwd", bwd, bwd_r)):
        _assert_grads(_grads(a), _grads(e), name)


# ---------------------------------------------------------------------------
# Custom synthesizer
# ---------------------------------------------------------------------------
class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.seen = []

    def forward(self, trigger, context):
        self.seen.append(context)
        out = self.lin(torch.tanh(trigger))
        return out if context is None else out * context.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", [None, "reference", "triton", "cpp", "cuda"])
def test_custom_synthesizer_runs_through_autograd_whatever_the_backend(backend):
    synth = _Custom()
    iface = dni.BackwardInterface(synth, backend=backend)
    synth_r, lin1 = copy.deepcopy(synth), nn.Linear(DIN, D)
    lin1_r = copy.deepcopy(lin1)
    x, ctx = torch.randn(B, DIN), torch.rand(B, 2)
    with dni.synthesizer_context(ctx):
        h = lin1(x)
        out = iface(h)
    g = torch.randn(B, D)
    out.backward(g)
    assert synth.seen[-1] is not None and torch.equal(synth.seen[-1], ctx)

    h_r = lin1_r(x)
    s = synth_r(h_r.detach(), ctx)
    h_r.backward(s.detach())
    (((s - g) ** 2).sum() / B).backward()
    _assert_grads(_grads(lin1), _grads(lin1_r), "lin1")
    _assert_grads(_grads(synth), _grads(synth_r), "synth")


# ---------------------------------------------------------------------------
# RNN: make_trigger / backward(factor) / defer_backward
# ---------------------------------------------------------------------------
class _RNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(DIN + D, D)
        self.readout = nn.Linear(D, DOUT)

    def forward(self, xs, hidden):
        outs = []
        for x in xs:
            hidden = torch.tanh(self.cell(torch.cat([x, hidden], -1)))
            outs.append(self.readout(hidden))
        return torch.stack(outs), hidden


def test_rnn_truncated_bptt_with_synthetic_gradients():
    T, factor = 3, 0.5
    rnn = _RNN()
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    iface = dni.BackwardInterface(synth)
    rnn_r, synth_r = copy.deepcopy(rnn), copy.deepcopy(synth)
    segments = [torch.randn(T, B, DIN) for _ in range(2)]
    h0 = torch.randn(B, D)

    hidden = h0
    for xs in segments:
        with dni.defer_backward():
            h_in = iface.make_trigger(hidden)
            out, hidden = rnn(xs, h_in)
            dni.backward((out ** 2).sum())
            iface.backward(hidden, factor=factor)
        hidden = hidden.detach()

    hidden = h0
    for xs in segments:
        h_in = hidden.clone().requires_grad_()
        s_in = synth_r(hidden, None)
        out, hidden_new = rnn_r(xs, h_in)
        s_out = synth_r(hidden_new.detach(), None).detach()
        torch.autograd.backward([(out ** 2).sum(), hidden_new], [torch.tensor(1.0), factor * s_out])
        (((s_in - h_in.grad) ** 2).sum() / B).backward()
        hidden = hidden_new.detach()

    _assert_grads(_grads(rnn), _grads(rnn_r), "rnn")
    _assert_grads(_grads(synth), _grads(synth_r), "synth")


def test_make_trigger_passes_true_gradient_through_unchanged():
    iface = dni.BackwardInterface(_nonzero(dni.BasicSynthesizer(D, n_hidden=1)))
    h = torch.randn(B, D, requires_grad=True)
    g = torch.randn(B, D)
    out = iface.make_trigger(h * 2)
    assert torch.equal(out, h * 2)
    out.backward(g)
    assert_close(h.grad, 2 * g)


def test_regression_gradient_does_not_reach_trigger_or_context_producers():
    """The documented deviation from dni-pytorch's make_trigger."""
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1, context_dim=2))
    iface = dni.BackwardInterface(synth)
    h = torch.randn(B, D, requires_grad=True)
    c = torch.randn(B, 2, requires_grad=True)
    with dni.synthesizer_context(c):
        out = iface.make_trigger(h)
    g = torch.randn(B, D)
    out.backward(g)
    assert torch.equal(h.grad, g)
    assert c.grad is None


def test_defer_backward_nesting_raises_and_state_is_reset():
    with dni.defer_backward():
        with pytest.raises(RuntimeError, match="nest"):
            with dni.defer_backward():
                pass
    # an exception inside drops the accumulated gradients and closes the scope
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError):
        with dni.defer_backward():
            dni.backward(x * 2)
            raise ValueError("boom")
    assert x.grad is None
    with dni.defer_backward():
        dni.backward((x * 2).sum())
        assert x.grad is None
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_backward_default_gradient_and_shape_check():
    x = torch.randn(2, 3, requires_grad=True)
    dni.backward(x * 3)
    assert torch.equal(x.grad, torch.full((2, 3), 3.0))
    with pytest.raises(ValueError, match="does not match"):
        dni.backward(x * 3, torch.ones(3))


def test_synthesizer_context_nests():
    assert dni.current_context() is None
    with dni.synthesizer_context("a"):
        with dni.synthesizer_context("b"):
            assert dni.current_context() == "b"
        assert dni.current_context() == "a"
    assert dni.current_context() is None


# ---------------------------------------------------------------------------
# send / receive
# ---------------------------------------------------------------------------
def test_forward_interface_send_receive():
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1, trigger_dim=DIN))
    fi = dni.ForwardInterface(synth)
    synth_r, lin1 = copy.deepcopy(synth), nn.Linear(DIN, D)
    x = torch.randn(B, DIN)
    m = lin1(x)
    fi.send(m, x)
    assert all(p.grad is None for p in lin1.parameters())
    s = synth_r(x, None)
    F.mse_loss(s, m.detach()).backward()
    _assert_grads(_grads(synth), _grads(synth_r), "synth")

    r = fi.receive(x)
    assert not r.requires_grad
    assert_close(r, synth(x, None))

    synth.zero_grad()
    out = fi(m, x)  # training: send then receive, one synthesizer run
    assert_close(out, synth(x, None))
    _assert_grads(_grads(synth), _grads(synth_r), "synth via forward")
    with pytest.raises(ValueError, match="message has shape"):
        fi.send(m[:, :2], x)


def test_receive_and_send_act_in_eval_mode():
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    fi = dni.ForwardInterface(synth).eval()
    x = torch.randn(B, D)
    assert_close(fi.receive(x), synth(x, None))
    fi.send(torch.randn(B, D), x)
    assert all(p.grad is not None for p in synth.parameters())


def test_eval_mode_passes_through():
    bi = dni.BidirectionalInterface(dni.BasicSynthesizer(D, trigger_dim=DIN), dni.BasicSynthesizer(D)).eval()
    bwd = dni.BackwardInterface(dni.BasicSynthesizer(D)).eval()
    fwd = dni.ForwardInterface(dni.BasicSynthesizer(D)).eval()
    h = torch.randn(B, D, requires_grad=True)
    assert bwd(h) is h and bwd.make_trigger(h) is h
    bwd.backward(h)
    assert h.grad is None
    assert fwd(h, h) is h
    assert bi(h, torch.randn(B, DIN)) is h
    assert all(p.grad is None for m in (bi, bwd, fwd) for p in m.parameters())


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
def test_errors_name_the_problem():
    iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1, context_dim=2))
    h = torch.randn(B, D, requires_grad=True)
    with pytest.raises(ValueError, match="no context was given"):
        iface(h)
    with dni.synthesizer_context(torch.randn(B, 5)):
        with pytest.raises(ValueError, match="context_dim=2"):
            iface(h)
    with dni.synthesizer_context(torch.randn(B + 1, 2)):
        with pytest.raises(ValueError, match="do not broadcast"):
            iface(h)
    with dni.synthesizer_context(torch.ones(B, 2, dtype=torch.long)):
        with pytest.raises(TypeError, match="floating"):
            iface(h)
    with dni.synthesizer_context(torch.randn(B, 2)):
        with pytest.raises(ValueError, match="trigger_dim=6"):
            iface(torch.randn(B, D + 1))
        with pytest.raises(TypeError, match="floating-point"):
            iface(torch.ones(B, D, dtype=torch.long))
        with pytest.raises(TypeError, match="outside autocast"):
            iface(torch.randn(B, D, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="is on meta"):
            iface(torch.randn(B, D, device="meta"))
    # nothing was injected or updated by the failed calls
    assert h.grad is None and all(p.grad is None for p in iface.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        dni.BackwardInterface(lambda t, c: t)
    with pytest.raises(ValueError, match="n_hidden"):
        dni.BasicSynthesizer(D, n_hidden=-1)


def test_bf16_autocast_works():
    lin1 = nn.Linear(DIN, D)
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    iface = dni.BackwardInterface(synth)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin1(torch.randn(B, DIN))
        assert h.dtype == torch.bfloat16
        out = iface(h)
    out.float().pow(2).sum().backward()
    for p in list(synth.parameters()) + list(lin1.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------
# Beyond the contract: warm-up, statistics, state_dict
# ---------------------------------------------------------------------------
def test_warmup_trains_synthesizer_without_applying_it():
    lin1 = nn.Linear(DIN, D)
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    iface = dni.BackwardInterface(synth, warmup_steps=2)
    for step in range(3):
        lin1.zero_grad(set_to_none=True)
        synth.zero_grad(set_to_none=True)
        out = iface(lin1(torch.randn(B, DIN)))
        out.sum().backward()
        assert all(p.grad is not None for p in synth.parameters())
        applied = all(p.grad is not None for p in lin1.parameters())
        assert applied == (step >= 2), step
    assert not iface.in_warmup


def test_stats_loss_and_cosine():
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    iface = dni.BackwardInterface(synth)
    assert iface.stats()["count"] == 0
    losses, coss = [], []
    for _ in range(3):
        h = torch.randn(B, D, requires_grad=True)
        g = torch.randn(B, D)
        s = synth(h, None).detach()
        iface(h).backward(g)
        losses.append((((s - g) ** 2).sum() / B).item())
        coss.append(F.cosine_similarity(s.flatten(), g.flatten(), dim=0).item())
    st = iface.stats()
    assert st["count"] == 3
    assert st["loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert st["loss_mean"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert st["cos"] == pytest.approx(coss[-1], rel=1e-4, abs=1e-6)
    assert st["cos_mean"] == pytest.approx(sum(coss) / 3, rel=1e-4, abs=1e-6)
    iface.reset_stats()
    assert iface.stats()["count"] == 0


def test_stats_leave_zero_true_gradients_out_of_cos_and_rel_err():
    """cos and |S-g|/|g| are undefined for g == 0: those steps count in the loss and norms only."""
    synth = _nonzero(dni.BasicSynthesizer(D, n_hidden=1))
    iface = dni.BackwardInterface(synth)
    h = torch.randn(B, D, requires_grad=True)
    iface(h).backward(torch.zeros(B, D))
    st = iface.stats()
    assert st["count"] == 1 and math.isnan(st["cos"]) and math.isnan(st["cos_mean"]) and math.isnan(st["rel_err"])
    assert st["g_norm"] == 0 and st["s_norm"] > 0 and st["loss"] > 0
    coss, rels, losses = [], [], [st["loss"]]
    for step in range(4):
        h = torch.randn(B, D, requires_grad=True)
        g = torch.zeros(B, D) if step == 3 else torch.randn(B, D)
        s = synth(h, None).detach()
        iface(h).backward(g)
        losses.append((((s - g) ** 2).sum() / B).item())
        if step < 3:
            coss.append(F.cosine_similarity(s.flatten(), g.flatten(), dim=0).item())
            rels.append(((s - g).norm() / g.norm()).item())
    st = iface.stats()
    assert st["count"] == 5
    assert st["cos_mean"] == pytest.approx(sum(coss) / 3, rel=1e-4, abs=1e-6)
    assert st["rel_err_mean"] == pytest.approx(sum(rels) / 3, rel=1e-4)
    assert st["cos"] == pytest.approx(coss[-1], rel=1e-4, abs=1e-6)  # the last step where it is defined
    assert st["loss_mean"] == pytest.approx(sum(losses) / 5, rel=1e-5)


def test_stats_cosine_stays_in_range_when_the_synthetic_gradient_underflows():
    """A synthetic gradient whose squares underflow fp32 (|S|^2 == 0) beside a huge true gradient (S . g != 0):
    a diverging run produced exactly these partials, and the cosine came out as 9e285. It is 0 (S predicts
    nothing), and every recorded cosine lies in [-1, 1]."""
    from dni_fast.stats import SynthStats, partials_of

    st = SynthStats()
    s = torch.full((4, 8), 1e-26)
    g = torch.full((4, 8), 1e12)
    p = partials_of(s, g)
    assert p[2] == 0 and p[1] != 0  # the case: |S|^2 underflowed, S . g did not
    st.record(p, 1.0)
    out = st.read()
    assert out["count"] == 1 and out["cos"] == 0.0 and out["cos_mean"] == 0.0
    st.record(partials_of(g * 1e-12, g), 1.0)  # parallel: 1 up to fp32 rounding, never past it
    out = st.read()
    assert 1.0 - 1e-6 < out["cos"] <= 1.0 and out["cos_mean"] == pytest.approx(0.5, abs=1e-6)


def test_stats_ring_folds_over_many_steps():
    iface = dni.ForwardInterface(_nonzero(dni.BasicSynthesizer(2, trigger_dim=2)))
    total = 0.0
    n = dni_fast_stats_capacity() * 2 + 3
    for _ in range(n):
        x, m = torch.randn(4, 2), torch.randn(4, 2)
        with torch.no_grad():
            total += F.mse_loss(iface.synthesizer(x, None), m).item()
        iface.send(m, x)
        iface.synthesizer.zero_grad()
    st = iface.stats()
    assert st["count"] == n
    assert st["loss_mean"] == pytest.approx(total / n, rel=1e-5)


def dni_fast_stats_capacity():
    from dni_fast.stats import SynthStats

    return SynthStats.CAPACITY


def _mlp():
    return nn.Sequential(nn.Linear(DIN, D), nn.ReLU(), dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1)),
                         nn.Linear(D, DOUT))


def test_state_dict_keys_and_round_trip_resumes_bit_for_bit():
    torch.manual_seed(0)
    data = [(torch.randn(B, DIN), torch.randint(0, DOUT, (B,))) for _ in range(6)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    torch.manual_seed(1)
    model = _mlp()
    assert "2.synthesizer.layers.0.weight" in model.state_dict()
    assert not any("stats" in k or "pending" in k for k in model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, data[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, data[3:])

    torch.manual_seed(2)
    model2 = _mlp()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    train(model2, opt2, data[3:])
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------
def test_backend_selection_api(monkeypatch):
    monkeypatch.delenv("DNI_FAST_BACKEND", raising=False)
    assert dni.get_backend() == "auto"
    monkeypatch.setenv("DNI_FAST_BACKEND", "reference")
    assert dni.get_backend() == "reference"
    monkeypatch.setenv("DNI_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DNI_FAST_BACKEND"):
        dni.get_backend()
    dni.set_backend("cpp")
    assert dni.get_backend() == "cpp"
    with dni.use_backend("reference"):
        assert dni.get_backend() == "reference"
        with dni.use_backend("triton"):
            assert dni.get_backend() == "triton"
        assert dni.get_backend() == "reference"
    assert dni.get_backend() == "cpp"
    with pytest.raises(ValueError, match="unknown dni_fast backend"):
        dni.set_backend("fast")
    with pytest.raises(ValueError, match="unknown dni_fast backend"):
        dni.BackwardInterface(dni.BasicSynthesizer(D), backend="gpu")
    assert dni.available_backends("cpu")[0] == "reference"


def test_unavailable_backend_says_how_to_get_it():
    iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1), backend="cuda")
    with pytest.raises(dni.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        iface(torch.randn(B, D, requires_grad=True))


def test_explicit_fast_backend_rejects_deep_synthesizer_clearly():
    from tests.conftest import fused_backends

    for b in fused_backends("cpu"):
        iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=3), backend=b)
        with pytest.raises(dni.BackendUnavailableError, match="n_hidden <= 2"):
            iface(torch.randn(B, D, requires_grad=True))
    # auto falls back to the reference path for it
    iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=3), backend="auto")
    iface(torch.randn(B, D, requires_grad=True)).sum().backward()


def test_import_does_not_load_torch_dynamo():
    """``import dni_fast`` stays cheap: torch._dynamo (about 2 s here) loads
    only when the user compiles."""
    import subprocess
    import sys

    code = "import sys, dni_fast; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_torch_compile_through_the_interfaces_does_not_recompile():
    """The interface's host-side step counter is hidden from torch.compile:
    after the warm-up boundary (compiled once each side of it) a new step
    compiles nothing (no guard on the counter, which would recompile every
    step and then fall back to eager), and the compiled model trains to the
    eager model's parameters, warm-up included."""
    pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    def run(compiled, seen):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                          dni.BackwardInterface(dni.BasicSynthesizer(16), backend="reference", warmup_steps=2),
                          nn.Linear(16, 3))
        opt = torch.optim.SGD(m.parameters(), 0.1)
        f = torch.compile(m, backend="eager") if compiled else m
        torch.manual_seed(1)
        for _ in range(8):
            x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
            opt.zero_grad()
            F.cross_entropy(f(x), y).backward()
            opt.step()
            seen.append(counters["frames"]["total"])
        return [p.detach().clone() for p in m.parameters()]

    eager = run(False, [])
    counters.clear()
    frames = []
    compiled = run(True, frames)
    assert frames[3] > 0 and frames[3:] == [frames[3]] * 5, frames  # nothing compiled after step 4
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# -- the testing helpers, review this stop -----------------------------------------------------------------------
def test_assert_close_needs_infinities_to_match_and_lowp_needs_equal_shapes():
    from dni_fast.testing import assert_close, assert_lowp_close

    with pytest.raises(AssertionError):  # an infinity expected made every tolerance infinite
        assert_close(torch.tensor([5.0, -math.inf]), torch.tensor([1.0, math.inf]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([-math.inf]), torch.tensor([math.inf]))
    assert_close(torch.tensor([1.0, math.inf]), torch.tensor([1.0, math.inf]))
    with pytest.raises(AssertionError, match="shapes"):
        assert_lowp_close(torch.tensor([2.5]).bfloat16(), torch.tensor([2.5, 2.5]).bfloat16(), torch.tensor([2.5, 2.5]))


def test_compare_backends_compares_tensors_inside_containers(monkeypatch):
    from dni_fast import testing

    calls = []

    def run(model):
        out = model(torch.randn(4, 8, requires_grad=True))
        calls.append(1)
        return {"logits": out + (1000.0 if len(calls) == 2 else 0.0)}

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), dni.BackwardInterface(dni.BasicSynthesizer(8)), nn.Linear(8, 3))

    report = testing.compare_backends(make, run, "reference")
    assert any("logits" in f or "output" in f or "0" in f for f in report.failures), report


def test_statistics_rings_pickled_by_an_earlier_version_still_fold():
    """Ring entries grew a fifth item (the halved scales); an interface pickled before held four."""
    from dni_fast.stats import SynthStats

    st = SynthStats()
    row = st.reserve(0.5, torch.device("cpu"))
    row.copy_(torch.tensor([1.0, 0.5, 1.0, 1.0]))
    st._retire_current()
    st._rings = [entry[:4] for entry in st._rings]  # what unpickling an old one gives
    assert st.read()["count"] == 1
