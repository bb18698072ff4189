"""How the schedule's stages run: ``sequential``, ``threads``, ``streams`` (docs/design.md §4).

Every executor drives the same :class:`~dni_fast.decoupled.schedule.Stage`
objects through the same per-stage sequence (stage ``k``: forward of batch
``j``, then the regression due at its step ``j``, then batch ``j+1``...).
A stage's numbers depend only on that sequence and on the inputs and targets
it receives, so two executors at the same ``delay`` and seed compute the same
parameters; they differ in *when* the work runs:

* ``sequential``: the caller's thread runs batch ``j`` through every stage,
  then the regressions due (``delay >= 0``); ``step`` returns batch ``j``'s loss.
* ``threads``: one worker thread per stage, each with its own intra-op thread
  count. A worker runs as soon as its input and its due target are there (no
  per-tick barrier); ``step(x_j)`` hands batch ``j`` to stage 0 and returns
  the loss of batch ``j - (n-1)`` when the last stage has it, so at most
  ``n`` batches are in flight (``delay >= 1``).
* ``streams``: one CUDA stream per stage; the caller's thread issues stage
  ``k``'s work on batch ``t - k`` at tick ``t`` (last stage first), ordered
  across streams with events: no host synchronisation per step. Stages may
  sit on different devices (``delay >= 1``).

``quiesce()`` lets every batch handed in so far reach every stage (and the
regressions due on the way) without applying anything early: the state is
then the sequential executor's after the same steps. ``drain()`` then applies
every pending regression, oldest first (``flush``).
"""
from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from dni_fast.decoupled.schedule import MIN_DELAY, Stage

__all__ = ["Batch", "Executor", "SequentialExecutor", "ThreadsExecutor", "StreamsExecutor", "EXECUTORS",
           "pick_executor", "ExecutorUnavailableError"]

EXECUTORS = ("auto", "sequential", "threads", "streams")


class ExecutorUnavailableError(RuntimeError):
    """The executor asked for cannot run here (``streams`` without CUDA, ...)."""


def autocast_state() -> tuple:
    """This thread's enabled autocast, ``((device type, dtype), ...)`` (autocast is thread-local)."""
    out = []
    for dev in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(dev):
                out.append((dev, torch.get_autocast_dtype(dev)))
        except RuntimeError:  # pragma: no cover - a device type without autocast
            pass
    return tuple(out)


@contextlib.contextmanager
def caller_autocast(state: tuple):
    """Enter a caller's :func:`autocast_state` (on a worker thread: autocast is thread-local), without
    autocast's weight cache: every executor updates the stages' weights in place between batches, inside
    the caller's autocast region, so a cast cached for the region would be stale after the first step (and
    the executors would differ: each worker's region is one batch)."""
    if not state:
        yield
        return
    with contextlib.ExitStack() as stack:
        for dev, dtype in state:
            stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=False))
        yield


@dataclass
class Batch:
    """One batch on its way through the stages: ``h`` is the input of the
    stage it waits for; ``x`` the network input (for unlocked stages), ``y``
    the target and ``context`` the synthesizers' context travel with it."""

    index: int
    h: Tensor
    x: Tensor
    y: Any
    loss_fn: Callable
    context: Any
    backend: Optional[str]
    events: Dict[str, Any] = field(default_factory=dict)  # streams: CUDA events the consumer waits on
    # The caller's autocast when it handed the batch to step ((device type, dtype) per enabled device type):
    # thread-local, so the threads executor's workers re-enter it (sequential and streams run on the caller).
    autocast: tuple = ()


def _to(t: Any, device: Optional[torch.device], non_blocking: bool = False) -> Any:
    if device is None or not isinstance(t, Tensor) or t.device == device:
        return t
    return t.to(device, non_blocking=non_blocking)


