"""DecoupledStage on gloo (docs/design.md §8, dni_fast/distributed/): 2 and 3
processes on 127.0.0.1, spawned per scenario.

* the same parameters as ``DecoupledSequential(executor="sequential")`` with
  the same schedule, bit for bit at one intra-op thread (2 and 3 ranks,
  delays 1 and 2, update_prob, complete unlock across ranks);
* per-stage checkpoints resume exactly;
* faults: a rank killed, a rank that hangs, a rank that raises: every other
  rank raises ``PeerFailure`` naming the culprit as ``stage <index>`` within
  the timeout (plus a margin for the report to travel);
* bad input: world size != num_stages, a missing target on the last rank,
  mismatched shapes between stages: clear errors on every rank, no deadlock.

Every scenario runs under a hard deadline and the processes are killed after
it, so nothing here can hang the suite. Workers end with ``os._exit`` (a
process group with a peer gone cannot be torn down cleanly).
"""
import datetime
import os
import queue
import socket
import time

import pytest

from dni_fast.examples._common import compact
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.decoupled import DecoupledSequential

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

D, DIN, DOUT, B = 24, 12, 5, 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here at one intra-op thread (conftest's ``one_thread``)."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_net(n, unlock_at=None, d=D, din=DIN, context_dim=None, normalize=False, ridge=False):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(din, d), nn.ReLU())]
    stages += [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n - 2)]
    stages.append(nn.Linear(d, DOUT))
    synths = []
    for k in range(n - 1):
        if ridge:  # closed-form: fitted on each target (dni_fast/ridge_synthesizer.py)
            s = dni.RidgeSynthesizer(d, context_dim=context_dim, forget=0.9)
        else:
            s = dni.BasicSynthesizer(d, n_hidden=1, context_dim=context_dim)
            with torch.no_grad():
                s.layers[-1].weight.normal_(0, 0.1)
        if k == unlock_at:
            s = dni.BidirectionalInterface(dni.BasicSynthesizer(d, n_hidden=1, trigger_dim=din), s)
        if normalize:
            s = dni.BackwardInterface(s, normalize_targets=True)
        synths.append(s)
    return stages, synths


def batches(n_batches, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, DIN, generator=g), torch.randint(0, DOUT, (B,), generator=g)) for _ in range(n_batches)]


def adam(p):
    return torch.optim.Adam(p, lr=1e-2)


def stage_weights(stage_module, synth):
    out = {f"module.{k}": v.detach().clone() for k, v in stage_module.state_dict().items()}
    if synth is not None:
        out.update({f"synth.{k}": v.detach().clone() for k, v in synth.state_dict().items()})
    return out


# ---------------------------------------------------------------------------
# What each rank runs (module level: the spawned processes import this file)
# ---------------------------------------------------------------------------
def _train(rank, world, data, timeout=10.0, unlock_at=None, state=None, cdni=False, normalize=False, ridge=False,
           **kw):
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world, unlock_at, context_dim=DOUT if cdni else None, normalize=normalize,
                              ridge=ridge)
    synth = synths[rank] if rank < world - 1 else None
    st = DecoupledStage(stages[rank], rank, world, synth, adam, timeout=timeout, **kw)
    if state is not None:
        st.load_state_dict(state)
    losses = []
    for x, y in data:
        last = rank == world - 1
        loss = st.step(x=x if rank == 0 else None, target=y if last else None,
                       loss_fn=F.cross_entropy if last else None,
                       context=F.one_hot(y, DOUT).float() if cdni and not last else None)
        losses.append(None if loss is None else float(loss))
    return st, stages[rank], synth, losses


