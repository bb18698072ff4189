"""``DecoupledSequential``: a chain of stages trained with synthetic gradients,
the stages running decoupled (docs/design.md §4; the schedule is
``schedule.py``, the executors ``executors.py``)."""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from dni_fast._manager import require_grad_mode
from dni_fast.backends import get_backend
from dni_fast.decoupled.executors import (EXECUTORS, Batch, autocast_state, default_threads, executor_class,
                                          pick_executor)
from dni_fast.decoupled.schedule import Stage, StageEvent, check_delay, check_update_prob, module_device

__all__ = ["DecoupledSequential"]

_FORMAT = "dni_fast.DecoupledSequential/1"


#: Modules that draw from torch's global generator in training mode.
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _warn_random_stages(stages: Sequence[nn.Module], executor: str) -> None:
    """Stages that draw random numbers (dropout) from the global generator make the concurrent executors'
    results depend on how the threads interleave: say so once, at construction."""
    if executor == "sequential":
        return
    hit = [f"stage {k} ({type(m).__name__})" for k, st in enumerate(stages) for m in st.modules()
           if isinstance(m, _RANDOM_MODULES) and getattr(m, "p", 1.0) > 0]  # p=0: nothing is drawn
    if hit:
        warnings.warn(f"DecoupledSequential(executor={executor!r}): {', '.join(hit[:3])} draw from torch's global "
                      "random generator, and the stages run concurrently: their draws interleave in an order "
                      "that changes from run to run, so the result is not reproducible and differs from "
                      "executor='sequential' (every other number is the same). Use executor='sequential' for "
                      "reproducible runs with dropout.", stacklevel=3)



def _auto_executor(stages, delay: Optional[int]) -> str:
    """``executor='auto'``: what the devices call for, except ``sequential`` for ``delay=0`` (the only executor
    that runs it; the others overlap consecutive batches)."""
    return "sequential" if delay == 0 else pick_executor(stages)


def _copied(v: Any) -> Any:
    """``v`` with every tensor in it (a tensor, or a dict, list or tuple of them) detached and cloned."""
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (dict, list, tuple)):
        from torch.utils._pytree import tree_map

        return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, v)
    return v