def pick_executor(stages: Sequence[Stage]) -> str:
    """``auto``: ``streams`` when the stages sit on CUDA, ``threads`` on a CPU
    with at least two cores for this process, else ``sequential`` (which also
    runs stages on any other device: meta, mps, ...)."""
    devs = {s.device.type for s in stages if s.device is not None}
    if "cuda" in devs:
        return "streams"
    if devs - {"cpu"}:
        return "sequential"
    from dni_fast._overlap import available_cores

    return "threads" if available_cores() >= 2 and len(stages) >= 2 else "sequential"


class Executor:
    """Runs the stages' schedule. Subclasses implement :meth:`submit` (one
    batch in; out, the loss of the batch that reached the last stage in that
    call, or ``None``), :meth:`quiesce`, :meth:`drain` and :meth:`close`.

    ``self.losses`` keeps the losses of batches that reached the last stage
    and were not returned yet (the overlapped executors return batch
    ``j - (n-1)``'s loss from ``submit(j)``); ``drain`` returns them."""

    name = ""

    def __init__(self, stages: List[Stage], graphs: Optional[tuple] = None) -> None:
        self.stages = stages
        self.n = len(stages)
        self.losses: Dict[int, Tensor] = {}
        self.returned = -1  # the last batch whose loss was returned
        self.graphs = graphs
        self.runners: List[Any] = [None] * self.n  # per stage: a StageGraphs (graphs.py), or None: eager
        if graphs is not None:
            from dni_fast.decoupled.graphs import StageGraphs

            mode, warmup = graphs
            self.runners = [StageGraphs(st, mode, warmup, self._stream(k)) for k, st in enumerate(stages)]

    def _stream(self, k: int):
        return None

    def _forward(self, k: int, batch: int, h, context, y, loss_fn, backend):
        """Stage ``k``'s steps 1-4, eager or through its graphs (in this thread's autocast, uncached)."""
        r = self.runners[k]
        with caller_autocast(autocast_state()):
            if r is None:
                return self.stages[k].forward(batch, h, context, y, loss_fn, backend)
            return r.forward(batch, h, context, y, loss_fn, backend)

    @staticmethod
    def _synthetic_input(st: Stage, batch: int, x, context, backend):
        """Complete unlock: the stage's synthetic input (in this thread's autocast, uncached)."""
        with caller_autocast(autocast_state()):
            return st.synthetic_input(batch, x, context, backend)

    def _regress(self, k: int, batch: int, step: Optional[int] = None) -> None:
        r = self.runners[k]
        with caller_autocast(autocast_state()):
            if r is None:
                self.stages[k].regress(batch, step)
            else:
                r.regress(batch, step)

    @staticmethod
    def check(stages: List[Stage], delay: int, threads_per_stage) -> None:
        """Raise if this executor cannot run these stages here."""

    def submit(self, batch: Batch) -> Optional[Tensor]:
        raise NotImplementedError

    def quiesce(self) -> None:
        """Let every batch submitted so far reach every stage (module docstring)."""

    def drain(self) -> List[Tensor]:
        """``quiesce``, apply every pending regression, and return the losses
        not returned yet, oldest first."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop any worker (the executor cannot be used afterwards)."""

    def undelivered(self) -> Dict[int, Tensor]:
        """After ``quiesce``: the losses not returned yet, by batch."""
        return dict(self.losses)

    def restore(self, submitted: int, returned: int, losses: Dict[int, Tensor]) -> None:
        """After ``load_checkpoint``: ``submitted`` batches went through every
        stage, batch ``returned``'s loss was the last one returned, ``losses``
        holds the later ones."""
        self.returned = returned
        self.losses = dict(losses)

    def _pop_loss(self, want: int) -> Optional[Tensor]:
        if want < 0 or want <= self.returned:
            return None
        loss = self.losses.pop(want, None)
        if loss is not None:
            self.returned = want
        return loss

    def _take_losses(self) -> List[Tensor]:
        keys = sorted(self.losses)
        if keys:
            self.returned = max(self.returned, keys[-1])
        return [self.losses.pop(b) for b in keys]