def scenario_equal(rank, world, q):
    """Plain, and with update_prob, delay 2 and complete unlock; then a checkpoint
    taken mid-run resumes exactly (in the same process group)."""
    out = {}
    data = batches(8)
    st, mod, syn, losses = _train(rank, world, data)
    st.finish()
    out["plain"] = (stage_weights(mod, syn), losses)

    kw = dict(delay=2, update_prob=0.6, seed=4, unlock_at=0 if world > 2 else None)
    st, mod, syn, losses = _train(rank, world, data, **kw)
    st.finish()
    out["variants"] = (stage_weights(mod, syn), losses)

    st, mod, syn, losses = _train(rank, world, data, cdni=True, regression="current")
    st.finish()
    out["cdni current"] = (stage_weights(mod, syn), losses)

    st, mod, syn, losses = _train(rank, world, data, cdni=True, ridge=True)
    st.finish()
    out["cdni ridge"] = (stage_weights(mod, syn), losses)

    # normalize_targets: the running target scale (the interface's buffers) survives a checkpoint
    st, mod, syn, _ = _train(rank, world, data[:5], normalize=True)
    saved = st.state_dict()
    st.finish()
    st, mod, syn, _ = _train(rank, world, data[5:], state=saved, normalize=True)
    st.finish()
    out["normalized, resumed"] = (stage_weights(mod, syn), None)

    st, mod, syn, _ = _train(rank, world, data[:5], **kw)
    saved = st.state_dict()  # waits for the targets in flight
    for x, y in data[5:]:  # training on after the snapshot must not change it
        last = rank == world - 1
        st.step(x=x if rank == 0 else None, target=y if last else None, loss_fn=F.cross_entropy if last else None)
    st.finish()
    st, mod, syn, _ = _train(rank, world, data[5:], state=saved, **kw)
    st.finish()
    out["resumed"] = (stage_weights(mod, syn), None)
    return out


def scenario_bad_config(rank, world, q):
    """Every rank raises the same error for a world size that does not match."""
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world + 1)
    try:
        DecoupledStage(stages[rank], rank, world + 1, synths[rank], adam, timeout=10)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_missing_target(rank, world, q):
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world)
    st = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=10)
    for x, y in batches(3):
        st.step(x=x if rank == 0 else None)  # the last rank forgets its target and loss_fn


def scenario_shape_mismatch(rank, world, q):
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world)
    if rank == 1:
        stages[1] = nn.Linear(D + 1, DOUT)  # expects D + 1, gets D
    st = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=10)
    for x, y in batches(3):
        last = rank == world - 1
        st.step(x=x if rank == 0 else None, target=y if last else None, loss_fn=F.cross_entropy if last else None)


def _faulty(rank, world, q, fault, culprit, at=3, timeout=None):
    timeout = TIMEOUT if timeout is None else timeout
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world)
    st = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam,
                        timeout=timeout)
    last = rank == world - 1

    def loss_fn(out, y):
        if rank == culprit and fault == "raise" and st.steps == at:
            q.put((rank, "fault", time.time()))
            time.sleep(0.3)
            raise ArithmeticError("the loss of the last stage raised")
        return F.cross_entropy(out, y)

    for j, (x, y) in enumerate(batches(50)):
        if rank == culprit and j == at and fault in ("kill", "hang"):
            q.put((rank, "fault", time.time()))
            time.sleep(0.3)  # let the queue's feeder thread send it
            if fault == "kill":
                os.kill(os.getpid(), 9)
            time.sleep(1000)  # hang: the test kills the process afterwards
        st.step(x=x if rank == 0 else None, target=y if last else None, loss_fn=loss_fn if last else None)
    st.finish()


def scenario_kill(rank, world, q):
    _faulty(rank, world, q, "kill", culprit=world - 1)


def scenario_hang(rank, world, q):
    _faulty(rank, world, q, "hang", culprit=world - 1)


def scenario_raise(rank, world, q):
    _faulty(rank, world, q, "raise", culprit=world - 1)


def _packet_tensors():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, D, generator=g), torch.randn(300, 256, generator=g),  # 300 KiB: a GROW first
            torch.randn(4, generator=g), torch.randint(-9, 9, (1000,), generator=g),
            torch.rand(5000, generator=g) > 0.5, torch.randn(2000, 300, generator=g).to(torch.bfloat16),  # grows again
            torch.empty(0, 3), torch.randn(10, 10, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, 2, 2, generator=g)]


