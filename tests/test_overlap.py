"""Drop-in overlap (dni_fast/_overlap.py): the synthesizer's update on a worker,
delivered at the synchronisation points, with the numbers of the run without
overlap."""
import contextlib
import threading
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
import dni_fast.backends as bk
from dni_fast import _overlap as ov
from dni_fast.stats import SynthStats
from tests.conftest import fused_backends

# The Triton interpreter cannot run kernels from a second thread (its patching
# of the language is per thread); compiled kernels on a GPU can.
BACKENDS = ["reference"] + [b for b in fused_backends("cpu") if not bk.get(b).interpreted(torch.device("cpu"))]


@pytest.fixture(autouse=True)
def _clean():
    ov.discard()
    ov.set_overlap(False)
    yield
    ov.discard()
    ov.set_overlap(False)
    bk.clear_cache()


def _mlp(backend, seed=0, width=24, depth=4, synth=None, **kw):
    """``synth(width)`` makes each synthesizer (default ``BasicSynthesizer(width, n_hidden=1)``)."""
    torch.manual_seed(seed)
    make = synth or (lambda w: dni.BasicSynthesizer(w, n_hidden=1))
    layers, dims = [], [32] + [width] * depth
    for i in range(depth):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.BatchNorm1d(width)]
        if i < depth - 1:
            layers.append(dni.BackwardInterface(make(width), backend=backend, **kw))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(width, 5))


def _synth_params(model):
    return [p for m in model.modules() if isinstance(m, dni.BackwardInterface) for p in m.synthesizer.parameters()]


def _train(model, steps, scope, seed=1, accum=1, batch=16, around=contextlib.nullcontext, optimizer=None):
    """``steps`` optimizer steps (Adam by default) of ``accum`` accumulated batches each, the forwards inside
    ``around()``."""
    opt = (optimizer or (lambda p: torch.optim.Adam(p, 1e-2)))(model.parameters())
    torch.manual_seed(seed)
    with scope():
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(accum):
                x, y = torch.randn(batch, 32), torch.randint(0, 5, (batch,))
                with around():
                    out = model(x)
                F.cross_entropy(out, y).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", [True, "injection"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_parameters_as_without_overlap(backend, mode, one_thread):
    a = _train(_mlp(backend), 12, lambda: dni.overlap(False))
    b = _train(_mlp(backend), 12, lambda: dni.overlap(mode))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on the CPU at a fixed thread count


