"""Decoupled Neural Interfaces with dni-pytorch's API and semantics.

The interfaces own what is the same for every backend: training/eval mode,
the warm-up, deferred backward, empty batches, the finite checks, the
pipelined schedule and the regression scale (``regression.py``). What runs
the synthesizer is one ``Backend`` object from ``backends.resolve``; the
interfaces call its entry points and never ask which backend it is
(docs/design.md §2).

Deviations from dni-pytorch, on purpose:

* the synthesizer runs once per ``forward`` (dni-pytorch runs it twice: once
  detached for the injection, once with a graph for the update);
* the regression gradient reaches only the synthesizer's parameters, never the
  producers of the trigger or the context.
"""
from __future__ import annotations

import itertools
import math
import numbers
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from dni_fast import _overlap
from dni_fast._compile import compiler_disable
from dni_fast._autocast import no_autocast
from dni_fast._manager import backward as _backward
from dni_fast._manager import current_context, is_deferring
from dni_fast.backends import Backend, _check_name, resolve
from dni_fast.backends.fused import flatten_inputs, grad_carrier
from dni_fast.regression import BACKWARD_LOSS, FORWARD_LOSS
from dni_fast.stats import SynthStats, apply_with_row
from dni_fast.synthesizer import BasicSynthesizer

__all__ = ["UnidirectionalInterface", "ForwardInterface", "BackwardInterface", "BidirectionalInterface",
           "set_check_finite", "get_check_finite", "name_interfaces"]

_ids = itertools.count(1)


def _env_check_finite() -> bool:
    return os.environ.get("DNI_FAST_CHECK_FINITE", "0").strip().lower() in ("1", "true", "yes", "on")


# Read once (an environment lookup costs ~1 us, and this is read every step).
_check_finite = _env_check_finite()


def set_check_finite(enabled: Optional[bool]) -> None:
    """Turn the finite checks on or off for every interface without its own
    ``check_finite=`` (``None``: back to ``$DNI_FAST_CHECK_FINITE``, read again
    now; it is otherwise read when dni_fast is imported). Each check syncs with
    the device once per step: a debugging switch."""
    global _check_finite
    _check_finite = _env_check_finite() if enabled is None else bool(enabled)


def get_check_finite() -> bool:
    """The global finite-check switch: ``set_check_finite``'s, else ``$DNI_FAST_CHECK_FINITE``."""
    return _check_finite


def name_interfaces(model: nn.Module, prefix: str = "") -> nn.Module:
    """Name every interface in ``model`` by its qualified module name (as in
    ``model.named_modules()``), so that errors and ``repr`` say which one."""
    for qual, m in model.named_modules(prefix=prefix):
        if isinstance(m, (UnidirectionalInterface, BidirectionalInterface)):
            m.name = qual or type(m).__name__
    return model


class _Runtime:
    """Host-side per-step state. A plain object rather than module attributes:
    nn.Module.__setattr__ costs ~3 us a step, and torch.compile must not guard on it."""

    __slots__ = ("steps", "last_backend", "scale_known")

    def __init__(self) -> None:
        self.steps = 0  # injections attempted (drives the warm-up); see n_steps
        self.last_backend: Optional[str] = None
        # normalize_targets: whether a true gradient has set the running scale (read from the device until it
        # has, then known on the host for good: the count only grows; a load resets it)
        self.scale_known = False


class _TargetBox:
    """What ``make_trigger``'s two normalisation nodes share within one
    backward: the true gradient as it arrived, and the scaled target handed
    down, so the trigger's producers get ``g`` itself (``g / sigma * sigma``
    overflows in fp16 and rounds in bf16)."""

    __slots__ = ("g", "sent")

    def __init__(self) -> None:
        self.g: Optional[Tensor] = None
        self.sent: Optional[Tensor] = None


def _identity_output(ctx, t: Tensor) -> Tensor:
    """The output of an identity node that the caller gets: not a view (autograd refuses an in-place op on a
    custom Function's view output, such as ``nn.ReLU(inplace=True)`` after the interface). ``t`` itself,
    marked dirty, when it is a fresh intermediate (the updater's output, which nothing else holds), which
    copies nothing; else a copy (a detached trigger passed through: marking it would bump the user's
    tensor's version)."""
    if t.grad_fn is not None and t._base is None:
        ctx.mark_dirty(t)
        return t
    return t.clone()


class _TargetScale(torch.autograd.Function):
    """Regression-target normalisation, on the output side: identity forward;
    backward folds the arriving true gradient ``g`` into the running mean
    square and hands ``g / sigma`` to the updater below, which regresses the
    synthesizer on it. ``sigma`` is the forward's, except before the first
    gradient seen (``seen`` false): the scale then is the one just observed,
    not 1, so the first target is not handed over in raw units (a closed-form
    fit kept that batch for hundreds of steps). The division runs in at least
    fp32; in fp16 a target beyond fp16's range is clamped to it (the
    producers still get ``g`` unchanged)."""

    @staticmethod
    def forward(ctx, t: Tensor, sigma: Tensor, seen: bool, owner: "BackwardInterface",
                box: Optional[_TargetBox]) -> Tensor:
        ctx.sigma, ctx.seen, ctx.owner, ctx.box = sigma, seen, owner, box
        return _identity_output(ctx, t)

    @staticmethod
    def backward(ctx, g: Tensor):
        owner = ctx.owner
        owner._observe_target(g)
        scaled = _divide_target(g, owner._regression_sigma(ctx.sigma, ctx.seen))
        box = ctx.box
        if box is not None:
            box.g, box.sent = g, scaled
        return scaled, None, None, None, None


