"""Compatibility with PyTorch's machinery, on every backend that runs on the CPU.

* parameter hooks, gradient accumulation and ``zero_grad(set_to_none=True)``;
* DDP: two gloo processes on 127.0.0.1 (see ``test_ddp_two_processes``);
* pickling a whole model (``torch.save``/``torch.load``), ``copy.deepcopy`` and
  ``.to(dtype)`` round trips;
* regressions found in review (the pipelined mode's pending update, autocast
  with fp64, the fused message's differentiability).

Backends: ``reference``; ``primref`` (the fp32 reference primitives routed
through the fused autograd glue, as in test_equivalence.py); ``cpp`` where
built. Expected values come from plain autograd.
"""
import copy
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast.backends import fused as _fused
from dni_fast.regression import BACKWARD_LOSS, FORWARD_LOSS
from dni_fast.testing import assert_close, assert_lowp_close
from tests.conftest import fused_backends

# The Triton interpreter is left out for speed: its glue is the same as cpp's,
# and test_equivalence.py / test_kernels_triton.py cover it.
FUSED = [b for b in fused_backends("cpu") if b == "cpp"]
BACKENDS = ["reference", "primref"] + FUSED
DIN, D, H, DOUT, DC = 5, 8, 7, 3, 3


@pytest.fixture(params=BACKENDS)
def backend(request):
    bk.clear_cache()
    yield request.param
    bk.clear_cache()


class _Net(nn.Module):
    """lin1 -> cDNI BackwardInterface -> lin2; module-level so that it pickles."""

    def __init__(self, pipelined=False, warmup_steps=0):
        super().__init__()
        self.lin1 = nn.Linear(DIN, D)
        self.iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1, hidden_dim=H, context_dim=DC),
                                           pipelined=pipelined, warmup_steps=warmup_steps)
        self.lin2 = nn.Linear(D, DOUT)

    def forward(self, x, y):
        with dni.synthesizer_context(F.one_hot(y, DC).to(x.dtype)):
            return self.lin2(torch.relu(self.iface(self.lin1(x))))


def _make(seed=0, **kw):
    torch.manual_seed(seed)
    net = _Net(**kw)
    with torch.no_grad():  # a fresh synthesizer has a zeroed last layer: give every parameter signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def _batch(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DIN, generator=g), torch.randint(0, DOUT, (b,), generator=g)


def _oracle_grads(net, x, y):
    """One step of ``net`` written in plain autograd on a copy: the injection
    ``h.backward(S(h))``, the true gradient ``g`` at the interface, and the
    regression ``sum((S - g)^2) / g.size(0)``. Returns {name: grad}."""
    ref = copy.deepcopy(net)
    ref.zero_grad(set_to_none=True)
    syn = ref.iface.synthesizer
    ctx = F.one_hot(y, DC).to(x.dtype)
    h = ref.lin1(x)
    s = syn(h.detach(), ctx)
    h.backward(s.detach())
    hd = h.detach().requires_grad_()
    F.cross_entropy(ref.lin2(torch.relu(hd)), y).backward()
    (((s - hd.grad) ** 2).sum() / hd.grad.size(0)).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def _step(net, x, y):
    F.cross_entropy(net(x, y), y).backward()


# ---------------------------------------------------------------------------
# Parameter hooks, accumulation, zero_grad
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("pipelined", [False, True])
def test_param_hooks_fire_once_per_update_with_the_right_gradient(backend, pipelined):
    net = _make(pipelined=pipelined)
    x, y = _batch(1)
    expected = _oracle_grads(net, x, y)
    seen, post = {}, {}
    for n, p in net.named_parameters():
        p.register_hook(lambda g, n=n: seen.setdefault(n, []).append(g.detach().clone()))
        p.register_post_accumulate_grad_hook(lambda p, n=n: post.setdefault(n, []).append(p.grad.detach().clone()))
    with dni.use_backend(backend):
        _step(net, x, y)
        if pipelined:  # the update is delivered one step late; no weight has changed, so it is the same
            net.iface.flush()
    names = [n for n, _ in net.named_parameters()]
    assert sorted(seen) == sorted(post) == sorted(names)
    for n in names:
        assert len(seen[n]) == 1 and len(post[n]) == 1, (n, len(seen[n]), len(post[n]))
        assert seen[n][0].abs().sum() > 0, n
        assert_close(seen[n][0], expected[n], name=f"hook grad of {n}")
        assert_close(post[n][0], expected[n], name=f"post-accumulate grad of {n}")
        assert_close(net.get_parameter(n).grad, expected[n], name=f".grad of {n}")