# ---------------------------------------------------------------------------
# sequential
# ---------------------------------------------------------------------------
class _ThreadCount:
    """Set this thread's intra-op thread count for a scope (``None``: leave it)."""

    def __init__(self, n: Optional[int]) -> None:
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None and torch.get_num_threads() != self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


class SequentialExecutor(Executor):
    """The reference: the caller's thread runs batch ``j`` through every stage
    in order, each stage's gradient goes down to the stage below, then every
    stage applies the regression due at its step ``j``."""

    name = "sequential"

    def __init__(self, stages: List[Stage], threads_per_stage: Optional[List[int]] = None,
                 graphs: Optional[tuple] = None) -> None:
        super().__init__(stages, graphs)
        # One thread runs every stage: one count (the first) applies to all.
        self.threads = None if threads_per_stage is None else threads_per_stage[0]

    @staticmethod
    def check(stages, delay, threads_per_stage) -> None:
        if threads_per_stage is not None and len(set(threads_per_stage)) > 1:
            raise ValueError("executor='sequential' runs every stage on one thread: give threads_per_stage one "
                             f"count, got {threads_per_stage}")

    def submit(self, b: Batch) -> Optional[Tensor]:
        stages = self.stages
        k = 0
        try:
            with _ThreadCount(self.threads):
                h, loss = b.h, None
                for k, st in enumerate(stages):
                    ctx = _to(b.context, st.device)
                    if st.unlocked:
                        hhat = self._synthetic_input(st, b.index, _to(b.x, st.device), ctx, b.backend)
                    out = self._forward(k, b.index, _to(h, st.device), ctx, b.y, b.loss_fn, b.backend)
                    if k > 0:
                        stages[k - 1].deliver(b.index, _to(out.grad_in, stages[k - 1].device))
                    h = hhat if st.unlocked else out.out
                    loss = out.loss
                for k, st in enumerate(stages):
                    for due in st.due(b.index):
                        self._regress(k, due, b.index)
        except BaseException as e:
            e.add_note(f"dni_fast.DecoupledSequential: raised in stage {k} (executor 'sequential') while processing "
                       f"batch {b.index}")
            raise
        self.returned = b.index
        return loss

    def drain(self) -> List[Tensor]:
        with _ThreadCount(self.threads):
            for k, st in enumerate(self.stages):
                for due in st.pending():
                    self._regress(k, due)
        return self._take_losses()


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside a worker to leave its loop (shutdown or another worker's failure)."""


_DRAIN = object()


class _Shared:
    """What the caller and the workers share, guarded by one lock: each party
    waits on its own condition, so a hand-off wakes only the thread it is for."""

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.cv = [threading.Condition(self.lock) for _ in range(n)]
        self.cv_caller = threading.Condition(self.lock)
        self.inputs: List[Deque] = [collections.deque() for _ in range(n)]
        self.losses: Dict[int, Tensor] = {}
        self.completed = [0] * n  # batches whose whole step (forward + due regression) is done, per stage
        self.drained = [False] * n
        self.drain_autocast: tuple = ()  # the caller's autocast at flush(): the drain's regressions run in it
        self.failure = None  # (stage, batch, exception)
        self.stop = False

    def wake_all(self) -> None:
        for c in self.cv:
            c.notify_all()
        self.cv_caller.notify_all()


def _shutdown(sh: _Shared, threads: List[threading.Thread]) -> None:
    with sh.lock:
        sh.stop = True
        sh.wake_all()
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=60)


