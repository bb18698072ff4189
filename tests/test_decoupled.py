"""DecoupledSequential and the §4 schedule (docs/design.md §4, dni_fast/decoupled/).

* the schedule against a plain-PyTorch oracle written from §4 (delays 0-2,
  custom and Basic synthesizers), and the delay applied at exactly step t + d;
* the executors against each other: equal ``state_dict`` s, bit for bit, at
  one intra-op thread (delays 1 and 2, update_prob, context, complete unlock);
* update_prob (the draws, the skipped updates, the targets still sent), the
  context travelling with its batch, hooks, intra-op thread counts;
* checkpoint/load_checkpoint resuming exactly (also across executors and
  after a stage raised);
* errors: widths, devices, executors that cannot run here, a worker that
  raises (surfaces with its traceback, no hang, no gradient left behind).

Everything runs at one intra-op thread where numbers are compared bit for
bit: a matrix product may sum in another order at another thread count.
"""
import copy
import io
import warnings
import threading
import traceback

import pytest

from dni_fast.examples._common import compact
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.decoupled import DecoupledSequential, ExecutorUnavailableError, Stage
from dni_fast.decoupled.schedule import stage_generator
from dni_fast.testing import assert_close

CPU_EXECUTORS = ["sequential", "threads"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here at one intra-op thread (conftest's ``one_thread``)."""


def run_with_deadline(fn, seconds=60.0):
    """``fn()`` on a helper thread; fails the test instead of hanging the suite."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"did not finish within {seconds} s (hang)")
    if "error" in out:
        raise out["error"]
    return out.get("value")


class MLPSynth(nn.Module):
    """A custom synthesizer (runs through autograd): ``forward(trigger, context)``."""

    def __init__(self, d, hidden=24, context_dim=None):
        super().__init__()
        self.l1 = nn.Linear(d, hidden)
        self.lc = nn.Linear(context_dim, hidden) if context_dim else None
        self.l2 = nn.Linear(hidden, d)
        self.calls = []

    def forward(self, trigger, context=None):
        z = self.l1(trigger)
        if self.lc is not None:
            z = z + self.lc(context)
        return self.l2(torch.relu(z))


def make_net(synth="basic", d=24, din=12, dout=5, n=3, context_dim=None, n_hidden=1, unlock_at=None, seed=0):
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(din, d), nn.ReLU())]
    stages += [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n - 2)]
    stages.append(nn.Linear(d, dout))
    synths = []
    for k in range(n - 1):
        if synth == "basic":
            s = dni.BasicSynthesizer(d, n_hidden=n_hidden, context_dim=context_dim)
            with torch.no_grad():  # a synthesizer that predicts something from step 0
                for p in s.parameters():
                    p.normal_(0, 0.1)
        elif synth == "ridge":
            s = dni.RidgeSynthesizer(d, context_dim=context_dim, forget=0.9)
        else:
            s = MLPSynth(d, context_dim=context_dim)
        if k == unlock_at:
            s = dni.BidirectionalInterface(dni.BasicSynthesizer(d, n_hidden=1, trigger_dim=din,
                                                                context_dim=context_dim), s)
        synths.append(s)
    return stages, synths


def batches(n_batches=8, b=8, din=12, dout=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, din, generator=g), torch.randint(0, dout, (b,), generator=g)) for _ in range(n_batches)]


def sgd(p):
    return torch.optim.SGD(p, lr=0.1)


def adam(p):
    return torch.optim.Adam(p, lr=1e-2)


def train(executor, delay, data, opt=adam, context=False, flush=True, **kw):
    net_kw = {k: kw.pop(k) for k in list(kw) if k in ("synth", "n", "context_dim", "n_hidden", "unlock_at", "d")}
    stages, synths = make_net(**net_kw)
    threads = None if executor == "streams" else 1
    m = DecoupledSequential(stages, synths, opt, executor=executor, delay=delay, threads_per_stage=threads, **kw)
    losses = [m.step(x, y, F.cross_entropy, context=F.one_hot(y, 5).float() if context else None) for x, y in data]
    rest = m.flush() if flush else []
    sd = m.state_dict()
    m.close()
    return sd, losses, rest, m


def net_state(stages, synths):
    """A state_dict with DecoupledSequential's keys (``stages.*``, ``synthesizers.*``)."""
    return nn.ModuleDict({"stages": nn.ModuleList(stages), "synthesizers": nn.ModuleList(synths)}).state_dict()


def assert_state_equal(a, b, what=""):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max abs diff {(a[k] - b[k]).abs().max().item():.3e})"


def assert_state_differs(a, b):
    assert any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# ---------------------------------------------------------------------------
# The schedule against an oracle written from §4 in plain PyTorch
# ---------------------------------------------------------------------------
def oracle(stages, synths, data, delay, opt=sgd, current=False):
    """§4's schedule, by hand: each stage runs, takes the synthetic gradient of
    the synthesizer after it (its current weights), steps; the gradient left on
    its input is the target of the synthesizer below; synthesizer k regresses
    the prediction stored at step t on that target at step t + delay, through
    its current weights: dL/dS = 2/B (S - g). A flush applies the rest.
    ``current``: regression="current", S predicted again with the current
    weights at step t + delay (the plain gradient of |S_now - g|^2 / B)."""
    n = len(stages)
    opts = [opt(list(s.parameters())) for s in stages]
    sopts = [opt(list(m.parameters())) for m in synths]
    stored = [{} for _ in synths]
    targets = [{} for _ in synths]

    def regress(k, b):
        trig, s = stored[k].pop(b)
        g = targets[k].pop(b)
        sopts[k].zero_grad()
        s_now = synths[k](trig, None)
        s_now.backward(2.0 / g.shape[0] * ((s_now.detach() if current else s) - g))
        sopts[k].step()

    for j, (x, y) in enumerate(data):
        h = x
        for k in range(n):
            if k > 0:
                h = h.detach().requires_grad_()
            a = stages[k](h)
            opts[k].zero_grad()
            if k < n - 1:
                with torch.no_grad():
                    s = synths[k](a.detach(), None)
                stored[k][j] = (a.detach(), s)
                a.backward(s)
            else:
                F.cross_entropy(a, y).backward()
            opts[k].step()
            if k > 0:
                targets[k - 1][j] = h.grad
            h = a
        for k in range(n - 1):
            if j - delay >= 0:
                regress(k, j - delay)
    for k in range(n - 1):
        for b in sorted(stored[k]):
            regress(k, b)
    return net_state(stages, synths)


@pytest.mark.parametrize("synth,n_hidden", [("custom", 1), ("basic", 0)])
def test_schedule_matches_oracle(synth, n_hidden):
    """The sequential executor is §4's schedule at delays 0, 1 and 2 (the
    Basic synthesizer on the reference backend: with n_hidden=0 its
    pipelined update is the plain gradient, so the oracle's autograd applies)."""
    data = batches(7)
    results = {}
    for delay in (0, 1, 2):
        with dni.use_backend("reference"):
            sd, *_ = train("sequential", delay, data, opt=sgd, synth=synth, n_hidden=n_hidden)
        stages, synths = make_net(synth=synth, n_hidden=n_hidden)
        expected = oracle(stages, synths, data, delay)
        for key, v in expected.items():
            assert_close(sd[key], v, name=f"delay={delay} {key}")
        results[delay] = sd
    assert_state_differs(results[0], results[1])
    assert_state_differs(results[1], results[2])


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
@pytest.mark.parametrize("delay", [1, 3])
def test_target_applied_exactly_at_step_t_plus_delay(executor, delay):
    """Hooks see every regression of batch t at the stage's step t + delay,
    never earlier or later; flush applies the rest, oldest first."""
    events = []
    lock = threading.Lock()
    stages, synths = make_net(n=3)
    m = DecoupledSequential(stages, synths, adam, executor=executor, delay=delay, threads_per_stage=1)

    def hook(ev):
        with lock:
            events.append(ev)

    m.register_hook(hook)
    n_steps = 7
    for x, y in batches(n_steps):
        m.step(x, y, F.cross_entropy)
    m.synchronize()
    for k in range(2):
        reg = [(e.batch, e.step) for e in events if e.kind == "regress" and e.stage == k]
        assert reg == [(t - delay, t) for t in range(delay, n_steps)], (k, reg)
        fwd = [e.batch for e in events if e.kind == "forward" and e.stage == k]
        assert fwd == list(range(n_steps))
    before = len(events)
    m.flush()
    for k in range(2):
        late = [e.batch for e in events[before:] if e.kind == "regress" and e.stage == k]
        assert late == list(range(n_steps - delay, n_steps))
    m.close()


# ---------------------------------------------------------------------------
# Executors agree
# ---------------------------------------------------------------------------
CASES = {
    "plain": {},
    "update_prob": {"update_prob": 0.5, "seed": 3},
    "context": {"context_dim": 5, "context": True},
    "custom": {"synth": "custom"},
    "ridge": {"synth": "ridge", "context_dim": 5, "context": True},
    "unlock": {"unlock_at": 0},
    "4 stages": {"n": 4},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("delay", [1, 2])
def test_threads_equals_sequential(case, delay):
    kw = dict(CASES[case])
    data = batches(9)
    seq, seq_losses, seq_rest, _ = train("sequential", delay, data, **kw)
    thr, thr_losses, thr_rest, _ = run_with_deadline(lambda: train("threads", delay, data, **kw))
    assert_state_equal(seq, thr, f"{case}, delay={delay}")
    n = kw.get("n", 3)
    # sequential returns batch j's loss at step j; threads batch j-(n-1)'s, the rest from flush
    assert seq_rest == [] and thr_losses[: n - 1] == [None] * (n - 1)
    got = [float(l) for l in thr_losses[n - 1:]] + [float(l) for l in thr_rest]
    assert got == [float(l) for l in seq_losses]
    # and the run trained something
    net_kw = {k: v for k, v in kw.items() if k in ("synth", "n", "context_dim", "unlock_at")}
    assert_state_differs(seq, net_state(*make_net(**net_kw)))


def test_delay_changes_the_result_and_minimums():
    data = batches(6)
    a = train("threads", 1, data)[0]
    b = train("threads", 2, data)[0]
    assert_state_differs(a, b)
    stages, synths = make_net()
    assert DecoupledSequential(stages, synths, adam, executor="sequential").delay == 0
    assert DecoupledSequential(stages, synths, adam, executor="threads").delay == 1
    with pytest.raises(ValueError, match="delay must be an int >= 1"):
        DecoupledSequential(stages, synths, adam, executor="threads", delay=0)
    with pytest.raises(ValueError, match="delay"):
        DecoupledSequential(stages, synths, adam, executor="sequential", delay=-1)


# ---------------------------------------------------------------------------
# update_prob, context, hooks, threads
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("executor", CPU_EXECUTORS)
def test_update_prob_skips_updates_and_still_sends_targets(executor):
    p, seed, n_steps = 0.4, 11, 10
    stages, synths = make_net(n=3)
    m = DecoupledSequential(stages, synths, adam, executor=executor, delay=1, update_prob=p, seed=seed,
                            threads_per_stage=1)
    updated = {k: [] for k in range(3)}
    snaps = {k: [] for k in range(3)}

    def hook(ev):
        if ev.kind == "forward":
            updated[ev.stage].append(ev.updated)
            snaps[ev.stage].append([q.detach().clone() for q in stages[ev.stage].parameters()])

    m.register_hook(hook)
    before = [[q.detach().clone() for q in s.parameters()] for s in stages]
    for x, y in batches(n_steps):
        m.step(x, y, F.cross_entropy)
    m.flush()
    for k in range(3):
        g = stage_generator(seed, k)
        draws = [bool(torch.rand((), generator=g).item() < p) for _ in range(n_steps)]
        assert updated[k] == draws
        assert 0 < sum(draws) < n_steps  # both kinds of step happen (so this test can fail)
        prev = before[k]
        for t in range(n_steps):
            same = all(torch.equal(a, b) for a, b in zip(prev, snaps[k][t]))
            assert same == (not draws[t]), (k, t)
            prev = snaps[k][t]
    # a skipped stage still backpropagates: every synthesizer got all its targets
    for st in m.stats():
        assert st["backward"]["count"] == n_steps
    m.close()


def test_update_prob_zero_freezes_stages_but_trains_synthesizers():
    stages, synths = make_net()
    before = [q.detach().clone() for q in stages[1].parameters()]
    s_before = [q.detach().clone() for q in synths[0].parameters()]
    m = DecoupledSequential(stages, synths, adam, executor="sequential", update_prob=0.0)
    for x, y in batches(4):
        m.step(x, y, F.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(before, stages[1].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(s_before, synths[0].parameters()))


class RecordingSynth(MLPSynth):
    """Records the context of every call: the batch index it was encoded with."""

    def forward(self, trigger, context=None):
        self.calls.append(int(context[0, 0].item()))
        return super().forward(trigger, context)


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
def test_context_travels_with_its_batch(executor):
    torch.manual_seed(0)
    d = 16
    stages = [nn.Linear(8, d), nn.Linear(d, d), nn.Linear(d, 3)]
    synths = [RecordingSynth(d, context_dim=2), RecordingSynth(d, context_dim=2)]
    m = DecoupledSequential(stages, synths, adam, executor=executor, delay=2, threads_per_stage=1)
    n_steps = 6
    for j in range(n_steps):
        ctx = torch.full((4, 2), float(j))
        m.step(torch.randn(4, 8), torch.randint(0, 3, (4,)), F.cross_entropy, context=ctx)
    m.flush()
    for s in synths:
        # each step: the prediction for batch j, then the regression of batch j - 2 (flush: the last two)
        expected = []
        for j in range(n_steps):
            expected.append(j)
            if j >= 2:
                expected.append(j - 2)
        expected += [n_steps - 2, n_steps - 1]
        assert s.calls == expected
    m.close()


def test_threads_per_stage_sets_the_workers_intra_op_threads():
    seen = {}

    def hook(ev):
        seen.setdefault(ev.stage, set()).add(torch.get_num_threads())

    for tps, expected in ((None, [max(1, 2 // 3)] * 3), (2, [2, 2, 2]), ([1, 2, 1], [1, 2, 1])):
        torch.set_num_threads(2)
        seen.clear()
        stages, synths = make_net()
        m = DecoupledSequential(stages, synths, adam, executor="threads", threads_per_stage=tps)
        m.register_hook(hook)
        for x, y in batches(3):
            m.step(x, y, F.cross_entropy)
        m.flush()
        m.close()
        assert [seen[k] for k in range(3)] == [{e} for e in expected]
        assert torch.get_num_threads() == 2  # the caller's count is untouched


def test_hook_remove_and_inference_forward():
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor="threads")
    calls = []
    h = m.register_hook(lambda ev: calls.append(ev.kind))
    data = batches(3)
    m.step(*data[0], F.cross_entropy)
    h.remove()
    n = len(calls)
    m.step(*data[1], F.cross_entropy)
    m.synchronize()
    assert n > 0 and len(calls) == n
    x = data[2][0]
    with torch.no_grad():
        expected = stages[2](stages[1](stages[0](x)))
        assert torch.equal(m(x), expected)
    m.close()


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("first,second", [("sequential", "sequential"), ("threads", "threads"),
                                          ("threads", "sequential")])
def test_checkpoint_resumes_exactly(first, second):
    data = batches(10)
    kw = dict(delay=2, update_prob=0.7, seed=5, threads_per_stage=1)

    def fresh(executor):
        stages, synths = make_net(unlock_at=1, n=3)
        return DecoupledSequential(stages, synths, adam, executor=executor, **kw)

    ref = fresh(first)
    ref_losses = [ref.step(x, y, F.cross_entropy) for x, y in data]
    ref_losses += ref.flush()
    expected = ref.state_dict()
    ref.close()

    m = fresh(first)
    losses = [m.step(x, y, F.cross_entropy) for x, y in data[:4]]
    buf = io.BytesIO()
    torch.save(m.checkpoint(), buf)
    for x, y in data[4:6]:  # training on after the checkpoint must not change it
        m.step(x, y, F.cross_entropy)
    m.close()

    r = fresh(second)
    buf.seek(0)
    r.load_checkpoint(torch.load(buf, weights_only=False))
    losses += [r.step(x, y, F.cross_entropy) for x, y in data[4:]]
    losses += r.flush()
    assert_state_equal(r.state_dict(), expected, f"{first} -> {second}")
    if first == second:
        assert [None if l is None else float(l) for l in losses] == \
               [None if l is None else float(l) for l in ref_losses]
    else:  # the sequential executor returns the losses of the batches in flight from flush
        assert sorted(float(l) for l in losses if l is not None) == sorted(float(l) for l in ref_losses
                                                                           if l is not None)
    r.close()


def test_checkpoint_rejects_other_delay():
    stages, synths = make_net()
    ck = DecoupledSequential(stages, synths, adam, executor="sequential", delay=1).checkpoint()
    stages, synths = make_net()
    with pytest.raises(ValueError, match="delay"):
        DecoupledSequential(stages, synths, adam, executor="sequential", delay=2).load_checkpoint(ck)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
class Exploding(nn.Module):
    def __init__(self, d, at):
        super().__init__()
        self.lin, self.at, self.calls = nn.Linear(d, d), at, 0

    def forward(self, h):
        self.calls += 1
        if self.calls == self.at:
            raise FloatingPointError("stage blew up")
        return self.lin(h)


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
def test_a_stage_that_raises_surfaces_in_the_caller(executor):
    torch.manual_seed(0)
    d = 16
    stages = [nn.Linear(12, d), Exploding(d, at=4), nn.Linear(d, 5)]
    synths = [dni.BasicSynthesizer(d), dni.BasicSynthesizer(d)]
    m = DecoupledSequential(stages, synths, adam, executor=executor, threads_per_stage=1)
    ck = m.checkpoint()
    data = batches(8)

    def go():
        for x, y in data:
            m.step(x, y, F.cross_entropy)
        m.flush()

    with pytest.raises(FloatingPointError, match="stage blew up") as info:
        run_with_deadline(go)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "stage 1" in notes and "batch 3" in notes
    # the original traceback: the line in the stage that raised
    assert 'raise FloatingPointError("stage blew up")' in "".join(traceback.format_exception(info.value))
    assert all(p.grad is None for p in m.parameters())  # nothing half-accumulated
    with pytest.raises(RuntimeError, match="load_checkpoint"):
        m.step(*data[0], F.cross_entropy)
    # a checkpoint brings it back
    stages[1].at = -1
    m.load_checkpoint(ck)
    for x, y in data:
        m.step(x, y, F.cross_entropy)
    m.flush()
    m.close()


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
def test_width_mismatch_raises_at_the_first_step(executor):
    stages = [nn.Linear(12, 16), nn.Linear(16, 5)]
    m = DecoupledSequential(stages, [dni.BasicSynthesizer(17)], adam, executor=executor)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"stage 0's output has shape \(8, 16\), but synthesizer 0 takes inputs "
                                         r"of width 17"):
        run_with_deadline(lambda: m.step(x, y, F.cross_entropy))
    # the next stage's input width: torch's error, with the shapes named
    m = DecoupledSequential([nn.Linear(12, 16), nn.Linear(17, 5)], [dni.BasicSynthesizer(16)], adam,
                            executor=executor)
    with pytest.raises(RuntimeError) as info:
        run_with_deadline(lambda: m.step(x, y, F.cross_entropy))
    assert "stage 1's input had shape (8, 16) (stage 0's output)" in "\n".join(info.value.__notes__)
    # a custom synthesizer whose output does not match
    wrong = type("W", (nn.Module,), {"forward": lambda self, t, c=None: t[:, :3]})()
    m = DecoupledSequential([nn.Linear(12, 16), nn.Linear(16, 5)], [wrong], adam, executor=executor)
    with pytest.raises(ValueError, match=r"synthesizer 0 predicts a gradient of shape \(8, 3\)"):
        run_with_deadline(lambda: m.step(x, y, F.cross_entropy))


def test_bad_construction():
    stages, synths = make_net()
    with pytest.raises(ValueError, match="3 stages need 2 synthesizers"):
        DecoupledSequential(stages, synths[:1], adam)
    with pytest.raises(ValueError, match="executor must be one of"):
        DecoupledSequential(stages, synths, adam, executor="gpu")
    with pytest.raises(ValueError, match="update_prob"):
        DecoupledSequential(stages, synths, adam, update_prob=1.5)
    with pytest.raises(ValueError, match="trigger_dim=8 but output_dim=24"):
        DecoupledSequential(stages, [dni.BasicSynthesizer(24, trigger_dim=8), synths[1]], adam)
    with pytest.raises(ValueError, match="threads_per_stage"):
        DecoupledSequential(stages, synths, adam, executor="threads", threads_per_stage=[1, 1])
    with pytest.raises(TypeError, match="ForwardInterface cannot sit after a stage"):
        DecoupledSequential(stages, [dni.ForwardInterface(synths[0]), synths[1]], adam)


def test_executors_that_cannot_run_here_are_refused():
    stages, synths = make_net()
    if not torch.cuda.is_available():
        with pytest.raises(ExecutorUnavailableError, match="executor='streams' needs CUDA"):
            DecoupledSequential(stages, synths, adam, executor="streams")
    assert DecoupledSequential(stages, synths, adam, executor="auto").executor in ("threads", "sequential")
    # CUDA-less stand-in for "a stage on another device": the meta device
    meta = nn.Linear(24, 24, device="meta")
    with pytest.raises(ExecutorUnavailableError, match="stage 1 is on meta"):
        DecoupledSequential([stages[0], meta, stages[2]], [synths[0], dni.BasicSynthesizer(24).to("meta")], adam,
                            executor="threads")


def test_wrong_devices_are_refused():
    stages, synths = make_net()
    meta_synth = dni.BasicSynthesizer(24).to("meta")
    with pytest.raises(ValueError, match="synthesizer 0 is on meta but stage 0 is on cpu"):
        DecoupledSequential(stages, [meta_synth, synths[1]], adam, executor="sequential")
    split = nn.Sequential(nn.Linear(12, 24), nn.Linear(24, 24, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        DecoupledSequential([split, stages[1], stages[2]], synths, adam, executor="sequential")
    m = DecoupledSequential(stages, synths, adam, executor="sequential")
    with pytest.raises(ValueError, match="x is on meta but stage 0 is on cpu"):
        m.step(torch.empty(4, 12, device="meta"), torch.zeros(4, dtype=torch.long), F.cross_entropy)


def test_stage_used_directly_for_a_custom_loop():
    """The hook for own loops: two Stage objects driven by hand follow the schedule
    (same parameters as DecoupledSequential's sequential executor)."""
    data = batches(5)
    expected = train("sequential", 1, data, n=2)[0]
    stages, synths = make_net(n=2)
    s0 = Stage(0, 2, stages[0], synths[0], adam, delay=1)
    s1 = Stage(1, 2, stages[1], None, adam, delay=1)
    for j, (x, y) in enumerate(data):
        out0 = s0.forward(j, x)
        out1 = s1.forward(j, out0.out, target=y, loss_fn=F.cross_entropy)
        s0.deliver(j, out1.grad_in)
        for b in s0.due(j):
            s0.regress(b)
    for b in s0.pending():
        s0.regress(b)
    assert_state_equal(net_state(stages, synths), expected)
    with pytest.raises(RuntimeError, match="expected batch 5"):
        s0.forward(7, data[0][0])


def test_move_with_pending_predictions_keeps_the_schedule():
    """``.double()`` mid-training moves the stored predictions too; both
    executors still agree (the threads executor's workers are restarted)."""
    data = batches(6)
    out = {}
    for ex in CPU_EXECUTORS:
        stages, synths = make_net()
        m = DecoupledSequential(stages, synths, sgd, executor=ex, delay=2, threads_per_stage=1)
        for x, y in data[:3]:
            m.step(x, y, F.cross_entropy)
        m.double()
        pend = [r for st in m.schedule_stages for recs in st._pending.values() for r in recs.values()]
        assert pend and all(r.x.dtype == torch.float64 and r.s.dtype == torch.float64 for r in pend)
        for x, y in data[3:]:
            m.step(x.double(), y, F.cross_entropy)
        m.flush()
        out[ex] = m.state_dict()
        m.close()
    assert_state_equal(out["sequential"], out["threads"])
    assert out["threads"]["stages.0.0.weight"].dtype == torch.float64


def test_example_quick(tmp_path):
    import json

    from dni_fast.examples import decoupled as example

    log = tmp_path / "decoupled.json"
    out = example.main(["--quick", "--no-progress", "--data", "digits", "--log", str(log)])
    saved = json.loads(log.read_text())
    assert compact(out["summary"]) == saved["summary"]  # the log keeps 6 significant digits
    names = [r["variant"] for r in saved["runs"]]
    assert names == ["backprop", "sequential", "sequential d=1", "threads"]
    for r in saved["runs"]:
        assert 0.0 <= r["test_acc"] <= 100.0 and r["samples_per_s"] > 0 and r["steps"] > 0
        assert r["final_train_loss"] is not None and r["final_train_loss"] > 0


# ---------------------------------------------------------------------------
# CUDA graphs: the plumbing, emulated on the CPU; the refusal where CUDA is absent
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("executor", CPU_EXECUTORS)
@pytest.mark.parametrize("case", ["plain", "update_prob", "context", "custom", "unlock"])
def test_graph_plumbing_keeps_the_schedule(executor, case):
    """With the graph runner in emulation (a replay re-runs the captured
    function on the static buffers and copies its results into the static
    outputs), the numbers are the eager run's, bit for bit: the inputs are
    copied in, the outputs copied out before the next replay, and the
    bookkeeping stays the eager schedule's."""
    kw = dict(CASES[case])
    context = kw.pop("context", False)
    data = batches(9)
    eager = train(executor, 2, data, context=context, **kw)
    net_kw = {k: kw.pop(k) for k in list(kw) if k in ("synth", "n", "context_dim", "unlock_at")}
    stages, synths = make_net(**net_kw)
    m = DecoupledSequential(stages, synths, adam, executor=executor, delay=2, threads_per_stage=1, **kw)
    m._enable_graphs("emulate", warmup_steps=3)
    losses = [m.step(x, y, F.cross_entropy, context=F.one_hot(y, 5).float() if context else None) for x, y in data]
    rest = m.flush()
    assert_state_equal(m.state_dict(), eager[0], f"graphs ({case})")
    assert [None if l is None else float(l) for l in losses + rest] == \
           [None if l is None else float(l) for l in eager[1] + eager[2]]
    runners = m._executor.runners
    assert all(r.graphs for r in runners)  # every stage went through its graphs
    m.close()


def test_graphs_need_static_shapes_and_are_refused_without_cuda():
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor="sequential", threads_per_stage=1)
    m._enable_graphs("emulate", warmup_steps=1)
    data = batches(3)
    m.step(*data[0], F.cross_entropy)
    m.step(*data[1], F.cross_entropy)  # captured here
    with pytest.raises(ValueError, match=r"captured for stage 0's input\['h'\] of shape \(8, 12\)"):
        m.step(data[2][0][:4], data[2][1][:4], F.cross_entropy)
    with pytest.raises(Exception, match="CUDA graphs need executor='streams'"):
        DecoupledSequential(*make_net(), adam, executor="threads").enable_cuda_graphs()
    from dni_fast.decoupled.graphs import check_capturable

    capt = DecoupledSequential(*make_net(), lambda p: torch.optim.Adam(p, capturable=False), executor="sequential")
    with pytest.raises(ValueError, match="capturable=True"):
        check_capturable(capt.schedule_stages[0])
    ok = DecoupledSequential(*make_net(), lambda p: torch.optim.Adam(p, capturable=True), executor="sequential")
    for st in ok.schedule_stages:
        check_capturable(st)


# ---------------------------------------------------------------------------
# The streams executor's schedule, on the CPU with a stand-in for the CUDA API
# ---------------------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """Streams, events and stream contexts that do nothing, so that the streams
    executor's issue order (last stage first, targets waited for by event, losses
    returned n-1 ticks late) runs on CPU tensors. Only the ordering logic is
    tested this way: the GPU path itself is not run here."""
    import contextlib

    from dni_fast.decoupled.executors import StreamsExecutor

    class FakeStream:
        def __init__(self, device=None):
            self.device = device

        def wait_event(self, ev):
            assert isinstance(ev, FakeEvent) and ev.recorded, "waited for an event that was never recorded"

        def wait_stream(self, s):
            pass

    class FakeEvent:
        recorded = False

        def record(self, stream=None):
            self.recorded = True

    @contextlib.contextmanager
    def nothing(*a, **k):
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", nothing)
    monkeypatch.setattr(torch.cuda, "device", nothing)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None, raising=False)
    monkeypatch.setattr(StreamsExecutor, "check", staticmethod(lambda stages, delay, tps: None))


@pytest.mark.parametrize("case", ["plain", "update_prob", "context", "unlock", "4 stages"])
@pytest.mark.parametrize("delay", [1, 2])
def test_streams_schedule_equals_sequential(fake_cuda, case, delay):
    kw = dict(CASES[case])
    data = batches(9)
    seq, seq_losses, _, _ = train("sequential", delay, data, **kw)
    stm, stm_losses, stm_rest, _ = train("streams", delay, data, **kw)
    assert_state_equal(seq, stm, f"streams ({case}, delay={delay})")
    n = kw.get("n", 3)
    assert stm_losses[: n - 1] == [None] * (n - 1)
    assert [float(l) for l in stm_losses[n - 1:] + stm_rest] == [float(l) for l in seq_losses]


def test_streams_with_graph_plumbing_and_checkpoint(fake_cuda):
    data = batches(8)
    seq = train("sequential", 1, data, update_prob=0.5, seed=2)[0]
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor="streams", update_prob=0.5, seed=2)
    m._enable_graphs("emulate", warmup_steps=2)
    for x, y in data[:5]:
        m.step(x, y, F.cross_entropy)
    ck = m.checkpoint()
    stages, synths = make_net()
    r = DecoupledSequential(stages, synths, adam, executor="streams", update_prob=0.5, seed=2)
    r.load_checkpoint(ck)
    for x, y in data[5:]:
        r.step(x, y, F.cross_entropy)
    r.flush()
    assert_state_equal(r.state_dict(), seq)


# -- on a real GPU (skipped without CUDA; run by benchmarks/gpu_decoupled.sh) -----------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train_cuda(executor, delay, data, graphs=False, **kw):
    stages, synths = make_net(**{k: kw.pop(k) for k in list(kw) if k in ("n", "unlock_at")})
    stages = [s.cuda() for s in stages]
    synths = [s.cuda() for s in synths]
    opt = (lambda p: torch.optim.Adam(p, lr=1e-2, capturable=True)) if graphs else adam
    m = DecoupledSequential(stages, synths, opt, executor=executor, delay=delay, **kw)
    if graphs:
        m.enable_cuda_graphs(warmup_steps=2)
    for x, y in data:
        m.step(x.cuda(), y.cuda(), F.cross_entropy)
    m.flush()
    sd = {k: v.cpu() for k, v in m.state_dict().items()}
    m.close()
    return sd


@needs_cuda
@pytest.mark.parametrize("case", ["plain", "update_prob", "unlock", "graphs"])
def test_streams_on_cuda_equals_sequential_on_cuda(case):
    """The streams executor on a real device computes sequential's schedule:
    the same kernels in the same order per stage, so the parameters agree
    within docs/design.md §6's fp32 tolerance (bit equality is not promised
    across streams)."""
    kw = {"plain": {}, "update_prob": dict(update_prob=0.5, seed=3), "unlock": dict(unlock_at=1),
          "graphs": {}}[case]
    data = batches(10)
    seq = _train_cuda("sequential", 1, data, **dict(kw))
    stm = _train_cuda("streams", 1, data, graphs=(case == "graphs"), **dict(kw))
    for k in seq:
        torch.testing.assert_close(stm[k], seq[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{case}: {k}: {m}")


# -- regression="current" and BackwardInterface options ---------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("delay", [0, 1, 2])
def test_regression_current_matches_its_oracle(backend, delay):
    """regression='current' is step 5 at the current weights (the fused
    primitives predict again), on the reference and every fused path."""
    ok, why = dni.backend_status(backend, "cpu")
    if not ok:
        pytest.skip(f"{backend}: {why}")
    data = batches(7)
    with dni.use_backend(backend):
        sd, *_ = train("sequential", delay, data, opt=sgd, regression="current")
        stored, *_ = train("sequential", delay, data, opt=sgd)
    stages, synths = make_net()
    expected = oracle(stages, synths, data, delay, current=True)
    for key, v in expected.items():
        assert_close(sd[key], v, rtol=1e-5, atol=1e-6, name=f"delay={delay} {key}")
    if delay == 0:
        assert_state_equal(sd, stored, "delay 0: both regressions are the same")
    else:
        assert_state_differs(sd, stored)


def test_regression_current_threads_equals_sequential_and_bad_value():
    data = batches(8)
    seq = train("sequential", 1, data, regression="current")[0]
    thr = train("threads", 1, data, regression="current")[0]
    assert_state_equal(seq, thr, "regression='current'")
    stages, synths = make_net()
    with pytest.raises(ValueError, match="regression must be one of 'stored', 'current', got 'fresh'"):
        DecoupledSequential(stages, synths, adam, regression="fresh")


def test_normalize_targets_is_honoured_and_other_options_refused():
    """A BackwardInterface(normalize_targets=True) entry: the injected
    synthetic gradient is sigma * S, the synthesizer regresses g / sigma, and
    sigma (in the interface's buffers, so in state_dict) tracks the targets'
    RMS. pipelined=True and overlap=True are refused, not ignored."""
    data = batches(6)
    stages, synths = make_net()
    ifaces = [dni.BackwardInterface(s, normalize_targets=True) for s in synths]
    m = DecoupledSequential(stages, ifaces, sgd, executor="sequential")
    seen = []
    m.register_hook(lambda e: seen.append(e) if e.kind == "forward" and e.synthetic_grad is not None else None)
    sigmas = []
    for x, y in data:
        sigma0 = ifaces[0].target_sigma().clone()
        with torch.no_grad():
            raw = synths[0](stages[0](x), None)
        m.step(x, y, F.cross_entropy)
        inj = next(e for e in seen if e.stage == 0)
        seen.clear()
        torch.testing.assert_close(inj.synthetic_grad, raw * sigma0)
        sigmas.append(float(ifaces[0].target_sigma()))
    assert sigmas[0] != 1.0 and len(set(sigmas)) > 1  # learned from the targets
    assert int(ifaces[0].target_count) == len(data)
    assert "synthesizers.0.target_sq_ema" in m.state_dict()
    # the same run with plain synthesizers differs
    plain = train("sequential", 0, data, opt=sgd)[0]
    sd = m.state_dict()
    assert any(not torch.equal(sd[k], plain[k]) for k in plain)
    for bad, what in ((dict(pipelined=True), "pipelined=True"), (dict(overlap=True), "overlap=True")):
        stages, synths = make_net()
        with pytest.raises(ValueError, match=what):
            DecoupledSequential(stages, [dni.BackwardInterface(s, **bad) for s in synths], sgd)


# --- faults found in review -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("then", ["step", "flush"])
def test_close_finishes_the_batches_in_flight_and_training_goes_on(then):
    data = batches(8)

    def run(executor):
        stages, synths = make_net()
        m = DecoupledSequential(stages, synths, adam, executor=executor, delay=1, threads_per_stage=1)
        for x, y in data[:6]:
            m.step(x, y, F.cross_entropy)
        m.close()  # nothing in flight may be dropped
        assert [st.steps for st in m.schedule_stages] == [6, 6, 6]
        if then == "step":
            for x, y in data[6:]:
                run_with_deadline(lambda: m.step(x, y, F.cross_entropy), 30)
        run_with_deadline(m.flush, 30)  # applies the regressions left pending, also on new workers
        assert all(not st.pending() for st in m.schedule_stages)
        sd = m.state_dict()
        m.close()
        return sd

    assert_state_equal(run("sequential"), run("threads"))


@pytest.mark.parametrize("seen_by", ["state_dict", "forward", "synchronize"])
def test_a_worker_error_first_seen_outside_step_breaks_the_model_and_load_checkpoint_recovers(seen_by):
    torch.manual_seed(0)
    stages = [nn.Linear(12, 16), nn.Linear(16, 16), Exploding(16, at=5)]
    synths = [dni.BasicSynthesizer(16), dni.BasicSynthesizer(16)]
    m = DecoupledSequential(stages, synths, adam, executor="threads", threads_per_stage=1)
    ck = m.checkpoint()
    for x, y in batches(5):  # the 5th batch reaches the last stage after step returned (the pipeline)
        m.step(x, y, F.cross_entropy)
    call = {"state_dict": m.state_dict, "forward": lambda: m(torch.randn(2, 12)),
            "synchronize": m.synchronize}[seen_by]
    with pytest.raises(FloatingPointError, match="stage blew up"):
        run_with_deadline(call, 30)
    assert all(p.grad is None for p in m.parameters())  # cleared, as after a failing step
    with pytest.raises(RuntimeError, match="load_checkpoint"):
        m.step(*batches(1)[0], F.cross_entropy)
    stages[2].at = -1
    run_with_deadline(lambda: m.load_checkpoint(ck), 30)
    run_with_deadline(lambda: m.step(*batches(1)[0], F.cross_entropy), 30)
    m.close()


@pytest.mark.parametrize("executor", ["sequential", "threads"])
def test_a_loss_that_does_not_require_grad_is_refused(executor):
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor=executor, threads_per_stage=1)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="does not require grad"):
        run_with_deadline(lambda: m.step(x, y, lambda out, t: F.cross_entropy(out, t).detach()), 30)
    m.close()


def test_dropout_under_a_concurrent_executor_warns_that_it_is_not_reproducible():
    stages, synths = make_net()
    stages[0].append(nn.Dropout(0.5))
    with pytest.warns(UserWarning, match="stage 0 \\(Dropout\\).*not reproducible"):
        DecoupledSequential(stages, synths, adam, executor="threads", threads_per_stage=1).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DecoupledSequential(*make_net(), adam, executor="sequential").close()


# -- review, third round ---------------------------------------------------------------------------------------------
def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_module_given_twice_is_refused():
    stages, synths = make_net()
    with pytest.raises(ValueError, match="is in synthesizer 0 and in synthesizer 1"):
        DecoupledSequential(stages, [synths[0], synths[0]], sgd, executor="sequential")
    stages, synths = make_net()
    stages[2] = stages[1][0]  # a Linear of stage 1 again as the last stage (tied)
    with pytest.raises(ValueError, match="is in stage 1 and in stage 2"):
        DecoupledSequential(stages, synths, sgd, executor="sequential")


@pytest.mark.parametrize("executor", CPU_EXECUTORS)
def test_reused_input_buffers_train_like_fresh_ones(executor):
    """x, y and the context are copied at step(): a buffer the caller refills for the next batch must not
    change the batches still in flight (read delay steps later)."""
    def run(reuse):
        stages, synths = make_net(context_dim=5, unlock_at=0)
        m = DecoupledSequential(stages, synths, sgd, executor=executor, delay=2)
        xb, yb, cb = torch.empty(8, 12), torch.empty(8, dtype=torch.long), torch.empty(8, 5)
        for x, y in batches(8):
            c = F.one_hot(y, 5).float()
            if reuse:
                xb.copy_(x), yb.copy_(y), cb.copy_(c)
                x, y, c = xb, yb, cb
            m.step(x, y, F.cross_entropy, context=c)
        m.flush()
        return _params(m)

    assert _same(run(True), run(False))


def test_eval_and_zero_grad_between_steps_wait_for_the_work_in_flight():
    """train()/eval() and zero_grad() are synchronisation points: a BatchNorm switched to eval while a worker
    runs an earlier batch's forward changed that batch (threads then differed from sequential)."""
    def run(executor):
        torch.manual_seed(0)
        stages = [nn.Sequential(nn.Linear(12, 24), nn.BatchNorm1d(24), nn.ReLU()),
                  nn.Sequential(nn.Linear(24, 24), nn.BatchNorm1d(24), nn.Tanh()), nn.Linear(24, 5)]
        _, synths = make_net()
        m = DecoupledSequential(stages, synths, sgd, executor=executor, delay=1)
        for j, (x, y) in enumerate(batches(9)):
            m.step(x, y, F.cross_entropy)
            if j % 3 == 2:
                m.eval()
                m(torch.randn(4, 12))
                m.train()
        m.flush()
        return _params(m)

    assert _same(run_with_deadline(lambda: run("threads")), run("sequential"))


def test_the_threads_executor_runs_under_the_callers_autocast():
    def run(executor):
        stages, synths = make_net()
        m = DecoupledSequential(stages, synths, sgd, executor=executor, delay=1)
        dtypes = []
        m.stages[1].register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for x, y in batches(4):
                m.step(x, y, F.cross_entropy)
            m.flush()
        return _params(m), dtypes

    (pt, dt), (ps, ds) = run_with_deadline(lambda: run("threads")), run("sequential")
    assert set(dt) == set(ds) == {torch.bfloat16}
    assert _same(pt, ps)


def test_a_hook_that_waits_for_the_workers_raises_instead_of_hanging():
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, sgd, executor="threads", delay=1)
    m.register_hook(lambda ev: m.stats() if ev.kind == "regress" and ev.stage == 0 else None)

    def train():
        for x, y in batches(4):
            m.step(x, y, F.cross_entropy)
        m.flush()

    with pytest.raises(RuntimeError, match="worker thread"):
        run_with_deadline(train, 60)


@pytest.mark.parametrize("option", [dict(warmup_steps=5), dict(check_finite=True), dict(track_stats=False)])
def test_interface_options_the_schedule_cannot_honour_are_refused(option):
    stages, synths = make_net()
    synths[0] = dni.BackwardInterface(synths[0], **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        DecoupledSequential(stages, synths, sgd, executor="sequential")


def test_a_stage_whose_output_is_detached_is_refused():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(24, 24)

        def forward(self, h):
            return self.l(h).detach()

    stages, synths = make_net()
    stages[1] = Detached()
    m = DecoupledSequential(stages, synths, sgd, executor="sequential")
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="stage 1's output does not require grad"):
        m.step(x, y, F.cross_entropy)


# -- review, fourth round (each failed before its fix) -----------------------------------------------------------
def test_tensors_inside_a_container_target_are_copied():
    """y as a dict of tensors refilled in place by the caller: the batches in flight keep their own values."""
    def run(executor, reuse):
        stages, synths = make_net()
        m = DecoupledSequential(stages, synths, adam, executor=executor, delay=1, threads_per_stage=1)
        buf = torch.zeros(8, dtype=torch.long)
        for x, y in batches():
            if reuse:
                buf.copy_(y)
                m.step(x, {"labels": buf}, lambda out, t: F.cross_entropy(out, t["labels"]))
            else:
                m.step(x, {"labels": y.clone()}, lambda out, t: F.cross_entropy(out, t["labels"]))
        m.flush()
        out = _params(m)
        m.close()
        return out

    fresh = run("sequential", False)
    assert _same(run("sequential", True), fresh) and _same(run("threads", True), fresh)


@pytest.mark.parametrize("executor", ["sequential", "threads"])
def test_a_checkpoint_that_cannot_load_leaves_the_model_unchanged(executor):
    m = DecoupledSequential(*make_net(), adam, executor=executor, delay=1, threads_per_stage=1)
    for x, y in batches(4):
        m.step(x, y, F.cross_entropy)
    m.synchronize()
    before, steps = _params(m), [st.steps for st in m._stages]
    other = DecoupledSequential(*make_net(unlock_at=0), adam, executor=executor, delay=1, threads_per_stage=1)
    for x, y in batches(4):
        other.step(x, y, F.cross_entropy)
    bad = other.checkpoint()
    other.close()
    with pytest.raises(ValueError, match="unchanged|does not match"):
        m.load_checkpoint(bad)
    assert _same(_params(m), before) and [st.steps for st in m._stages] == steps
    for x, y in batches(2, seed=7):  # and it goes on training
        m.step(x, y, F.cross_entropy)
    m.flush()
    m.close()


def test_the_statistics_resume_with_the_checkpoint():
    data = batches(8)

    def run(split):
        m = DecoupledSequential(*make_net(), adam, executor="sequential", delay=1)
        for i, (x, y) in enumerate(data):
            if i == split:
                ck = m.checkpoint()
                m = DecoupledSequential(*make_net(seed=3), adam, executor="sequential", delay=1)
                m.load_checkpoint(ck)
            m.step(x, y, F.cross_entropy)
        m.flush()
        return m.stats()

    a, b = run(None), run(4)
    for sa, sb in zip(a, b):  # (the sums fold in another order: equal to rounding)
        for kind in sa:
            assert sa[kind]["count"] == sb[kind]["count"] == 8
            for k, v in sa[kind].items():
                assert sb[kind][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (kind, k)


def test_load_checkpoint_from_a_hook_on_a_worker_is_refused():
    m = DecoupledSequential(*make_net(), adam, executor="threads", delay=1, threads_per_stage=1)
    for x, y in batches(2):
        m.step(x, y, F.cross_entropy)
    ck = m.checkpoint()
    errors = []

    def hook(module, args, out):
        try:
            m.load_checkpoint(ck)
        except RuntimeError as e:
            errors.append(e)

    m.stages[1].register_forward_hook(hook)
    x, y = batches(1, seed=5)[0]
    m.step(x, y, F.cross_entropy)
    m.synchronize()
    assert errors and "would never return" in str(errors[0])
    m.close()


def test_deepcopy_of_a_threads_model_trains_like_the_original():
    data = batches(8)
    m = DecoupledSequential(*make_net(), adam, executor="threads", delay=1, threads_per_stage=1)
    for x, y in data[:4]:
        m.step(x, y, F.cross_entropy)
    c = copy.deepcopy(m)
    for mm in (m, c):
        for x, y in data[4:]:
            mm.step(x, y, F.cross_entropy)
        mm.flush()
    assert _same(_params(m), _params(c))
    m.close()
    c.close()


def test_auto_executor_with_delay_zero_is_sequential():
    m = DecoupledSequential(*make_net(), adam, executor="auto", delay=0)
    assert m.executor == "sequential"
    m.close()


# -- review, stop 23 ----------------------------------------------------------------------------------------------
def test_a_checkpoint_whose_optimizer_state_does_not_fit_is_refused_before_anything_changes():
    """A parameter frozen since the checkpoint: the optimizer's group sizes differ. The weights were loaded
    first and the optimizer's load failed after, leaving the model broken with the checkpoint's weights."""
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor="sequential")
    data = batches(4)
    for x, y in data[:2]:
        m.step(x, y, F.cross_entropy)
    ck = m.checkpoint()
    stages2, synths2 = make_net(seed=3)
    stages2[1][0].bias.requires_grad_(False)
    m2 = DecoupledSequential(stages2, synths2, adam, executor="sequential")
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match="holds 2 parameters in group 0, this stage's 1"):
        m2.load_checkpoint(ck)
    assert all(torch.equal(before[k], v) for k, v in m2.state_dict().items())
    m2.step(*data[2], F.cross_entropy)  # still usable


def test_a_checkpoint_of_another_optimizer_class_is_refused():
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor="sequential")
    m.step(*batches(1)[0], F.cross_entropy)
    ck = m.checkpoint()
    stages2, synths2 = make_net()
    m2 = DecoupledSequential(stages2, synths2, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                             executor="sequential")
    with pytest.raises(ValueError, match="is a Adam, this stage's a SGD"):
        m2.load_checkpoint(ck)


@pytest.mark.parametrize("executor", ["sequential", "threads"])
def test_step_under_no_grad_is_refused_on_every_executor(executor):
    """sequential failed deep in autograd, threads trained anyway (its workers do not inherit grad mode)."""
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, adam, executor=executor)
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs autograd"):
        m.step(*batches(1)[0], F.cross_entropy)
    m.close()


def test_auto_runs_stages_on_other_devices_sequentially():
    with torch.device("meta"):
        stages, synths = [nn.Linear(8, 16), nn.Linear(16, 4)], [dni.BasicSynthesizer(16, n_hidden=1)]
    m = DecoupledSequential(stages, synths, sgd)
    assert m.executor == "sequential"


def test_a_checkpoint_of_an_optimizer_with_factored_state_loads():
    """Adafactor keeps (rows, 1) and (1, cols) statistics: the per-parameter shape check refused its valid
    checkpoints. Only torch optimizers whose state is parameter-shaped are checked for shapes."""
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    make = lambda p: torch.optim.Adafactor(p, lr=1e-2)  # noqa: E731
    stages, synths = make_net()
    m = DecoupledSequential(stages, synths, make, executor="sequential")
    data = batches(3)
    m.step(*data[0], F.cross_entropy)
    ck = m.checkpoint()
    stages2, synths2 = make_net(seed=4)
    m2 = DecoupledSequential(stages2, synths2, make, executor="sequential")
    m2.load_checkpoint(ck)
    m2.step(*data[1], F.cross_entropy)
