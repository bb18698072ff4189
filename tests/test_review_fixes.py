"""Faults found in review (state lost across a checkpoint, statistics lost
before a backward, bad input accepted), one test each; each fails without
its fix."""
import math

import pytest
import torch
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast.stats import SynthStats
from tests.conftest import fused_backends

BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if not bk.get(b).interpreted(torch.device("cpu"))]


def _layer_and_interface(**kw):
    torch.manual_seed(0)
    return nn.ModuleDict({"lin": nn.Linear(4, 4), "it": dni.BackwardInterface(dni.BasicSynthesizer(4), **kw)})


def _step(m, seed):
    torch.manual_seed(seed)
    m.zero_grad()
    m["it"](m["lin"](torch.randn(3, 4)))
    return m["lin"].weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_interface_does_not_warm_up_again(backend):
    a = _layer_and_interface(warmup_steps=2, backend=backend)
    for i in range(2):
        _step(a, i)
    b = _layer_and_interface(warmup_steps=2, backend=backend)
    b.load_state_dict(a.state_dict())
    assert b["it"].n_steps == 2 and not b["it"].in_warmup
    ga, gb = _step(a, 5), _step(b, 5)
    assert ga is not None and gb is not None and torch.equal(ga, gb)


def test_without_warm_up_the_state_dict_keeps_dni_pytorchs_keys():
    keys = set(_layer_and_interface(backend="reference").state_dict())
    assert not any("warmup" in k for k in keys)


def test_a_resumed_ridge_synthesizer_refits_when_the_uninterrupted_one_does():
    torch.manual_seed(0)
    rows = [(torch.randn(8, 2), torch.randn(8, 2)) for _ in range(3)]
    a = dni.RidgeSynthesizer(2, refit_every=3)
    for x, g in rows[:2]:
        a.fit(x, None, g)
    b = dni.RidgeSynthesizer(2, refit_every=3)
    b.load_state_dict(a.state_dict())
    a.fit(rows[2][0], None, rows[2][1])
    b.fit(rows[2][0], None, rows[2][1])
    x = torch.randn(5, 2)
    assert torch.equal(a(x, None), b(x, None)) and a(x, None).abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_read_between_a_forward_and_its_backward_are_kept(backend):
    torch.manual_seed(0)
    lin, it = nn.Linear(4, 4), dni.BackwardInterface(dni.BasicSynthesizer(4), backend=backend)
    for _ in range(3):
        y = it.make_trigger(lin(torch.randn(2, 4)))
        it.stats()  # between the forward (the fused C++ step reserves its row there) and the backward
        y.pow(2).sum().backward()
    assert it.stats()["count"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_of_more_triggers_than_a_ring_before_one_backward_are_kept(backend):
    torch.manual_seed(0)
    lin, it = nn.Linear(4, 4), dni.BackwardInterface(dni.BasicSynthesizer(4), backend=backend)
    h = torch.randn(2, 4)
    n = SynthStats.CAPACITY + 2
    torch.stack([it.make_trigger(lin(h)) for _ in range(n)]).pow(2).sum().backward()
    assert it.stats()["count"] == n


@pytest.mark.parametrize("bad", [float("inf"), 1e20])
def test_one_huge_or_infinite_true_gradient_does_not_break_target_normalisation(bad):
    torch.manual_seed(0)
    it = dni.BackwardInterface(dni.BasicSynthesizer(4), backend="reference", normalize_targets=True)
    lin = nn.Linear(4, 4)

    def step(value):
        y = it(lin(torch.randn(2, 4)))
        y.backward(torch.full_like(y, value))

    step(1.0)
    step(bad)
    step(1.0)
    sigma = it.target_sigma().item()
    assert math.isfinite(sigma) and (bad == 1e20 or sigma == pytest.approx(1.0)), sigma
    lin.zero_grad()
    step(1.0)
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_a_dtype_cast_keeps_the_target_scale_in_its_own_precision(cast):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4), backend="reference", normalize_targets=True)
    getattr(it, cast)()
    assert it.target_sq_ema.dtype == torch.float64 and it.target_count.dtype == torch.float64
    it.target_count.fill_(300)
    it.target_count.add_(1)
    assert it.target_count.item() == 301


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_context_of_another_dtype_is_refused_by_name(backend):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4, context_dim=3), backend=backend)
    h = torch.randn(2, 4, requires_grad=True)
    with dni.synthesizer_context(torch.randn(2, 3, dtype=torch.float64)):
        with pytest.raises(TypeError, match="context dtype torch.float64"):
            it(h * 1)


def test_auto_decides_each_row_count_by_the_table_whatever_the_call_order():
    it = dni.BackwardInterface(dni.BasicSynthesizer(64), backend="auto")
    picks = []
    for order in [(64, 100), (100, 64)]:
        bk.clear_cache()
        picks.append({r: it.resolved_backend(torch.randn(r, 64)) for r in order})
    bk.clear_cache()
    assert picks[0] == picks[1], picks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["forward", "make_trigger", "backward"])
def test_an_empty_batch_of_the_wrong_width_is_named(backend, call):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4), backend=backend)
    t = torch.randn(0, 7, requires_grad=True)
    with pytest.raises(ValueError, match="trigger_dim=4"):
        it(t) if call == "forward" else getattr(it, call)(t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_synthesizer_is_still_measured_by_every_backend(backend):
    # A frozen synthesizer is not updated, but its statistics (S against g or the message) are kept alike.
    torch.manual_seed(0)
    fi = dni.ForwardInterface(dni.BasicSynthesizer(4, trigger_dim=3).requires_grad_(False), backend=backend)
    bi = dni.BackwardInterface(dni.BasicSynthesizer(4).requires_grad_(False), backend=backend)
    for _ in range(3):
        fi(torch.randn(2, 4), torch.randn(2, 3))
        h = torch.randn(2, 4, requires_grad=True)
        bi.make_trigger(h * 1).sum().backward()
        assert torch.equal(h.grad, torch.ones_like(h))  # the true gradient passes through unchanged
    assert fi.stats()["count"] == 3 and bi.stats()["count"] == 3
    assert all(p.grad is None for p in bi.synthesizer.parameters())
