"""The schedule of docs/design.md §4, for one stage: what every executor runs.

One definition serves the in-process executors (``sequential``, ``threads``,
``streams``: ``dni_fast/decoupled/executors.py``) and the distributed stages
of §8 (``dni_fast/distributed/``); they differ only in how batches, targets
and the order of the calls travel between stages. A :class:`Stage` is also
the hook for people who write their own loops (their own transport, their
own threads): call its methods in the order below and the result is the
schedule's.

For a batch ``j`` (stage ``k`` processes batch ``j`` at its own step ``j``):

1. ``a = S_k(h)``: ``h`` is the stage's input, a detached tensor that
   requires grad (the network input, untouched, for stage 0);
2. ``M_k(a)``: the synthetic gradient, predicted with ``M_k``'s current
   weights (and the batch's context);
3. ``a.backward(M_k(a))`` through ``S_k`` alone, then one step of ``S_k``'s
   optimizer (skipped with probability ``1 - update_prob``; the backward to
   ``h`` still runs, so ``M_{k-1}`` still gets its target). The last stage
   starts its backward from ``loss_fn(a, y)`` instead;
4. ``a.detach()`` goes on to stage ``k+1``; the gradient stage ``k+1``'s own
   backward leaves on it comes back (:meth:`Stage.deliver`) as the
   regression target of ``M_k`` for batch ``j``;
5. at step ``j + delay`` (:meth:`Stage.due`), ``M_k`` regresses the
   prediction it stored in step 2 on that target, through its *current*
   weights (§3's pipelined update), then takes one optimizer step.

Complete unlock (a ``BidirectionalInterface`` in place of the synthesizer
after stage ``k``): before step 1, :meth:`Stage.synthetic_input` predicts
stage ``k+1``'s input from the network input ``x`` with the forward
synthesizer ``F_k`` and hands it on at once, so stage ``k+1`` never waits
for ``S_k``. ``M_k`` then regresses on the gradient stage ``k+1`` leaves on
that synthetic input, with the synthetic input as its trigger (what
``BidirectionalInterface.receive`` does), and ``F_k`` regresses its
prediction on the real ``a`` (``F.mse_loss``, as ``ForwardInterface.send``),
both at step ``j + delay``.

Threading: a ``Stage`` is not locked. Its methods run on one thread at a
time, except :meth:`deliver` and :meth:`has_target`, which the stage above
calls; an executor that runs stages on several threads guards those two and
the stage's own check of them with one lock (``executors.py`` does).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from dni_fast._autocast import no_autocast
from dni_fast.backends import resolve
from dni_fast.backends.base import Backend
from dni_fast.backends.fused import deliver, flatten_inputs, grad_carrier
from dni_fast.backends.reference import closed_form
from dni_fast.interfaces import BackwardInterface, BidirectionalInterface, UnidirectionalInterface, _divide_target
from dni_fast.regression import BACKWARD_LOSS, FORWARD_LOSS, RegressionLoss
from dni_fast.stats import SynthStats, partials_of
from dni_fast.synthesizer import BasicSynthesizer

__all__ = ["Stage", "StageOutput", "StageEvent", "MIN_DELAY", "check_delay", "check_update_prob",
           "stage_generator", "split_synthesizer", "check_regression", "REGRESSIONS"]

#: The smallest ``delay`` each way of running the schedule accepts, and its default.
#: With ``delay=0`` a stage's step waits for the whole pipeline above it (the
#: target of the batch it has just processed), which is the sequential order.
MIN_DELAY = {"sequential": 0, "threads": 1, "streams": 1, "distributed": 1}


def check_delay(delay: Optional[int], runner: str) -> int:
    """``delay`` validated for ``runner`` (a key of :data:`MIN_DELAY`); ``None`` is the minimum."""
    lo = MIN_DELAY[runner]
    if delay is None:
        return lo
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < lo:
        why = ("" if lo == 0 else
               "; with delay=0 every stage would wait each step for the stages above it to finish the same "
               "batch, so nothing would overlap: use executor='sequential' for delay=0")
        raise ValueError(f"delay must be an int >= {lo} for {runner!r}, got {delay!r}{why}")
    return delay


def check_update_prob(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0) or math.isnan(p):
        raise ValueError(f"update_prob must be a number in [0, 1], got {p!r}")
    return float(p)


def stage_generator(seed: int, index: int) -> torch.Generator:
    """The generator of stage ``index``'s ``update_prob`` draws: one per stage,
    seeded from ``seed`` alone, so every executor and every rank draws the same."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    # splitmix64 of (seed, index): neighbouring seeds and stages get unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return torch.Generator(device="cpu").manual_seed(z & 0x7FFFFFFFFFFFFFFF)


REGRESSIONS = ("stored", "current")