def test_gradient_accumulation_and_zero_grad_set_to_none(backend):
    net = _make()
    (x1, y1), (x2, y2) = _batch(1), _batch(2)
    g1, g2 = _oracle_grads(net, x1, y1), _oracle_grads(net, x2, y2)
    with dni.use_backend(backend):
        _step(net, x1, y1)
        _step(net, x2, y2)  # no zero_grad: gradients add up
        for n, p in net.named_parameters():
            assert_close(p.grad, g1[n] + g2[n], name=f"accumulated grad of {n}")
            assert not torch.allclose(g1[n], g2[n]), n  # the two steps differ, so the sum is a real check
        net.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in net.parameters())
        _step(net, x2, y2)
    for n, p in net.named_parameters():
        assert_close(p.grad, g2[n], name=f"grad of {n} after zero_grad(set_to_none=True)")


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_synthesizer_layers(backend):
    """weight_norm / torch.nn.utils.parametrize on the synthesizer's layers: the
    fused step reads the computed weight, and the gradients reach the original
    parameters through autograd."""
    from torch.nn.utils import parametrize

    net = _make()
    syn = net.iface.synthesizer
    with torch.no_grad():
        syn.layers[-1].weight.normal_(0, 0.1)  # a non-zero message, so every gradient is non-trivial
    parametrize.register_parametrization(syn.input_trigger, "weight", _Double())
    nn.utils.parametrizations.weight_norm(syn.layers[0])
    x, y = _batch(1)
    expected = _oracle_grads(net, x, y)
    with dni.use_backend(backend):
        _step(net, x, y)
    names = [n for n, _ in net.named_parameters()]
    assert any("parametrizations.weight.original" in n for n in names), names
    for n, p in net.named_parameters():
        assert_close(p.grad, expected[n], name=f"grad of {n}")


def test_fused_backends_reject_a_layer_without_bias_by_name():
    syn = dni.BasicSynthesizer(D, n_hidden=1)
    syn.layers[0] = nn.Linear(D, D, bias=False)
    with pytest.raises(ValueError, match="Linear with a bias, got Linear.*bias=False.*backend='reference'"):
        syn.flat_params()


# ---------------------------------------------------------------------------
# Pickling, deepcopy, .to(dtype)
# ---------------------------------------------------------------------------
def _train(net, seeds, lr=0.1):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for s in seeds:
        opt.zero_grad(set_to_none=True)
        _step(net, *_batch(s))
        opt.step()
    return net


