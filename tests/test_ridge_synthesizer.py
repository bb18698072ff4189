"""RidgeSynthesizer (dni_fast/ridge_synthesizer.py): the closed-form fit
against a direct weighted least-squares solve in fp64, and its plumbing
through every interface path (make_trigger, forward, defer_backward,
normalize_targets, ForwardInterface.send, overlap, DecoupledSequential),
checkpointing, and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.decoupled import DecoupledSequential
from dni_fast.testing import assert_close

D = 7


def weighted_ridge(rows, forget, ridge):
    """The fit by hand: rows = [(features (N, D+1) fp64, targets (N, Do))], oldest first, each batch weighted
    forget ** age; penalty ridge * diag(A)."""
    n = len(rows)
    a = sum(forget ** (n - 1 - i) * f.T @ f for i, (f, _) in enumerate(rows))
    b = sum(forget ** (n - 1 - i) * f.T @ g for i, (f, g) in enumerate(rows))
    return torch.linalg.solve(a + torch.diag(ridge * a.diagonal()), b)


def feats(x, c=None):
    parts = [x.double()] + ([c.double()] if c is not None else []) + [torch.ones(x.shape[0], 1, dtype=torch.float64)]
    return torch.cat(parts, 1)


@pytest.mark.parametrize("forget", [1.0, 0.7])
@pytest.mark.parametrize("context", [False, True])
def test_fit_equals_weighted_ridge(forget, context):
    torch.manual_seed(0)
    s = dni.RidgeSynthesizer(5, trigger_dim=D, context_dim=3 if context else None, forget=forget, ridge=0.1)
    rows = []
    for _ in range(4):
        x, g = torch.randn(37, D), torch.randn(37, 5)
        c = torch.randn(37, 3) if context else None
        s.fit(x, c, g)
        rows.append((feats(x, c), g.double()))
    w = weighted_ridge(rows, forget, 0.1)
    # few rows (N < Do): through the factor, W never formed; then many rows: through W
    x, c = torch.randn(3, D), (torch.randn(3, 3) if context else None)
    assert_close(s(x, c), (feats(x, c) @ w).float(), rtol=1e-6, atol=1e-6, name="S through the factor")
    assert s._w is None
    x, c = torch.randn(11, D), (torch.randn(11, 3) if context else None)
    assert_close(s(x, c), (feats(x, c) @ w).float(), rtol=1e-6, atol=1e-6, name="S through W")
    assert_close(s.weight, w, rtol=1e-9, atol=1e-10, name="W")
    assert int(s.n_fits) == 4


def test_recovers_a_linear_map_and_broadcasts_context():
    torch.manual_seed(1)
    w_true = torch.randn(D + 2 + 1, D)
    s = dni.RidgeSynthesizer(D, context_dim=2, forget=1.0, ridge=1e-9)
    for _ in range(3):
        x = torch.randn(4, 10, D)
        c = torch.randn(4, 1, 2)  # broadcast over the middle dim
        ce = c.expand(4, 10, 2)
        g = (torch.cat([x, ce, torch.ones(4, 10, 1)], -1) @ w_true)
        s.fit(x, c, g)
    x, c = torch.randn(3, 5, D), torch.randn(3, 1, 2)
    want = torch.cat([x, c.expand(3, 5, 2), torch.ones(3, 5, 1)], -1) @ w_true
    assert s(x, c).shape == (3, 5, D)
    assert_close(s(x, c), want, rtol=1e-4, atol=1e-4, name="S")


def test_refit_every_and_fitting_off():
    torch.manual_seed(2)
    s = dni.RidgeSynthesizer(D, refit_every=3)
    for i in range(2):
        s.fit(torch.randn(8, D), None, torch.randn(8, D))
    assert s.weight.abs().max() == 0, "refitted before refit_every observations"
    s.fit(torch.randn(8, D), None, torch.randn(8, D))
    assert s.weight.abs().max() > 0
    s.fitting = False
    before = copy.deepcopy(s.state_dict())
    s.fit(torch.randn(8, D), None, torch.randn(8, D))
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k
    s.reset()
    assert s.weight.abs().max() == 0 and int(s.n_fits) == 0


def _true_grad_net(seed=3):
    torch.manual_seed(seed)
    return nn.Linear(D, D), torch.randn(D + 1, D)


@pytest.mark.parametrize("path", ["make_trigger", "forward", "deferred"])
def test_interfaces_hand_it_the_true_gradient(path):
    """Every path fits on exactly the gradient that reaches the trigger, and (forward, deferred) injects S."""
    net, w = _true_grad_net()
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D, forget=0.8, ridge=0.01))
    oracle = dni.RidgeSynthesizer(D, forget=0.8, ridge=0.01)
    for step in range(3):
        x = torch.randn(9, D)
        h = net(x)
        g = feats(h.detach()).float() @ w  # the true gradient at h, some function of h
        s_before = oracle(h.detach())
        net.zero_grad()
        if path == "make_trigger":
            (iface.make_trigger(h) * g).sum().backward()
        elif path == "forward":
            out = iface(h)
            (out * g).sum().backward()
            # the injected S reached the net: its weight gradient is S's contribution
            want = torch.autograd.grad((net(x) * s_before).sum(), net.weight)[0]
            assert_close(net.weight.grad, want, rtol=1e-5, atol=1e-5, name="injected")
        else:
            with dni.defer_backward():
                out = iface(h)
                dni.backward((out * g).sum())
        oracle.fit(h.detach(), None, g)
        assert_close(iface.synthesizer.weight, oracle.weight, rtol=1e-9, atol=1e-10, name=f"W step {step}")
    st = iface.stats()
    assert st["count"] == 3 and st["backend"] == "reference"


def test_normalize_targets_fits_scaled_and_injects_unscaled():
    net, w = _true_grad_net()
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D, ridge=1e-9), normalize_targets=True, target_momentum=0.5)
    x = torch.randn(16, D)  # one batch again and again: sigma settles after the first step
    for step in range(4):
        h = net(x)
        g = 1e-4 * (feats(h.detach()).float() @ w)  # a tiny true gradient
        (iface.make_trigger(h) * g).sum().backward()
    h = h.detach()
    sigma = iface.target_sigma().item()
    assert sigma == pytest.approx(g.pow(2).mean().sqrt().item(), rel=1e-5)
    # the synthesizer learned g / sigma (unit scale); receive() gives sigma * S, the true scale
    assert_close(iface.synthesizer(h), g / sigma, rtol=1e-3, atol=1e-4, name="S")
    assert_close(iface.receive(h), g, rtol=1e-3, atol=1e-4, name="sigma * S")


def test_normalize_targets_first_target_is_scaled_by_its_own_sigma():
    """Before any true gradient the running scale is 1; the first target must
    still reach the fit in unit scale (it used to arrive raw, and a closed-form
    fit kept that batch: the injected gradients were ~30x too large 60 steps
    later)."""
    torch.manual_seed(13)
    w = torch.randn(D + 1, D)
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D, forget=0.98, ridge=1e-6), normalize_targets=True)
    for _ in range(5):
        h = torch.randn(32, D, requires_grad=True)
        g = 1e3 * (feats(h.detach()).float() @ w)  # a large true gradient: raw units are far from unit scale
        (iface.make_trigger(h) * g).sum().backward()
        assert torch.equal(h.grad, g)  # the producers get the true gradient itself
    h = torch.randn(64, D)
    g = 1e3 * (feats(h).float() @ w)
    err = ((iface.receive(h) - g).norm() / g.norm()).item()
    assert err < 0.05, f"relative error of sigma * S: {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalize_targets_passes_the_true_gradient_unchanged_in_half(dtype):
    """make_trigger under normalisation hands the producers ``g`` itself:
    ``g / sigma * sigma`` overflowed to inf in fp16 and rounded in bf16."""
    torch.manual_seed(14)
    synth = dni.BasicSynthesizer(D, n_hidden=1).to(dtype)
    iface = dni.BackwardInterface(synth, normalize_targets=True, backend="reference")
    h = torch.randn(8, D, dtype=dtype, requires_grad=True)
    iface.make_trigger(h).backward(torch.full((8, D), 1e-3, dtype=dtype))  # sigma becomes 1e-3
    h = torch.randn(8, D, dtype=dtype, requires_grad=True)
    g = (torch.randn(8, D) * 100).to(dtype)
    iface.make_trigger(h).backward(g)
    assert torch.equal(h.grad, g)
    if dtype == torch.bfloat16:  # (fp16: a target 1e5 sigmas out is clamped to fp16's range; its products overflow)
        assert all(torch.isfinite(p.grad).all() for p in synth.parameters() if p.grad is not None)


def test_forward_interface_send_fits_the_message():
    torch.manual_seed(4)
    iface = dni.ForwardInterface(dni.RidgeSynthesizer(4, trigger_dim=D, forget=1.0, ridge=1e-9))
    w = torch.randn(D + 1, 4)
    for _ in range(3):
        t = torch.randn(20, D)
        m = feats(t).float() @ w
        iface.send(m, t)
    t = torch.randn(5, D)
    assert_close(iface.receive(t), feats(t).float() @ w, rtol=1e-4, atol=1e-4, name="forward message")


def test_overlap_gives_the_same_fit():
    def run(ov):
        net, w = _true_grad_net()
        iface = dni.BackwardInterface(dni.RidgeSynthesizer(D), overlap=ov)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(4):
            h = net(torch.randn(8, D))
            out = iface(h)
            (out * (feats(h.detach()).float() @ w)).sum().backward()
            opt.step()
            opt.zero_grad()
        dni.synchronize()
        return iface.synthesizer.weight.clone(), net.weight.detach().clone()

    a, b = run(False), run(True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_state_dict_roundtrip_and_dtype_casts():
    torch.manual_seed(5)
    a = dni.RidgeSynthesizer(D, forget=0.9)
    for _ in range(3):
        a.fit(torch.randn(8, D), None, torch.randn(8, D))
    b = dni.RidgeSynthesizer(D, forget=0.9)
    b.load_state_dict(a.state_dict())
    x, g = torch.randn(8, D), torch.randn(8, D)
    a.fit(x, None, g)
    b.fit(x, None, g)
    assert torch.equal(a.weight, b.weight)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    a.half()
    for k, v in a.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), f"{k} went through fp16"
    assert a.weight.dtype == torch.float64
    # any float trigger; the output in the trigger's dtype, computed in fp64
    x = torch.randn(2, D)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert a(x.to(dt)).dtype == dt
    assert_close(a(x.double()), feats(x) @ a.weight, rtol=1e-12, atol=1e-12, name="fp64 S")


def test_fused_backend_choice_runs_it_on_reference():
    """A closed-form synthesizer has no fused kernels: the global choice sends it to reference (as any custom
    synthesizer), and the step is the same as on reference."""
    net, w = _true_grad_net()
    with dni.use_backend("auto"):
        iface = dni.BackwardInterface(dni.RidgeSynthesizer(D))
        h = net(torch.randn(8, D))
        (iface(h) * (feats(h.detach()).float() @ w)).sum().backward()
    assert iface.stats()["backend"] == "reference" and int(iface.synthesizer.n_fits) == 1


def test_decoupled_sequential_fits_it():
    torch.manual_seed(6)
    d = 16
    stages = [nn.Sequential(nn.Linear(12, d), nn.ReLU()), nn.Linear(d, 5)]
    synth = dni.RidgeSynthesizer(d, forget=0.9)
    m = DecoupledSequential(stages, [synth], lambda p: torch.optim.SGD(p, lr=0.1), executor="sequential")
    for _ in range(4):
        x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
        m.step(x, y, F.cross_entropy)
    m.flush()
    assert int(synth.n_fits) == 4 and synth.weight.abs().max() > 0
    m.close()


# -- bad input ------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"forget": 0.0}, "forget must be in"), ({"forget": 1.5}, "forget must be in"),
    ({"ridge": -1.0}, "ridge must be"), ({"refit_every": 0}, "refit_every must be"),
    ({"trigger_dim": 0}, "trigger_dim must be"), ({"context_dim": 2.5}, "context_dim must be"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        dni.RidgeSynthesizer(D, **kw)


def test_bad_inputs_name_the_problem():
    s = dni.RidgeSynthesizer(D, context_dim=2)
    with pytest.raises(ValueError, match=r"trigger has shape \(3, 5\).*trigger_dim=7"):
        s(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="no context was given"):
        s(torch.randn(3, D))
    with pytest.raises(ValueError, match="context has shape"):
        s(torch.randn(3, D), torch.randn(3, 4))
    with pytest.raises(ValueError, match="do not broadcast"):
        s(torch.randn(3, D), torch.randn(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        s(torch.ones(3, D, dtype=torch.long), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"RidgeSynthesizer.fit: target has shape \(3, 6\)"):
        s.fit(torch.randn(3, D), torch.randn(3, 2), torch.randn(3, 6))
    with pytest.raises(TypeError, match="needs a BasicSynthesizer"):
        dni.BackwardInterface(dni.RidgeSynthesizer(D), pipelined=True)
    assert int(s.n_fits) == 0, "a refused call changed the state"


def test_a_non_finite_target_is_named_or_skipped():
    # checked: the interface names it and nothing is fitted
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D), check_finite=True)
    h = torch.randn(4, D, requires_grad=True)
    with pytest.raises(FloatingPointError, match="true gradient arriving at step 0 has NaN"):
        iface.make_trigger(h).backward(torch.full((4, D), float("nan")))
    assert int(iface.synthesizer.n_fits) == 0
    # unchecked: the batch is skipped on the device, the statistics stay finite and count it
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D, forget=0.5), check_finite=False)
    g = torch.randn(4, D)
    iface.make_trigger(torch.randn(4, D, requires_grad=True)).backward(g)
    w = iface.synthesizer.weight.clone()
    bad = g.clone()
    bad[1, 2] = float("inf")
    iface.make_trigger(torch.randn(4, D, requires_grad=True)).backward(bad)
    s = iface.synthesizer
    assert torch.equal(s.weight, w) and int(s.n_fits) == 1 and torch.isfinite(s.gram).all()
    assert iface.stats()["nonfinite"] == 1


def test_autocast_bf16_trigger_with_fp32_state():
    torch.manual_seed(7)
    iface = dni.BackwardInterface(dni.RidgeSynthesizer(D))
    lin = nn.Linear(D, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            h = lin(torch.randn(8, D))
            assert h.dtype == torch.bfloat16
            out = iface(h)
            out.float().sum().backward()
        s = iface.receive(h)
    assert s.dtype == torch.bfloat16 and iface.synthesizer.gram.dtype == torch.float64
    assert int(iface.synthesizer.n_fits) == 2 and iface.synthesizer.weight.abs().max() > 0
    # the usual pattern: forward under autocast, backward outside it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = iface(lin(torch.randn(8, D)))
    out.float().sum().backward()
    assert int(iface.synthesizer.n_fits) == 3


def test_forward_interface_does_not_fit_without_grad():
    """A validation pass under no_grad (or inference_mode) must not train a closed-form synthesizer."""
    iface = dni.ForwardInterface(dni.RidgeSynthesizer(4, trigger_dim=D))
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            iface.send(torch.randn(8, 4), torch.randn(8, D))
    assert iface.synthesizer.n_fits == 0
    iface.send(torch.randn(8, 4), torch.randn(8, D))
    assert iface.synthesizer.n_fits == 1


def test_prediction_does_not_depend_on_a_cached_weight():
    """With fewer rows than outputs the prediction goes through the factor, whether or not W was formed (a
    .weight read): the two paths round differently, and a resume drops the cache."""
    torch.manual_seed(5)
    synth = dni.RidgeSynthesizer(D, ridge=1e-3).double()
    synth.fit(torch.randn(64, D, dtype=torch.float64), None, torch.randn(64, D, dtype=torch.float64))
    t = torch.randn(2, D, dtype=torch.float64)
    before = synth(t)
    synth.weight  # noqa: B018  (forms and caches W)
    assert torch.equal(synth(t), before)
