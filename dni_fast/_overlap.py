"""Drop-in overlap: the synthesizer's regression update off the main path.

With ``dni.overlap()`` (or ``dni.set_overlap(True)``, or
``BackwardInterface(..., overlap=True)``), when a true gradient reaches a
``BackwardInterface`` its regression update, the products that give every
synthesizer parameter gradient, is handed to a worker: a thread on the CPU
(running with ``max(1, torch.get_num_threads() // 2)`` intra-op threads), the
same thread launching on a side CUDA stream on a GPU (ordered with events,
no host sync). The main path goes on at once: the layers below backpropagate,
the next layers run their forward.

The worker only computes. Its gradients reach ``.grad`` through autograd (a
node whose backward returns them, run on the caller's thread) at the next
*synchronisation point*, all of them or none:

* ``dni.synchronize()``;
* any optimizer's ``step()`` (a global ``register_optimizer_step_pre_hook``,
  so optimizers made before ``overlap()`` are covered);
* ``torch.optim.Optimizer.zero_grad`` and ``torch.nn.Module.zero_grad``
  (wrapped once, the first time overlap is used; a subclass that overrides
  ``zero_grad`` without calling the base is not covered);
* ``state_dict()`` of a module that holds an overlapped interface;
* ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` (called through
  ``torch.nn.utils``; a reference bound by ``from ... import`` before the
  first overlap is not wrapped) and ``torch.amp.GradScaler.unscale_`` (so
  ``scaler.step(opt)`` unscales and checks the synthesizers' gradients too);
* ``optimizer.step(closure)``: the closure is wrapped, so the gradients of
  its backward are complete when the closure returns (LBFGS, SGD with a
  closure).

Reading an interface's ``stats()`` waits until the worker has written the
statistics rows; it delivers no gradient. A raw ``.grad`` read needs
``dni.synchronize()`` first.

Only a plain ``backward()`` hands updates to the worker. Under
``torch.autograd.grad`` or ``backward(inputs=...)`` the engine decides which
gradients reach ``.grad`` (none, under ``autograd.grad``), so the update runs
inline there, exactly as without overlap.

The worker, its pending updates and the synchronisation points are shared by
the process: ``synchronize()`` on any thread delivers every thread's pending
updates, and an exception leaving an ``overlap()`` scope discards them all.
Train with overlap from one thread at a time. The worker sets its own
intra-op thread count with ``torch.set_num_threads``, which also sets the
count that threads created afterwards start with. On the CPU the worker
needs a core the caller's intra-op threads leave free; where they use every
core it only competes with them, and the first CPU job warns once
(:class:`PerformanceWarning`).

Under CUDA graph capture (``torch.cuda.graph`` around a whole training
step, ``Adam(capturable=True)``, ``track_stats=False``) the caller launches
the update on the side stream itself, forked from and joined to the
capturing stream with events: the update is a parallel branch of the graph.

``overlap="injection"`` moves the injection too, on CPU tensors: the main
path computes ``S`` and goes on with the next layer's forward while the
worker backpropagates ``S`` through the part below (``torch.autograd.grad``
onto that part's leaves, found by walking the graph), and runs there, at
once, the updates that this backward reaches (the interface below is
regressed on what arrives from it; with ``cpp`` the update of the interface
that the main backward reaches runs there, as one native call). Its
gradients are delivered like the updates', at the synchronisation points.
The part below must be left alone until then: modifying the interface's
input in place and ``retain_grad()`` on tensors below it (not filled) are
not supported. A parameter below with a tensor hook (it would run on the
worker and again at delivery) or a reentrant ``torch.utils.checkpoint``
below (it refuses ``torch.autograd.grad``), tensors saved under
saved-tensor hooks, and an interface below with ``normalize_targets`` or a
``RidgeSynthesizer`` (their state is read by the next forward) make that
interface inject inline. On CUDA tensors, inside ``defer_backward`` and
under DDP the injection runs inline (the GPU runs it asynchronously
already).

Under ``DistributedDataParallel`` (detected during its forward), in a step
traced by ``torch.compile``, and for a synthesizer with a hooked or
parametrized (non-leaf) parameter the update runs inline instead: the
reducer must see every gradient in its backward; the worker's backward
through a compiled graph is refused; a hook must get this backward's
gradient, and a parametrized weight's graph is freed by the main backward.

The result equals the run without overlap: the same operations on the same
tensors, the gradients delivered in the order the updates arose (bit for bit
on the CPU when the worker runs with the same intra-op thread count as the
caller, e.g. at one thread; a synthesizer updated several times within one
backward pass may differ in the rounding of the sum). An exception on the
worker is raised, with its original traceback, at the next synchronisation
point; nothing from the failed batch of updates is delivered.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["overlap", "set_overlap", "get_overlap", "synchronize", "pending", "discard", "OverlapError",
           "INJECTION"]


class OverlapError(RuntimeError):
    """Misuse of overlapped execution (e.g. synchronising inside ``defer_backward``)."""


# ---------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------
class _Switch(threading.local):
    def __init__(self) -> None:
        self.stack: List[bool] = []


_switch = _Switch()
_default: Union[bool, str] = False

#: The overlap mode that moves the injection to the worker too.
INJECTION = "injection"


def mode(value) -> Union[bool, str]:
    """Normalise an overlap setting: ``False`` (off), ``True`` (the update on
    the worker; also spelt ``"update"``) or ``"injection"`` (the injection too)."""
    if value is None or value is False:
        return False
    if value is True or value == "update":
        return True
    if value == INJECTION:
        return INJECTION
    raise ValueError(f"overlap must be False, True (or 'update') or 'injection', got {value!r}")


def get_overlap() -> Union[bool, str]:
    """The overlap mode for interfaces without their own ``overlap=`` (this
    thread): ``False``, ``True`` (the update off the main path) or
    ``"injection"`` (the injection too)."""
    return _switch.stack[-1] if _switch.stack else _default


def set_overlap(enabled: Union[bool, str]) -> None:
    """Set the overlap mode process-wide (``overlap()`` scopes override it):
    ``False``, ``True`` / ``"update"`` or ``"injection"``. Turning it off
    synchronises first."""
    global _default
    m = mode(enabled)
    try:
        if not m:
            synchronize()
    finally:  # off even when a pending update raised (the error is the caller's to handle)
        _default = m
    if m:
        _install_hooks()


@contextlib.contextmanager
def overlap(enabled: Union[bool, str] = True):
    """Run the synthesizer updates of every ``BackwardInterface`` without its
    own ``overlap=`` off the main path within the scope (this thread);
    ``overlap("injection")`` moves their injections there too (CPU tensors).
    The scope ends with ``dni.synchronize()``: every gradient is complete
    after it."""
    m = mode(enabled)
    _switch.stack.append(m)
    if m:
        _install_hooks()
    try:
        yield
    except BaseException:
        _switch.stack.pop()
        discard()  # the step failed: its updates must not land in the next one
        raise
    _switch.stack.pop()
    synchronize()


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------
class _Job:
    __slots__ = ("compute", "params", "done", "grads", "error", "threads", "cuda", "children")

    def __init__(self, compute: Callable[[], Sequence[Optional[Tensor]]], params: Sequence[Tensor], threads: int,
                 cuda: Optional[dict]) -> None:
        self.compute, self.params, self.threads, self.cuda = compute, list(params), threads, cuda
        self.done = threading.Event()
        self.grads: Optional[Sequence[Optional[Tensor]]] = None
        self.error: Optional[BaseException] = None
        # Jobs this job raised while it ran (the updates an injection's backward reaches), run right there and
        # delivered right after it: their order never depends on which thread ran the parent.
        self.children: List["_Job"] = []


class _Running(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # jobs executing on this thread (a job may run another: nested)
        self.job: Optional[_Job] = None  # the innermost of them
        # inside an injection's torch.autograd.grad (ours: it stands for a backward()): its root, the trigger
        self.injecting: Optional[Tensor] = None


_running = _Running()


def injecting_into(t: Tensor) -> bool:
    """Whether the calling thread is running the offloaded injection whose root
    is ``t`` (``overlap="injection"``: its ``torch.autograd.grad`` runs CPU
    nodes on the thread that called it, the worker's or a caller's)."""
    return _running.injecting is t


def in_job() -> bool:
    """Whether the calling thread is executing an overlap job (the worker, or a
    caller that took a queued job at a synchronisation point). Such code must
    never wait for the pending jobs: one of them is itself."""
    return _running.depth > 0


class _Worker:
    """One daemon thread running jobs in submission order; a caller that waits
    for them runs the ones not started yet itself (below)."""

    def __init__(self) -> None:
        self._queue: "collections.deque[_Job]" = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.pending: List[_Job] = []  # submitted, not yet delivered; owned by the callers' threads
        self._streams: dict = {}

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="dni_fast-overlap", daemon=True)
            self._thread.start()

    @staticmethod
    def _execute(job: _Job, threads: Optional[int]) -> None:
        _running.depth += 1
        outer, _running.job = _running.job, job
        try:
            # Intra-op threads are per thread, but torch.set_num_threads on
            # another thread can change this one's too: check every job.
            if threads is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if job.cuda is None:
                job.grads = job.compute()
            else:
                c = job.cuda
                with torch.cuda.device(c["device"]), torch.cuda.stream(c["stream"]):
                    c["stream"].wait_event(c["ready"])
                    job.grads = job.compute()
                    c["done"].record(c["stream"])
        except BaseException as e:  # surfaces in the caller at the next synchronisation point
            job.error = e
        finally:
            _running.depth -= 1
            _running.job = outer
            job.done.set()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                job = self._queue.popleft()
            self._execute(job, job.threads)

    def side_stream(self, device: torch.device):
        s = self._streams.get(device.index)
        if s is None:
            s = self._streams[device.index] = torch.cuda.Stream(device)
        return s

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def run_here(self, job: _Job) -> None:
        """Run ``job`` on the calling thread now and list it as pending
        (delivered at the next synchronisation point, in order)."""
        self._execute(job, None)
        with self._lock:
            self.pending.append(job)

    def submit(self, job: _Job) -> None:
        parent = _running.job
        if parent is not None:
            # A job that a job raises (an update reached by an injection's
            # backward), on the worker or on a caller that took the job: run it
            # now, on this thread (queueing it would only delay it behind the
            # jobs the main path queued meanwhile), and deliver it right after
            # its parent, whichever thread ran which (same order, same sums).
            self._execute(job, None)
            parent.children.append(job)
            return
        with self._lock:
            self.pending.append(job)
            self._ensure_thread()
        with self._ready:
            self._queue.append(job)
            self._ready.notify()

    def wait(self) -> None:
        """Block until every submitted job has been computed (no delivery).

        The caller does not just wait: it takes the CPU jobs that the worker
        has not started, oldest first, and runs them itself (with its own
        intra-op thread count, as without overlap), so that a backlog on the
        worker is shared by both threads. The jobs are independent (each
        reads what its submitter handed it and returns gradients), so who runs
        which changes no number. A thread that is executing a job (the worker,
        or a caller running a job it took) never waits: the jobs it would wait
        for include the one it is running (statistics defer their reads there
        instead, ``stats.can_wait``)."""
        if in_job():
            return
        while True:
            with self._ready:
                job = self._queue.popleft() if self._queue and self._queue[0].cuda is None else None
            if job is None:
                break
            self._execute(job, None)
        with self._lock:
            jobs = list(self.pending)
        for job in jobs:
            while not job.done.wait(1.0):
                if self._thread is None or not self._thread.is_alive():  # cannot happen short of interpreter exit
                    raise OverlapError("dni_fast: the overlap worker thread died with updates pending")

    def take(self) -> List[_Job]:
        """The pending jobs, each followed by the jobs it raised, in submission order; none pending after."""
        with self._lock:
            jobs, self.pending = self.pending, []
        out: List[_Job] = []

        def add(js: List[_Job]) -> None:
            for j in js:
                out.append(j)
                add(j.children)

        add(jobs)
        return out


_worker = _Worker()


# The native worker of the C++ extension (csrc/overlap.cpp), once the cpp
# backend has queued an update on it: it runs the update with no GIL at all.
_native = None


def uses_native_worker() -> None:
    global _native
    if _native is None:
        from dni_fast import _ext

        _native = _ext.get_ext()
        atexit.register(_drain_native_at_exit)


def _drain_native_at_exit() -> None:
    """At interpreter exit, let the native worker finish its queued updates (dropped, never delivered) while
    the runtime is whole, rather than compute through the process's teardown."""
    if _native is not None and _native._overlap_pending():
        try:
            _native._overlap_collect()
        except Exception:
            pass