def scenario_packets(rank, world, q):
    """The transport on its own: payloads of every size (across the channel's
    capacity, so with GROW packets), dtype and rank arrive intact, in order,
    and go back."""
    from dni_fast.distributed.transport import TAG_ACT, TAG_GRAD, Transport

    tr = Transport(dist.group.WORLD, rank, torch.device("cpu"), timeout=10.0)
    if rank == 0:
        tr.open([(1, TAG_GRAD)], [(1, TAG_ACT)])
        for j, t in enumerate(_packet_tensors()):
            tr.send(1, TAG_ACT, t, j)
        back = [tr.recv(1, TAG_GRAD, j, f"echo {j}") for j in range(len(_packet_tensors()))]
    else:
        tr.open([(0, TAG_ACT)], [(0, TAG_GRAD)])
        back = []
        for j in range(len(_packet_tensors())):
            t = tr.recv(0, TAG_ACT, j, f"message {j}")
            back.append(t.clone())
            tr.send(0, TAG_GRAD, t, j)
    tr.close()
    # Reopened (DecoupledStage.finish() then step()): the peer's new receiver starts at the initial capacity
    # again, so a large payload must be announced again (a sender that kept its grown capacity overran the
    # 8 KiB buffer and gloo aborted the process).
    big = _packet_tensors()[1]
    if rank == 0:
        tr.open([(1, TAG_GRAD)], [(1, TAG_ACT)])
        tr.send(1, TAG_ACT, big, 100)
        again = tr.recv(1, TAG_GRAD, 100, "echo after reopening")
    else:
        tr.open([(0, TAG_ACT)], [(0, TAG_GRAD)])
        again = tr.recv(0, TAG_ACT, 100, "message after reopening").clone()
        tr.send(0, TAG_GRAD, again, 100)
    tr.close()
    # compared here: the queue back to the test carries numpy arrays, which have no bfloat16
    return {"equal": [a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                      for a, b in zip(back, _packet_tensors())], "n": len(back),
            "reopened": bool(torch.equal(again, big))}


def _steps(st, rank, world, data):
    for x, y in data:
        last = rank == world - 1
        st.step(x=x if rank == 0 else None, target=y if last else None, loss_fn=F.cross_entropy if last else None)


def scenario_lifecycle(rank, world, q):
    """state_dict() after finish() leaves the channels closed; a second stage on the group while the first
    still has its channels open is refused on every rank; a refused checkpoint changes nothing."""
    from dni_fast.distributed import DecoupledStage

    out = {}
    data = batches(6)
    st, mod, syn, _ = _train(rank, world, data[:3])
    st.finish()
    t0 = time.monotonic()
    if rank == 0:  # a second finish() on one rank (a finally: block) does nothing: it waited out the timeout
        st.finish()
    out["second_finish_s"] = time.monotonic() - t0
    saved = st.state_dict()
    out["closed_after_state_dict"] = not st.transport.is_open
    st2, _, _, _ = _train(rank, world, data[:2])  # not finished: its receivers stay posted
    stages, synths = make_net(world)
    try:
        DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=10)
        out["second"] = None
    except ValueError as e:
        out["second"] = str(e)
    try:  # a rollback with the channels open: messages of the run left behind would be taken for the resumed one's
        st2.load_state_dict(saved)
        out["open_load"] = None
    except RuntimeError as e:
        out["open_load"] = str(e)
    st2.finish()
    stages, synths = make_net(world)
    st3 = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=10,
                         delay=2)
    before = {k: v.clone() for k, v in st3.modules().state_dict().items()}
    try:
        st3.load_state_dict(saved)  # taken with delay 1
        out["refused"] = None
    except ValueError as e:
        out["refused"] = str(e)
    after = st3.modules().state_dict()
    out["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    st3.finish()
    stages, synths = make_net(world)
    st4 = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None,
                         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), timeout=10)
    try:  # an Adam checkpoint into SGD stages: it loaded, and the next step raised KeyError 'momentum'
        st4.load_state_dict(saved)
        out["other_optimizer"] = None
    except ValueError as e:
        out["other_optimizer"] = str(e)
    st4.finish()
    return out


def scenario_late_peer(rank, world, q):
    """Stage 1 raises at its first step and its process moves on; stage 0 starts late (after stage 1's
    report could still be read): its send fails at once, and it must name stage 1, not report a raw
    connection error as its own."""
    from dni_fast.distributed import DecoupledStage

    stages, synths = make_net(world)
    st = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=10)
    if rank == 0:
        time.sleep(6.5)  # longer than stage 1 lingers after its report (5 s)
    for x, y in batches(2):
        st.step(x=x if rank == 0 else None)  # the last stage forgets its target


def scenario_step_mismatch(rank, world, q, loads=0):
    """Only rank ``loads`` loads its checkpoint: the stages are at different step counts, said at once (not
    after the timeout, blaming a healthy stage), whichever stage is ahead."""
    from dni_fast.distributed import DecoupledStage

    data = batches(8)
    st, _, _, _ = _train(rank, world, data[:4])
    saved = st.state_dict()
    st.finish()
    stages, synths = make_net(world)
    st = DecoupledStage(stages[rank], rank, world, synths[rank] if rank < world - 1 else None, adam, timeout=20)
    if rank == loads:
        st.load_state_dict(saved)
    t0 = time.monotonic()
    try:
        _steps(st, rank, world, data[4:])
    except Exception as e:
        return {"type": type(e).__name__, "msg": str(e), "stage": getattr(e, "stage", None),
                "seconds": time.monotonic() - t0}
    return {"type": None}