@pytest.mark.parametrize("backend", BACKENDS)
def test_injection_mode_with_checks_and_normalised_targets(backend, one_thread):
    kw = dict(check_finite=True, normalize_targets=True)
    a = _train(_mlp(backend, **kw), 8, lambda: dni.overlap(False))
    b = _train(_mlp(backend, **kw), 8, lambda: dni.overlap("injection"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_overlap_modes_are_named():
    assert ov.mode("update") is True and ov.mode(None) is False and ov.mode("injection") == "injection"
    with pytest.raises(ValueError, match="overlap must be False, True .* or 'injection', got 'inject'"):
        dni.BackwardInterface(dni.BasicSynthesizer(4), overlap="inject")
    with pytest.raises(ValueError, match="got 'all'"):
        dni.set_overlap("all")
    with dni.overlap("injection"):
        assert dni.get_overlap() == "injection"
    assert dni.get_overlap() is False


def test_injected_gradients_wait_for_a_synchronisation_point():
    model = _mlp("reference", overlap="injection")
    lower = [p for m in list(model)[:2] for p in m.parameters()]  # the first Linear and BatchNorm
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    dni.synchronize()
    want = [p.grad.clone() for p in lower]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    assert ov.pending() >= 3
    assert all(p.grad is None for p in lower)  # not delivered yet: a raw read needs synchronize()
    dni.synchronize()
    assert all(p.grad is not None for p in lower)
    assert not all(torch.equal(w, p.grad) for w, p in zip(want, lower))  # this step's, not last step's


def test_a_hooked_parameter_below_makes_that_injection_inline():
    """A tensor hook would run on the worker and again at delivery: the
    interface above a hooked parameter injects inline, and the hook runs once."""
    model = _mlp("reference", overlap="injection")
    calls = []
    model[0].weight.register_hook(lambda g: calls.append(1))
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    assert model[0].weight.grad is not None and len(calls) == 1  # inline: there already
    dni.synchronize()
    assert len(calls) == 1


@pytest.mark.parametrize("reentrant", [True, False])
def test_injection_mode_through_checkpointed_layers(reentrant, one_thread):
    """torch.utils.checkpoint below an interface: the reentrant kind refuses
    torch.autograd.grad, so that interface injects inline; the other kind
    recomputes on the worker. Same parameters as without overlap either way."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(32, 24), nn.Linear(24, 5)
            self.iface = dni.BackwardInterface(dni.BasicSynthesizer(24, n_hidden=1))

        def forward(self, x):
            h = checkpoint(lambda t: torch.relu(self.a(t)), x.requires_grad_(), use_reentrant=reentrant)
            return self.b(self.iface(h))

    a = _train(Net(), 5, lambda: dni.overlap(False))
    b = _train(Net(), 5, lambda: dni.overlap("injection"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_injection_that_fails_on_the_worker_delivers_nothing():
    model = _mlp("reference", overlap="injection")
    model[1].register_full_backward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("hook failure below")))
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    with pytest.raises(RuntimeError, match="hook failure below"):
        dni.synchronize()
    below = [p for m in list(model)[:2] for p in m.parameters()]
    assert ov.pending() == 0 and all(p.grad is None for p in below + _synth_params(model))
    assert model[-1].weight.grad is not None  # the main backward's own gradients are there


def test_per_interface_switch_and_set_overlap(one_thread):
    a = _train(_mlp("reference"), 5, lambda: dni.overlap(False))
    b = _train(_mlp("reference", overlap=True), 5, lambda: dni.overlap(False))
    dni.set_overlap(True)
    assert dni.get_overlap()
    c = _train(_mlp("reference"), 5, lambda: dni.overlap(True))
    dni.set_overlap(False)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k


def test_the_update_is_pending_until_a_synchronisation_point():
    model = _mlp("reference", overlap=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # made before anything overlapped: the global hook covers it
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    assert ov.pending() == 3
    assert all(p.grad is None for p in _synth_params(model))  # not delivered yet: a raw read needs synchronize()
    before = [p.detach().clone() for p in _synth_params(model)]
    opt.step()  # synchronises first
    assert ov.pending() == 0
    assert all(p.grad is not None for p in _synth_params(model))
    assert any(not torch.equal(b, p) for b, p in zip(before, _synth_params(model)))


@pytest.mark.parametrize("point", ["synchronize", "optimizer.zero_grad", "module.zero_grad", "state_dict", "stats"])
def test_every_synchronisation_point_delivers(point):
    model = _mlp("reference", overlap=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    assert ov.pending() == 3
    iface = next(m for m in model.modules() if isinstance(m, dni.BackwardInterface))
    if point == "synchronize":
        dni.synchronize()
    elif point == "optimizer.zero_grad":
        opt.zero_grad()
    elif point == "module.zero_grad":
        model.zero_grad()
    elif point == "state_dict":
        model.state_dict()
    else:
        assert iface.stats()["count"] == 1  # the worker's statistics row is waited for
        dni.synchronize()
    assert ov.pending() == 0
    if point.endswith("zero_grad"):  # delivered, then zeroed: nothing leaks into the next step
        assert all(p.grad is None for p in _synth_params(model))
    else:
        assert all(p.grad is not None for p in _synth_params(model))


@pytest.mark.parametrize("mode", [True, "injection"])
def test_the_update_runs_off_the_main_path(monkeypatch, mode):
    """On the worker (with its own intra-op thread count), or on the caller
    only while it waits at a synchronisation point (it runs the jobs the
    worker has not started), never inside the backward."""
    seen = []
    phase = ["forward"]
    prims = bk.get("primref").primitives
    real = prims.update

    def spy(*a, **k):
        seen.append((threading.get_ident(), torch.get_num_threads(), phase[0]))
        return real(*a, **k)

    monkeypatch.setattr(bk.get("primref"), "_primitives", type(prims)(prims.forward, spy, prims.pipelined))
    n = torch.get_num_threads()
    model = _mlp("primref", overlap=mode)
    loss = F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,)))
    phase[0] = "backward"
    loss.backward()
    phase[0] = "synchronize"
    dni.synchronize()
    me = threading.get_ident()
    assert len(seen) == 3, seen
    assert all(t != me or p == "synchronize" for t, _, p in seen), seen
    assert all(k == max(1, n // 2) for t, k, _ in seen if t != me), (n, seen)  # the worker's own thread count


def test_a_waiting_caller_runs_the_jobs_the_worker_has_not_started():
    release, started = threading.Event(), threading.Event()
    ran = []
    ov.submit(lambda: (started.set(), release.wait(10), ran.append(("blocker", threading.get_ident())))[:0], [], [],
              torch.device("cpu"))
    assert started.wait(10)  # the worker is inside the blocker
    for i in range(2):
        ov.submit(lambda i=i: (ran.append((i, threading.get_ident())),)[:0], [], [], torch.device("cpu"))
    threading.Timer(0.5, release.set).start()
    ov._worker.wait()  # runs jobs 0 and 1 here while the worker is stuck in the blocker
    me = threading.get_ident()
    assert dict(ran)[0] == me and dict(ran)[1] == me and dict(ran)["blocker"] != me, ran
    assert [k for k, _ in ran] == [0, 1, "blocker"]
    dni.synchronize()
    assert ov.pending() == 0


def test_a_worker_error_surfaces_with_its_traceback_and_nothing_is_delivered(monkeypatch):
    prims = bk.get("primref").primitives

    def broken_update(*a, **k):
        raise ValueError("synthetic failure in the update")

    monkeypatch.setattr(bk.get("primref"), "_primitives", type(prims)(prims.forward, broken_update, prims.pipelined))
    model = _mlp("primref", overlap=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    before = [p.detach().clone() for p in _synth_params(model)]  # (state_dict() would synchronise, and raise)
    with pytest.raises(ValueError, match="synthetic failure") as e:
        opt.step()
    assert "broken_update" in "".join(traceback.format_tb(e.value.__traceback__))  # the worker's frames
    assert ov.pending() == 0 and all(p.grad is None for p in _synth_params(model))
    assert all(torch.equal(b, p) for b, p in zip(before, _synth_params(model)))  # the step did not happen
    monkeypatch.undo()
    bk.clear_cache()
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
    opt.step()  # and the next step works


def test_an_error_in_the_scope_discards_its_updates():
    model = _mlp("reference")
    with pytest.raises(RuntimeError, match="boom"):
        with dni.overlap():
            F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
            raise RuntimeError("boom")
    assert ov.pending() == 0 and all(p.grad is None for p in _synth_params(model))


def test_synchronising_inside_defer_backward_is_refused():
    iface = dni.BackwardInterface(dni.BasicSynthesizer(6), overlap=True)
    lin = nn.Linear(6, 6)
    iface(lin(torch.randn(3, 6))).sum().backward()
    assert ov.pending() == 1
    with dni.defer_backward():
        with pytest.raises(ov.OverlapError, match="inside defer_backward"):
            dni.synchronize()
    dni.synchronize()


def test_defer_backward_with_overlap_gives_the_same_gradients(one_thread):
    """Truncated BPTT: real and synthetic gradients through one graph."""
    def run(overlap):
        torch.manual_seed(0)
        cell = nn.RNNCell(4, 6)
        iface = dni.BackwardInterface(dni.BasicSynthesizer(6, n_hidden=1), overlap=overlap)
        h = torch.zeros(2, 6)
        with dni.defer_backward():
            for t in range(3):
                h = cell(torch.randn(2, 4), h)
                dni.backward((h ** 2).sum())
            iface.backward(h)
            h = iface.make_trigger(h.detach())
        (h.sum()).backward()
        dni.synchronize()
        return [p.grad.clone() for p in [*cell.parameters(), *iface.parameters()]]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_pipelined_and_overlap_cannot_be_combined():
    with pytest.raises(ValueError, match="cannot be combined"):
        dni.BackwardInterface(dni.BasicSynthesizer(4), pipelined=True, overlap=True)


def test_under_ddp_the_update_runs_inline(monkeypatch):
    """DDP's reducer must see every gradient in its backward: inside a DDP
    forward the update is not deferred."""
    model = _mlp("reference", overlap=True)
    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", object())
    out = model(torch.randn(8, 32))
    monkeypatch.undo()
    F.cross_entropy(out, torch.randint(0, 5, (8,))).backward()
    assert ov.pending() == 0 and all(p.grad is not None for p in _synth_params(model))


def test_models_with_overlapped_interfaces_still_pickle(tmp_path):
    model = _mlp("reference", overlap=True)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(i.overlap for i in loaded.modules() if isinstance(i, dni.BackwardInterface))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", [True, "injection"])  # injection: inline on CUDA tensors
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_cuda_side_stream_gives_the_same_parameters(backend, mode):
    if not dni.backend_status(backend, "cuda")[0]:
        pytest.skip(f"{backend} unavailable on cuda")

    def run(overlap):
        model = _mlp(backend).cuda()
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        torch.manual_seed(1)
        with dni.overlap(overlap):
            for _ in range(8):
                x, y = torch.randn(16, 32, device="cuda"), torch.randint(0, 5, (16,), device="cuda")
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return {k: v.float().cpu() for k, v in model.state_dict().items()}

    a, b = run(False), run(mode)
    for k in a:  # docs/design.md §6: same kernels on another stream; TF32 may differ by scheduling only
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_cuda_graph_capture_of_an_overlapped_step(backend):
    """The whole training step captured in one CUDA graph with overlap on: the
    update is launched on the side stream by the capturing thread (a parallel
    branch of the graph), and replays train like eager steps without overlap."""
    if not dni.backend_status(backend, "cuda")[0]:
        pytest.skip(f"{backend} unavailable on cuda")
    torch.manual_seed(1)
    data = [(torch.randn(16, 32, device="cuda"), torch.randint(0, 5, (16,), device="cuda")) for _ in range(8)]

    def make():
        model = _mlp(backend, track_stats=False).cuda()
        return model, torch.optim.Adam(model.parameters(), 1e-2, capturable=True)

    model, opt = make()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = {k: v.float().cpu() for k, v in model.state_dict().items()}

    model, opt = make()
    sx, sy = data[0][0].clone(), data[0][1].clone()
    with dni.overlap():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (3 of the 8 steps) outside the graph, as PyTorch's recipe asks
            for x, y in data[:3]:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        sx.copy_(data[3][0])
        sy.copy_(data[3][1])
        with torch.cuda.graph(g):
            F.cross_entropy(model(sx), sy).backward()
            opt.step()
        assert ov.pending() == 0  # delivered inside the capture
        g.replay()  # step 4 (capture itself does not run the step)
        for x, y in data[4:]:
            sx.copy_(x)
            sy.copy_(y)
            g.replay()
    torch.cuda.synchronize()
    got = {k: v.float().cpu() for k, v in model.state_dict().items()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


# --- faults found in review: each test fails without its fix -------------------------------------------------------
def _recipe_run(backend, mode, recipe, steps=3):
    """Train the small MLP with a standard recipe that reads .grad inside or before step()."""
    model = _mlp(backend)
    torch.manual_seed(1)
    data = [(torch.randn(16, 32), torch.randint(0, 5, (16,))) for _ in range(steps)]
    if recipe == "lbfgs":
        opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    elif recipe == "sgd_closure":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), 1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if recipe == "scaler" else None
    with dni.overlap(mode):
        for x, y in data:
            if recipe in ("lbfgs", "sgd_closure"):
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure) if recipe == "lbfgs" else opt.step(closure=closure)
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if recipe == "clip":
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe", ["lbfgs", "sgd_closure", "clip", "scaler"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_recipes_that_read_grad_inside_step_see_the_synthesizer_gradients(backend, recipe, one_thread):
    # step(closure): the closure's backward queues updates after the step pre-hook ran; clip_grad_norm_ and
    # GradScaler.unscale_ read every .grad before step(). Each is a synchronisation point now.
    want = _recipe_run(backend, False, recipe)
    got = _recipe_run(backend, True, recipe)
    bad = {k: (want[k] - got[k]).abs().max().item() for k in want if not torch.equal(want[k], got[k])}
    assert not bad, f"{recipe}: parameters differ from the run without overlap: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_through_an_overlapped_update_accumulates_nothing(backend):
    # As without overlap: torch.autograd.grad fills no .grad, so no update may be queued for later delivery.
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    iface = dni.BackwardInterface(dni.BasicSynthesizer(6, n_hidden=1), backend=backend)
    x = torch.randn(4, 6, requires_grad=True)
    with dni.overlap():
        h = iface.make_trigger(lin(x))
        (gx,) = torch.autograd.grad((h ** 2).sum(), x)
        assert ov.pending() == 0
    assert all(p.grad is None for p in iface.synthesizer.parameters())
    assert gx.abs().sum() > 0


def test_a_caller_running_a_taken_job_that_fills_the_stats_ring_does_not_hang():
    # The caller takes a queued injection at a synchronisation point; the update it reaches fills the lower
    # interface's statistics ring, whose fold used to wait for every pending job, the running one included.
    model = _mlp("reference", depth=3)
    lower = [m for m in model.modules() if isinstance(m, dni.BackwardInterface)][0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def fwd_bwd():
        F.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 5, (16,))).backward()

    done = threading.Event()
    errors = []

    def run():
        try:
            with dni.overlap("injection"):
                for _ in range(SynthStats.CAPACITY):
                    opt.zero_grad()
                    fwd_bwd()
                    opt.step()
                opt.zero_grad()
                gate = threading.Event()
                ov.submit(lambda: (gate.wait(1.0),)[:0], [], [], torch.device("cpu"))  # keeps the worker busy
                fwd_bwd()
                opt.step()  # the caller runs the queued injection itself
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(60), "training with overlap='injection' hung when a statistics ring filled"
    assert not errors, errors
    assert lower.stats()["count"] == SynthStats.CAPACITY + 1  # the ring set aside inside the job is folded later


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_warns_once_when_the_callers_threads_leave_no_core_free(backend, monkeypatch):
    """The CPU worker shares the cores with the caller's intra-op threads: when those use every core it only
    competes with them (slower than no overlap, docs/decoupled.md), and a PerformanceWarning says so, once."""
    import warnings

    threads = torch.get_num_threads()
    model = _mlp(backend, overlap=True)

    def step():
        F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 5, (8,))).backward()
        dni.synchronize()

    try:
        for cores, warned in ((threads + 1, False), (threads, True)):
            monkeypatch.setattr(ov, "_no_free_core_warned", False)
            monkeypatch.setattr(ov, "available_cores", lambda c=cores: c)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                step()
                step()  # once per process, not once per job
            hits = [x for x in w if issubclass(x.category, dni.PerformanceWarning)]
            assert len(hits) == int(warned), [str(x.message) for x in w]
            if warned:
                msg = str(hits[0].message)
                assert f"{threads} intra-op threads already use all {cores} cores" in msg
                assert f"torch.set_num_threads({max(1, cores - 1)})" in msg
    finally:
        torch.set_num_threads(threads)


# -- review fixes (each fails without its fix) ----------------------------------------------------------------
def test_an_interface_unpickled_or_switched_on_later_installs_the_synchronisation_points(monkeypatch, tmp_path):
    """Overlap decided after construction (an unpickled model, ``iface.overlap = True``) still delivers at the
    optimizer's step: the hooks were installed only by the constructor and overlap(), so the synthesizer never
    trained and its updates piled up."""
    was, real, calls = ov._hooks_installed, ov._install_hooks, []

    def spy():  # (hooks installed earlier in this process are not installed twice)
        calls.append(1)
        if was:
            ov._hooks_installed = True
        else:
            real()

    monkeypatch.setattr(ov, "_hooks_installed", False)
    monkeypatch.setattr(ov, "_install_hooks", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), dni.BackwardInterface(dni.BasicSynthesizer(16), backend="reference"),
                          nn.Linear(16, 3))
    model[1].overlap = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model[1].parameters()]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    assert calls and ov._hooks_installed and ov.pending() == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model[1].parameters()))


@pytest.mark.parametrize("how", ["inputs", "grad"])
def test_reference_overlap_under_backward_inputs_and_autograd_grad(how):
    """Under backward(inputs=...) or torch.autograd.grad the engine decides where gradients go: the reference
    backend's overlapped update runs inline there (it used to drop the synthesizer's gradient)."""
    def run(overlap):
        torch.manual_seed(0)
        lin, head = nn.Linear(6, 6), nn.Linear(6, 1)
        iface = dni.BackwardInterface(dni.BasicSynthesizer(6, n_hidden=1), backend="reference", overlap=overlap)
        with torch.no_grad():
            for p in iface.parameters():
                p.normal_(0, 0.3)
        params = [*lin.parameters(), *iface.parameters(), *head.parameters()]
        loss = head(iface(lin(torch.randn(4, 6)))).sum()
        if how == "inputs":
            loss.backward(inputs=params)
            dni.synchronize()
            return [p.grad for p in iface.parameters()]
        return list(torch.autograd.grad(loss, params, allow_unused=True))[2:2 + len(list(iface.parameters()))]

    for a, b in zip(run(False), run(True)):
        assert a is not None and b is not None and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_cast_between_backward_and_step_is_a_synchronisation_point(backend):
    """``.double()`` with an update pending: delivered first (the reference job lost its gradients, and the
    native one raced the cast)."""
    def run(overlap):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), dni.BackwardInterface(dni.BasicSynthesizer(16, n_hidden=1),
                                                                   backend=backend, overlap=overlap),
                          nn.Linear(16, 3))
        with torch.no_grad():
            for p in m[1].parameters():
                p.normal_(0, 0.3)
        F.cross_entropy(m(torch.randn(32, 8)), torch.randint(0, 3, (32,))).backward()
        m.double()
        dni.synchronize()
        return [p.grad for p in m[1].parameters()]

    for a, b in zip(run(False), run(True)):
        assert b is not None and b.dtype == torch.float64 and torch.equal(a, b)


def test_injection_below_a_non_reentrant_checkpoint_runs_inline(one_thread):
    """A non-reentrant checkpoint below an interface recomputes its forward in the backward, resetting the
    process-wide RNG: run on the worker it raced the main thread's draws. Such an injection runs inline."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 5)
            self.iface = dni.BackwardInterface(dni.BasicSynthesizer(64, n_hidden=1), backend="reference")

        def lower(self, t):
            return F.dropout(torch.relu(self.a(t)), 0.5, training=True)

        def forward(self, x):
            h = self.iface(checkpoint(self.lower, x, use_reentrant=False))
            return self.b(F.dropout(h, 0.5, training=True))

    def train(mode):
        net = Net()
        opt = torch.optim.SGD(net.parameters(), 0.1)
        torch.manual_seed(1)
        with dni.overlap(mode):
            for _ in range(3):
                x, y = torch.randn(16, 32), torch.randint(0, 5, (16,))
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        return net.state_dict(), torch.rand(3)

    (a, ra), (b, rb) = train(False), train("injection")
    assert torch.equal(ra, rb) and all(torch.equal(a[k], b[k]) for k in a)
    h = checkpoint(lambda t: torch.relu(t * 2), torch.randn(3, 4, requires_grad=True), use_reentrant=False)
    assert ov._leaves(h) is None


def test_injection_into_a_hooked_leaf_trigger_runs_its_hook_once():
    for mode in (False, "injection"):
        iface = dni.BackwardInterface(dni.BasicSynthesizer(6), backend="reference")
        x = torch.randn(4, 6, requires_grad=True)
        calls = []
        x.register_hook(lambda g: calls.append(1))
        with dni.overlap(mode):
            iface(x)
        assert len(calls) == 1, mode


def test_normalised_target_scale_waits_for_the_injections_in_flight(one_thread):
    """Gradient accumulation under overlap="injection": the next micro-batch's forward reads the target scale
    that the last backward's injection (on the worker) sets, as without overlap."""
    import time

    def run(mode):
        torch.manual_seed(0)
        S = lambda: dni.BasicSynthesizer(16, n_hidden=1)  # noqa: E731
        m = nn.Sequential(nn.Linear(8, 16), dni.BackwardInterface(S(), backend="reference", normalize_targets=True),
                          nn.ReLU(), nn.Linear(16, 16),
                          dni.BackwardInterface(S(), backend="reference", normalize_targets=True),
                          nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            for i in (1, 4):
                for p in m[i].parameters():
                    p.normal_(0, 0.3)
        m[3].register_full_backward_hook(lambda *a: time.sleep(0.05))  # a slow layer between the interfaces
        opt = torch.optim.SGD(m.parameters(), 0.1)
        torch.manual_seed(1)
        sig = []
        with dni.overlap(mode):
            opt.zero_grad()
            for _ in range(2):
                x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
                sig.append(m[1].target_sigma().item())
                F.cross_entropy(m(x), y).backward()
            opt.step()
        return sig, m.state_dict()

    (sa, a), (sb, b) = run(False), run("injection")
    assert sa == sb and all(torch.equal(a[k], b[k]) for k in a)


def test_jobs_raised_by_a_job_are_delivered_right_after_it():
    """Whichever thread ran an injection, the updates it reached are delivered right after it (their order
    decided the rounding of accumulated gradients)."""
    w = ov._worker
    order = []
    parent = ov._Job(lambda: (w.submit(ov._Job(lambda: (order.append("child"),)[:0], [], 0, None)),
                              order.append("parent"))[:0], [], 0, None)
    w._execute(parent, None)
    assert [j is parent for j in [parent, *parent.children]] == [True, False]
    w.pending.append(parent)
    later = ov._Job(lambda: (), [], 0, None)
    w._execute(later, None)
    w.pending.append(later)
    assert w.take() == [parent, parent.children[0], later]


def test_a_synchronisation_point_inside_an_overlapped_update_raises_clearly():
    job = ov._Job(lambda: (dni.synchronize(),), [], 0, None)
    w = ov._worker
    done = ov._Job(lambda: (), [], 0, None)
    w._execute(done, None)
    w.pending.append(done)  # something pending
    w._execute(job, None)
    assert isinstance(job.error, ov.OverlapError) and "inside an overlapped update" in str(job.error)
    ov.discard()


def test_set_overlap_false_turns_it_off_even_when_a_pending_update_failed():
    ov.set_overlap(True)
    ov._worker.submit(ov._Job(lambda: (_ for _ in ()).throw(ValueError("boom")), [], 0, None))
    with pytest.raises(ValueError, match="boom"):
        ov.set_overlap(False)
    assert ov.get_overlap() is False


def test_kernels_in_the_triton_interpreter_never_go_to_the_worker():
    """Triton's interpreter is not thread-safe (a launch on the worker broke the main thread's): its updates
    run inline, with overlap on."""
    if not bk.get("triton").status(torch.device("cpu"))[0]:
        pytest.skip("triton not importable")
    torch.manual_seed(0)
    lin = nn.Linear(5, 6)
    iface = dni.BackwardInterface(dni.BasicSynthesizer(6, n_hidden=2), backend="triton", overlap=True)
    h = lin(torch.randn(4, 5))
    iface.make_trigger(h).pow(2).sum().backward(retain_graph=True)
    assert ov.pending() == 0 and all(p.grad is not None for p in iface.synthesizer.parameters())
    iface.backward(h, factor=0.3)
    dni.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooked_synthesizer_parameters_get_their_gradients_under_overlap(backend):
    """A tensor hook on a synthesizer parameter (a clamp) runs in the main backward with the real gradient:
    the overlapped update returned None there, and the hook crashed."""
    def run(overlap):
        torch.manual_seed(0)
        lin = nn.Linear(6, 6)
        synth = dni.BasicSynthesizer(6, n_hidden=1)
        with torch.no_grad():
            for p in synth.parameters():
                p.normal_(0, 0.3)
        seen = []
        for p in synth.parameters():
            p.register_hook(lambda g: seen.append(g is not None) or g.clamp(-0.5, 0.5))
        iface = dni.BackwardInterface(synth, backend=backend, overlap=overlap)
        (iface(lin(torch.randn(8, 6))) * torch.randn(8, 6)).sum().backward()
        dni.synchronize()
        return [p.grad for p in synth.parameters()], seen

    (a, _), (b, seen) = run(False), run(True)
    assert seen and all(seen) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_normalised_targets_never_wait_for_the_worker(monkeypatch, one_thread):
    """normalize_targets read the running scale by waiting for every pending job, inside the backward and at
    each forward: the overlapped updates ran serially again."""
    waits = []
    real = ov._Worker.wait
    monkeypatch.setattr(ov._Worker, "wait", lambda self: waits.append(1) or real(self))
    for mode in (True, "injection"):
        m = _mlp("reference", normalize_targets=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with dni.overlap(mode):
            for _ in range(3):
                waits.clear()
                F.cross_entropy(m(torch.randn(16, 32)), torch.randint(0, 5, (16,))).backward()
                assert not waits, mode  # nothing waited between the forward and the synchronisation point
                opt.step()
                opt.zero_grad()


# -- review, stop 23: overlap as users combine it ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
def test_overlap_under_copying_saved_tensor_hooks_trains_the_synthesizers(backend, one_thread):
    """save_on_cpu's pack copies: the fused node's saved parameters unpack as copies, and the worker's
    gradients were delivered to those, so the lower synthesizer never trained (no error)."""
    hooks = lambda: torch.autograd.graph.save_on_cpu(pin_memory=False)  # noqa: E731
    want = _train(_mlp(backend), 3, lambda: dni.overlap(False), around=hooks)
    got = _train(_mlp(backend), 3, lambda: dni.overlap(True), around=hooks)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("backend", ["reference"] + fused_backends("cpu"))
def test_overlap_with_a_parametrized_synthesizer_layer(backend, one_thread):
    """weight_norm's weight is not a leaf: its graph was freed by the main backward before the worker's
    gradients were delivered ("Trying to backward through the graph a second time"). It updates inline."""
    def synth(w):
        s = dni.BasicSynthesizer(w, n_hidden=1)
        torch.nn.utils.parametrizations.weight_norm(s.input_trigger)  # (layers[-1] starts at zero)
        return s

    want = _train(_mlp(backend, synth=synth), 3, lambda: dni.overlap(False))
    got = _train(_mlp(backend, synth=synth), 3, lambda: dni.overlap(True))
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_injection_overlap_keeps_a_ridge_fit_below_inline(one_thread):
    """The upper interface's offloaded injection reached the lower RidgeSynthesizer's fit on the worker, racing
    the next micro-batch's forward (gradient accumulation): wrong numbers, different from run to run."""
    # (wide: a fit long enough for the next forward to overlap it)
    net = lambda: _mlp("reference", width=512, depth=3, synth=dni.RidgeSynthesizer)  # noqa: E731
    want = _train(net(), 2, lambda: dni.overlap(False), accum=3, batch=64)
    for _ in range(3):
        got = _train(net(), 2, lambda: dni.overlap("injection"), accum=3, batch=64)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_overlap_inside_torch_compile_runs_the_update_inline():
    """The worker's backward through a compiled synthesizer graph (retain_graph) was refused once dynamo
    recompiled (donated buffers): the next optimizer step raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), dni.BackwardInterface(dni.BasicSynthesizer(16, n_hidden=1),
                                                                              backend="reference"), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    compiled = torch.compile(model)
    with dni.overlap(True):
        for b in (8, 5, 3):
            opt.zero_grad()
            F.cross_entropy(compiled(torch.randn(b, 10)), torch.randint(0, 4, (b,))).backward()
            opt.step()
    torch._dynamo.reset()


@pytest.mark.parametrize("opts", [{"normalize_targets": True}, {"check_finite": True}])
def test_an_inplace_op_after_the_interface_works_with_every_option(opts):
    """The options' identity nodes returned views: nn.ReLU(inplace=True) after the interface was refused."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 8)
    iface = dni.BackwardInterface(dni.BasicSynthesizer(8), backend="reference", **opts)
    h = torch.relu_(iface(lin(torch.randn(4, 6))))
    h.sum().backward()
    assert lin.weight.grad is not None


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_a_spectral_norm_synthesizer_runs_its_power_iteration_as_often_as_on_reference(backend):
    """The fused paths' dtype probes read the parametrized .weight: one or two power iterations a step more
    than reference, so the runs drifted apart (1.8e-3 after 30 steps)."""
    def synth(w):
        s = dni.BasicSynthesizer(w, n_hidden=1)
        torch.nn.utils.parametrizations.spectral_norm(s.input_trigger)
        return s

    # SGD: Adam's normalised steps would turn the backends' float rounding into visible differences
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    want = _train(_mlp("reference", synth=synth), 6, contextlib.nullcontext, optimizer=sgd)
    got = _train(_mlp(backend, synth=synth), 6, contextlib.nullcontext, optimizer=sgd)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