class PerformanceWarning(UserWarning):
    """A set-up that works but is likely slower than the alternative the message names."""


def worker_threads(warn: bool = True) -> int:
    """Intra-op threads of the worker: the caller's count, halved (they share the cores).
    ``warn`` (a job that computes on the CPU): warn once if the caller's threads leave no core free."""
    n = torch.get_num_threads()
    if warn and not _no_free_core_warned:
        _warn_if_no_free_core(n)
    return max(1, n // 2)


_no_free_core_warned = False


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _warn_if_no_free_core(threads: int) -> None:
    """Once per process: the CPU worker shares the cores with the caller's intra-op threads, so when those
    already use every core it only competes with them (measured slower than no overlap: docs/decoupled.md,
    "At the default two threads")."""
    global _no_free_core_warned
    _no_free_core_warned = True
    cores = available_cores()
    if threads >= cores:
        warnings.warn(f"dni_fast overlap: the worker thread computes on the CPU, but this thread's {threads} "
                      f"intra-op threads already use all {cores} cores, so the worker competes with them and the "
                      f"step is usually slower than without overlap. Leave it a core: "
                      f"torch.set_num_threads({max(1, cores - 1)}) (docs/decoupled.md).", PerformanceWarning,
                      stacklevel=4)


def _native_pending() -> int:
    return _native._overlap_pending() if _native is not None else 0


def pending() -> int:
    """Updates computed or in flight, not yet delivered to ``.grad``."""
    return len(_worker.pending) + len(_native_done) + _native_pending()


def submit(compute: Callable[[], Sequence[Optional[Tensor]]], params: Sequence[Tensor], inputs: Sequence[Tensor],
           device: torch.device) -> None:
    """Hand ``compute() -> grads`` (one per entry of ``params``, ``None`` for
    none) to the worker. ``inputs``: the tensors it reads, kept alive for it
    (and, on CUDA, marked as used on its stream)."""
    cuda = None
    if device.type == "cuda":
        stream = _worker.side_stream(device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
        for t in inputs:  # the caching allocator must not reuse them while the side stream reads them
            if isinstance(t, Tensor) and t.is_cuda:
                t.record_stream(stream)
        cuda = {"device": device, "stream": stream, "ready": ready, "done": torch.cuda.Event()}
        if torch.cuda.is_current_stream_capturing():
            # CUDA graph capture: a launch from the worker thread would not be
            # captured (it would run once, now). Launch on the side stream from
            # this thread instead: the fork (ready) and the join at delivery
            # (done) become a parallel branch of the captured graph, which is
            # the overlap when the graph replays.
            _worker.run_here(_Job(compute, params, 0, cuda))
            return
    _worker.submit(_Job(compute, params, worker_threads(warn=cuda is None), cuda))


def _leaves(root: Tensor) -> Optional[List[Tensor]]:
    """The leaves that ``root``'s backward accumulates into (the variables of
    the ``AccumulateGrad`` nodes below it), or ``None`` when one of them has a
    hook (it would run twice: on the worker and at delivery) or the graph
    holds a reentrant ``torch.utils.checkpoint`` (it refuses
    ``torch.autograd.grad``)."""
    fn = root.grad_fn
    if fn is None:
        return None if _hooked(root) else [root]
    leaves: List[Tensor] = []
    seen = {fn}
    stack = [fn]
    while stack:
        node = stack.pop()
        name = type(node).__name__
        if name == "CheckpointFunctionBackward":
            return None  # reentrant checkpointing refuses torch.autograd.grad: inject inline
        if name in ("_TargetScaleBackward", "_RefFitterBackward"):
            # an interface below with normalize_targets, or a closed-form synthesizer (RidgeSynthesizer) that
            # fits in this backward: their state (the running scale, the ridge statistics) is read by the next
            # forward, which must not wait for (or race) an injection still on the worker (gradient
            # accumulation)
            return None
        if _unpacks_with_hooks(node):
            return None
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in seen:
                continue
            seen.add(nxt)
            var = getattr(nxt, "variable", None)
            if var is None:
                stack.append(nxt)
            elif _hooked(var):
                return None
            else:
                leaves.append(var)
    return leaves


def _hooked(leaf: Tensor) -> bool:
    return bool(leaf._backward_hooks or getattr(leaf, "_post_accumulate_grad_hooks", None))


def update_inline(params: Sequence[Tensor]) -> bool:
    """Whether an update through ``params`` must run inline, not on the worker: a parameter with a tensor hook
    (an update deferred to the worker returns no gradient in the main backward, and autograd would call the
    hook with ``None``: a clamp hook crashed), or one that is not a leaf (a parametrized layer's weight:
    its graph to the leaves is freed by the main backward before the worker's gradients are delivered)."""
    return any(_hooked(p) or not p.is_leaf for p in params)


_SAVED_NAMES: dict = {}  # node type -> the names of its raw saved tensors


def _unpacks_with_hooks(node) -> bool:
    """Whether ``node`` saved a tensor under saved-tensor hooks: a non-reentrant
    ``torch.utils.checkpoint`` (its unpack recomputes the forward, resetting
    the process-wide RNG and reading the caller's thread-local state: on the
    worker it would race the main thread), ``save_on_cpu`` and the like. Such
    an injection runs inline. About 1.5 us a node."""
    tp = type(node)
    names = _SAVED_NAMES.get(tp)
    if names is None:
        names = _SAVED_NAMES[tp] = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
    for a in names:
        try:
            v = getattr(node, a)
        except RuntimeError:  # freed (retain_graph=False after a backward): nothing to unpack
            continue
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if getattr(t, "unpack_hook", None) is not None:
                return True
    return False


def inject(trigger: Tensor, s: Tensor) -> bool:
    """``trigger.backward(s)`` on the worker (``overlap="injection"``): the
    gradients of the leaves below ``trigger`` are delivered at the next
    synchronisation point. Returns ``False`` (nothing done: inject inline)
    where that cannot be honoured: a CUDA tensor, a hooked leaf, no leaf."""
    if trigger.device.type != "cpu":
        return False
    leaves = _leaves(trigger)
    if not leaves:
        return False

    def compute():
        outer, _running.injecting = _running.injecting, trigger
        try:
            return torch.autograd.grad((trigger,), leaves, (s,), allow_unused=True)
        finally:
            _running.injecting = outer

    _worker.submit(_Job(compute, leaves, worker_threads(), None))
    return True


def discard() -> None:
    """Drop every pending update (after waiting for the workers to finish them)."""
    if _worker.pending:
        _worker.wait()
        _worker.take()
    if _native_pending():
        try:
            _native._overlap_collect()
        except RuntimeError:
            pass  # dropped anyway
    _native_done.clear()  # collected early (a statistics read), never delivered: dropped too


def wait_computed() -> None:
    """Block until the workers have computed every submitted update (statistics rows included). On CUDA the
    host only knows the side stream's work was launched: the current stream then waits for it (its events),
    so that what reads the rows next on it (a statistics fold) sees them written."""
    if _worker.pending:
        _worker.wait()
        for job in list(_worker.pending):
            if job.cuda is not None:
                torch.cuda.current_stream(job.cuda["device"]).wait_event(job.cuda["done"])
    if _native_pending():
        _native_wait()


_native_done: List[tuple] = []  # collected from the native worker, not yet delivered


def _native_wait() -> None:
    _native_done.extend(_native._overlap_collect())


def synchronize() -> None:
    """Complete every synthesizer gradient: wait for the worker and deliver its
    gradients through autograd, in submission order. Raises the worker's first
    exception (with its traceback) instead, delivering none of the pending
    updates. A no-op when nothing is pending."""
    if not (_worker.pending or _native_done or _native_pending()):
        return
    if in_job():
        raise OverlapError("dni_fast: a synchronisation point (optimizer step, zero_grad, state_dict, a module's "
                           ".to(), dni.synchronize()) was reached inside an overlapped update (a hook that the "
                           "worker's backward ran): it would wait for the update it is part of. Move it out of "
                           "the hook")
    from dni_fast._manager import is_deferring

    if is_deferring():
        raise OverlapError("dni_fast: cannot synchronise overlapped updates inside defer_backward: the deferred "
                           "backward has not run yet, so the gradients it will produce cannot be complete; "
                           "synchronise (or step the optimizer) after the defer_backward scope")
    _worker.wait()
    jobs = _worker.take()
    try:
        native = list(_native_done)
        if _native_pending():
            native += _native._overlap_collect()  # raises the native worker's first failure
    finally:
        _native_done.clear()
    failed = next((j for j in jobs if j.error is not None), None)
    if failed is not None:
        raise failed.error
    # (one process uses one kind of worker per interface; the two lists are
    # delivered one after the other)
    jobs = jobs + [_NativeJob(params, grads) for params, grads in native]
    from dni_fast.backends.fused import deliver, grad_carrier

    # One engine run per group of jobs with disjoint parameters (one carrier
    # node for all of them): an engine run costs ~30 us, and most steps update
    # each synthesizer once. A parameter that comes back starts a new group, so
    # that its gradients accumulate in submission order, as without overlap.
    groups, current, seen = [], [], set()
    for job in jobs:
        if job.cuda is not None:
            main = torch.cuda.current_stream(job.cuda["device"])
            main.wait_event(job.cuda["done"])
            for g in job.grads or ():
                if isinstance(g, Tensor) and g.is_cuda:
                    # made on the side stream, used and freed on this one: the allocator must not hand the
                    # block back to the side stream before this stream's work with it is done
                    g.record_stream(main)
        live = [(g, p) for g, p in zip(job.grads, job.params) if g is not None and p.requires_grad]
        if any(id(p) in seen for _, p in live):
            groups.append(current)
            current, seen = [], set()
        current += live
        seen.update(id(p) for _, p in live)
    groups.append(current)
    for live in groups:
        if not live:
            continue
        with torch.enable_grad():
            carrier = grad_carrier([g for g, _ in live], [p for _, p in live])
        deliver(carrier)


class _NativeJob:
    __slots__ = ("params", "grads", "cuda")

    def __init__(self, params, grads) -> None:
        self.params, self.grads, self.cuda = params, grads, None


def _synchronize_quietly(*_args, **_kwargs) -> None:
    if _worker.pending or _native_done or _native_pending():
        synchronize()


# ---------------------------------------------------------------------------
# Synchronisation points (installed once, the first time overlap is used)
# ---------------------------------------------------------------------------
_hooks_installed = False


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(_step_pre_hook)

    def wrap(cls):
        orig = cls.zero_grad

        def zero_grad(self, *args, **kwargs):
            _synchronize_quietly()
            return orig(self, *args, **kwargs)

        zero_grad.__doc__ = orig.__doc__
        zero_grad.__wrapped__ = orig
        cls.zero_grad = zero_grad

    wrap(torch.optim.Optimizer)
    wrap(torch.nn.Module)
    # A module cast or moved (.to(), .double(), .cuda()) replaces its parameters' data: a pending update would
    # then write into (or read) the old tensors, and the grad accumulators are reset. Deliver first.
    _sync_first(torch.nn.Module, "_apply")
    # Readers of every .grad between backward and step: gradient clipping, and
    # GradScaler's unscale_ (its inf check and the division by the scale).
    _sync_first(torch.amp.GradScaler, "unscale_")
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad

    for name in ("clip_grad_norm_", "clip_grad_value_"):
        orig = getattr(clip_grad, name)
        _sync_first(clip_grad, name)
        if getattr(nn_utils, name, None) is orig:
            setattr(nn_utils, name, getattr(clip_grad, name))
    from dni_fast import stats

    stats.before_read = wait_computed
    stats.can_wait = lambda: not in_job()


def _sync_first(owner, name: str) -> None:
    """Replace ``owner.name`` by a function that synchronises, then calls it."""
    orig = getattr(owner, name)

    @functools.wraps(orig)
    def synced(*args, **kwargs):
        _synchronize_quietly()
        return orig(*args, **kwargs)

    setattr(owner, name, synced)


def _step_pre_hook(opt, args, kwargs):
    """Every optimizer's ``step()``: deliver the pending gradients; with a
    closure, also when the closure returns (its backward queued new ones, and
    ``step`` reads ``.grad`` right after it)."""
    _synchronize_quietly()
    # args: (optimizer, *step's positional arguments), as torch passes them to the hooks
    if "closure" in kwargs:
        closure = kwargs["closure"]
    else:
        closure = args[1] if len(args) > 1 else None
    if closure is None:
        return None

    @functools.wraps(closure)
    def closure_then_synchronize(*a, **k):
        loss = closure(*a, **k)
        _synchronize_quietly()
        return loss

    if "closure" in kwargs:
        return args, dict(kwargs, closure=closure_then_synchronize)
    return (args[0], closure_then_synchronize, *args[2:]), kwargs


def plain_backward(ctx, n: int) -> bool:
    """Inside a custom Function's backward (``ctx``) whose last ``n`` inputs are
    leaves (the synthesizer's parameters): whether the running backward
    accumulates into every one of them. True for a plain ``backward()``; False
    under ``torch.autograd.grad`` (it accumulates into nothing) or a
    ``backward(inputs=...)`` that leaves one out. An overlapped update may only
    be deferred in the first case: elsewhere the engine decides where each
    gradient goes, so the update must run inline. (The leaves' accumulator
    nodes are read off the node's own edges: ``get_gradient_edge`` per leaf
    cost ~16 us a step.)"""
    if _running.injecting is not None:  # an injection on the worker: a backward() whose gradients are delivered later anyway
        return True
    try:
        edges = ctx.next_functions[len(ctx.next_functions) - n:]  # (not [-n:]: n == 0 would take every edge)
        return all(torch._C._will_engine_execute_node(node) for node, _ in edges if node is not None)
    except RuntimeError:  # raised for a leaf under torch.autograd.grad: nothing accumulates
        return False


def inside_ddp_forward() -> bool:
    """Whether a DistributedDataParallel forward is running (its reducer must
    see every gradient in the backward it prepares)."""
    ddp = getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    return ddp is not None