def check_regression(regression: str) -> str:
    """Which prediction step 5 regresses on its target, ``delay`` steps after it was made.

    * ``"stored"`` (docs/design.md §4 as written, §3's pipelined update): the
      prediction stored at step 2, backpropagated through the current weights.
    * ``"current"``: the synthesizer predicts again for the stored trigger with
      its current weights (one more synthesizer forward per regression), so
      step 5 is the plain gradient of the regression loss at the current
      weights.

    Both are the same at ``delay=0``. At ``delay >= 1`` the stored prediction is
    stale by ``delay`` optimizer steps, and the error ``S_stored - g`` does not
    see what those steps changed: with Adam, whose steps are far larger than
    the targets (docs/synthetic_gradients.md, cause 1), this delayed feedback
    stops the synthesizers learning. Measured (examples/decoupled.py, MNIST, one
    epoch, cDNI, seed 1): sequential at delay 0 95.6%; at delay 1 33.2% with
    ``"stored"`` and 95.4% with ``"current"`` (docs/decoupled.md)."""
    if regression not in REGRESSIONS:
        raise ValueError(f"regression must be one of {', '.join(map(repr, REGRESSIONS))}, got {regression!r}")
    return regression


def split_synthesizer(entry: Optional[nn.Module]) -> Tuple[Optional[nn.Module], Optional[nn.Module], Optional[str]]:
    """``(backward_synth, forward_synth, backend)`` of one ``synthesizers[k]``
    entry: a synthesizer module, a ``BackwardInterface`` (its synthesizer and
    its ``backend=``), or a ``BidirectionalInterface`` (complete unlock: its
    forward and backward synthesizers). :func:`target_normalizer` gives the
    interface whose ``normalize_targets`` applies."""
    if entry is None:
        return None, None, None
    if isinstance(entry, BidirectionalInterface):
        fwd, bwd = entry.forward_interface, entry.backward_interface
        _check_interface_options(bwd)
        return bwd.synthesizer, fwd.synthesizer, bwd.backend or fwd.backend
    if isinstance(entry, UnidirectionalInterface):
        if not isinstance(entry, BackwardInterface):
            raise TypeError(f"a {type(entry).__name__} cannot sit after a stage: give a synthesizer, a "
                            "BackwardInterface or a BidirectionalInterface (complete unlock)")
        _check_interface_options(entry)
        return entry.synthesizer, None, entry.backend
    if not isinstance(entry, nn.Module):
        raise TypeError(f"a synthesizer must be an nn.Module with forward(trigger, context), got "
                        f"{type(entry).__name__}")
    return entry, None, None


def _check_interface_options(iface: BackwardInterface) -> None:
    """The BackwardInterface options the schedule cannot honour are refused, never ignored."""
    if getattr(iface, "pipelined", False):
        raise ValueError("BackwardInterface(pipelined=True) after a stage: the schedule's own delay= sets when "
                         "the true gradient is applied; drop pipelined=True")
    if getattr(iface, "overlap", None):
        raise ValueError("BackwardInterface(overlap=True) after a stage: the executor decides where the "
                         "regression runs (executor='threads' or 'streams'); drop overlap=True")
    if getattr(iface, "warmup_steps", 0):
        raise ValueError(f"BackwardInterface(warmup_steps={iface.warmup_steps}) after a stage: the schedule "
                         "applies every synthetic gradient it predicts (update_prob= skips stage updates); drop "
                         "warmup_steps")
    if getattr(iface, "check_finite", None):
        raise ValueError("BackwardInterface(check_finite=True) after a stage: the schedule does not run the "
                         "interface's checks; drop check_finite (check the loss returned by step instead)")
    if getattr(iface, "track_stats", True) is False:
        raise ValueError("BackwardInterface(track_stats=False) after a stage: the schedule keeps its own "
                         "statistics (DecoupledSequential.stats()); drop track_stats")


def target_normalizer(entry: Optional[nn.Module]) -> Optional[BackwardInterface]:
    """The ``BackwardInterface`` of ``synthesizers[k]`` built with
    ``normalize_targets=True`` (its running RMS sigma and its buffers), else ``None``."""
    if isinstance(entry, BidirectionalInterface):
        entry = entry.backward_interface
    if isinstance(entry, BackwardInterface) and entry.normalize_targets:
        return entry
    return None


def module_device(module: nn.Module) -> Optional[torch.device]:
    """The one device of ``module``'s parameters and buffers (``None`` if it has
    none); raises if they sit on several."""
    devs = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    if len(devs) > 1:
        raise ValueError(f"{type(module).__name__} has parameters on several devices "
                         f"({', '.join(sorted(map(str, devs)))}); a stage must sit on one device")
    return next(iter(devs)) if devs else None


# ---------------------------------------------------------------------------
# One synthesizer: prediction, stored records, regression
# ---------------------------------------------------------------------------
@dataclass
class _Record:
    """A prediction stored for its regression step (§4 step 5).

    Fused path (``BasicSynthesizer``): ``x`` (N, Dt) and ``c`` (N, Dc) are the
    flattened, detached trigger and context, ``zs`` the pre-activations and
    ``s`` (N, Do) the prediction, as ``kernels/synth_ref.py`` defines them.
    Custom synthesizer: ``x`` and ``c`` as given, ``s`` in the trigger's
    layout, ``zs`` empty. ``shape`` is the prediction's (and so the target's)
    shape in the trigger's layout."""

    backend: Optional[Backend]  # None: a custom synthesizer, through autograd
    x: Tensor
    c: Optional[Tensor]
    zs: Tuple[Tensor, ...]
    s: Tensor
    scale: float
    shape: torch.Size
    target: Optional[Tensor] = None
    sigma: Optional[Tensor] = None  # normalize_targets: the target scale at prediction time (0-dim)
    seen: Optional[bool] = None  # normalize_targets: whether a true gradient had set sigma then

    def tensors(self) -> dict:
        return {"fused": self.backend is not None, "backend": None if self.backend is None else self.backend.name,
                "x": self.x, "c": self.c, "zs": list(self.zs), "s": self.s, "scale": self.scale,
                "shape": list(self.shape), "target": self.target, "sigma": self.sigma,
                "seen": self.seen}