SCENARIOS = {f.__name__[len("scenario_"):]: f for f in (scenario_equal, scenario_bad_config, scenario_missing_target,
                                                         scenario_shape_mismatch, scenario_kill, scenario_hang,
                                                         scenario_raise, scenario_packets, scenario_lifecycle,
                                                         scenario_late_peer, scenario_step_mismatch)}
SCENARIOS["step_mismatch_ahead"] = lambda rank, world, q: scenario_step_mismatch(rank, world, q, loads=1)


def _plain(obj):
    """Tensors as numpy arrays: a queue would share tensors through file
    descriptors, which die with the process that ends right after ``put``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _tensors(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _worker(rank, world, ports, scenarios, q):
    """Run ``scenarios`` in turn, each on a process group of its own (a new
    port): after a stage raised, every stage's transport has ended cleanly (the
    reports go round), so the process can go on; a killed or hung stage ends
    the list."""
    torch.set_num_threads(1)
    try:
        for scenario, port in zip(scenarios, ports):
            try:
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                        timeout=datetime.timedelta(seconds=60))
                out = SCENARIOS[scenario](rank, world, q)
                q.put((rank, scenario, "ok", _plain(out)))
            except BaseException as e:
                q.put((rank, scenario, "error", {"type": type(e).__name__, "msg": str(e),
                                                 "stage": getattr(e, "stage", None), "kind": getattr(e, "kind", None),
                                                 "time": time.time()}))
            finally:
                dist.destroy_process_group()
    finally:
        q.close()
        q.join_thread()
        os._exit(0)


def spawn(scenarios, world, deadline_s=90.0, expect=None):
    """Run ``scenarios`` (a name or a list) on ``world`` ranks; returns
    ``{scenario: {rank: (status, payload)}}`` and the time of the last fault a
    rank reported. Ranks that report nothing by the deadline (a killed or hung
    rank) are absent; every process is killed at the end."""
    scenarios = [scenarios] if isinstance(scenarios, str) else list(scenarios)
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    ports = [_free_port() for _ in scenarios]
    procs = [ctx.Process(target=_worker, args=(r, world, ports, scenarios, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = {s: {} for s in scenarios}
    fault_time = None
    expect = {(s, r) for s in scenarios for r in range(world)} if expect is None else set(expect)
    deadline = time.monotonic() + deadline_s
    try:
        while not expect <= {(s, r) for s in results for r in results[s]}:
            try:
                item = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item[1] == "fault":
                fault_time = item[2]
            else:
                rank, scenario, status, payload = item
                results[scenario][rank] = (status, _tensors(payload))
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = expect - {(s, r) for s in results for r in results[s]}
    assert not missing, f"{scenarios}: {sorted(missing)} reported nothing within {deadline_s} s: {results}"
    return results, fault_time


def oracle(world, data, unlock_at=None, cdni=False, normalize=False, ridge=False, **kw):
    stages, synths = make_net(world, unlock_at, context_dim=DOUT if cdni else None, normalize=normalize, ridge=ridge)
    m = DecoupledSequential(stages, synths, adam, executor="sequential", **kw)
    losses = [float(m.step(x, y, F.cross_entropy, context=F.one_hot(y, DOUT).float() if cdni else None))
              for x, y in data]
    m.flush()
    return [stage_weights(stages[k], synths[k] if k < world - 1 else None) for k in range(world)], losses


def _assert_weights_equal(got, expected, what):
    assert got.keys() == expected.keys(), what
    for k in got:
        assert torch.equal(got[k], expected[k]), f"{what}: {k} differs by {(got[k] - expected[k]).abs().max():.3e}"


# ---------------------------------------------------------------------------
# The tests. Spawning a process costs seconds here (importing torch), so the
# scenarios that leave their processes usable share one spawn per world size.
# ---------------------------------------------------------------------------
TIMEOUT, MARGIN = 3.0, 2.5  # the fault time is taken 0.3 s before the fault itself
TWO = ["bad_config", "equal", "missing_target", "shape_mismatch", "packets", "lifecycle", "late_peer",
       "step_mismatch", "step_mismatch_ahead"]
THREE = ["equal", "raise"]


@pytest.fixture(scope="module")
def two_ranks():
    return spawn(TWO, 2, deadline_s=150.0)[0]


@pytest.fixture(scope="module")
def three_ranks():
    return spawn(THREE, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_same_parameters_as_the_sequential_executor(world, request):
    results = (request.getfixturevalue("two_ranks") if world == 2 else request.getfixturevalue("three_ranks")[0])
    results = results["equal"]
    for r in range(world):
        assert results[r][0] == "ok", results[r]
    data = batches(8)
    kw = dict(delay=2, update_prob=0.6, seed=4, unlock_at=0 if world > 2 else None)
    for name, (weights, losses) in (("plain", oracle(world, data, delay=1)), ("variants", oracle(world, data, **kw)),
                                    ("cdni current", oracle(world, data, delay=1, cdni=True, regression="current")),
                                    ("cdni ridge", oracle(world, data, delay=1, cdni=True, ridge=True))):
        for r in range(world):
            _assert_weights_equal(results[r][1][name][0], weights[r], f"{name}, stage {r}")
        assert results[world - 1][1][name][1] == losses  # the last rank's loss of batch j at its step j
        assert all(l is None for l in results[0][1][name][1])
    # the checkpoint taken after 5 steps, loaded into fresh stages, ends where the uninterrupted run ended
    weights, _ = oracle(world, data, **kw)
    for r in range(world):
        _assert_weights_equal(results[r][1]["resumed"][0], weights[r], f"resumed, stage {r}")
    weights, _ = oracle(world, data, delay=1, normalize=True)
    for r in range(world):
        _assert_weights_equal(results[r][1]["normalized, resumed"][0], weights[r], f"normalized, resumed, stage {r}")
    assert any(k.endswith("target_sq_ema") for k in weights[0])
    # the ridge synthesizers were fitted (their statistics are in the weights compared above)
    ridge = oracle(world, data, delay=1, cdni=True, ridge=True)[0]
    assert int(ridge[0]["synth.n_fits"]) > 0 and ridge[0]["synth.cross_fit"].abs().max() > 0
    # and the variants are a different run (the options had an effect)
    plain = oracle(world, data, delay=1)[0]
    assert any(not torch.equal(plain[0][k], weights[0][k]) for k in plain[0])


def test_transport_packets_of_every_size_dtype_and_shape(two_ranks):
    n = len(_packet_tensors())
    for r in range(2):
        status, out = two_ranks["packets"][r]
        assert status == "ok", out
        assert out["n"] == n and all(out["equal"]), f"rank {r}: messages equal to what was sent: {out['equal']}"
        assert out["reopened"], f"rank {r}: a large message after closing and reopening the transport"


def test_world_size_mismatch_raises_on_every_rank(two_ranks):
    for r in range(2):
        status, out = two_ranks["bad_config"][r]
        assert status == "ok" and out["error"] is not None, two_ranks["bad_config"][r]
        assert "num_stages=3 but the process group has 2 ranks" in out["error"]


def test_missing_target_raises_on_every_rank(two_ranks):
    res = two_ranks["missing_target"]
    status, e = res[1]
    assert status == "error" and e["type"] == "ValueError" and "needs target=" in e["msg"]
    status, e = res[0]
    assert status == "error" and e["type"] == "PeerFailure" and e["stage"] == 1 and e["kind"] == "raised", e
    assert "stage 1 raised ValueError" in e["msg"] and "needs target=" in e["msg"]


def test_shape_mismatch_between_stages_raises_on_every_rank(two_ranks):
    res = two_ranks["shape_mismatch"]
    status, e = res[1]
    assert status == "error" and e["type"] == "RuntimeError" and "8x24 and 25x5" in e["msg"], e
    status, e = res[0]
    assert status == "error" and e["type"] == "PeerFailure" and e["stage"] == 1
    assert "8x24 and 25x5" in e["msg"] and "stage 1 raised RuntimeError" in e["msg"]


@pytest.mark.parametrize("fault", ["kill", "hang", "raise"])
def test_a_faulty_rank_makes_every_other_rank_raise_naming_it(fault, request):
    world, culprit = 3, 2
    others = [r for r in range(world) if r != culprit]
    if fault == "raise":
        all_results, fault_time = request.getfixturevalue("three_ranks")
        results = all_results["raise"]
    else:  # the culprit never reports: it is dead or hung (and killed at the end)
        all_results, fault_time = spawn(fault, world, expect=[(fault, r) for r in others])
        results = all_results[fault]
    assert fault_time is not None
    for r in others:
        status, e = results[r]
        assert status == "error" and e["type"] == "PeerFailure", (r, results[r])
        assert e["stage"] == culprit and f"stage {culprit}" in e["msg"], (r, e)
        expected_kind = {"kill": "died", "hang": "timeout", "raise": "raised"}[fault]
        assert e["kind"] == expected_kind, (r, e)
        limit = (TIMEOUT if fault == "hang" else 0.0) + MARGIN
        assert e["time"] - fault_time < limit, f"rank {r} raised {e['time'] - fault_time:.1f} s after the fault"
    if fault == "raise":
        status, e = results[culprit]
        assert status == "error" and e["type"] == "ArithmeticError"
        assert "the loss of the last stage raised" in results[0][1]["msg"]


def test_example_without_torchrun(tmp_path):
    """``python -m dni_fast.examples.mnist_distributed --spawn 2``: the example
    starts its own processes (no torchrun), trains decoupled and GPipe, and
    reports both."""
    import json

    from dni_fast.examples import mnist_distributed as example

    log = tmp_path / "mnist_distributed.json"
    out = example.main(["--spawn", "2", "--quick", "--data", "digits", "--no-progress", "--schedules", "decoupled",
                        "gpipe", "--log", str(log)])
    saved = json.loads(log.read_text())
    assert compact(out["summary"]) == saved["summary"]  # the log keeps 6 significant digits
    methods = [r["method"] for r in saved["runs"]]
    assert methods == ["decoupled", "gpipe m=4"]
    for r in saved["runs"]:
        assert r["samples_per_s"] > 0 and 0 <= r["test_acc"] <= 100 and r["train_loss"] > 0
        assert len(r["peak_rss_mib"]) == 2


def test_requires_an_initialised_group():
    from dni_fast.distributed import DecoupledStage

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="never initialises one"):
        DecoupledStage(nn.Linear(2, 2), 0, 1)


def test_state_dict_after_finish_a_second_stage_and_a_refused_checkpoint(two_ranks):
    for r in range(2):
        status, out = two_ranks["lifecycle"][r]
        assert status == "ok", out
        assert out["closed_after_state_dict"], "state_dict() after finish() reopened the channels"
        assert out["second"] is not None and "still has its channels open" in out["second"], out
        assert out["refused"] is not None and "delay" in out["refused"], out
        assert out["unchanged"], "a refused checkpoint changed the weights"
        assert out["open_load"] is not None and "call finish() on every rank first" in out["open_load"], out
        assert out["other_optimizer"] is not None and "is a Adam, this stage's a SGD" in out["other_optimizer"], out
        assert out["second_finish_s"] < 2.0, f"a second finish() took {out['second_finish_s']:.1f} s"


def test_a_send_to_a_peer_that_raised_and_left_names_that_peer(two_ranks):
    status, e = two_ranks["late_peer"][0]
    assert status == "error" and e["type"] == "PeerFailure" and e["stage"] == 1, e
    status, e = two_ranks["late_peer"][1]
    assert status == "error" and e["type"] == "ValueError" and "needs target=" in e["msg"], e


def test_stages_at_different_step_counts_are_named_at_once(two_ranks):
    outs = [two_ranks["step_mismatch"][r] for r in range(2)]
    for status, out in outs:
        assert status == "ok" and out["type"] is not None, out
        assert out["seconds"] < 10, f"took {out['seconds']:.1f} s (the timeout is 20 s)"
    behind = outs[1][1]  # rank 1 starts at batch 0, rank 0 sends batch 4
    assert behind["type"] == "StepMismatch" and "different step counts" in behind["msg"], behind
    ahead = outs[0][1]
    assert ahead["type"] == "PeerFailure" and ahead["stage"] == 1 and "different step counts" in ahead["msg"], ahead
    # the other way round: only rank 1 loads, so it is the one ahead (it used to wait out the timeout, and each
    # stage blamed the other)
    outs = [two_ranks["step_mismatch_ahead"][r] for r in range(2)]
    for status, out in outs:
        assert status == "ok" and out["type"] is not None and out["seconds"] < 10, out
    assert any(o["type"] == "StepMismatch" for _, o in outs), outs