def _divide_target(g: Tensor, sigma: Tensor) -> Tensor:
    """``g / sigma`` in at least fp32, back in ``g``'s dtype (fp16: clamped to its range)."""
    work = torch.promote_types(g.dtype, torch.float32)
    out = g.to(work) / sigma.to(work)
    if g.dtype == torch.float16:
        big = torch.finfo(torch.float16).max
        out = out.clamp(-big, big)
    return out.to(g.dtype)


class _TargetUnscale(torch.autograd.Function):
    """The input side of ``make_trigger`` under normalisation: the updater passes
    ``g / sigma`` through; this gives the trigger's producers ``g`` back: the
    true gradient itself where the updater passed its target through
    unchanged (always, on every backend), else ``g * sigma``."""

    @staticmethod
    def forward(ctx, t: Tensor, sigma: Tensor, box: _TargetBox) -> Tensor:
        ctx.sigma, ctx.box = sigma, box
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        box = ctx.box
        raw, sent = box.g, box.sent
        box.g = box.sent = None  # the next backward (retain_graph) brings its own
        if raw is not None and (g is sent or (g.shape == sent.shape and g.data_ptr() == sent.data_ptr())):
            return raw, None, None
        work = torch.promote_types(g.dtype, torch.float32)
        return (g.to(work) * ctx.sigma.to(work)).to(g.dtype), None, None


def _synchronize_hook(module, prefix, keep_vars) -> None:
    _overlap._synchronize_quietly()


class _FiniteGuard(torch.autograd.Function):
    """Identity; its backward raises ``FloatingPointError`` when the true
    gradient is not finite, before it reaches the synthesizer's update."""

    @staticmethod
    def forward(ctx, owner: "UnidirectionalInterface", step: int, t: Tensor) -> Tensor:
        ctx.owner, ctx.step = owner, step
        return _identity_output(ctx, t)

    @staticmethod
    def backward(ctx, g: Tensor):
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"dni_fast: {ctx.owner.label()}: the true gradient arriving at step "
                                     f"{ctx.step} has NaN or inf values; the synthesizer was not updated")
        return None, None, g