class _Synth:
    """One synthesizer of the schedule: its optimizer, statistics and loss."""

    def __init__(self, module: nn.Module, optimizer: Callable, loss: RegressionLoss, backend: Optional[str],
                 label: str, normalizer: Optional[BackwardInterface] = None, regression: str = "stored") -> None:
        self.module, self.loss, self.backend, self.label = module, loss, backend, label
        self.regression = regression  # check_regression's doc
        # BackwardInterface(normalize_targets=True): the synthesizer predicts g / sigma (sigma the running RMS
        # of its targets, in the interface's buffers); sigma * S is injected, and the regression's target is
        # g / sigma with the sigma of prediction time, as the interface does inline (docs/synthetic_gradients.md).
        self.normalizer = normalizer
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(optimizer, params, label) if params else None
        self.stats = SynthStats()
        # The fused primitives read the layers' parameters without calling the modules: only where that computes
        # exactly what forward() does (no overridden forward, module hook or replaced layer; checked here, once)
        self.fused = isinstance(module, BasicSynthesizer) and module.fused_blocker() is None

    def predict(self, trigger: Tensor, context: Any, requested: Optional[str]) -> Tuple[Tensor, _Record]:
        """``S(trigger, context)`` with the current weights, detached, in the
        trigger's layout ``(*, Do)``, and the record its regression needs."""
        synth = self.module
        if self.fused:
            if self.backend is not None:
                requested = self.backend
            try:
                x, c = flatten_inputs(synth, trigger, context)
            except (ValueError, TypeError, RuntimeError) as e:
                raise type(e)(f"{self.label}: {e}") from None
            backend = resolve(requested, synth, x)
            with torch.no_grad(), no_autocast(x):
                s, zs = backend.primitives.forward(x, c, [p.detach() for p in synth.flat_params()])
            out = s.view(*trigger.shape[:-1], s.shape[-1])
            return self._scaled(out, _Record(backend, x, c, tuple(zs), s, 0.0, out.shape))
        x = trigger.detach()
        c = context.detach() if isinstance(context, Tensor) else context
        with torch.no_grad():
            s = synth(x, c)
        if not isinstance(s, Tensor):
            raise TypeError(f"{self.label}: the synthesizer returned {type(s).__name__}, expected a tensor")
        return self._scaled(s, _Record(None, x, c, (), s, 0.0, s.shape))

    def _scaled(self, out: Tensor, rec: _Record) -> Tuple[Tensor, _Record]:
        """The synthetic gradient to inject: ``sigma * S`` under normalize_targets (the record keeps S)."""
        if self.normalizer is None:
            return out, rec
        with torch.no_grad():
            rec.sigma, rec.seen = self.normalizer._target_scale()  # a fresh tensor (torch.where's)
            return out * rec.sigma.to(out.dtype), rec

    def regress_compute(self, rec: _Record) -> Tensor:
        """The device work of one regression step: the loss between the stored
        prediction and its target, backpropagated through the *current*
        weights, then one optimizer step. The gradients reach ``.grad`` through
        autograd. Returns the partial sums for the statistics (fp32 (4,))."""
        g = rec.target
        if self.normalizer is not None:
            norm = self.normalizer
            norm._observe_target(g)  # the running RMS learns from the true (unscaled) target
            # (a prediction made before any target had set sigma is divided by the sigma observed with its own)
            g = _divide_target(g, norm._regression_sigma(rec.sigma, rec.seen))
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if rec.backend is not None:
            synth = self.module
            params = synth.flat_params()
            g2 = g.reshape(-1, g.shape[-1])
            if g2.dtype != rec.s.dtype:
                g2 = g2.to(rec.s.dtype)
            with torch.no_grad(), no_autocast(rec.x):
                weights = [p.detach() for p in params]
                s_, zs_ = rec.s, rec.zs
                if self.regression == "current":  # the prediction again, with the weights as they are now
                    s_, zs_ = rec.backend.primitives.forward(rec.x, rec.c, weights)
                grads, partials = rec.backend.primitives.update(rec.x, rec.c, weights, zs_, s_, g2, rec.scale,
                                                                None)
            with torch.enable_grad():
                carrier = grad_carrier(grads, params)
            if carrier.requires_grad:  # else the synthesizer is frozen
                deliver(carrier)
        elif closed_form(self.module):  # RidgeSynthesizer: fitted on the target, no loss
            partials = partials_of(self.module(rec.x, rec.c) if self.regression == "current" else rec.s, g)
            self.module.fit(rec.x, rec.c, g)
        else:
            with torch.enable_grad():
                out = self.module(rec.x, rec.c)
                s_ = out.detach() if self.regression == "current" else rec.s
                partials = partials_of(s_, g)
                if out.requires_grad:
                    out.backward(rec.scale * (s_ - g.to(s_.dtype)))
        if self.optimizer is not None:
            self.optimizer.step()
        return partials

    def regress(self, rec: _Record) -> None:
        """One regression step, its statistics recorded."""
        self.stats.record(self.regress_compute(rec), rec.scale)