def _flush_step(net, lr=0.1):
    for p in net.parameters():
        p.grad = None
    net.iface.flush()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _assert_same_params(a, b, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{what}: {n} differs"


@pytest.mark.parametrize("pipelined", [False, True])
def test_torch_save_load_whole_model_and_deepcopy_resume_exactly(backend, pipelined, tmp_path):
    with dni.use_backend(backend):
        net = _train(_make(pipelined=pipelined), [1, 2])
        path = tmp_path / "model.pt"
        torch.save(net, path)
        # A whole pickled module needs weights_only=False (torch >= 2.6 defaults to True).
        loaded = torch.load(path, weights_only=False)
        clone = copy.deepcopy(net)
        assert isinstance(loaded.iface, dni.BackwardInterface) and loaded.iface.pipelined == pipelined
        assert loaded.iface.stats()["count"] == clone.iface.stats()["count"] == net.iface.stats()["count"] > 0
        for m in (net, loaded, clone):
            _train(m, [3, 4])
            if pipelined:  # the pending update of the last step was pickled / copied too
                _flush_step(m)
    _assert_same_params(loaded, net, "torch.load")
    _assert_same_params(clone, net, "deepcopy")
    assert loaded.iface.stats() == net.iface.stats()
    # the copies share nothing with the original
    with torch.no_grad():
        clone.iface.synthesizer.layers[0].weight.add_(1.0)
    assert not torch.equal(clone.iface.synthesizer.layers[0].weight, net.iface.synthesizer.layers[0].weight)
    clone.iface.reset_stats()
    assert net.iface.stats()["count"] > 0


def test_to_float64_and_back_round_trip(backend):
    net, plain = _make(), _make()
    with dni.use_backend(backend):
        net.double()
        assert all(p.dtype == torch.float64 for p in net.parameters())
        x, y = _batch(1)
        expected = _oracle_grads(net, x.double(), y)
        _step(net, x.double(), y)
        for n, p in net.named_parameters():
            assert p.grad.dtype == torch.float64
            assert_close(p.grad, expected[n], name=f"fp64 grad of {n}")
        net.zero_grad(set_to_none=True)
        net.float()  # fp32 -> fp64 -> fp32 is exact
        _assert_same_params(net, plain, "fp32 -> fp64 -> fp32")
        _train(net, [2, 3])
        _train(plain, [2, 3])
    _assert_same_params(net, plain, "training after the round trip")


def test_to_bfloat16(backend):
    """A model cast to bf16 (no autocast) runs and matches the bf16 reference
    under the low-precision rule (docs/design.md §6)."""
    net = _make()
    x, y = _batch(1)
    exp32 = _oracle_grads(net, x, y)
    net16 = copy.deepcopy(net).to(torch.bfloat16)
    exp16 = _oracle_grads(net16, x.bfloat16(), y)
    with dni.use_backend(backend):
        _step(net16, x.bfloat16(), y)
    for n, p in net16.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        assert_lowp_close(p.grad, exp16[n], exp32[n], name=f"bf16 grad of {n}")


def test_bf16_autocast_matches_reference_under_the_lowp_rule(backend):
    """bf16 autocast with fp32 weights, every interface kind: the backend's
    gradients against fp32 are at most 2x as far as the reference's own
    autocast run (docs/design.md §6)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = nn.Linear(DIN, D), nn.Linear(D, DOUT)
            self.bi = dni.BidirectionalInterface(dni.BasicSynthesizer(D, n_hidden=1, trigger_dim=DIN),
                                                 dni.BasicSynthesizer(D, n_hidden=2, hidden_dim=H))
            self.bwd = dni.BackwardInterface(dni.BasicSynthesizer(DOUT, n_hidden=1, context_dim=DC))

        def forward(self, x, y):
            with dni.synthesizer_context(F.one_hot(y, DC).float()):
                return self.bwd(self.lin2(torch.relu(self.bi(self.lin1(x), x))))

    def run(b, autocast):
        torch.manual_seed(0)
        net = Net()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        x, y = _batch(1, b=9)
        with dni.use_backend(b), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x, y)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        return {n: p.grad for n, p in net.named_parameters()}

    ref32, ref16, fast = run("reference", False), run("reference", True), run(backend, True)
    for n in ref32:
        assert fast[n].dtype == torch.float32, n
        assert_lowp_close(fast[n], ref16[n], ref32[n], name=n)


# ---------------------------------------------------------------------------
# Regressions found in review
# ---------------------------------------------------------------------------
def test_fused_message_is_not_differentiable(monkeypatch):
    """The fused forward marks S non-differentiable: it carries no graph, and
    backward is not handed a zero-filled gradient for it every step."""
    unused = []
    for fn in (_fused._TriggerUpdate, _fused._SendRegression):
        def spy(ctx, g, u, real=fn.backward):
            unused.append(u)
            return real(ctx, g, u)

        monkeypatch.setattr(fn, "backward", staticmethod(spy))
    syn = dni.BasicSynthesizer(D, n_hidden=1)
    h = torch.randn(2, 3, D, requires_grad=True)
    engine = bk.get("primref")
    out, s = engine.trigger(syn, h.detach(), None, None, BACKWARD_LOSS.scale(h.shape), None)
    assert out.requires_grad and s.shape == (2, 3, D)
    assert not s.requires_grad and s.grad_fn is None
    out.sum().backward()
    m = torch.randn(2, 3, D)
    loss, s = engine.send(syn, h, None, m, None, FORWARD_LOSS, FORWARD_LOSS.scale(m.shape))
    assert loss.requires_grad and not s.requires_grad
    loss.backward()
    assert unused == [None, None]
    assert all(p.grad is not None for p in syn.parameters())


def test_fp64_under_autocast_computes_in_fp64(backend):
    """Autocast leaves fp64 alone; the fused backends must too (they used to
    cast the trigger to bf16 and fail against fp64 weights)."""
    net = _make().double()
    x, y = _batch(1)
    expected = _oracle_grads(net, x.double(), y)
    with dni.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.double(), y)
        assert out.dtype == torch.float64
        F.cross_entropy(out, y).backward()
    for n, p in net.named_parameters():
        assert_close(p.grad, expected[n], name=n)


def test_pipelined_gradient_arriving_late_or_twice_is_not_lost(backend):
    """Pipelined mode, with no weight change in between, must deliver the same
    synthesizer update as the synchronous mode when a step's true gradient
    arrives (a) after the next step's forward, (b) in two backward calls, or
    (c) after flush(). It used to drop (a) and (c) and keep only the last of (b)."""
    (x1, y1), (x2, y2) = _batch(1), _batch(2)

    def scenario(net, which):
        if which == "late":
            o1, o2 = net(x1, y1), net(x2, y2)
            (F.cross_entropy(o1, y1) + F.cross_entropy(o2, y2)).backward()
        elif which == "twice":
            o = net(x1, y1)
            F.cross_entropy(o, y1).backward(retain_graph=True)
            (o ** 2).mean().backward()
        else:  # flush before the backward
            o = net(x1, y1)
            if net.iface.pipelined:
                net.iface.flush()
            F.cross_entropy(o, y1).backward()
        if net.iface.pipelined:
            net.iface.flush()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    with dni.use_backend(backend):
        for which in ("late", "twice", "flush_first"):
            sync, pipe = _make(), _make(pipelined=True)
            expected, got = scenario(sync, which), scenario(pipe, which)
            for n in expected:
                assert_close(got[n], expected[n], name=f"{which}: grad of {n}")
            n_sync, n_pipe = sync.iface.stats()["count"], pipe.iface.stats()["count"]
            # One statistics row per step on every backend and mode, written by the first update through it;
            # the gradients above still include both updates of "twice".
            assert n_pipe == n_sync == (2 if which == "late" else 1), which


def test_pipelined_forward_without_grad_and_with_a_frozen_synthesizer(backend):
    """A training-mode forward under no_grad/inference_mode used to raise (and
    consume the pending update); so did a step after freezing the synthesizer."""
    x, y = _batch(1)
    with dni.use_backend(backend):
        net, sync = _make(pipelined=True), _make()
        _step(net, x, y)
        _step(sync, x, y)
        with torch.no_grad():
            net(x, y)
        with torch.inference_mode():
            net(x, y)
        with torch.no_grad():
            net.iface.flush()  # flush works under no_grad too: it delivers through autograd
        for (n, p), q in zip(net.named_parameters(), sync.parameters()):
            assert_close(p.grad, q.grad, name=f"grad of {n}")
        # freeze the synthesizer with an update pending: nothing is delivered, nothing raises
        _step(net, x, y)
        net.iface.synthesizer.requires_grad_(False)
        before = [p.grad.clone() for p in net.iface.synthesizer.parameters()]
        _step(net, x, y)
        net.iface.flush()
        for p, g in zip(net.iface.synthesizer.parameters(), before):
            assert torch.equal(p.grad, g)


def test_pipelined_pending_update_follows_to(backend):
    """``.to(dtype)`` moves the pending update with the weights."""
    x, y = _batch(1)
    with dni.use_backend(backend):
        net = _make(pipelined=True)
        sync = _make().double()
        _step(net, x, y)
        net.double()
        net.zero_grad(set_to_none=True)
        net.iface.flush()
        F.cross_entropy(sync(x.double(), y), y).backward()
    for (n, p), q in zip(net.iface.synthesizer.named_parameters(), sync.iface.synthesizer.parameters()):
        assert p.grad.dtype == torch.float64
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, name=n)


# ---------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------
DDP_STEPS, DDP_B, DDP_LR = 2, 4, 0.1
# (pattern, warmup_steps, pipelined)
DDP_PATTERNS = (("find_unused", 1, False), ("per_stage", 0, False), ("find_unused_pipelined", 0, True))


def _ddp_shard(rank, step):
    return _batch(1000 + 10 * step + rank, b=DDP_B)


def _ddp_model(warmup_steps, pipelined):
    return _make(seed=7, warmup_steps=warmup_steps, pipelined=pipelined)


def _sgd(params, grads):
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(DDP_LR * g)


def _ddp_oracle(backend, warmup_steps, pipelined, ranks=(0, 1)):
    """Single process: one replica per rank, each running its own shard from
    the same state; after each step the gradients are averaged (a missing one
    counts as zero) and applied by SGD to every replica. In pipelined mode the
    last update is flushed and averaged the same way."""
    reps = [_ddp_model(warmup_steps, pipelined) for _ in ranks]

    def average_and_step():
        for ps in zip(*(m.parameters() for m in reps)):
            gs = [p.grad for p in ps]
            mean = None if all(g is None for g in gs) else sum(g for g in gs if g is not None) / len(gs)
            _sgd(ps, [mean] * len(ps))

    with dni.use_backend(backend):
        for step in range(DDP_STEPS):
            for m, r in zip(reps, ranks):
                m.zero_grad(set_to_none=True)
                _step(m, *_ddp_shard(r, step))
            average_and_step()
        if pipelined:
            for m in reps:
                m.zero_grad(set_to_none=True)
                m.iface.flush()
            average_and_step()
    return [p.detach().clone() for p in reps[0].parameters()]


def _ddp_concat_run(backend, warmup_steps, pipelined):
    net = _ddp_model(warmup_steps, pipelined)
    with dni.use_backend(backend):
        for step in range(DDP_STEPS):
            x, y = zip(*(_ddp_shard(r, step) for r in range(2)))
            net.zero_grad(set_to_none=True)
            _step(net, torch.cat(x), torch.cat(y))
            _sgd(net.parameters(), [p.grad for p in net.parameters()])
    return [p.detach().clone() for p in net.parameters()]


def _ddp_worker(rank, port, backends, q):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        out = {}
        for backend in backends:
            for pattern, warmup, pipelined in DDP_PATTERNS:
                net = _ddp_model(warmup, pipelined)
                if pattern.startswith("find_unused"):
                    wrapped = DDP(net, find_unused_parameters=True)
                else:
                    net.lin1, net.iface, net.lin2 = DDP(net.lin1), DDP(net.iface), DDP(net.lin2)
                    wrapped = net
                with dni.use_backend(backend):
                    for step in range(DDP_STEPS):
                        wrapped.zero_grad(set_to_none=True)
                        _step(wrapped, *_ddp_shard(rank, step))
                        _sgd(net.parameters(), [p.grad for p in net.parameters()])
                    if pipelined:  # flush() runs outside DDP: average its update by hand
                        net.zero_grad(set_to_none=True)
                        net.iface.flush()
                        for p in net.iface.parameters():
                            dist.all_reduce(p.grad)
                            p.grad /= dist.get_world_size()
                        _sgd(net.parameters(), [p.grad for p in net.parameters()])
                out[(backend, pattern)] = [p.detach().clone().tolist() for p in net.parameters()]
        # plain DDP (find_unused_parameters=False): DDP itself raises on the second step
        net = DDP(_ddp_model(0, False))
        try:
            for step in range(2):
                _step(net, *_ddp_shard(rank, step))
            out["default"] = None
        except RuntimeError as e:
            out["default"] = str(e)
        q.put((rank, out))
    except BaseException:
        q.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_ddp_two_processes():
    """DDP with DNI, 2 gloo processes on 127.0.0.1.

    The interfaces inject the synthetic gradient with a backward call inside
    the forward pass, so the parameters before an interface get their
    gradients before DDP's reducer expects any hook, and those parameters are
    not reachable from the output. What works:

    * recommended: ``DDP(model, find_unused_parameters=True)``. The reducer
      marks a parameter as used when its gradient hook fires, even outside its
      backward window (the mechanism ``no_sync`` relies on); the parameters
      before an interface are unreachable from the output, so they are marked
      ready at the start of the backward pass and their injected gradient is
      averaged with the others. Works with warm-up (no gradient there yet: DDP
      leaves it None) and with the pipelined mode, whose update reaches the
      synthesizer in the next forward and is averaged in that step's backward;
      only the update that ``flush()`` delivers, outside DDP, must be
      all-reduced by hand.
    * wrapping each stage in its own DDP (the part before the interface, the
      interface itself, the part after): each stage's backward comes after its
      own forward. Not with warm-up (the first stage then gets no gradient and
      DDP raises on the next step).
    * plain ``DDP(model)`` raises DDP's own "Expected to have finished
      reduction ... find_unused_parameters=True" on the second step;
      ``static_graph=True`` raises likewise.

    The oracle: one process holds a replica per rank, runs each rank's shard on
    its replica and averages the gradients after every step, which is what
    DDP computes. It is *not* a single-process run on the concatenated batch:
    the synthetic gradient is not normalised by the batch (its scale is learnt
    against the local batch), the true gradient the synthesizer regresses on is
    that of the rank's own mean loss, and the regression is normalised by the
    local ``g.size(0)``. The test checks that the concatenated-batch run
    differs indeed, and so does rank 0 training alone (so the averaging is
    tested).
    """
    backends = ["reference"] + FUSED
    deadline = time.monotonic() + 50  # the workers' gloo timeout is 30 s: nothing here can hang past ~55 s
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, backends, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        # the single-process oracles, while the workers start
        expected = {(b, pat): (_ddp_oracle(b, w, pipe), _ddp_concat_run(b, w, pipe), _ddp_oracle(b, w, pipe, ranks=(0,)),
                               [p.detach() for p in _ddp_model(w, pipe).parameters()])
                    for b in backends for pat, w, pipe in DDP_PATTERNS}
        for _ in range(2):
            rank, out = q.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert not isinstance(out, str), f"rank {rank} failed:\n{out}"
            results[rank] = out
    except queue.Empty:
        pytest.fail("DDP workers timed out")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    for rank in (0, 1):
        err = results[rank]["default"]
        assert err is not None and "find_unused_parameters" in err, err
    for key, (oracle, concat, alone, init) in expected.items():
        r0 = [torch.tensor(t) for t in results[0][key]]
        r1 = [torch.tensor(t) for t in results[1][key]]
        for i, (a, b, e) in enumerate(zip(r0, r1, oracle)):
            assert torch.equal(a, b), f"{key}: parameter {i} differs between ranks"
            assert_close(a, e, rtol=1e-5, atol=1e-6, name=f"{key}: parameter {i}")
            assert not torch.equal(a, init[i]), f"{key}: parameter {i} never moved"
        assert any(not torch.allclose(a, c, rtol=1e-4, atol=1e-5) for a, c in zip(r0, concat)), key
        assert any(not torch.allclose(a, c, rtol=1e-4, atol=1e-5) for a, c in zip(r0, alone)), key


# -- dni-pytorch behaviours found by review (each failed before its fix) ----------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_backward_under_no_grad_still_injects(backend):
    """dni-pytorch's backward() calls trigger.backward(S), which runs under no_grad for a trigger built with
    grad: the synthetic gradient arrives (it was silently dropped)."""
    if not bk.get(backend).status(torch.device("cpu"))[0]:
        pytest.skip(f"{backend} not built")
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    iface = dni.BackwardInterface(dni.BasicSynthesizer(4), backend=backend)
    with torch.no_grad():
        for p in iface.parameters():
            p.add_(0.1)
    h = lin(torch.randn(3, 4))
    expected = torch.autograd.grad(h, lin.weight, 0.1 * iface.synthesizer(h.detach()).detach(),
                                   retain_graph=True)[0]
    with torch.no_grad():
        iface.backward(h, factor=0.1)
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, expected)


def test_bidirectional_with_a_replaced_forward_half_calls_its_send_and_receive():
    class Noisy(dni.ForwardInterface):
        def receive(self, trigger):
            return super().receive(trigger) + 1

    torch.manual_seed(0)
    bi = dni.BidirectionalInterface(dni.BasicSynthesizer(4), dni.BasicSynthesizer(4))
    bi.forward_interface = Noisy(dni.BasicSynthesizer(4))
    x, m = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    out = bi(m, x)
    assert torch.allclose(out - bi.forward_interface.synthesizer(x).detach(), torch.ones(3, 4))


def test_a_method_patched_onto_an_instance_is_what_forward_calls():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    iface = dni.BackwardInterface(dni.BasicSynthesizer(4), backend="reference")
    with torch.no_grad():
        for p in iface.parameters():
            p.add_(0.1)
    orig = iface.backward
    iface.backward = lambda trigger, factor=1: orig(trigger, factor=0.0)
    iface(lin(torch.randn(3, 4)))
    assert lin.weight.grad is None or lin.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_context_layer_attached_after_construction_is_used(backend):
    if not bk.get(backend).status(torch.device("cpu"))[0]:
        pytest.skip(f"{backend} not built")
    torch.manual_seed(0)
    s = dni.BasicSynthesizer(4)
    s.input_context = nn.Linear(2, 4)
    x, c = torch.randn(3, 4), torch.ones(3, 2)
    assert not torch.equal(s(x, c), s(x, torch.zeros(3, 2)))
    iface = dni.BackwardInterface(s, backend=backend)
    with dni.synthesizer_context(c):
        iface(torch.randn(3, 4, requires_grad=True)).sum().backward()
    assert s.input_context.weight.grad is not None and s.input_context.weight.grad.abs().sum() > 0


def test_dni_backward_takes_dni_pytorchs_keyword():
    x = torch.randn(3, requires_grad=True)
    dni.backward(variable=x * 2)
    assert torch.equal(x.grad, torch.full((3,), 2.0))