class DecoupledSequential(nn.Module):
    """Stages ``S_0 .. S_{n-1}`` with a ``BackwardInterface`` after each but
    the last, trained on §4's schedule: every stage updates as soon as its
    synthetic gradient exists, and the true gradients train the synthesizers
    ``delay`` steps later.

    Args:
        stages: ``n >= 1`` modules; stage ``k`` maps its input ``(B, *)`` to
            ``a_k`` ``(B, *, D_k)``; stage ``k+1`` takes ``a_k``.
        synthesizers: ``n - 1`` entries; ``synthesizers[k]`` predicts the
            gradient of ``a_k`` from ``a_k`` (and the context): a synthesizer
            module (``BasicSynthesizer(D_k, ...)`` or any module with
            ``forward(trigger, context)``), a ``BackwardInterface`` (its
            synthesizer, with its ``backend=``), or a ``BidirectionalInterface``
            for complete unlock: its forward synthesizer predicts ``a_k`` from
            the network input ``x`` (``trigger_dim`` = ``x``'s last dim) and
            stage ``k+1`` trains on that prediction instead of waiting.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once
            per stage and once per synthesizer (not for a module without
            trainable parameters).
        executor: ``"sequential"`` (the reference, the caller's thread),
            ``"threads"`` (a worker thread per stage, CPU), ``"streams"`` (a
            CUDA stream per stage) or ``"auto"`` (``streams`` for CUDA stages,
            ``threads`` on a CPU with 2+ cores, else ``sequential``).
        update_prob: each step, each stage skips its own update with
            probability ``1 - update_prob`` (one generator per stage, from
            ``seed``); it still passes its output and its input gradient on.
        delay: a synthesizer regresses on the target of the batch its stage
            processed at step ``t`` exactly at step ``t + delay``. Default: the
            executor's minimum (0 for ``sequential``, 1 for the others).
        seed: seeds the ``update_prob`` generators.
        threads_per_stage: intra-op threads per worker (``threads``; an int,
            or one per stage); default ``max(1, torch.get_num_threads() // n)``.
            For ``sequential``, one count for its one thread during ``step``.
        regression: which prediction a synthesizer regresses, ``delay`` steps
            after making it: ``"stored"`` (docs/design.md §4 as written: the
            stored prediction, through the current weights) or ``"current"``
            (predicted again with the current weights; one more synthesizer
            forward per step). Equal at ``delay=0``; at ``delay >= 1`` only
            ``"current"`` kept the synthesizers learning in our measurements
            (``dni_fast.decoupled.schedule.check_regression``,
            docs/decoupled.md). Also set ``BackwardInterface(normalize_targets=
            True)`` entries' options this way: the schedule honours
            ``normalize_targets`` and refuses ``pipelined``/``overlap``.

    ``state_dict()`` is ``nn.Module``'s (the stages' and synthesizers'
    parameters and buffers); the optimizers and the schedule go through
    :meth:`checkpoint` / :meth:`load_checkpoint`. With ``threads`` and
    ``streams`` work continues after ``step`` returns: ``state_dict``,
    ``forward``, ``checkpoint``, ``stats`` and ``synchronize`` wait for it;
    read parameters directly only after one of them (or ``flush``).
    """

    def __init__(self, stages: Sequence[nn.Module], synthesizers: Sequence[Optional[nn.Module]],
                 optimizer: Callable[[List[Tensor]], torch.optim.Optimizer], executor: str = "auto",
                 update_prob: float = 1.0, delay: Optional[int] = None, seed: int = 0,
                 threads_per_stage: Union[None, int, Sequence[int]] = None, *, regression: str = "stored") -> None:
        super().__init__()
        stages, synthesizers = list(stages), list(synthesizers)
        n = len(stages)
        if n == 0:
            raise ValueError("DecoupledSequential needs at least one stage")
        if len(synthesizers) != n - 1:
            raise ValueError(f"DecoupledSequential: {n} stages need {n - 1} synthesizers (one after each stage but "
                             f"the last), got {len(synthesizers)}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        update_prob = check_update_prob(update_prob)
        _refuse_shared_parameters(stages, synthesizers)
        self.stages = nn.ModuleList(stages)
        self.synthesizers = nn.ModuleList(synthesizers)
        # The executor decides the minimum delay, and `auto` decides from the devices.
        for k, m in enumerate(stages):
            if not isinstance(m, nn.Module):
                raise TypeError(f"stage {k} must be an nn.Module, got {type(m).__name__}")
            module_device(m)
        self._requested = (executor, delay)
        if executor == "auto":
            probe = [_DeviceOnly(module_device(m), k) for k, m in enumerate(stages)]
            executor = _auto_executor(probe, delay)
        self.executor = executor
        self.delay = check_delay(delay, executor)
        self.update_prob, self.seed = update_prob, seed
        self._threads = _threads_list(threads_per_stage, n)
        self._threads_given = self._threads is not None
        if self._threads is None and executor == "threads":
            # fixed now: the executor is rebuilt later (load_checkpoint, .to()), at other counts maybe
            self._threads = default_threads(n)
        self._stages = [Stage(k, n, stages[k], synthesizers[k] if k < n - 1 else None, optimizer,
                              delay=self.delay, update_prob=update_prob, seed=seed, regression=regression)
                        for k in range(n)]
        self.regression = regression
        self._cls = executor_class(executor)
        self._cls.check(self._stages, self.delay, self._threads)
        _warn_random_stages(stages, executor)
        self._graphs: Optional[tuple] = None  # (mode, warmup_steps) once enable_cuda_graphs is called
        self._make_executor()
        self._batches = 0  # batches handed to step
        self._broken: Optional[BaseException] = None
        self._closed = False  # close() stopped the workers; the next step starts new ones
        self._checked = False  # whether a batch went through every stage since construction

    def _make_executor(self) -> None:
        ex = self._cls(self._stages, self._threads, graphs=self._graphs)
        self._executor = ex
        # Stop the workers when the module is collected (the workers do not reference it).
        self._finalizer = weakref.finalize(self, ex.close)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.double()``...: the stages' devices are read
        again, the predictions waiting for their targets move too, and
        ``executor='auto'`` picks again (before the first step only, since
        that may change the delay). Move the model before training: the
        optimizers' state, if any, stays where it is, as in plain PyTorch."""
        if "_stages" not in self.__dict__:  # during __init__
            return super()._apply(fn, recurse)
        self._quiesce()
        super()._apply(fn, recurse)
        for st in self._stages:
            st.moved(fn)
        executor, delay = self._requested
        if executor == "auto":
            picked = _auto_executor(self._stages, delay)
            if picked != self.executor:
                if self._batches:
                    raise RuntimeError(f"DecoupledSequential(executor='auto') chose {self.executor!r} and the move "
                                       f"calls for {picked!r}: move the model before the first step")
                self.executor, self._cls = picked, executor_class(picked)
                self.delay = check_delay(delay, picked)
                if not self._threads_given:  # the default count belongs to the executor that was picked
                    self._threads = default_threads(len(self._stages)) if picked == "threads" else None
                for st in self._stages:
                    st.delay = self.delay
        self._cls.check(self._stages, self.delay, self._threads)
        self._restart()
        return self

    def __deepcopy__(self, memo):
        """A copy at the same point of the schedule, with executors of its own (the workers' locks and threads
        are not copied: best-model snapshots and EMA copies of a ``threads`` model)."""
        if self._broken is None and not self._closed:
            self._quiesce()
        ex = self._executor
        state = (self._batches, ex.returned, {b: t.detach().clone() for b, t in ex.undelivered().items()})
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k not in ("_executor", "_finalizer"):
                new.__dict__[k] = copy.deepcopy(v, memo)
        new._make_executor()
        new._executor.restore(*state)
        return new

    def _restart(self) -> None:
        """A fresh executor in the old one's place, at the same point of the
        schedule (after a quiesce: nothing in flight)."""
        ex = self._executor
        state = (self._batches, ex.returned, ex.undelivered())
        ex.close()
        self._finalizer.detach()
        self._make_executor()
        self._executor.restore(*state)
        self._closed = False

    def _refuse_on_worker(self) -> None:
        """A hook runs on a stage's worker (executor='threads'): anything that waits for the workers would wait
        for itself. Raised before any state changes; the hook's error then stops training like any stage's."""
        on_worker = getattr(self.__dict__.get("_executor"), "on_worker", None)  # only the threads executor has one
        if on_worker is not None and on_worker():
            raise RuntimeError("DecoupledSequential: stats(), state_dict(), synchronize(), flush(), forward(), "
                               "checkpoint(), train()/eval() and zero_grad() wait for every stage's worker, and "
                               "this call came from one (a hook, executor='threads'): it would never return. Read "
                               "the model after step() returns, or use executor='sequential'")

    def _quiesce(self) -> None:
        """Wait for the work in flight; a stage's error raised here breaks the
        model as it would in ``step`` (gradients cleared, ``load_checkpoint``
        to go on)."""
        self._refuse_on_worker()
        if self._broken is not None or self._closed:
            return
        try:
            self._executor.quiesce()
        except BaseException as e:
            self._fail(e)
            raise

    def extra_repr(self) -> str:
        return (f"executor={self.executor!r}, delay={self.delay}, update_prob={self.update_prob}, seed={self.seed}, "
                f"steps={self._batches}")

    # -- training -------------------------------------------------------------------
    def step(self, x: Tensor, y: Any, loss_fn: Callable[[Tensor, Any], Tensor], context: Any = None
             ) -> Optional[Tensor]:
        """One training step on batch ``x`` ``(B, *)`` with target ``y``:
        ``loss_fn(a_{n-1}, y)`` is the last stage's loss. ``context`` (cDNI)
        reaches every synthesizer with this batch. Returns the loss of the
        batch that reached the last stage in this call, detached, 0-dim, on
        the last stage's device (no host sync): this batch's with
        ``sequential``, batch ``j - (n-1)``'s with ``threads`` and ``streams``
        (``None`` while the pipeline fills; :meth:`flush` returns the rest)."""
        self._check_usable()
        if not self.training:
            raise RuntimeError("DecoupledSequential.step trains: call .train() first (eval mode is for forward())")
        # (the sequential executor failed deep in autograd, the threads workers trained anyway)
        require_grad_mode("DecoupledSequential.step")
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B, *), got shape {tuple(x.shape)}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, y) -> loss, got {type(loss_fn).__name__}")
        d0, dl = self._stages[0].device, self._stages[-1].device
        if d0 is not None and x.device != d0:
            raise ValueError(f"x is on {x.device} but stage 0 is on {d0}: move the batch to its device")
        if isinstance(y, Tensor) and dl is not None and y.device != dl:
            raise ValueError(f"y is on {y.device} but the last stage (stage {len(self._stages) - 1}) is on {dl}")
        # Copies: the batch is read later (by the last stage n-1 steps on; by a regression `delay` steps on),
        # so a buffer the caller refills for the next step must not change this one (a reused one-hot).
        x = x.detach().clone()
        y, context = _copied(y), _copied(context)  # (tensors inside a dict or tuple too)
        b = Batch(self._batches, x, x, y, loss_fn, context, get_backend(), autocast=autocast_state())
        try:
            loss = self._executor.submit(b)
            if not self._checked:
                # The first batch goes through every stage before the first step returns, so
                # that a wrong width, device or loss_fn raises here, not at a later call.
                # Waiting changes no number: the schedule is the same.
                self._executor.quiesce()
                self._checked = True
        except BaseException as e:
            self._fail(e)
            raise
        self._batches += 1
        return loss

    def flush(self) -> List[Tensor]:
        """Drain: every batch in flight reaches every stage, and every pending
        regression step is applied, oldest first. Returns the losses that
        ``step`` has not returned yet, oldest first. ``step`` may go on
        afterwards (the regressions already applied are not applied again)."""
        self._check_usable()
        try:
            return self._executor.drain()
        except BaseException as e:
            self._fail(e)
            raise

    def synchronize(self) -> None:
        """Wait until every batch handed to ``step`` has gone through every
        stage (nothing is applied early): parameters are then safe to read."""
        self._check_usable()
        try:
            self._executor.quiesce()
        except BaseException as e:
            self._fail(e)
            raise

    def close(self) -> None:
        """Stop the worker threads (they also stop when the module is collected),
        after the batches in flight have gone through every stage (nothing is
        applied early, nothing is dropped). ``step``, ``flush`` and
        ``synchronize`` may go on afterwards: they start new workers."""
        if self._closed:
            return
        self._quiesce()
        self._executor.close()
        self._closed = True

    def _check_usable(self) -> None:
        self._refuse_on_worker()
        if self._closed and self._broken is None:
            self._restart()
        if self._broken is not None:
            raise RuntimeError("DecoupledSequential cannot go on: a stage raised earlier (the error above this "
                               "one), so the stages are at different points of the schedule. Every stage's "
                               "gradients were cleared and no optimizer step was cut short; load_checkpoint() "
                               "to continue") from self._broken

    def _fail(self, e: BaseException) -> None:
        """A stage raised: stop the workers (each finishes the step it is in), clear
        every gradient so none is left half-accumulated, and refuse to go on."""
        self._broken = e
        try:
            self._executor.close()
        finally:
            for st in self._stages:
                st.zero_grad()

    # -- inference and state -----------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """The stages in order on ``x`` (no synthesizer involved): inference.
        Waits for the work in flight first."""
        self._quiesce()
        h = x
        for st in self._stages:
            if st.device is not None and isinstance(h, Tensor) and h.device != st.device:
                h = h.to(st.device)
            h = st.module(h)
        return h

    def state_dict(self, *args, **kwargs):
        self._quiesce()
        return super().state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        """As ``nn.Module.train`` (and ``eval()``), after the work in flight: a BatchNorm switched to eval
        while a worker still runs an earlier batch's forward would change that batch."""
        if "_executor" in self.__dict__:
            self._quiesce()
        return super().train(mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``nn.Module.zero_grad``, after the work in flight (a worker's optimizer may be stepping)."""
        if "_executor" in self.__dict__:
            self._quiesce()
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._quiesce()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def checkpoint(self) -> Dict[str, Any]:
        """A snapshot (deep copies: safe to keep in memory or ``torch.save``) of
        the parameters, every optimizer's state, the ``update_prob``
        generators, the step counts, the predictions waiting for their targets
        and the losses not returned yet. ``load_checkpoint`` resumes exactly;
        a checkpoint taken with one executor loads into another at the same
        ``delay``."""
        self.synchronize()
        ex = self._executor
        return {
            "format": _FORMAT,
            "num_stages": len(self._stages), "delay": self.delay, "executor": self.executor,
            "batches": self._batches, "returned": ex.returned,
            "losses": {b: t.detach().clone() for b, t in ex.undelivered().items()},
            "model": copy.deepcopy(super().state_dict()),
            "stages": [st.state() for st in self._stages],
        }

    def load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Restore :meth:`checkpoint` (also after a stage raised)."""
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != _FORMAT:
            raise ValueError("not a DecoupledSequential checkpoint (expected the dict checkpoint() returns)")
        if checkpoint["num_stages"] != len(self._stages):
            raise ValueError(f"checkpoint of {checkpoint['num_stages']} stages loaded into {len(self._stages)}")
        if checkpoint["delay"] != self.delay:
            raise ValueError(f"the checkpoint was taken with delay={checkpoint['delay']}, this model has "
                             f"delay={self.delay}")
        self._refuse_on_worker()  # (raised before anything changes, as from the other waiting calls)
        try:
            self._quiesce()
        except BaseException:
            pass  # a stage's error from before: the model is marked broken, and everything is replaced below
        # Everything that can be checked is, before anything changes: a mismatched checkpoint leaves the model
        # as it was. What fails past this point (a corrupt optimizer state) leaves it marked broken.
        self._check_checkpoint(checkpoint)
        try:
            super().load_state_dict(checkpoint["model"])
            for st, s in zip(self._stages, checkpoint["stages"]):
                st.load_state(s)
        except BaseException as e:
            self._fail(e)
            raise
        self._batches = int(checkpoint["batches"])
        dev = self._stages[-1].device
        losses = {int(b): (t if dev is None else t.to(dev)).clone() for b, t in checkpoint["losses"].items()}
        # A fresh executor: the old one's workers may have stopped (a stage raised), and
        # captured graphs hold the optimizers' old state tensors (load_state_dict replaces them).
        self._executor.close()
        self._finalizer.detach()
        self._make_executor()
        self._broken = None
        self._closed = False
        self._executor.restore(self._batches, int(checkpoint["returned"]), losses)

    def _check_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Raise, changing nothing, where ``checkpoint`` cannot load: its parameters' and buffers' names and
        shapes, and each stage's own checks (``Stage.check_state``)."""
        mine = super().state_dict()
        theirs = checkpoint["model"]
        missing, unexpected = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not match this model's modules: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}; the model is unchanged")
        for k, v in mine.items():
            w = theirs[k]
            if isinstance(v, Tensor) and isinstance(w, Tensor) and v.shape != w.shape:
                raise ValueError(f"the checkpoint's {k} has shape {tuple(w.shape)}, this model's "
                                 f"{tuple(v.shape)}; the model is unchanged")
        for st, s in zip(self._stages, checkpoint["stages"]):
            st.check_state(s)

    # -- CUDA graphs --------------------------------------------------------------------------
    def enable_cuda_graphs(self, warmup_steps: int = 3) -> "DecoupledSequential":
        """Capture each stage's step in CUDA graphs after ``warmup_steps`` eager
        steps, and replay them (``executor='streams'``; static shapes, the same
        ``loss_fn`` every step, optimizers built with ``capturable=True``; see
        ``dni_fast/decoupled/graphs.py``). The schedule and its numbers are the
        eager ones. Refused with a clear error where CUDA graphs cannot run."""
        if self.executor != "streams" or not torch.cuda.is_available():
            from dni_fast.decoupled.executors import ExecutorUnavailableError

            where = "torch.cuda.is_available() is False here" if not torch.cuda.is_available() else \
                f"this model runs executor={self.executor!r}"
            raise ExecutorUnavailableError(f"CUDA graphs need executor='streams' with CUDA stages; {where}")
        return self._enable_graphs("cuda", warmup_steps)

    def _enable_graphs(self, mode: str, warmup_steps: int) -> "DecoupledSequential":
        """``mode='emulate'`` runs the graph plumbing without CUDA (tests)."""
        from dni_fast.decoupled.graphs import StageGraphs, check_capturable

        if self._batches:
            raise RuntimeError("enable CUDA graphs before the first step")
        for st in self._stages:
            if st.synth is not None and st.synth.normalizer is not None:
                raise ValueError(f"CUDA graphs do not capture normalize_targets=True (synthesizer {st.index}): the "
                                 "running target scale is updated on the host side of the regression; use eager "
                                 "steps or drop normalize_targets")
        if mode == "cuda":
            for st in self._stages:
                check_capturable(st)
        StageGraphs(self._stages[0], mode, warmup_steps)  # validates the arguments
        self._graphs = (mode, warmup_steps)
        self._executor.close()
        self._finalizer.detach()
        self._make_executor()
        return self

    # -- hooks and statistics ------------------------------------------------------------
    def register_hook(self, fn: Callable[[StageEvent], None]):
        """Call ``fn(event)`` (a :class:`~dni_fast.decoupled.StageEvent`) after
        every stage's forward step and every regression step, on the thread
        that runs that stage (a worker with ``threads``). A hook that raises
        stops training like any stage error. Returns a handle with ``remove()``."""
        handles = [st.register_hook(fn) for st in self._stages]
        return _Handles(handles)

    @property
    def schedule_stages(self) -> List[Stage]:
        """The :class:`~dni_fast.decoupled.Stage` objects (the schedule's state per stage)."""
        return list(self._stages)

    def stats(self) -> List[dict]:
        """Per synthesizer (stages 0..n-2): ``{'backward': ..., 'forward': ...}``
        regression statistics (``SynthStats.read``: loss, cosine, ...)."""
        self.synchronize()
        return [st.synth_stats() for st in self._stages[:-1]]


def _refuse_shared_parameters(stages: Sequence[nn.Module], synthesizers: Sequence[Optional[nn.Module]]) -> None:
    """Each stage and synthesizer has an optimizer of its own (running on a worker of its own with
    ``threads``): a parameter in two of them would be stepped twice, concurrently under ``threads``."""
    owner: Dict[int, str] = {}
    parts = [(f"stage {k}", m) for k, m in enumerate(stages)]
    parts += [(f"synthesizer {k}", m) for k, m in enumerate(synthesizers) if isinstance(m, nn.Module)]
    for name, m in parts:
        for p in m.parameters():
            other = owner.setdefault(id(p), name)
            if other != name:
                raise ValueError(f"DecoupledSequential: a parameter of shape {tuple(p.shape)} is in {other} and in "
                                 f"{name} (the same module given twice, e.g. [synth] * 2, or tied weights): each "
                                 f"has its own optimizer, which would both step it. Give each its own module")


class _DeviceOnly:
    def __init__(self, device, index) -> None:
        self.device, self.index = device, index


class _Handles:
    def __init__(self, handles) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _threads_list(threads_per_stage, n: int) -> Optional[List[int]]:
    if threads_per_stage is None:
        return None
    if isinstance(threads_per_stage, int) and not isinstance(threads_per_stage, bool):
        out = [threads_per_stage] * n
    else:
        try:
            out = list(threads_per_stage)
        except TypeError:
            raise TypeError(f"threads_per_stage must be an int or one int per stage, got {threads_per_stage!r}") \
                from None
        if len(out) != n:
            raise ValueError(f"threads_per_stage has {len(out)} entries for {n} stages")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in out):
        raise ValueError(f"threads_per_stage must be positive ints, got {threads_per_stage!r}")
    return out