def _make_optimizer(factory: Callable, params: List[Tensor], label: str):
    if not callable(factory):
        raise TypeError(f"optimizer must be a callable params -> torch.optim.Optimizer, got {type(factory).__name__}")
    opt = factory(params)
    if not (hasattr(opt, "step") and hasattr(opt, "zero_grad") and hasattr(opt, "state_dict")):
        raise TypeError(f"optimizer(params) for {label} returned {type(opt).__name__}, not an optimizer")
    return opt


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------
# torch.optim classes whose per-parameter state tensors have their parameter's shape
_PARAM_SHAPED_STATE = frozenset({"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta",
                                 "ASGD", "Rprop", "SparseAdam"})


@dataclass
class StageOutput:
    """What one stage's step hands on.

    ``out``: ``a.detach()`` for the next stage (``None`` on the last stage, and
    ``None`` when the stage is unlocked: its successor already has the
    synthetic input); ``grad_in``: the gradient the stage's backward left on
    its input, the target of the synthesizer below (``None`` on stage 0);
    ``loss``: the last stage's loss, detached, 0-dim."""

    out: Optional[Tensor]
    grad_in: Optional[Tensor]
    loss: Optional[Tensor]
    updated: bool


@dataclass
class _Computed:
    """The device results of steps 1-3 (``Stage.compute_forward``): ``a``
    detached, the synthetic gradient ``s`` and its record (``None`` on the last
    stage), the gradient on the input (``None`` on stage 0), the loss (last)."""

    a: Tensor
    s: Optional[Tensor]
    rec: Optional[_Record]
    grad_in: Optional[Tensor]
    loss: Optional[Tensor]


@dataclass
class StageEvent:
    """What a hook sees (``DecoupledSequential.register_hook``, :meth:`Stage.register_hook`).

    ``kind`` is ``"forward"`` after steps 1-4 (``output`` is ``a`` detached,
    ``synthetic_grad`` the prediction injected into it, ``loss`` the last
    stage's loss, ``updated`` whether the optimizer stepped) or
    ``"regress"`` after a regression step of batch ``batch`` at this stage's
    step ``step`` (``synthetic_grad`` the stored prediction, ``target`` its
    target). Tensors are the stage's own: clone them to keep them."""

    kind: str
    stage: int
    batch: int
    step: int
    output: Optional[Tensor] = None
    synthetic_grad: Optional[Tensor] = None
    target: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    updated: Optional[bool] = None