def default_threads(n: int) -> List[int]:
    """The ``threads`` executor's intra-op thread count per stage by default: the
    caller's count shared among the ``n`` workers."""
    return [max(1, torch.get_num_threads() // n)] * n


class ThreadsExecutor(Executor):
    """One worker thread per stage on the CPU (module docstring).

    Each worker runs with ``threads_per_stage[k]`` intra-op threads (default
    ``max(1, torch.get_num_threads() // n)``, read in the constructing
    thread). A worker's exception stops every worker at its next hand-off
    (each finishes the forward or regression step it is in, so no optimizer
    step is cut in half) and is raised in the caller with its traceback."""

    name = "threads"

    def __init__(self, stages: List[Stage], threads_per_stage: Optional[List[int]] = None,
                 graphs: Optional[tuple] = None) -> None:
        super().__init__(stages, graphs)
        n = self.n
        self.threads = threads_per_stage or default_threads(n)
        self.sh = _Shared(n)
        self.losses = self.sh.losses  # one dict: the last worker writes it, the caller reads it, under the lock
        self.submitted = 0
        self.workers: List[threading.Thread] = []

    @staticmethod
    def check(stages, delay, threads_per_stage) -> None:
        for s in stages:
            if s.device is not None and s.device.type != "cpu":
                raise ExecutorUnavailableError(
                    f"executor='threads' runs stages on the CPU, but stage {s.index} is on {s.device}; use "
                    f"executor='streams' for CUDA stages, 'sequential' for {s.device.type} ones (or 'auto', "
                    f"which picks)")

    def _start(self) -> None:
        if self.workers:
            return
        sh, stages = self.sh, self.stages
        self.workers = [threading.Thread(target=_worker, args=(sh, stages, k, self.threads[k], self),
                                         name=f"dni_fast-stage-{k}", daemon=True) for k in range(self.n)]
        for t in self.workers:
            t.start()

    # -- the caller's side -------------------------------------------------------
    def _raise_failure(self, sh=None) -> None:
        # (the state the caller waited on: a load_checkpoint may have replaced self.sh meanwhile)
        k, j, e = (sh or self.sh).failure
        raise e

    def _wait(self, pred: Callable[[], bool]) -> None:
        """Wait (lock held) until ``pred()`` or a worker failed."""
        sh = self.sh
        while not pred():
            if sh.failure is not None:
                self._raise_failure(sh)
            sh.cv_caller.wait()
        if sh.failure is not None:
            self._raise_failure(sh)

    def submit(self, b: Batch) -> Optional[Tensor]:
        self._start()
        sh = self.sh
        want = b.index - (self.n - 1)
        with sh.lock:
            if sh.failure is not None:
                self._raise_failure()
            sh.inputs[0].append(b)
            self.submitted = b.index + 1
            sh.cv[0].notify()
            if want < 0 or want <= self.returned:
                return None
            self._wait(lambda: want in sh.losses)
            return self._pop_loss(want)

    def undelivered(self) -> Dict[int, Tensor]:
        with self.sh.lock:
            return dict(self.sh.losses)

    def restore(self, submitted: int, returned: int, losses: Dict[int, Tensor]) -> None:
        with self.sh.lock:
            self.returned = returned
            self.sh.losses.clear()
            self.sh.losses.update(losses)
            self.sh.completed = [submitted] * self.n
        self.submitted = submitted

    def on_worker(self) -> bool:
        """Whether the calling thread is one of the stages' workers (a hook runs there)."""
        return threading.current_thread() in self.workers

    def quiesce(self) -> None:
        if not self.workers:
            return
        sh, n = self.sh, self.submitted
        with sh.lock:
            self._wait(lambda: all(c >= n for c in sh.completed))

    def drain(self) -> List[Tensor]:
        self.quiesce()
        if not self.workers and any(st.pending() for st in self.stages):
            # regressions left pending by a previous executor (a restore: load_checkpoint, a move, close)
            self._start()
        if self.workers:
            sh = self.sh
            with sh.lock:
                sh.drained = [False] * self.n
                sh.drain_autocast = autocast_state()
                for k in range(self.n):
                    sh.inputs[k].append(_DRAIN)
                    sh.cv[k].notify()
                self._wait(lambda: all(sh.drained))
                return self._take_losses()
        return self._take_losses()

    def close(self) -> None:
        if self.workers:
            _shutdown(self.sh, self.workers)
            self.workers = []
            old = self.sh
            if old.failure is None:
                # Workers started later must run: a fresh, not stopped, shared state with the old one's
                # progress (a failure stays: the executor is not used again after one).
                sh = _Shared(self.n)
                sh.losses.update(old.losses)
                sh.completed = list(old.completed)
                self.sh, self.losses = sh, sh.losses


def _wait_worker(sh: _Shared, k: int, pred: Callable[[], bool]) -> None:
    """In worker ``k``, lock held: wait until ``pred()``; leave on stop or failure."""
    while not pred():
        if sh.stop or sh.failure is not None:
            raise _Stop
        sh.cv[k].wait()
    if sh.stop or sh.failure is not None:
        raise _Stop


def _worker(sh: _Shared, stages: List[Stage], k: int, threads: int, ex: "ThreadsExecutor") -> None:
    st = stages[k]
    n = len(stages)
    last = k == n - 1
    below = stages[k - 1] if k > 0 else None
    batch = None
    try:
        while True:
            with sh.lock:
                _wait_worker(sh, k, lambda: bool(sh.inputs[k]))
                b = sh.inputs[k].popleft()
            # Intra-op threads are per thread, but a thread started later inherits the last
            # count set anywhere: check before each unit of work.
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if b is _DRAIN:
                for due in st.pending():
                    with sh.lock:
                        _wait_worker(sh, k, lambda: st.has_target(due))
                    with caller_autocast(sh.drain_autocast):
                        ex._regress(k, due)
                with sh.lock:
                    sh.drained[k] = True
                    sh.cv_caller.notify()
                continue
            batch = b.index
            with caller_autocast(b.autocast):
                if st.unlocked:
                    hhat = ex._synthetic_input(st, batch, b.x, b.context, b.backend)
                    with sh.lock:  # the next stage starts now: it does not wait for this stage's forward
                        sh.inputs[k + 1].append(Batch(batch, hhat, b.x, b.y, b.loss_fn, b.context, b.backend,
                                                      autocast=b.autocast))
                        sh.cv[k + 1].notify()
                out = ex._forward(k, batch, b.h, b.context, b.y, b.loss_fn, b.backend)
                with sh.lock:
                    if out.out is not None:
                        sh.inputs[k + 1].append(Batch(batch, out.out, b.x, b.y, b.loss_fn, b.context, b.backend,
                                                      autocast=b.autocast))
                        sh.cv[k + 1].notify()
                    if below is not None:
                        below.deliver(batch, out.grad_in)
                        sh.cv[k - 1].notify()
                    if last:
                        sh.losses[batch] = out.loss
                        sh.cv_caller.notify()
                for due in st.due(batch):
                    with sh.lock:
                        _wait_worker(sh, k, lambda: st.has_target(due))
                    ex._regress(k, due, batch)
            with sh.lock:
                sh.completed[k] = batch + 1
                sh.cv_caller.notify()
    except _Stop:
        return
    except BaseException as e:  # surfaces in the caller
        with sh.lock:
            if sh.failure is None:
                where = "" if batch is None else f" while processing batch {batch}"
                e.add_note(f"dni_fast.DecoupledSequential: raised in stage {k}'s worker thread (executor "
                           f"'threads'){where}")
                sh.failure = (k, batch, e)
            sh.wake_all()


# ---------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------
class StreamsExecutor(Executor):
    """One CUDA stream per stage, ordered with events (module docstring).

    The caller's thread issues every kernel; autograd runs each backward op on
    the stream of its forward op, so a stage's forward, backward, optimizer
    step and regressions all run on that stage's stream. Tensors that cross
    streams are ``record_stream``-ed on the consumer, so the caching
    allocator never hands their memory out early. The returned loss is made
    safe to read on the caller's current stream (it waits on an event). Not
    measured here: this machine has no GPU (see docs/decoupled.md)."""

    name = "streams"

    def __init__(self, stages: List[Stage], threads_per_stage=None, graphs: Optional[tuple] = None) -> None:
        self.devices = []
        prev = None
        for s in stages:
            d = s.device or prev
            self.devices.append(d)
            prev = d
        self.streams = [None if d is None else torch.cuda.Stream(d) for d in self.devices]
        super().__init__(stages, graphs)  # after the streams: the graphs capture on them
        self._wait_for_callers()
        self.inbox: List[Deque[Batch]] = [collections.deque() for _ in stages]
        self.target_events: List[Dict[int, Any]] = [{} for _ in stages]  # stage k: batch -> event of its target
        self._copy_streams: Dict[tuple, tuple] = {}  # (src, dst) device -> (source stream, destination stream)

    def _stream(self, k: int):
        return self.streams[k]

    def _wait_for_callers(self) -> None:
        """Order every stage stream after its device's current stream once: the
        weights (and any state loaded since) were written there. Not per step:
        the caller's stream waits for the last stage's loss each step, so a
        per-step wait would chain stage 0 to the last stage."""
        for d, s in zip(self.devices, self.streams):
            s.wait_stream(torch.cuda.current_stream(d))

    def restore(self, submitted: int, returned: int, losses: Dict[int, Tensor]) -> None:
        super().restore(submitted, returned, losses)
        self._wait_for_callers()  # load_checkpoint wrote the weights on the caller's streams

    @staticmethod
    def check(stages, delay, threads_per_stage) -> None:
        if not torch.cuda.is_available():
            raise ExecutorUnavailableError(
                f"executor='streams' needs CUDA, and torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}); use executor='threads' on the CPU, or 'auto'")
        if threads_per_stage is not None:
            raise ValueError("threads_per_stage applies to the CPU executors, not to executor='streams'")
        for s in stages:
            if s.device is not None and s.device.type != "cuda":
                raise ExecutorUnavailableError(f"executor='streams' runs every stage on a CUDA device, but stage "
                                               f"{s.index} is on {s.device}")
        if stages[0].device is None:
            raise ValueError("executor='streams': stage 0 has no parameters or buffers to tell its device")

    @staticmethod
    def _event(stream) -> "torch.cuda.Event":
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _transfer(self, t: Any, dst: torch.device, after) -> tuple:
        """``t`` on ``dst`` once event ``after`` has happened: ``(tensor, event)``
        with the event to wait for before reading it (``after`` itself when no
        copy is needed). A copy between devices runs on a pair of copy streams:
        torch orders a cross-device copy with the current streams of both
        devices, and on the stages' own streams that would chain the stages."""
        if not isinstance(t, Tensor) or not t.is_cuda or t.device == dst:
            return t, after
        key = (t.device, dst)
        pair = self._copy_streams.get(key)
        if pair is None:
            pair = self._copy_streams[key] = (torch.cuda.Stream(t.device), torch.cuda.Stream(dst))
        cs, cd = pair
        with torch.cuda.stream(cs):
            cs.wait_event(after)
            t.record_stream(cs)
            with torch.cuda.stream(cd):
                out = t.to(dst, non_blocking=True)
            return out, self._event(cd)

    def _run_stage(self, k: int) -> None:
        """Issue stage ``k``'s next batch (forward, hand-offs) and the regression
        due at that step, on stage ``k``'s stream."""
        st, b = self.stages[k], self.inbox[k].popleft()
        dev, stream = self.devices[k], self.streams[k]
        ready = b.events["ready"]
        x, ev_x = self._transfer(b.x, dev, ready) if st.unlocked else (b.x, ready)
        ctx, ev_c = self._transfer(b.context, dev, ready)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            for ev in {id(e): e for e in (ready, ev_x, ev_c)}.values():
                stream.wait_event(ev)
            for t in (b.h, x, b.y, ctx):  # read on this stream; allocated on another one
                if isinstance(t, Tensor) and t.is_cuda and t.device == dev:
                    t.record_stream(stream)
            if st.unlocked:
                hhat = self._synthetic_input(st, b.index, x, ctx, b.backend)
                self._hand_on(k, b, hhat)
            out = self._forward(k, b.index, b.h, ctx, b.y, b.loss_fn, b.backend)
            if out.out is not None:
                self._hand_on(k, b, out.out)
            if k > 0:
                g, ev_g = self._transfer(out.grad_in, self.devices[k - 1], self._event(stream))
                g.record_stream(self.streams[k - 1])
                self.stages[k - 1].deliver(b.index, g)
                self.target_events[k - 1][b.index] = ev_g
            self._regress_due(k, b.index)
        if out.loss is not None:
            # The caller reads the loss on its own stream: order it after this stage's.
            cur = torch.cuda.current_stream(dev)
            cur.wait_event(self._event(stream))
            out.loss.record_stream(cur)
            self.losses[b.index] = out.loss

    def _hand_on(self, k: int, b: Batch, h: Tensor) -> None:
        """Batch ``b``'s input for stage ``k+1`` (on its device), ready after an event."""
        h, ready = self._transfer(h, self.devices[k + 1], self._event(self.streams[k]))
        h.record_stream(self.streams[k + 1])
        self.inbox[k + 1].append(Batch(b.index, h, b.x, b.y, b.loss_fn, b.context, b.backend, {"ready": ready}))

    def _regress_due(self, k: int, step: int) -> None:
        st, stream = self.stages[k], self.streams[k]
        for due in st.due(step):
            ev = self.target_events[k].pop(due, None)
            if ev is not None:
                stream.wait_event(ev)
            elif not st.has_target(due):  # cannot happen with delay >= 1 and the last-stage-first issue order
                raise RuntimeError(f"streams executor: the target of batch {due} for stage {k} was not issued yet")
            # (no event and a target: it came with a checkpoint, written before restore's wait)
            self._regress(k, due, step)

    def _tick(self) -> None:
        # Last stage first: stage k+1's forward on the batch stage k handed on at the
        # previous tick is issued before stage k's regression that waits for its target.
        for k in reversed(range(self.n)):
            if self.inbox[k]:
                self._run_stage(k)

    def submit(self, b: Batch) -> Optional[Tensor]:
        dev0 = self.devices[0]
        # x, y and the context were written on the caller's stream: every stage stream that
        # reads them waits for this event (y and the context travel with the batch).
        b.events["ready"] = self._event(torch.cuda.current_stream(dev0))
        self.inbox[0].append(b)
        self._tick()
        return self._pop_loss(b.index - (self.n - 1))

    def quiesce(self) -> None:
        while any(self.inbox):
            self._tick()
        # The caller's streams wait for every stage's work (parameters, state).
        for k in range(self.n):
            torch.cuda.current_stream(self.devices[k]).wait_event(self._event(self.streams[k]))

    def drain(self) -> List[Tensor]:
        self.quiesce()
        for k, st in enumerate(self.stages):
            # After the caller's stream too: what it issued since the last step (a checkpoint's copies of the
            # weights, a load_state_dict) must come before these regressions change the weights. Once per drain:
            # no chain between the stages.
            self.streams[k].wait_stream(torch.cuda.current_stream(self.devices[k]))
            with torch.cuda.device(self.devices[k]), torch.cuda.stream(self.streams[k]):
                for due in st.pending():
                    ev = self.target_events[k].pop(due, None)
                    if ev is not None:
                        self.streams[k].wait_event(ev)
                    self._regress(k, due)
            torch.cuda.current_stream(self.devices[k]).wait_event(self._event(self.streams[k]))
        return self._take_losses()


_BY_NAME = {"sequential": SequentialExecutor, "threads": ThreadsExecutor, "streams": StreamsExecutor}


def executor_class(name: str):
    if name not in _BY_NAME:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    return _BY_NAME[name]


assert set(MIN_DELAY) >= set(_BY_NAME)
