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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 6), (2, 2, 6)])
def test_an_unused_interface_output_counts_as_a_zero_true_gradient(backend, shape):
    # A downstream op that returns None for the interface's output: as on reference, g = 0 and the update runs.
    def grads(b):
        torch.manual_seed(0)
        synth = dni.BasicSynthesizer(6, n_hidden=1)
        with torch.no_grad():
            for p in synth.parameters():
                p.normal_(0, 0.3)
        it = dni.BackwardInterface(synth, backend=b)
        x = torch.randn(*shape, requires_grad=True)
        w = torch.ones((), requires_grad=True)
        z = it.make_trigger(x * 1)
        _Drop.apply(z, w).sum().backward()  # a Function that returns None for z: the node gets no gradient
        assert w.grad is not None
        return [p.grad.clone() for p in synth.parameters()]

    for a, b in zip(grads("reference"), grads(backend)):
        torch.testing.assert_close(b, a)


class _Drop(torch.autograd.Function):
    """``t * w``, but no gradient for ``t`` (a gated or straight-through op)."""

    @staticmethod
    def forward(ctx, t, w):
        return t * w

    @staticmethod
    def backward(ctx, g):
        return None, g.sum().reshape(())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_mode_across_a_change_of_compute_dtype(backend):
    # autocast switched on after an fp32 step: one fused launch cannot mix dtypes, so the pending update runs alone
    def run(b):
        torch.manual_seed(0)
        synth = dni.BasicSynthesizer(6, n_hidden=1)
        it = dni.BackwardInterface(synth, backend=b, pipelined=True)
        for amp in (False, True, False):
            x = torch.randn(3, 6, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = it(x * 1)
            (out.float() ** 2).sum().backward()
        it.flush()
        return [p.grad.clone() for p in synth.parameters()]

    for a, b in zip(run("reference"), run(backend)):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bf16 steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("synth", ["basic", "ridge"])
def test_a_synthesizer_narrower_than_its_trigger_is_named(backend, synth):
    # S would broadcast against the true gradient (reference) or fail obscurely at the backward: refused at once
    make = dni.BasicSynthesizer if synth == "basic" else dni.RidgeSynthesizer
    with pytest.raises(ValueError, match="output_dim == the trigger's last dim"):
        dni.BackwardInterface(make(1, trigger_dim=6), backend=backend)


@pytest.mark.parametrize("mode", [None, True, "injection"])
def test_gradient_isolation_guard_accepts_an_interface_whose_injection_runs_on_the_worker(mode):
    from dni_fast.local import AuxClassifier, GradientIsolated

    class Good(nn.Module):  # module 1 feeds its input straight into a BackwardInterface: legitimate
        def __init__(self):
            super().__init__()
            self.bi = dni.BackwardInterface(dni.BasicSynthesizer(5), backend="reference", overlap=mode)
            self.lin = nn.Linear(5, 4)

        def forward(self, h):
            return self.lin(self.bi(h))

    torch.manual_seed(0)
    m0, m1 = nn.Sequential(nn.Linear(6, 5), nn.ReLU()), Good()
    for p in m1.bi.parameters():
        nn.init.normal_(p, std=0.1)
    gi = GradientIsolated([m0, m1], [None, AuxClassifier(4, 3, kind="mlp", conv_layers=0)],
                          lambda p: torch.optim.SGD(p, lr=0.1))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(2):
        gi.step(x, y)
    dni.synchronize()
    assert m0[0].weight.grad is not None and m0[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("example,argv,message", [
    ("quickstart", ["--normalize-targets"], "--normalize-targets is not implemented"),
    ("mnist_full_unlock", ["--normalize-targets", "all"], "--normalize-targets is not implemented"),
    ("copy_task", ["--valid", "500"], "--valid is not implemented"),
    ("ptb_lm", ["--valid", "500"], "--valid is not implemented"),
    ("mnist_mlp", ["--synth", "ridge", "--normalize-target", "all"], "unrecognized arguments"),  # no abbreviations
    ("mnist_mlp", ["--threads", "-1"], "argument --threads"),
    ("mnist_mlp", ["--batch-size", "0"], "argument --batch-size"),
    ("mnist_mlp", ["--epochs", "-1"], "argument --epochs"),
])
def test_examples_refuse_options_they_would_ignore_or_misread(example, argv, message, capsys):
    import importlib

    mod = importlib.import_module(f"dni_fast.examples.{example}")
    with pytest.raises(SystemExit):
        mod.main(["--quick", "--no-progress"] + argv)
    assert message in capsys.readouterr().err


def test_summarize_reads_the_distributed_examples_logs():
    import glob

    from dni_fast.diagnostics import summarize

    logs = sorted(glob.glob("docs/logs/distributed/*.json"))
    if not logs:
        pytest.skip("no distributed logs in this checkout")
    for log in logs:  # their records name a method, not a variant
        assert "test_acc" in summarize(log)


@pytest.mark.parametrize("factor", ["float32(0.5)", "int64(2)", "float64(0.25)", "array(0.5)"])
def test_backward_accepts_a_numpy_scalar_factor(factor):
    np = pytest.importorskip("numpy")  # a declared dependency, but absent from some GPU images
    factor = eval("np." + factor)
    # dni-pytorch multiplies by whatever factor it is given
    def grad(f):
        torch.manual_seed(0)
        synth = dni.BasicSynthesizer(4)
        with torch.no_grad():
            for p in synth.parameters():
                p.normal_(0, 0.3)
        it = dni.BackwardInterface(synth, backend="reference")
        x = torch.randn(3, 4, requires_grad=True)
        it.backward(x * 1, f)
        return x.grad

    torch.testing.assert_close(grad(factor), grad(float(factor)))
    with pytest.raises(ValueError, match="finite number"):
        grad(np.float32("nan"))


def test_backward_in_eval_mode_is_a_no_op_whatever_the_factor():
    it = dni.BackwardInterface(dni.BasicSynthesizer(4)).eval()
    x = torch.randn(3, 4, requires_grad=True)
    it.backward(x * 1, None)  # dni-pytorch checks nothing in eval mode
    assert x.grad is None


# ----------------------------------------------------------------------------- third review round: the contract
def _randomized(synth, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in synth.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return synth


class _Half(dni.BasicSynthesizer):
    def forward(self, trigger, context=None):
        return super().forward(trigger, context) * 0.5


def _hooked(kind):
    torch.manual_seed(0)
    if kind == "subclass":
        return _randomized(_Half(64))
    s = _randomized(dni.BasicSynthesizer(64, n_hidden=1))
    if kind == "hook":
        s.register_forward_hook(lambda m, i, o: o * 0.5)
    elif kind == "layer_hook":
        s.layers[0].register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    elif kind == "weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(s.input_trigger)  # old style: a forward pre-hook
    elif kind == "no_bias":
        s.input_trigger = nn.Linear(64, 64, bias=False)
    return s


def _two_steps(synth, backend):
    torch.manual_seed(1)
    it = dni.BackwardInterface(synth, backend=backend)
    opt = torch.optim.SGD(synth.parameters(), lr=0.1)
    out = []
    for _ in range(2):
        x = torch.randn(32, 64, requires_grad=True)
        h = it(x * 1.0)
        (h * torch.randn(32, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        out.append(x.grad)
    return out + [p.detach().clone() for p in synth.parameters()]


@pytest.mark.parametrize("kind", ["subclass", "hook", "layer_hook", "weight_norm", "no_bias"])
def test_a_basic_synthesizer_the_fused_paths_would_miscompute_runs_its_modules(kind):
    """An overridden forward, a module hook or a replaced layer: the fused backends read the parameters
    without calling the modules, so auto runs the synthesizer on reference (the same numbers as dni-pytorch,
    whose forward calls the modules); so does a named fused backend, with a PerformanceWarning naming why (the
    contract: a synthesizer the fused paths cannot run goes through plain autograd, never an error)."""
    s = _hooked(kind)
    assert s.fused_blocker() is not None
    auto = _two_steps(s, None)
    ref = _two_steps(_hooked(kind), "reference")
    for a, b in zip(auto, ref):
        assert torch.equal(a, b)
    from dni_fast import backends

    backends._warned_blocked.clear()  # (said once per backend and reason in a process)
    for name in [b for b in fused_backends("cpu")]:
        with pytest.warns(dni.PerformanceWarning, match=f"backend '{name}' cannot fuse this BasicSynthesizer"):
            named = _two_steps(_hooked(kind), name)
        for a, b in zip(named, ref):
            assert torch.equal(a, b)
    with pytest.raises(TypeError, match="pipelined=True"):
        dni.BackwardInterface(_hooked(kind), pipelined=True)


def test_a_parametrized_basic_synthesizer_still_fuses():
    s = dni.BasicSynthesizer(8, n_hidden=1)
    torch.nn.utils.parametrizations.weight_norm(s.layers[0])
    assert s.fused_blocker() is None


class _Scaled(dni.BackwardInterface):
    def backward(self, trigger, factor=1):
        super().backward(trigger, factor * 0.1)


class _Doubled(dni.ForwardInterface):
    def receive(self, trigger):
        return super().receive(trigger) * 2


class _BiSend(dni.BidirectionalInterface):
    def send(self, message, trigger):
        self.forward_interface.send(message, trigger)  # no synthetic gradient into the message


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interface_subclass_overriding_its_methods_changes_forward_as_in_dni_pytorch(backend):
    """dni-pytorch's forward calls backward/make_trigger (BackwardInterface) and send/receive (the others):
    a subclass overriding them gets that composition, not the fused shortcut."""
    def injected(cls):
        torch.manual_seed(0)
        synth = _randomized(dni.BasicSynthesizer(8))
        x = torch.randn(4, 8, requires_grad=True)
        cls(synth, backend=backend)(x * 1.0)
        return x.grad

    torch.testing.assert_close(injected(_Scaled), 0.1 * injected(dni.BackwardInterface))
    torch.manual_seed(0)
    f = _Doubled(_randomized(dni.BasicSynthesizer(8)), backend=backend)
    m, x = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(f(m, x), 2 * dni.ForwardInterface.receive(f, x))  # the override was used
    torch.manual_seed(0)
    bi = _BiSend(_randomized(dni.BasicSynthesizer(8)), _randomized(dni.BasicSynthesizer(8), seed=4), backend=backend)
    m = torch.randn(4, 8, requires_grad=True)
    bi(m * 1.0, torch.randn(4, 8))
    assert m.grad is None  # the overridden send injected nothing


def test_basic_synthesizer_takes_numpy_integer_sizes():
    np = pytest.importorskip("numpy")
    s = dni.BasicSynthesizer(np.int64(16), n_hidden=np.int32(1), context_dim=np.int64(10))
    assert (s.output_dim, s.n_hidden, s.context_dim) == (16, 1, 10) and type(s.output_dim) is int
    with pytest.raises(ValueError, match="output_dim must be a positive int"):
        dni.BasicSynthesizer(np.float32(16))
    with pytest.raises(ValueError, match="n_hidden must be a non-negative int"):
        dni.BasicSynthesizer(16, n_hidden=True)


# ----------------------------------------------------------------------------- the C++ extension's review
CPP = [b for b in ("cpp",) if b in BACKENDS]


def _net(backend, d=128, **kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), dni.BackwardInterface(dni.BasicSynthesizer(d, n_hidden=1), backend=backend,
                                                                **kw), nn.ReLU(), nn.Linear(d, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inference_mode_forward_in_train_mode_does_not_break_training(backend):
    """A validation pass under inference_mode with the model still in train mode: the statistics ring must
    not become an inference tensor that training's updates cannot write."""
    net = _net(backend)
    with torch.inference_mode():
        net(torch.randn(16, 128))
    for _ in range(3):
        torch.nn.functional.cross_entropy(net(torch.randn(16, 128)), torch.randint(0, 10, (16,))).backward()
    assert net[1].stats()["count"] == 3


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_through_a_fused_interface_is_refused(backend):
    """create_graph=True: the fused update is computed outside autograd, so a gradient penalty through it
    would be silently wrong (reference: differentiable)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    it = dni.BackwardInterface(_randomized(dni.BasicSynthesizer(8, n_hidden=1)), backend=backend)
    h = it.make_trigger(lin(torch.randn(4, 8)))
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad((h ** 3).sum(), [*lin.parameters(), *it.parameters()], create_graph=True)
    ref = dni.BackwardInterface(_randomized(dni.BasicSynthesizer(8, n_hidden=1)), backend="reference")
    h = ref.make_trigger(lin(torch.randn(4, 8)))
    g = torch.autograd.grad((h ** 3).sum(), list(ref.parameters()), create_graph=True)
    assert all(x.requires_grad for x in g)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_an_overlapped_update_whose_context_is_modified_in_place_raises(backend, one_thread):
    """Changing the context buffer in place after the backward is legal without overlap; with overlap the
    update may not have run yet, so it would silently read the new values: raised at the synchronisation
    point instead (when the update had not run before the change)."""
    from dni_fast import _overlap as ov

    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    it = dni.BackwardInterface(_randomized(dni.BasicSynthesizer(16, n_hidden=1, context_dim=4)), backend=backend)
    onehot = torch.zeros(8, 4)
    gate = __import__("threading").Event()
    real_submit = ov._worker.submit

    def held_submit(job):  # hold the Python worker's job until the buffer has changed
        compute = job.compute

        def later():
            gate.wait(10)
            return compute()
        job.compute = later
        real_submit(job)

    try:
        with dni.overlap():
            if backend == "cpp":
                # the native worker: keep it busy with nothing to hold, so check what it reports instead
                pass
            else:
                ov._worker.submit = held_submit
            with dni.synthesizer_context(onehot):
                out = it(lin(torch.randn(8, 16)))
            out.sum().backward()
            onehot.fill_(1.0)  # legal without overlap
            gate.set()
            if backend == "cpp":
                try:
                    dni.synchronize()  # the native job may have run before the change: then it is fine
                except RuntimeError as e:
                    assert "modified in place" in str(e)
            else:
                with pytest.raises(RuntimeError, match="modified in place after the backward"):
                    dni.synchronize()
    finally:
        ov._worker.submit = real_submit
        ov.discard()


@pytest.mark.parametrize("backend", CPP)
def test_the_native_overlap_worker_runs_in_a_forked_child(backend, one_thread):
    """After fork() the child has no worker thread: it must start one, not wait for one forever. (One
    intra-op thread: a forked child of a process that ran OpenMP regions hangs in its next one, a libgomp
    limitation of its own.)"""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    with dni.overlap():
        _net(backend)[1](torch.randn(16, 128, requires_grad=True) * 1).sum().backward()
        dni.synchronize()
    p = mp.get_context("fork").Process(target=_overlapped_step_then_exit, args=(backend,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0, f"the child {'hung' if alive else f'exited with {p.exitcode}'}"


def _overlapped_step_then_exit(backend):
    import os

    torch.set_num_threads(1)
    with dni.overlap():
        _net(backend)[1](torch.randn(16, 128, requires_grad=True) * 1).sum().backward()
        dni.synchronize()
    os._exit(0)


@pytest.mark.parametrize("backend", CPP)
def test_exiting_with_native_overlap_updates_pending_is_clean(backend, tmp_path):
    """Updates still queued on the native worker at interpreter exit: a clean exit (the worker once dropped
    Python-owned tensors, taking the GIL during finalisation, and the process aborted ~1 run in 3)."""
    import subprocess
    import sys

    script = tmp_path / "pending_at_exit.py"
    script.write_text(
        "import torch, dni_fast as dni\n"
        f"bi = dni.BackwardInterface(dni.BasicSynthesizer(512, n_hidden=2), backend={backend!r}, overlap=True)\n"
        "lin = torch.nn.Linear(512, 512); x = torch.randn(512, 512)\n"
        "for _ in range(3):\n"
        "    bi(lin(x)).sum().backward()\n")
    for _ in range(3):
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]


# ----------------------------------------------------------------------------- the options' review
def _pipe_model():
    torch.manual_seed(0)
    return nn.ModuleList([nn.Linear(3, 4), dni.BackwardInterface(dni.BasicSynthesizer(4, n_hidden=1),
                                                                 pipelined=True), nn.Linear(4, 2)])


def _pipe_step(m, x, opt):
    opt.zero_grad()
    (m[2](m[1](m[0](x))) ** 2).sum().backward()
    opt.step()


def test_pipelined_mode_resumes_bit_for_bit_and_a_rollback_drops_the_pending_update():
    xs = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a = _pipe_model()
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    for x in xs:
        _pipe_step(a, x, oa)
    b = _pipe_model()
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    for x in xs[:2]:
        _pipe_step(b, x, ob)
    saved = b.state_dict()
    assert any("pipelined_pending" in k for k in saved)
    c = _pipe_model()
    c.load_state_dict(saved)
    oc = torch.optim.SGD(c.parameters(), lr=0.1)
    for x in xs[2:]:
        _pipe_step(c, x, oc)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    # a rollback to a state without a pending update: the live model's pending update is dropped
    fresh = _pipe_model().state_dict()
    b.load_state_dict(fresh)
    assert b[1]._pending is None
    # without pipelined=True the keys are dni-pytorch's
    plain = dni.BackwardInterface(dni.BasicSynthesizer(4, n_hidden=1))
    assert not any("pipelined" in k for k in plain.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipelined_mode_checks_the_true_gradient_when_asked(backend):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4, n_hidden=1), pipelined=True, check_finite=True,
                               backend=backend)
    with pytest.raises(FloatingPointError, match="true gradient arriving has NaN or inf"):
        it(torch.randn(3, 4, requires_grad=True)).backward(torch.full((3, 4), float("nan")))


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_forward_without_a_graph_does_not_use_up_the_warm_up(pipelined):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4, n_hidden=1), warmup_steps=3, pipelined=pipelined)
    with torch.no_grad():
        for _ in range(3):
            it(torch.randn(2, 4))
    assert it.n_steps == 0 and it.in_warmup
    h = torch.randn(2, 4, requires_grad=True)
    it(h * 1)
    assert it.n_steps == 1 and h.grad is None  # still warming up: nothing injected


def test_a_forward_interface_refuses_a_warm_up():
    with pytest.raises(ValueError, match="a forward interface has none to hold back"):
        dni.ForwardInterface(dni.BasicSynthesizer(4, trigger_dim=3), warmup_steps=100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_stats_between_a_forward_and_its_backward_keeps_that_step(backend):
    it = dni.BackwardInterface(dni.BasicSynthesizer(4, n_hidden=1), backend=backend)
    out = it(torch.randn(2, 4, requires_grad=True) * 1)
    it.reset_stats()
    out.backward(torch.ones(2, 4))
    assert it.stats()["count"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("synth", ["basic", "ridge"])
def test_a_frozen_synthesizer_is_measured_through_forward_too(backend, synth):
    s = dni.BasicSynthesizer(4).requires_grad_(False) if synth == "basic" else dni.RidgeSynthesizer(4)
    if synth == "ridge":
        s.fitting = False
    it = dni.BackwardInterface(s, backend=backend)
    lin, head = nn.Linear(3, 4), nn.Linear(4, 2)
    head(it(lin(torch.randn(2, 3)))).sum().backward()
    assert lin.weight.grad is not None  # the injection still reached the layer below
    h = torch.randn(2, 4, requires_grad=True)
    it.make_trigger(h * 1).sum().backward()
    assert it.stats()["count"] == 2


def test_bf16_in_the_triton_interpreter_is_refused():
    b = bk.get("triton")
    if not b.interpreted(torch.device("cpu")) or not b.status(torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is not in use here")
    it = dni.BackwardInterface(dni.BasicSynthesizer(16, n_hidden=1), backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(dni.BackendUnavailableError,
                                                                     match="interpreter"):
        it(nn.Linear(16, 16)(torch.randn(4, 16)))
    assert bk.resolve("auto", dni.BasicSynthesizer(16, n_hidden=1),
                      torch.randn(4, 16, dtype=torch.bfloat16)).name != "triton"


# ----------------------------------------------------------------------------- the harness's review
def test_auto_picks_the_rule_measured_nearest_when_ranges_overlap(monkeypatch):
    """Neighbouring rules overlap (B/4..4B, D/2..2D): the size a rule was measured at must get that rule's
    backend, not the first listed rule's."""
    from dni_fast.backends import auto

    rules = [{"device": "cpu", "dtype": "float32", "min_rows": 4, "max_rows": 64, "min_width": 64,
              "max_width": 256, "backend": "cpp", "measured": {"B": 16, "D": 128}},
             {"device": "cpu", "dtype": "float32", "min_rows": 16, "max_rows": 256, "min_width": 128,
              "max_width": 512, "backend": "reference", "measured": {"B": 64, "D": 256}}]
    monkeypatch.setattr(auto, "_rules", rules)
    cpu = torch.device("cpu")
    assert auto.pick(cpu, torch.float32, 64, 256, lambda n: True) == "reference"
    assert auto.pick(cpu, torch.float32, 16, 128, lambda n: True) == "cpp"
    assert auto.pick(cpu, torch.float32, 20, 140, lambda n: True) == "cpp"  # nearer the first measurement


def test_an_auto_table_from_a_csv_reads_only_this_machines_rows(tmp_path):
    from benchmarks import harness as H

    row = H.Row("interface_step", "cpp", 16, 128, 128, "float32", 1, False, 1.0, 1.0, 1.0, ratio=1.5)
    H.append_csv([row], str(tmp_path / "b.csv"), {"date": "d", "device": "x86_64", "torch": "t", "triton": "-",
                                                  "python": "p", "dni_fast": "v"})
    H.append_csv([row], str(tmp_path / "b.csv"), {"date": "d", "device": "NVIDIA H200", "torch": "t",
                                                  "triton": "-", "python": "p", "dni_fast": "v"})
    assert len(H.rows_from_csv(str(tmp_path / "b.csv"))) == 2
    assert len(H.rows_from_csv(str(tmp_path / "b.csv"), device="x86_64")) == 1


def test_compare_backends_fails_when_it_compares_nothing_or_loses_an_output():
    from dni_fast.testing import assert_close, compare_backends

    rep = compare_backends(lambda: nn.Linear(3, 3), lambda m: [1.0], "reference")
    assert rep.failures and "nothing was compared" in rep.failures[0]
    calls = []

    def run(m):
        calls.append(1)
        y = m(torch.ones(2, 3))
        return (y, y.detach() * 2) if len(calls) == 1 else (y,)  # the second run (the backend) loses one

    rep = compare_backends(lambda: nn.Linear(3, 3), run, "reference")
    assert any("returned 1 tensors" in f for f in rep.failures)
    nan = torch.tensor([float("nan"), float("inf"), 1.0])
    assert_close(nan.clone(), nan)  # the same NaN and inf are agreement
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("nan"), float("inf"), 1.0]), torch.tensor([1.0, float("inf"), 1.0]))


def test_overlap_error_is_public():
    """The README tells users to catch dni.OverlapError; it was only in dni_fast._overlap."""
    from dni_fast import _overlap

    assert dni.OverlapError is _overlap.OverlapError and "OverlapError" in dni.__all__


def test_the_backend_cache_stays_bounded_under_ever_new_row_counts(monkeypatch):
    """``auto`` resolves per row count: a model fed sequences of ever new lengths grew the cache without bound."""
    from dni_fast import backends

    monkeypatch.setattr(backends, "_CACHE_MAX", 8)
    backends.clear_cache()
    synth = dni.BasicSynthesizer(4)
    for n in range(1, 40):
        backends.resolve("auto", synth, torch.randn(n, 4))
        assert len(backends._cache) <= 8
    backends.clear_cache()