class Stage:
    """One stage of the decoupled schedule (module docstring), with its
    optimizer, its synthesizer(s) and their optimizers, its ``update_prob``
    generator and the predictions waiting for their targets.

    Args:
        index, num_stages: this stage's place, ``0 <= index < num_stages``.
        module: ``S_k``, input ``(B, *)``, output ``a`` ``(B, *, D)``.
        synthesizer: ``None`` on the last stage; else a synthesizer module
            (``forward(trigger, context) -> (*, D)``), a ``BackwardInterface``
            or a ``BidirectionalInterface`` (complete unlock).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once
            for the module and once per synthesizer (not for a module without
            trainable parameters).
        delay: the step at which a target is applied, counted in this stage's
            steps (``>= 0``).
        update_prob: probability of taking step 3 at a step.
        seed: seeds the ``update_prob`` generator (:func:`stage_generator`).

    Call order for batch ``j`` (``j`` = 0, 1, ... with no gaps): optionally
    :meth:`synthetic_input` (unlocked stages), :meth:`forward`, then for each
    batch in :meth:`due` ``(j)``: wait until :meth:`has_target`, then
    :meth:`regress`. The stage above calls :meth:`deliver`. At the end,
    :meth:`regress` every batch in :meth:`pending`, oldest first.
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module, synthesizer: Optional[nn.Module],
                 optimizer: Callable, delay: int = 0, update_prob: float = 1.0, seed: int = 0, *,
                 regression: str = "stored") -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {index} must be an nn.Module, got {type(module).__name__}")
        if not (isinstance(num_stages, int) and num_stages >= 1 and isinstance(index, int) and 0 <= index < num_stages):
            raise ValueError(f"stage index {index!r} out of range for num_stages={num_stages!r}")
        self.index, self.num_stages, self.module = index, num_stages, module
        self.last = index == num_stages - 1
        self.delay = check_delay(delay, "sequential")
        self.update_prob = check_update_prob(update_prob)
        self.generator = stage_generator(seed, index)
        bwd, fwd, backend = split_synthesizer(synthesizer)
        if self.last and bwd is not None:
            raise ValueError(f"stage {index} is the last stage: it takes its gradient from the loss, so it has no "
                             "synthesizer")
        if not self.last and bwd is None:
            raise ValueError(f"stage {index} needs a synthesizer (every stage but the last has one)")
        if isinstance(bwd, BasicSynthesizer) and bwd.trigger_dim != bwd.output_dim:
            raise ValueError(f"synthesizer {index} has trigger_dim={bwd.trigger_dim} but output_dim="
                             f"{bwd.output_dim}: it predicts the gradient of stage {index}'s output from that "
                             "output, so both must equal the output's width")
        self.device = module_device(module)
        for name, s in (("synthesizer", bwd), ("forward synthesizer", fwd)):
            d = None if s is None else module_device(s)
            if d is not None and self.device is not None and d != self.device:
                raise ValueError(f"{name} {index} is on {d} but stage {index} is on {self.device}: put each "
                                 "synthesizer on its stage's device")
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(optimizer, params, f"stage {index}") if params else None
        self.regression = check_regression(regression)
        self.synth = None if bwd is None else _Synth(bwd, optimizer, BACKWARD_LOSS, backend, f"synthesizer {index}",
                                                     target_normalizer(synthesizer), self.regression)
        self.fsynth = (None if fwd is None else
                       _Synth(fwd, optimizer, FORWARD_LOSS, backend, f"forward synthesizer {index}",
                              regression=self.regression))
        self.steps = 0  # forward steps done: the batch index of the next one
        self._pending: Dict[int, Dict[str, _Record]] = {}  # batch -> {"bwd": rec, "fwd": rec}
        self._hooks: Dict[int, Callable[[StageEvent], None]] = {}
        self._hook_id = 0

    # -- facts -----------------------------------------------------------------
    @property
    def unlocked(self) -> bool:
        """Whether the next stage takes a synthetic input from this one (complete unlock)."""
        return self.fsynth is not None

    def __repr__(self) -> str:
        return (f"<dni_fast Stage {self.index}/{self.num_stages} step {self.steps}, delay {self.delay}, "
                f"{len(self._pending)} pending>")

    # -- hooks -------------------------------------------------------------------
    def register_hook(self, fn: Callable[[StageEvent], None]):
        """Call ``fn(event)`` after each forward step and each regression step
        (on the thread that runs the stage). Returns a handle with ``remove()``."""
        if not callable(fn):
            raise TypeError("hook must be callable")
        self._hook_id += 1
        key = self._hook_id
        self._hooks[key] = fn
        return _HookHandle(self._hooks, key)

    def _emit(self, event: StageEvent) -> None:
        for fn in list(self._hooks.values()):
            fn(event)

    # -- steps 0-4 -------------------------------------------------------------------
    def synthetic_input(self, batch: int, x: Tensor, context: Any = None, backend: Optional[str] = None) -> Tensor:
        """Complete unlock: ``F_k(x)``, the next stage's input predicted from the
        network input ``x`` (``(*, Dx)``) with the forward synthesizer's current
        weights, detached. ``M_k``'s prediction on it is stored for its
        regression. Call before :meth:`forward` of the same batch."""
        if self.fsynth is None:
            raise RuntimeError(f"stage {self.index} is not unlocked (its synthesizer is not a BidirectionalInterface)")
        if batch != self.steps:
            raise RuntimeError(f"stage {self.index}: synthetic_input for batch {batch}, expected batch {self.steps}")
        if batch in self._pending:
            raise RuntimeError(f"stage {self.index}: synthetic_input called twice for batch {batch}")
        hhat, frec = self.fsynth.predict(x, context, backend)
        frec.scale = FORWARD_LOSS.scale(hhat.shape)
        # The backward synthesizer regresses on the gradient at the synthetic input,
        # with that input as its trigger (BidirectionalInterface.receive); stored now.
        _check_width(self.index, self.synth.module, hhat, f"forward synthesizer {self.index}'s prediction")
        s, brec = self.synth.predict(hhat, context, backend)
        _check_synthetic(self.index, s, hhat, "the synthetic input")
        brec.scale = BACKWARD_LOSS.scale(hhat.shape)
        self._pending[batch] = {"bwd": brec, "fwd": frec}
        return hhat

    def forward(self, batch: int, h: Tensor, context: Any = None, target: Any = None,
                loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
                backend: Optional[str] = None) -> StageOutput:
        """Steps 1-4 for ``batch`` (which must be ``self.steps``): the stage's
        forward, the synthetic gradient (or the loss on the last stage), the
        backward through the stage alone and its optimizer step. ``backend``
        is the dni_fast backend name for the synthesizer (``None``: this
        thread's global choice)."""
        self.check_forward(batch, h)
        updated = self.draw_update()
        return self.record_forward(batch, self.compute_forward(h, context, target, loss_fn, backend, updated),
                                   updated)

    # The three parts of ``forward``, apart so that a CUDA graph can replay the
    # device work alone (``graphs.py``): the checks and the bookkeeping stay in Python.
    def check_forward(self, batch: int, h: Any) -> None:
        k = self.index
        if batch != self.steps:
            raise RuntimeError(f"stage {k}: forward for batch {batch}, expected batch {self.steps} (batches go "
                               "through a stage in order, each once)")
        if self.unlocked and batch not in self._pending:
            raise RuntimeError(f"stage {k} is unlocked: call synthetic_input before forward for batch {batch}")
        if not isinstance(h, Tensor):
            raise TypeError(f"stage {k}: the input must be a tensor, got {type(h).__name__}")

    def draw_update(self) -> bool:
        """Whether this step takes step 3 (one draw per step when ``update_prob < 1``)."""
        if self.update_prob >= 1.0:
            return True
        return bool(torch.rand((), generator=self.generator).item() < self.update_prob)

    def compute_forward(self, h: Tensor, context: Any, target: Any, loss_fn: Optional[Callable],
                        backend: Optional[str], updated: bool) -> "_Computed":
        """The device work of steps 1-3; changes no Python state of the stage
        (but the modules' and optimizers' tensors)."""
        k = self.index
        if k > 0:
            h = h.detach().requires_grad_()  # its .grad is the target of the synthesizer below
        try:
            with torch.enable_grad():
                a = self.module(h)
        except Exception as e:
            src = f"stage {k - 1}'s output" if k > 0 else "the batch x"
            e.add_note(f"stage {k}'s input had shape {tuple(h.shape)} ({src})")
            raise
        if not isinstance(a, Tensor):
            raise TypeError(f"stage {k} returned {type(a).__name__}; a stage must return one tensor")
        if k > 0 and not a.requires_grad:
            raise ValueError(f"stage {k}'s output does not require grad (detached inside the stage, or computed "
                             f"under no_grad?): the gradient sent down would be zeros, and synthesizer {k - 1} "
                             f"would regress on them")
        s = rec = None
        if self.last:
            if loss_fn is None:
                raise ValueError(f"stage {k} is the last stage: step needs loss_fn")
            with torch.enable_grad():
                loss = loss_fn(a, target)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a tensor with one element, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            if not loss.requires_grad and (k > 0 or any(p.requires_grad for p in self.module.parameters())):
                raise ValueError(f"loss_fn returned a loss that does not require grad (computed under no_grad, or "
                                 f"detached?): stage {k} could not learn from it"
                                 + (f", and synthesizer {k - 1} would regress on zeros" if k > 0 else ""))
            root, seed_grad = loss.reshape(()), None
        else:
            loss = None
            _check_width(k, self.synth.module, a, f"stage {k}'s output")
            s, rec = self.synth.predict(a, context, backend)
            _check_synthetic(k, s, a, f"stage {k}'s output")
            rec.scale = BACKWARD_LOSS.scale(a.shape)
            root, seed_grad = a, s
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        grad_in = None
        if root.requires_grad:
            if updated:
                root.backward(seed_grad)
                grad_in = h.grad if k > 0 else None
                if self.optimizer is not None:
                    self.optimizer.step()
            elif k > 0:
                # Skip step 3, keep the backward to the input: the synthesizer below needs its target.
                (grad_in,) = torch.autograd.grad(root, h, seed_grad, allow_unused=True)
        if k > 0 and grad_in is None:  # the output does not depend on the input
            grad_in = torch.zeros_like(h)
        return _Computed(a.detach(), s, rec, None if grad_in is None else grad_in.detach(),
                         None if loss is None else loss.detach().reshape(()))

    def record_forward(self, batch: int, comp: "_Computed", updated: bool) -> StageOutput:
        """The bookkeeping of steps 2 and 4: store the prediction for its
        regression, count the step, call the hooks."""
        k, a = self.index, comp.a
        if not self.last:
            if self.unlocked:
                # M_k's regression pair is the synthetic input's (stored by synthetic_input);
                # F_k regresses its prediction on the real output.
                frec = self._pending[batch]["fwd"]
                if tuple(frec.shape) != tuple(a.shape):
                    raise ValueError(f"forward synthesizer {k} predicts stage {k + 1}'s input with shape "
                                     f"{tuple(frec.shape)}, but stage {k}'s output has shape {tuple(a.shape)}")
                frec.target = a
            else:
                self._pending[batch] = {"bwd": comp.rec}
        self.steps += 1
        if self._hooks:
            self._emit(StageEvent("forward", k, batch, batch, output=a, synthetic_grad=comp.s, loss=comp.loss,
                                  updated=updated))
        return StageOutput(None if (self.last or self.unlocked) else a, comp.grad_in, comp.loss, updated)

    # -- step 5 -------------------------------------------------------------------
    def deliver(self, batch: int, target: Tensor) -> None:
        """The gradient that stage ``k+1``'s backward left on this stage's
        output (or synthetic input) for ``batch``: ``M_k``'s target."""
        recs = self._pending.get(batch)
        if recs is None:
            raise RuntimeError(f"stage {self.index}: a target arrived for batch {batch}, which has no pending "
                               "prediction (already applied, or never run)")
        rec = recs["bwd"]
        if rec.target is not None:
            raise RuntimeError(f"stage {self.index}: a second target arrived for batch {batch}")
        if not isinstance(target, Tensor) or tuple(target.shape) != tuple(rec.shape):
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"stage {self.index}: the gradient from stage {self.index + 1} for batch {batch} has "
                             f"shape {got}, expected {tuple(rec.shape)} (the shape handed on)")
        rec.target = target.detach()

    def has_target(self, batch: int) -> bool:
        recs = self._pending.get(batch)
        return recs is not None and recs["bwd"].target is not None

    def due(self, step: int) -> List[int]:
        """The batches whose regression is due at this stage's step ``step``:
        ``[step - delay]`` while it is pending (``flush`` may have applied it)."""
        b = step - self.delay
        return [b] if b >= 0 and b in self._pending else []

    def pending(self) -> List[int]:
        """Batches whose prediction waits for its regression, oldest first."""
        return sorted(self._pending)

    def regress(self, batch: int, step: Optional[int] = None,
                runner: Optional[Callable[[str, "_Synth", _Record], Tensor]] = None) -> None:
        """Step 5 for ``batch``: the backward synthesizer's regression, then the
        forward synthesizer's (complete unlock); its target must be there.
        ``runner(kind, synth, record) -> partials`` replaces
        ``synth.regress_compute`` (a CUDA graph's replay)."""
        recs = self._pending.get(batch)
        if recs is None:
            raise RuntimeError(f"stage {self.index}: no pending prediction for batch {batch}")
        if recs["bwd"].target is None:
            raise RuntimeError(f"stage {self.index}: the target of batch {batch} has not arrived; the schedule "
                               "applies a target when it is there, never before")
        del self._pending[batch]
        for kind, synth in (("bwd", self.synth), ("fwd", self.fsynth)):
            if kind in recs:
                rec = recs[kind]
                partials = synth.regress_compute(rec) if runner is None else runner(kind, synth, rec)
                synth.stats.record(partials, rec.scale)
        if self._hooks:
            r = recs["bwd"]
            self._emit(StageEvent("regress", self.index, batch, self.steps - 1 if step is None else step,
                                  synthetic_grad=r.s, target=r.target))

    def moved(self, fn: Callable[[Tensor], Tensor]) -> None:
        """After the modules moved (``nn.Module._apply``): read the device again
        and apply ``fn`` to the stored predictions and targets."""
        self.device = module_device(self.module)
        for recs in self._pending.values():
            for r in recs.values():
                r.x, r.s = fn(r.x), fn(r.s)
                r.c = None if not isinstance(r.c, Tensor) else fn(r.c)
                r.zs = tuple(fn(z) for z in r.zs)
                r.target = None if r.target is None else fn(r.target)

    # -- state ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Clear every gradient this stage's optimizers see (after a failure)."""
        for opt in (self.optimizer, None if self.synth is None else self.synth.optimizer,
                    None if self.fsynth is None else self.fsynth.optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def state(self) -> dict:
        """A deep copy of everything but the modules' weights: the optimizers,
        the generator, the step count and the pending predictions (with their
        targets), so that :meth:`load_state` resumes exactly."""
        st = {
            "index": self.index, "num_stages": self.num_stages, "delay": self.delay, "steps": self.steps,
            "update_prob": self.update_prob, "generator": self.generator.get_state(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "synth_optimizer": None if self.synth is None or self.synth.optimizer is None
            else self.synth.optimizer.state_dict(),
            "fsynth_optimizer": None if self.fsynth is None or self.fsynth.optimizer is None
            else self.fsynth.optimizer.state_dict(),
            # what each optimizer is: another class's state would load, and fail at the next step
            "optimizer_types": {name: type(opt).__qualname__ for name, opt in self._optimizers() if opt is not None},
            "pending": {b: {kind: r.tensors() for kind, r in recs.items()} for b, recs in self._pending.items()},
            # the statistics too: stats() after a resume reads what the uninterrupted run reads (to the last bits of
            # the fp64 sums: this fold groups the additions differently)
            "stats": {kind: s.stats.state() for kind, s in (("bwd", self.synth), ("fwd", self.fsynth))
                      if s is not None},
        }
        return copy.deepcopy(st)

    def check_state(self, st: dict) -> None:
        """Raise, changing nothing, where :meth:`load_state` of ``st`` would fail on its structure."""
        if not isinstance(st, dict):
            raise ValueError(f"stage {self.index}: the checkpoint's stage state is a {type(st).__name__}, not a dict")
        if st.get("index") != self.index or st.get("num_stages") != self.num_stages:
            raise ValueError(f"checkpoint of stage {st.get('index')}/{st.get('num_stages')} loaded into stage "
                             f"{self.index}/{self.num_stages}")
        if st.get("delay") != self.delay:
            raise ValueError(f"stage {self.index}: the checkpoint was taken with delay={st.get('delay')}, this "
                             f"schedule has delay={self.delay}; the pending predictions would be applied at other "
                             "steps")
        for name, opt in self._optimizers():
            if (st.get(name) is None) != (opt is None):
                raise ValueError(f"stage {self.index}: the checkpoint's {name} does not match this stage's (one "
                                 f"has it, the other not: a frozen stage or synthesizer?)")
            if opt is None:
                continue
            saved_type = st.get("optimizer_types", {}).get(name)  # (absent in older checkpoints)
            if saved_type is not None and saved_type != type(opt).__qualname__:
                raise ValueError(f"stage {self.index}: the checkpoint's {name} is a {saved_type}, this stage's a "
                                 f"{type(opt).__qualname__}: its state would not fit")
            self._check_optimizer_state(name, st[name], opt)
        for b, recs in st.get("pending", {}).items():
            for kind in recs:
                if (self.synth if kind == "bwd" else self.fsynth) is None:
                    raise ValueError(f"stage {self.index}: the checkpoint has a pending {kind!r} prediction, but "
                                     f"this stage has no such synthesizer (a checkpoint of another unlock setting?)")

    def _check_optimizer_state(self, name: str, saved: dict, opt: torch.optim.Optimizer) -> None:
        """The saved optimizer state fits ``opt``: as many groups, as many parameters in each, and, for torch's
        optimizers whose per-parameter state is shaped like the parameter (Adam's moments, a momentum buffer),
        those shapes. ``load_state_dict`` checks only the counts per group, and only once it loads, after the
        weights (a frozen parameter changes them). Other optimizers keep other shapes (Adafactor's factored
        row/column statistics, LBFGS's flat vectors): only their counts are checked."""
        groups = saved.get("param_groups", ()) if isinstance(saved, dict) else ()
        if len(groups) != len(opt.param_groups):
            raise ValueError(f"stage {self.index}: the checkpoint's {name} has {len(groups)} parameter groups, "
                             f"this stage's {len(opt.param_groups)}")
        params = {}
        for i, (g_saved, g) in enumerate(zip(groups, opt.param_groups)):
            ids = list(g_saved.get("params", ()))
            if len(ids) != len(g["params"]):
                raise ValueError(f"stage {self.index}: the checkpoint's {name} holds {len(ids)} parameters in group "
                                 f"{i}, this stage's {len(g['params'])} (a parameter frozen or added since?)")
            params.update(zip(ids, g["params"]))
        if type(opt).__name__ not in _PARAM_SHAPED_STATE or type(opt).__module__.split(".")[:2] != ["torch", "optim"]:
            return
        for pid, pstate in (saved.get("state") or {}).items():
            p = params.get(pid)
            if p is None or not isinstance(pstate, dict):
                continue
            for key, v in pstate.items():
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(f"stage {self.index}: the checkpoint's {name} keeps {key!r} of shape "
                                     f"{tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")

    def _optimizers(self):
        return (("optimizer", self.optimizer),
                ("synth_optimizer", None if self.synth is None else self.synth.optimizer),
                ("fsynth_optimizer", None if self.fsynth is None else self.fsynth.optimizer))

    def load_state(self, st: dict) -> None:
        """Restore :meth:`state` (the modules' weights are loaded separately)."""
        self.check_state(st)
        st = copy.deepcopy(st)
        for name, opt in self._optimizers():
            if opt is not None:
                opt.load_state_dict(st[name])
        self.generator.set_state(st["generator"])
        self.steps = int(st["steps"])
        for kind, s in (("bwd", self.synth), ("fwd", self.fsynth)):
            if s is not None:
                s.stats.load_state(st.get("stats", {}).get(kind))  # (a checkpoint without them: reset)
        self._pending = {}
        for b, recs in st["pending"].items():
            self._pending[int(b)] = {kind: self._record_from(kind, r) for kind, r in recs.items()}

    def _record_from(self, kind: str, r: dict) -> _Record:
        synth = self.synth if kind == "bwd" else self.fsynth
        dev = None if self.device is None else self.device
        if dev is None:
            mv = lambda t: t  # noqa: E731
        else:
            from torch.utils._pytree import tree_map

            # (a custom synthesizer's context may be any object: its tensors move)
            mv = lambda t: tree_map(lambda u: u.to(dev) if isinstance(u, Tensor) else u, t)  # noqa: E731
        backend = None
        if r["fused"]:
            # The same backend that predicted it, if it can still run here; else what resolves now.
            from dni_fast.backends import get as get_backend_object

            try:
                backend = get_backend_object(r["backend"])
                if not backend.status(r["x"].device if dev is None else dev)[0]:
                    raise ValueError
            except ValueError:
                backend = resolve(synth.backend, synth.module, mv(r["x"]))
        return _Record(backend, mv(r["x"]), mv(r["c"]), tuple(mv(z) for z in r["zs"]), mv(r["s"]), r["scale"],
                       torch.Size(r["shape"]), mv(r["target"]), mv(r.get("sigma")), mv(r.get("seen")))

    def synth_stats(self) -> dict:
        """``{'backward': ..., 'forward': ...}`` statistics (``SynthStats.read``) of
        this stage's synthesizers (``forward`` only when unlocked)."""
        out = {}
        if self.synth is not None:
            out["backward"] = self.synth.stats.read()
        if self.fsynth is not None:
            out["forward"] = self.fsynth.stats.read()
        return out


def _check_width(k: int, synth: nn.Module, t: Tensor, what: str) -> None:
    if isinstance(synth, BasicSynthesizer) and (t.dim() == 0 or t.shape[-1] != synth.trigger_dim):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, but synthesizer {k} takes inputs of width "
                         f"{synth.trigger_dim}: a stage's output width must match the synthesizer after it")


def _check_synthetic(k: int, s: Tensor, a: Tensor, what: str) -> None:
    if tuple(s.shape) != tuple(a.shape):
        raise ValueError(f"synthesizer {k} predicts a gradient of shape {tuple(s.shape)} for {what} of shape "
                         f"{tuple(a.shape)}: its output width must match stage {k}'s output width "
                         f"({a.shape[-1] if a.dim() else '?'})")


class _HookHandle:
    def __init__(self, hooks: dict, key: int) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)