class UnidirectionalInterface(nn.Module):
    """Base interface: ``receive`` and ``send`` around one synthesizer.

    Args:
        synthesizer: a ``BasicSynthesizer`` (fused backends apply) or any
            ``nn.Module`` with ``forward(trigger, context)`` (always autograd).
        backend: ``None`` (the global choice, see ``dni_fast.backends``),
            ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.
        warmup_steps: for this many injections the synthesizer trains but its
            message is not applied (DNI's warm-up; dni-pytorch issue 2).
        track_stats: keep the regression statistics on the device (``stats()``).
        check_finite: raise ``FloatingPointError`` at the step where the
            synthetic or the true gradient has a NaN or inf (``None``: the
            global ``set_check_finite`` / ``$DNI_FAST_CHECK_FINITE``). Syncs
            once per step.
        name: how errors and ``repr`` refer to this interface (default
            ``<class>#<n>``; ``dni.name_interfaces(model)`` names them all).
    """

    def __init__(self, synthesizer: nn.Module, backend: Optional[str] = None, warmup_steps: int = 0,
                 track_stats: bool = True, check_finite: Optional[bool] = None, name: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(synthesizer, nn.Module):
            raise TypeError(f"{type(self).__name__}: synthesizer must be an nn.Module with forward(trigger, context), "
                            f"got {type(synthesizer).__name__}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        if warmup_steps and not isinstance(self, BackwardInterface):
            raise ValueError(f"{type(self).__name__}(warmup_steps={warmup_steps}): the warm-up holds back a "
                             "synthetic gradient (BackwardInterface); a forward interface has none to hold back")
        self.synthesizer = synthesizer
        self.backend = None if backend is None else _check_name(backend, f"{type(self).__name__}(backend=...)")
        self.warmup_steps = warmup_steps
        self.track_stats = track_stats
        self.check_finite = check_finite
        self.name = name or f"{type(self).__name__}#{next(_ids)}"
        self._rt = _Runtime()
        self._stats = SynthStats()

    def extra_repr(self) -> str:
        used = self._rt.last_backend
        return (f"name={self.name!r}, backend={self.backend or 'global'}"
                + (f" (last step: {used})" if used else "") + f", warmup_steps={self.warmup_steps}")

    def label(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    # -- statistics --------------------------------------------------------
    def stats(self) -> dict:
        """The regression statistics since the last reset (``SynthStats.read``, which
        first waits for the overlap worker's pending rows:
        last and mean ``loss``, ``cos``, ``rel_err``, ``s_norm``, ``g_norm``;
        ``count``; ``nonfinite``), plus ``backend``: the backend of the last
        step. Reading syncs with the device; recording never does."""
        out = self._stats.read()
        out["backend"] = self._rt.last_backend
        return out

    def reset_stats(self) -> None:
        self._stats.reset()

    @property
    def n_steps(self) -> int:
        """Injections attempted so far (the warm-up counts them)."""
        return self._rt.steps

    # With a warm-up, the count of injections is part of the state (a resumed run must not warm up again). It
    # is saved only then, so that the default state_dict keeps dni-pytorch's keys; a host counter, saved beside
    # the buffers rather than as one (the step never reads it back from the device).
    _STEPS_KEY = "warmup_steps_done"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.warmup_steps > 0:
            destination[prefix + self._STEPS_KEY] = torch.tensor(self._rt.steps, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        steps = state_dict.pop(prefix + self._STEPS_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if steps is not None:
            self._rt.steps = int(steps)
        self._rt.scale_known = False  # (a loaded target count may be 0)

    @n_steps.setter
    def n_steps(self, value: int) -> None:
        self._rt.steps = int(value)

    @property
    def in_warmup(self) -> bool:
        return self._rt.steps < self.warmup_steps

    # -- helpers -------------------------------------------------------------
    def _engine(self, trigger: Tensor) -> Backend:
        # self._modules[...] rather than self.synthesizer: Module.__getattr__ costs ~1 us a call
        engine = resolve(self.backend, self._modules["synthesizer"], trigger)
        self._rt.last_backend = engine.name
        return engine

    def resolved_backend(self, trigger: Tensor) -> str:
        """The name of the backend this interface runs on ``trigger`` with (what
        ``auto`` or the global choice picks for its device, dtype and shape)."""
        return resolve(self.backend, self._modules["synthesizer"], trigger).name

    def _stats_sink(self) -> Optional[SynthStats]:
        return self._stats if self.track_stats else None

    def _checking(self) -> bool:
        c = self.check_finite
        return _check_finite if c is None else c

    def _check_synthetic(self, s: Tensor) -> None:
        if not bool(torch.isfinite(s).all()):
            raise FloatingPointError(
                f"dni_fast: {self.label()}: the synthesizer's output S(h) has NaN or inf values at step "
                f"{self._rt.steps} (a non-finite trigger or context, or a diverged synthesizer); nothing was "
                "injected or updated")

    def receive(self, trigger: Tensor) -> Tensor:
        """``S(trigger)``, detached. Acts in training and eval mode.
        ``trigger (*, Dt)`` -> ``(*, Do)``."""
        s = self._engine(trigger).receive(self._modules["synthesizer"], trigger, current_context())
        return s

    def send(self, message: Tensor, trigger: Tensor) -> None:
        """Regress ``S(trigger)`` on ``message`` with ``F.mse_loss`` (mean over all
        elements) and backpropagate into the synthesizer only."""
        self._send(message, trigger)

    def _send(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not isinstance(message, Tensor):
            raise TypeError(f"send: message must be a tensor, got {type(message).__name__}")
        if message.numel() == 0 or (isinstance(trigger, Tensor) and trigger.numel() == 0):
            s = self.receive(trigger)  # an empty batch: nothing to regress
            if s.shape != message.shape:
                raise ValueError(f"send: message has shape {tuple(message.shape)} but the synthesizer predicts "
                                 f"{tuple(s.shape)} from a trigger of shape {tuple(trigger.shape)}")
            return s
        synth = self._modules["synthesizer"]
        loss, s = self._engine(trigger).send(synth, trigger, current_context(), message, self._stats_sink(),
                                             FORWARD_LOSS, FORWARD_LOSS.scale(message.shape))
        if self._checking():
            self._check_synthetic(s)
            if not bool(torch.isfinite(message).all()):
                raise FloatingPointError(f"dni_fast: {self.label()}: the message sent has NaN or inf values; the "
                                         "synthesizer was not updated")
        if loss is not None:
            _backward(loss)
        return s


#: ``(base, name) -> function``: the library's own methods that dni-pytorch's ``forward`` composes, as
#: defined (filled below the classes), so that a method patched onto an instance or onto the class itself
#: counts as an override too.
_ORIGINAL: dict = {}


def _overrides(obj: nn.Module, base: type, names: tuple) -> bool:
    """Whether ``obj`` overrides any of ``base``'s methods ``names``: in a
    subclass, on the instance (``iface.backward = ...``) or by patching the
    library's class. dni-pytorch's ``forward`` calls them (``backward`` and
    ``make_trigger``, ``send`` and ``receive``), so an override changes what
    ``forward`` does: ``forward`` then composes them as dni-pytorch does
    instead of taking the fused shortcut. A few dict reads (this runs every step)."""
    cls, inst = type(obj), obj.__dict__
    for n in names:
        if n in inst or getattr(cls, n) is not _ORIGINAL[base, n]:
            return True
    return False


class ForwardInterface(UnidirectionalInterface):
    """Synthesizes a message (an activation) from a trigger: forward unlock.

    ``forward(message, trigger)``: in training mode ``send`` then ``receive``
    (the synthesizer runs once), returning the synthetic message; in eval mode
    it returns ``message``.
    """

    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not self.training:
            return message
        if _overrides(self, ForwardInterface, ("send", "receive")):
            self.send(message, trigger)
            return self.receive(trigger)
        return self._send(message, trigger)


class _PipelineCapture(torch.autograd.Function):
    """Pipelined mode: identity forward; backward stores the true gradient for
    the next step's fused call and passes it through to the trigger.

    A gradient that cannot wait for the next step (its step was already
    superseded by the next forward or by ``flush``, or it is a second gradient
    for the same step, as with ``retain_graph``) is applied at once.

    ``anchor`` is a 0-element leaf that makes the output require grad. The
    synthesizer's parameters are not inputs: returning ``None`` for them would
    call their tensor hooks with ``None`` every step."""

    @staticmethod
    def forward(ctx, owner: "BackwardInterface", pending: dict, trigger: Tensor, anchor: Tensor) -> Tensor:
        ctx.owner, ctx.pending = owner, pending
        return trigger.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        p = ctx.pending
        if ctx.owner._checking() and not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"dni_fast: {ctx.owner.label()}: the true gradient arriving has NaN or inf "
                                     "values; the synthesizer was not updated (pipelined mode: it is not kept "
                                     "for the next step)")
        g2 = g.detach().reshape(-1, g.shape[-1])
        g2 = g2 if g2.dtype == p["s"].dtype else g2.to(p["s"].dtype)
        if p["g"] is None and not p["stale"]:
            p["g"] = g2
        else:
            ctx.owner._deliver(p, g2)
        return None, None, (g if ctx.needs_input_grad[2] else None), None


class BackwardInterface(UnidirectionalInterface):
    """Synthesizes the gradient of an activation from the activation: update unlock.

    Args (beyond ``UnidirectionalInterface``):
        pipelined: the true gradient of step t is used one step late, and step
            t+1's forward and step t's update run in one fused call; the update
            uses ``S`` as computed at step t and the weights as they are when it
            runs. Needs a ``BasicSynthesizer``. Call ``flush()`` after the last
            step to deliver the last pending update.
        normalize_targets: regress the synthesizer on ``g / sigma``, with
            ``sigma`` the running RMS of the true gradients (an exponential
            average with ``target_momentum``, bias-corrected, kept on the
            device as the buffers ``target_sq_ema`` and ``target_count``), and
            inject ``sigma * S``: the synthesizer learns targets of unit scale
            whatever the loss's scale, while the injected gradient keeps the
            true scale. The first target (before any has set ``sigma``) is
            divided by the ``sigma`` observed with it, not by 1, and the
            trigger's producers get the true gradient itself, not
            ``g / sigma * sigma``. Off by default (dni-pytorch's behaviour);
            the statistics are then in normalised units (cos and rel_err are
            scale-free). See docs/synthetic_gradients.md.
        overlap: ``True`` (or ``"update"``): run the synthesizer's regression
            update off the main path (``dni_fast/_overlap.py``: a worker thread
            on the CPU, a side stream on a GPU); its gradients are complete at
            the next synchronisation point (``dni.synchronize()``, an
            optimizer's ``step()`` or ``zero_grad()``, ``state_dict()``).
            ``"injection"``: on CPU tensors, the injection (the backward of
            ``S`` through the part below) runs on the worker too, and the
            gradients of the part below are complete at the next
            synchronisation point as well. ``None``: the global
            ``dni.overlap()`` / ``dni.set_overlap()``.
    """

    def __init__(self, synthesizer: nn.Module, backend: Optional[str] = None, warmup_steps: int = 0,
                 track_stats: bool = True, pipelined: bool = False, check_finite: Optional[bool] = None,
                 name: Optional[str] = None, overlap: Optional[bool] = None, normalize_targets: bool = False,
                 target_momentum: float = 0.99) -> None:
        super().__init__(synthesizer, backend=backend, warmup_steps=warmup_steps, track_stats=track_stats,
                         check_finite=check_finite, name=name)
        overlap = None if overlap is None else _overlap.mode(overlap)  # a bad value is named before anything else
        # The synthesizer predicts the gradient of its trigger, so it must be as wide as its trigger (else S would
        # broadcast against the true gradient on reference, and fail obscurely at the backward on fused backends).
        od, td = getattr(synthesizer, "output_dim", None), getattr(synthesizer, "trigger_dim", None)
        if od is not None and td is not None and od != td:
            raise ValueError(f"BackwardInterface: the synthesizer predicts gradients of width output_dim={od} for "
                             f"triggers of width trigger_dim={td}; a BackwardInterface's synthesizer needs "
                             f"output_dim == the trigger's last dim (trigger_dim)")
        if normalize_targets and pipelined:
            raise ValueError("BackwardInterface: normalize_targets=True is not supported with pipelined=True")
        if not 0.0 <= target_momentum < 1.0:
            raise ValueError(f"target_momentum must be in [0, 1), got {target_momentum!r}")
        self.normalize_targets = normalize_targets
        self.target_momentum = target_momentum
        if normalize_targets:  # buffers only when asked: the default state_dict keeps dni-pytorch's keys
            # fp64: the mean square of a true gradient of 1e20 must not overflow (fp32 made sigma inf for good)
            self.register_buffer("target_sq_ema", torch.zeros((), dtype=torch.float64))
            self.register_buffer("target_count", torch.zeros((), dtype=torch.float64))
        if pipelined and not isinstance(synthesizer, BasicSynthesizer):
            raise TypeError("BackwardInterface(pipelined=True) needs a BasicSynthesizer; custom synthesizers run "
                            "through autograd, which cannot split the update from its own forward")
        if pipelined:
            self._check_pipelined(synthesizer)
            if _overrides(self, BackwardInterface, ("backward", "make_trigger", "receive")):
                raise TypeError(f"{type(self).__name__}(pipelined=True): the class overrides backward, "
                                f"make_trigger or receive, so forward() composes them and updates at once; "
                                f"pipelined mode runs only through the library's own forward()")
        if pipelined and overlap:
            raise ValueError("BackwardInterface: pipelined=True and overlap=True cannot be combined: the pipelined "
                             "mode already runs the update in the next step's fused call")
        self.pipelined = pipelined
        self.overlap = overlap
        if overlap:
            _overlap._install_hooks()
        self._pending: Optional[dict] = None
        # state_dict() is a synchronisation point (a module-level hook: models must stay picklable)
        self.register_state_dict_pre_hook(_synchronize_hook)

    def receive(self, trigger: Tensor) -> Tensor:
        """``S(trigger)``, detached, in the true gradient's scale (``sigma * S``
        under ``normalize_targets``). ``trigger (*, Dt)`` -> ``(*, Do)``."""
        s = super().receive(trigger)
        if self.normalize_targets:
            s = s * self.target_sigma().to(s.dtype)
        return s

    # -- regression-target normalisation -------------------------------------
    def target_sigma(self) -> Tensor:
        """The current RMS scale of the true gradients (1 before the first one), 0-dim, on the device."""
        buf = self._buffers  # (not Module.__getattr__: this runs up to twice a step)
        count = buf["target_count"]
        debiased = buf["target_sq_ema"] / (1.0 - torch.pow(self.target_momentum, count)).clamp_min(1e-12)
        return torch.where(count > 0, debiased.sqrt().clamp_min(1e-30), 1.0)

    def _target_scale(self) -> Tuple[Tensor, bool]:
        """``(sigma, seen)`` at prediction time: the scale, and whether any true
        gradient had set it. ``seen`` is read from the device (a sync on a GPU)
        only until the first true gradient has been seen, then known for good.
        A regression target predicted before that is divided by the sigma
        observed with it (``_regression_sigma``)."""
        rt = self._rt
        if not rt.scale_known:
            rt.scale_known = bool(self.target_count > 0)
        return self.target_sigma(), rt.scale_known

    def _regression_sigma(self, sigma: Tensor, seen: Optional[bool]) -> Tensor:
        """The scale a target predicted with ``(sigma, seen)`` is divided by, once it has been observed
        (``seen`` ``None``: a record from before this rule, divided by its own sigma)."""
        return sigma if seen is None or seen else self.target_sigma()

    def _observe_target(self, g: Tensor) -> None:
        # An all-zero target (the first steps of a stacked interface, whose
        # input is the zero-initialised synthesizer above it) carries no scale:
        # counting it would make sigma ~0 and the next targets astronomically
        # large, killing the synthesizer's ReLUs. It is skipped, on the device.
        m = self.target_momentum
        buf = self._buffers
        ema, count = buf["target_sq_ema"], buf["target_count"]
        with torch.no_grad():
            # fp64: a finite fp32 gradient of 1e20 must not square to inf; a non-finite one is skipped like a
            # zero one (one inf would make sigma inf for good; the statistics count it as nonfinite)
            g = g.detach()
            sq = g.double().pow_(2) if g.dtype != torch.float64 else g.pow(2)  # squared in place on the copy
            msq = sq.mean()
            ok = torch.isfinite(msq) & (msq > 0)
            # (torch.where picks ema where not ok: a NaN msq never reaches it. A buffer on MPS may be fp32.)
            ema.copy_(torch.where(ok, ema * m + msq.to(ema.dtype) * (1.0 - m), ema))
            count.add_(ok)

    def _overlapping(self, engine, trigger: Tensor) -> Union[bool, str]:
        """This step's overlap mode on ``engine``: ``False``, ``True`` (the
        update goes to the overlap worker) or ``"injection"`` (the injection too)."""
        ov = self.overlap if self.overlap is not None else _overlap.get_overlap()
        # Under DDP the reducer must see every gradient within the backward it prepares: run inline. So do
        # kernels in Triton's interpreter (tests only), which is not thread-safe: a launch on the worker broke
        # the main thread's. And so does a step traced by torch.compile: the worker's backward through the
        # compiled synthesizer graph (retain_graph) is refused once its buffers are donated.
        if (not ov or self.pipelined or _overlap.inside_ddp_forward() or engine.interpreted(trigger.device)
                or torch.compiler.is_compiling()):
            return False
        if not _overlap._hooks_installed:  # an unpickled interface, or .overlap set after construction
            _overlap._install_hooks()
        return ov

    def _measured(self, out: Tensor, s: Tensor) -> Tensor:
        """A synthesizer that does not learn (frozen, or a RidgeSynthesizer with ``fitting = False``) builds no
        graph from the detached trigger, so no true gradient would reach the interface: a statistics-only node
        still measures ``S`` against it (the check above is one attribute read, not a parameter scan)."""
        sink = self._stats_sink()
        if sink is None or not torch.is_grad_enabled():
            return out
        from dni_fast.backends.reference import _RefUpdater

        anchor = s.new_empty(0).requires_grad_()  # makes the output require grad
        return apply_with_row(_RefUpdater, sink, BACKWARD_LOSS.scale(out.shape), s, None, out, s.detach(), anchor)

    def _check_empty(self, trigger: Tensor) -> None:
        """An empty batch does nothing, but a trigger of the wrong width, dtype or
        device is still named as such (it would fail on the next full batch)."""
        check = getattr(self._modules["synthesizer"], "check_inputs", None)
        if check is not None:
            check(trigger, current_context())

    @compiler_disable  # a host-side counter: torch.compile must not guard on (and recompile for) it
    def _take_injection(self, trigger: Tensor) -> bool:
        """Count one injection; whether it applies (not in warm-up, and there is a graph to inject into).
        Under ``no_grad`` a trigger built with grad still takes its synthetic
        gradient (``trigger.backward(S)`` runs there, as in dni-pytorch)."""
        if not trigger.requires_grad and not torch.is_grad_enabled():
            return False  # no graph: nothing trains, so no warm-up step is used up
        rt = self._rt
        rt.steps += 1
        return rt.steps > self.warmup_steps and trigger.requires_grad

    def forward(self, trigger: Tensor) -> Tensor:
        """Training: inject ``S(trigger)`` into ``trigger``'s graph now (or at the
        end of ``defer_backward``) and return ``make_trigger(trigger.detach())``.
        Eval: return ``trigger``. An empty batch passes through: nothing is
        injected or regressed, and the statistics do not change."""
        if not self.training:
            return trigger
        if not isinstance(trigger, Tensor):
            raise TypeError(f"{self.label()}: the trigger must be a tensor, got {type(trigger).__name__}")
        if trigger.numel() == 0:
            self._check_empty(trigger)
            return trigger.detach()
        if _overrides(self, BackwardInterface, ("backward", "make_trigger", "receive")):
            self.backward(trigger)
            return self.make_trigger(trigger.detach())
        if self.pipelined:
            return self._forward_pipelined(trigger)
        engine = self._engine(trigger)
        inject = self._take_injection(trigger)
        check = self._checking()
        norm = self.normalize_targets
        ov = self._overlapping(engine, trigger)
        deferring = is_deferring()
        offload = inject and ov == _overlap.INJECTION and not deferring
        # Inject inside the engine's call (one native call for cpp) unless S must
        # first be checked or scaled, the injection is deferred, or it goes to
        # the overlap worker.
        now = inject and not check and not norm and not deferring and not offload
        out, s = engine.trigger(self._modules["synthesizer"], trigger.detach(), current_context(),
                                self._stats_sink(), BACKWARD_LOSS.scale(trigger.shape), trigger if now else None,
                                ov)
        if not out.requires_grad:
            out = self._measured(out, s)
        if norm:
            sigma, seen = self._target_scale()
            s = s * sigma.to(s.dtype)
            out = _TargetScale.apply(out, sigma, seen, self, None)
        if check:
            self._check_synthetic(s)
            out = _FiniteGuard.apply(self, self._rt.steps, out)
        if inject and not now and not (offload and _overlap.inject(trigger, s)):
            _backward(trigger, s)
        return out

    def backward(self, trigger: Tensor, factor: float = 1) -> None:
        """Inject ``factor * S(trigger)`` into ``trigger``'s graph (no update).
        A no-op in eval mode. ``factor``: a number, or a tensor that broadcasts
        against ``S`` (checked for NaN and inf on the host: one sync per call
        for a tensor on a GPU; pass a Python number to avoid it)."""
        if not self.training:
            return  # a no-op in eval mode, whatever the factor (as in dni-pytorch)
        if not isinstance(factor, (Tensor, numbers.Real)) and getattr(factor, "ndim", None) == 0:
            factor = factor.item()  # a 0-d numpy array (np.array(0.1))
        if isinstance(factor, Tensor):
            if not bool(torch.isfinite(factor).all()):
                raise ValueError(f"{self.label()}.backward: factor has NaN or inf values")
        elif not isinstance(factor, numbers.Real) or not math.isfinite(factor):
            # numbers.Real: numpy scalars too (dni-pytorch multiplies by whatever it is given)
            raise ValueError(f"{self.label()}.backward: factor must be a finite number, got {factor!r}")
        elif not isinstance(factor, (int, float)):
            factor = float(factor)  # a numpy scalar times a tensor would give a numpy array
        if not isinstance(trigger, Tensor):
            raise TypeError(f"{self.label()}: the trigger must be a tensor, got {type(trigger).__name__}")
        if trigger.numel() == 0:
            self._check_empty(trigger)
            return
        s = self.receive(trigger)
        if self._checking():
            self._check_synthetic(s)
        if self._take_injection(trigger):
            _backward(trigger, s if (not isinstance(factor, Tensor) and factor == 1) else s * factor)

    def make_trigger(self, trigger: Tensor) -> Tensor:
        """Identity forward; in the backward pass the true gradient passes to
        ``trigger`` unchanged and regresses ``S(trigger)`` on it. Eval: identity."""
        if not self.training:
            return trigger
        if not isinstance(trigger, Tensor):
            raise TypeError(f"{self.label()}: the trigger must be a tensor, got {type(trigger).__name__}")
        if trigger.numel() == 0:
            self._check_empty(trigger)
            return trigger
        if self.pipelined:
            raise RuntimeError(f"{self.label()}.make_trigger: this interface is pipelined (pipelined=True), which "
                               f"defers the update to the next forward(); make_trigger would update at once. Call "
                               f"the interface (forward), or build it with pipelined=False")
        norm = self.normalize_targets
        if norm:
            sigma, seen = self._target_scale()
            box = _TargetBox()
            trigger = _TargetUnscale.apply(trigger, sigma, box)
        engine = self._engine(trigger)
        out, s = engine.trigger(self._modules["synthesizer"], trigger, current_context(), self._stats_sink(),
                                BACKWARD_LOSS.scale(trigger.shape), None, bool(self._overlapping(engine, trigger)))
        if norm:
            s = s * sigma.to(s.dtype)
            out = _TargetScale.apply(out, sigma, seen, self, box)
        if self._checking():
            self._check_synthetic(s)
            out = _FiniteGuard.apply(self, self._rt.steps, out)
        return out

    # -- pipelined mode ------------------------------------------------------
    @staticmethod
    def _check_pipelined(synth: nn.Module) -> None:
        why = synth.fused_blocker()
        if why is not None:
            raise TypeError(f"BackwardInterface(pipelined=True) runs the synthesizer's fused primitives, which read "
                            f"its layers' parameters without calling its modules, but {why}; use "
                            f"pipelined=False")

    def _forward_pipelined(self, trigger: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # no graph, no update: leave the pending update alone
            return trigger
        synth = self._modules["synthesizer"]
        self._check_pipelined(synth)  # a hook added since construction counts
        prims = self._engine(trigger).primitives
        x, c = flatten_inputs(synth, trigger, current_context())
        params = synth.flat_params()
        plain = [p.detach() for p in params]
        prev = self._pending
        carrier = None
        if prev is not None:
            prev["stale"] = True  # a true gradient arriving for it from now on is applied at once
        fuse = prev is not None and prev["g"] is not None
        if fuse and (prev["x"].dtype != x.dtype or prev["x"].device != x.device):
            # One fused launch computes in one dtype on one device (autocast switched on or off, a move): the
            # pending update is applied on its own first, with the same (current) weights.
            self._deliver(prev, prev["g"])
            fuse = False
        with torch.no_grad(), no_autocast(x):
            if fuse:
                s, zs, grads, partials = prims.pipelined(x, c, plain, prev["x"], prev["c"], prev["zs"], prev["s"],
                                                         prev["g"], prev["scale"])
                self._record_once(prev, partials)
            else:
                s, zs = prims.forward(x, c, plain)
        if fuse:
            carrier = grad_carrier(grads, params)
        self._pending = {"x": x, "c": c, "zs": zs, "s": s, "scale": BACKWARD_LOSS.scale(trigger.shape), "g": None,
                         "stale": False}
        if any(p.requires_grad for p in params):
            out = _PipelineCapture.apply(self, self._pending, trigger.detach(), trigger.new_empty(0).requires_grad_())
        else:  # frozen synthesizer: nothing to capture
            out = trigger.detach()
        if carrier is not None and carrier.requires_grad:
            _backward(carrier)
        s = s.view(*trigger.shape[:-1], s.shape[-1])
        if self._checking():
            self._check_synthetic(s)
        if self._take_injection(trigger):
            _backward(trigger, s)
        return out

    def _record_once(self, p: dict, partials: Tensor) -> None:
        """One statistics row per step, as on every other path (a second true gradient for the same step, with
        retain_graph, updates again but is not a second step)."""
        if self.track_stats and not p.get("recorded"):
            p["recorded"] = True
            self._stats.record(partials, p["scale"])

    def _deliver(self, p: dict, g: Tensor) -> None:
        """Apply the update of pending step ``p`` for the true gradient ``g`` now,
        with the current weights, through autograd."""
        synth = self._modules["synthesizer"]
        params = synth.flat_params()
        prims = self._engine(p["x"]).primitives
        with torch.no_grad(), no_autocast(p["x"]):
            grads, partials = prims.update(p["x"], p["c"], [q.detach() for q in params], p["zs"], p["s"], g,
                                           p["scale"], None)
        self._record_once(p, partials)
        with torch.enable_grad():
            carrier = grad_carrier(grads, params)
        if carrier.requires_grad:  # else the synthesizer was frozen since
            _backward(carrier)

    # Pipelined mode: the pending update (the last step's prediction and its true gradient) is part of the
    # state, so that a save and load resumes bit for bit; saved only while one is pending (the default keys
    # stay dni-pytorch's). A state without it clears the pending update: a rolled-back model must not fuse an
    # update from the trajectory it left.
    _PENDING = "pipelined_pending."

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        p = self._pending
        if self.pipelined and p is not None and p["g"] is not None:
            k = prefix + self._PENDING
            destination[k + "x"] = p["x"].detach().clone()
            destination[k + "s"] = p["s"].detach().clone()
            destination[k + "g"] = p["g"].detach().clone()
            destination[k + "scale"] = torch.tensor(float(p["scale"]), dtype=torch.float64)
            if p["c"] is not None:
                destination[k + "c"] = p["c"].detach().clone()
            for i, z in enumerate(p["zs"]):
                destination[k + f"z{i}"] = z.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        k = prefix + self._PENDING
        mine = {key[len(k):]: state_dict.pop(key) for key in [q for q in state_dict if q.startswith(k)]}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.pipelined:
            if mine and strict:
                unexpected_keys.extend(k + q for q in mine)
            return
        if mine:
            # The pending update follows the synthesizer, as its parameters do: onto their device, and into
            # their dtype where it was saved in the saved parameters' dtype (a checkpoint loaded into a model
            # of another dtype); one saved under autocast (bf16 inputs of fp32 weights) keeps its dtype.
            ref = next(self._modules["synthesizer"].parameters(), None)
            saved = next((v for q, v in state_dict.items() if q.startswith(prefix + "synthesizer.")
                          and isinstance(v, torch.Tensor) and v.is_floating_point()), None)

            def fit(t):
                if t is None or ref is None:
                    return t
                same = saved is not None and t.dtype == saved.dtype
                return t.to(device=ref.device, dtype=ref.dtype if same else t.dtype)

            zs = [fit(mine[f"z{i}"]) for i in range(len([q for q in mine if q.startswith("z")]))]
            self._pending = {"x": fit(mine["x"]), "c": fit(mine.get("c")), "zs": zs, "s": fit(mine["s"]),
                             "g": fit(mine["g"]), "scale": float(mine["scale"]), "stale": True}
        else:
            self._pending = None

    def flush(self) -> None:
        """Pipelined mode: apply the pending update (the last step's true
        gradient) now, with the current weights, through autograd. A true
        gradient that arrives after ``flush`` is applied when it arrives."""
        prev = self._pending
        self._pending = None
        if prev is None:
            return
        prev["stale"] = True
        if prev["g"] is not None:
            self._deliver(prev, prev["g"])

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda(), ...: the pending update moves with the weights. A dtype cast of the model
        # (.half(), .bfloat16()) must not cast the running target scale: a bf16 count stops at 256 and the mean
        # square keeps 3 digits. fn gives each buffer a new tensor, so the originals are intact: they keep their
        # dtype, on the device fn chose.
        keep = {k: self._buffers[k] for k in ("target_sq_ema", "target_count") if k in self._buffers}
        super()._apply(fn, *args, **kwargs)
        for k, t in keep.items():
            b = self._buffers[k]
            if b is not None and b.dtype != t.dtype:
                self._buffers[k] = b.to(t.dtype) if t.is_meta or b.is_meta else t.to(b.device)
        p = self._pending
        if p is not None:
            for k in ("x", "c", "s", "g"):
                if p[k] is not None:
                    p[k] = fn(p[k])
            p["zs"] = tuple(fn(z) for z in p["zs"])
        return self


class BidirectionalInterface(nn.Module):
    """Forward and backward interfaces together: complete unlock.

    ``send(m, x)``: the forward synthesizer regresses on ``m``, then the backward
    synthesizer's gradient is injected into ``m``. ``receive(x)``: the synthetic
    message with the backward regression attached (``make_trigger``).
    ``forward(m, x)``: ``send`` then ``receive`` in training mode (the forward
    synthesizer runs once); ``m`` in eval mode.
    """

    def __init__(self, forward_synthesizer: nn.Module, backward_synthesizer: nn.Module,
                 backend: Optional[str] = None, warmup_steps: int = 0, track_stats: bool = True,
                 check_finite: Optional[bool] = None, name: Optional[str] = None,
                 overlap: Optional[bool] = None) -> None:
        super().__init__()
        self.forward_interface = ForwardInterface(forward_synthesizer, backend=backend, track_stats=track_stats,
                                                  check_finite=check_finite)
        self.backward_interface = BackwardInterface(backward_synthesizer, backend=backend,
                                                    warmup_steps=warmup_steps, track_stats=track_stats,
                                                    check_finite=check_finite, overlap=overlap)
        self.name = name or f"{type(self).__name__}#{next(_ids)}"

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key == "name" and "backward_interface" in self._modules:  # name the halves after the whole
            self.forward_interface.name = f"{value}.forward_interface"
            self.backward_interface.name = f"{value}.backward_interface"

    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not self.training:
            return message
        fwd = self._modules["forward_interface"]
        if _overrides(self, BidirectionalInterface, ("send", "receive")) or type(fwd) is not ForwardInterface \
                or _overrides(fwd, ForwardInterface, ("send", "receive")):
            # (a replaced or patched forward half: its own send and receive, as dni-pytorch calls them)
            self.send(message, trigger)
            return self.receive(trigger)
        synthetic = fwd._send(message, trigger)
        self.backward_interface.backward(message)
        return self.backward_interface.make_trigger(synthetic)

    def send(self, message: Tensor, trigger: Tensor) -> None:
        self.forward_interface.send(message, trigger)
        self.backward_interface.backward(message)

    def receive(self, trigger: Tensor) -> Tensor:
        return self.backward_interface.make_trigger(self.forward_interface.receive(trigger))

    def stats(self) -> dict:
        """``{'forward': ..., 'backward': ...}``, each as ``UnidirectionalInterface.stats``."""
        return {"forward": self.forward_interface.stats(), "backward": self.backward_interface.stats()}

    def reset_stats(self) -> None:
        self.forward_interface.reset_stats()
        self.backward_interface.reset_stats()


for _base, _names in ((ForwardInterface, ("send", "receive")),
                      (BackwardInterface, ("backward", "make_trigger", "receive")),
                      (BidirectionalInterface, ("send", "receive"))):
    for _n in _names:
        _ORIGINAL[_base, _n] = getattr(_base, _n)
del _base, _names, _n
