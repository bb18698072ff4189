"""Decoupled Neural Interfaces with dni-pytorch's API and semantics.

Deviations from dni-pytorch, on purpose:

* the synthesizer runs once per ``forward`` (dni-pytorch runs it twice: once
  detached for the injection, once with a graph for the update);
* the regression gradient reaches only the synthesizer's parameters, never the
  producers of the trigger or the context.

Beyond dni-pytorch: a backend per interface (``backend=``), a warm-up
(``warmup_steps``), device-side statistics (``stats()``), a pipelined mode for
``BackwardInterface`` (``pipelined=True``) and clear errors on bad input.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni_fast import _fused
from dni_fast._manager import backward as _backward
from dni_fast._manager import current_context, is_deferring
from dni_fast.backends import _check_name, reference_impl, resolve
from dni_fast.synthesizer import BasicSynthesizer

__all__ = ["UnidirectionalInterface", "ForwardInterface", "BackwardInterface", "BidirectionalInterface"]


def _detached(context: Any) -> Any:
    return context.detach() if isinstance(context, Tensor) else context


class _RefUpdater(torch.autograd.Function):
    """dni-pytorch's synthetic-gradient updater: identity forward; backward
    passes the true gradient ``g`` through and sends ``2/g.size(0) * (S - g)``
    into the synthesizer's graph."""

    @staticmethod
    def forward(ctx, stats: Optional[_fused.SynthStats], trigger: Tensor, s: Tensor) -> Tensor:
        ctx.stats = stats
        ctx.save_for_backward(s)
        return trigger.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (s,) = ctx.saved_tensors
        scale = 2.0 / g.size(0)
        if ctx.stats is not None:
            ctx.stats.record(_fused.partials_of(s, g), scale)
        return None, (g if ctx.needs_input_grad[1] else None), scale * (s - g)


class _PipelineCapture(torch.autograd.Function):
    """Pipelined mode: identity forward; backward stores the true gradient for
    the next step's fused launch and passes it through to the trigger.

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
        scale = 2.0 / g.size(0)
        g2 = g.detach().reshape(-1, g.shape[-1])
        g2 = g2 if g2.dtype == p["s"].dtype else g2.to(p["s"].dtype)
        if p["g"] is None and not p["stale"]:
            p["scale"], p["g"] = scale, g2
        else:
            ctx.owner._deliver(p, g2, scale)
        return None, None, (g if ctx.needs_input_grad[2] else None), None


class UnidirectionalInterface(nn.Module):
    """Base interface: ``receive`` and ``send`` around one synthesizer.

    Args:
        synthesizer: a ``BasicSynthesizer`` (fused backends apply) or any
            ``nn.Module`` with ``forward(trigger, context)`` (always autograd).
        backend: ``None`` (the global choice, see ``dni_fast.backends``),
            ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.
        warmup_steps: for this many injections the synthesizer trains but its
            message is not applied (DNI's warm-up; dni-pytorch issue 2).
        track_stats: keep the regression loss and the cosine similarity
            between synthetic and true message on the device (``stats()``).
    """

    def __init__(self, synthesizer: nn.Module, backend: Optional[str] = None, warmup_steps: int = 0,
                 track_stats: bool = True) -> None:
        super().__init__()
        if not isinstance(synthesizer, nn.Module):
            raise TypeError(f"{type(self).__name__}: synthesizer must be an nn.Module with forward(trigger, context), "
                            f"got {type(synthesizer).__name__}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.synthesizer = synthesizer
        self.backend = None if backend is None else _check_name(backend, f"{type(self).__name__}(backend=...)")
        self.warmup_steps = warmup_steps
        self.track_stats = track_stats
        self._counter = [0]  # injections attempted (drives the warm-up); see n_steps
        self._stats = _fused.SynthStats()

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'global'}, warmup_steps={self.warmup_steps}"

    # -- statistics --------------------------------------------------------
    def stats(self) -> dict:
        """``{'loss', 'loss_mean', 'cos', 'cos_mean', 'count'}``: the last and the
        mean regression loss and cosine similarity since the last reset.
        Reading syncs with the device; recording never does."""
        return self._stats.read()

    def reset_stats(self) -> None:
        self._stats.reset()

    @property
    def n_steps(self) -> int:
        """Injections attempted so far (the warm-up counts them). Kept in a list
        rather than a module attribute: nn.Module.__setattr__ costs ~3 us a step."""
        return self._counter[0]

    @n_steps.setter
    def n_steps(self, value: int) -> None:
        self._counter[0] = int(value)

    @property
    def in_warmup(self) -> bool:
        return self._counter[0] < self.warmup_steps

    # -- helpers -------------------------------------------------------------
    def _stats_sink(self) -> Optional[_fused.SynthStats]:
        return self._stats if self.track_stats else None

    def _synth_graph(self, trigger: Tensor) -> Tensor:
        """Reference path: ``S`` with a graph over the synthesizer's parameters
        only (trigger and context detached)."""
        return self.synthesizer(trigger.detach(), _detached(current_context()))

    def _fused_inputs(self, trigger: Tensor):
        # self._modules[...] rather than self.synthesizer: Module.__getattr__ costs ~1 us a call
        return _fused.flatten_inputs(self._modules["synthesizer"], trigger, current_context())

    def _shape_like(self, s: Tensor, trigger: Tensor) -> Tensor:
        return s.view(*trigger.shape[:-1], s.shape[-1])

    def receive(self, trigger: Tensor) -> Tensor:
        """``S(trigger)``, detached. Acts in training and eval mode.
        ``trigger (*, Dt)`` -> ``(*, Do)``."""
        impl = resolve(self.backend, self.synthesizer, trigger)
        if impl is None:
            with torch.no_grad():
                return self.synthesizer(trigger.detach(), _detached(current_context()))
        x, c = self._fused_inputs(trigger)
        return self._shape_like(_fused.fused_receive(impl, x, c, self.synthesizer.flat_params()), trigger)

    def send(self, message: Tensor, trigger: Tensor) -> None:
        """Regress ``S(trigger)`` on ``message`` with ``F.mse_loss`` (mean over all
        elements) and backpropagate into the synthesizer only."""
        self._send(message, trigger)

    def _send(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not isinstance(message, Tensor):
            raise TypeError(f"send: message must be a tensor, got {type(message).__name__}")
        impl = resolve(self.backend, self.synthesizer, trigger)
        if impl is None:
            s = self._synth_graph(trigger)
            if s.shape != message.shape:
                raise ValueError(f"send: message has shape {tuple(message.shape)} but the synthesizer predicts "
                                 f"{tuple(s.shape)} from a trigger of shape {tuple(trigger.shape)}")
            m = message.detach()
            if self.track_stats:
                self._stats.record(_fused.partials_of(s, m), 2.0 / m.numel())
            if s.requires_grad:
                _backward(F.mse_loss(s, m))
            return s.detach()
        x, c = self._fused_inputs(trigger)
        out_shape = (*trigger.shape[:-1], self.synthesizer.output_dim)
        if tuple(message.shape) != out_shape:
            raise ValueError(f"send: message has shape {tuple(message.shape)} but the synthesizer predicts "
                             f"{out_shape} from a trigger of shape {tuple(trigger.shape)}")
        m = message.detach().reshape(-1, message.shape[-1])
        if m.dtype != x.dtype:
            m = m.to(x.dtype)
        loss, s = _fused.fused_send(impl, self._stats_sink(), x, c, m, self.synthesizer.flat_params())
        if loss.requires_grad:
            _backward(loss)
        return self._shape_like(s, trigger)


class ForwardInterface(UnidirectionalInterface):
    """Synthesizes a message (an activation) from a trigger: forward unlock.

    ``forward(message, trigger)``: in training mode ``send`` then ``receive``
    (the synthesizer runs once), returning the synthetic message; in eval mode
    it returns ``message``.
    """

    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not self.training:
            return message
        return self._send(message, trigger)


class BackwardInterface(UnidirectionalInterface):
    """Synthesizes the gradient of an activation from the activation: update unlock.

    Args (beyond ``UnidirectionalInterface``):
        pipelined: the true gradient of step t is used one step late, and step
            t+1's forward and step t's update run in one fused call; the update
            uses ``S`` as computed at step t and the weights as they are when it
            runs. Needs a ``BasicSynthesizer``. Call ``flush()`` after the last
            step to deliver the last pending update.
    """

    def __init__(self, synthesizer: nn.Module, backend: Optional[str] = None, warmup_steps: int = 0,
                 track_stats: bool = True, pipelined: bool = False) -> None:
        super().__init__(synthesizer, backend=backend, warmup_steps=warmup_steps, track_stats=track_stats)
        if pipelined and not isinstance(synthesizer, BasicSynthesizer):
            raise TypeError("BackwardInterface(pipelined=True) needs a BasicSynthesizer; custom synthesizers run "
                            "through autograd, which cannot split the update from its own forward")
        self.pipelined = pipelined
        self._pending: Optional[dict] = None

    @torch.compiler.disable  # a host-side counter: torch.compile must not guard on (and recompile for) it
    def _take_injection(self, trigger: Tensor) -> bool:
        """Count one injection; whether it applies (not in warm-up, and there is a graph to inject into)."""
        c = self._counter
        c[0] += 1
        return c[0] > self.warmup_steps and trigger.requires_grad

    def _inject(self, trigger: Tensor, s: Tensor, factor: float = 1) -> None:
        if self._take_injection(trigger):
            _backward(trigger, s if factor == 1 else s * factor)

    def _stats_slot(self, trigger: Tensor) -> Optional[Tensor]:
        # g has the trigger's shape, so the regression's scale is known now.
        if not self.track_stats:
            return None
        return self._stats.reserve(2.0 / trigger.shape[0], trigger.device)

    def forward(self, trigger: Tensor) -> Tensor:
        """Training: inject ``S(trigger)`` into ``trigger``'s graph now (or at the
        end of ``defer_backward``) and return ``make_trigger(trigger.detach())``.
        Eval: return ``trigger``."""
        if not self.training:
            return trigger
        if self.pipelined:
            return self._forward_pipelined(trigger)
        impl = resolve(self.backend, self._modules["synthesizer"], trigger)
        if impl is None:
            s = self._synth_graph(trigger)
            self._inject(trigger, s.detach())
            if not s.requires_grad:  # frozen synthesizer: nothing to update
                return trigger.detach()
            return _RefUpdater.apply(self._stats_sink(), trigger.detach(), s)
        x, c = self._fused_inputs(trigger)
        if impl.step is not None:  # the whole step in one native call (csrc/step.cpp)
            inject = self._take_injection(trigger)
            deferred = inject and is_deferring()
            params = self._modules["synthesizer"].flat_params()
            out, s = impl.step(trigger.detach(), x, c, params, self._stats_slot(trigger),
                               trigger if inject and not deferred else None)
            if deferred:
                _backward(trigger, s)
            return out
        out, s = _fused.fused_trigger(impl, self._stats_sink(), trigger.detach(), x, c, self.synthesizer.flat_params())
        self._inject(trigger, s)
        return out

    def backward(self, trigger: Tensor, factor: float = 1) -> None:
        """Inject ``factor * S(trigger)`` into ``trigger``'s graph (no update).
        A no-op in eval mode."""
        if not self.training:
            return
        self._inject(trigger, self.receive(trigger), factor)

    def make_trigger(self, trigger: Tensor) -> Tensor:
        """Identity forward; in the backward pass the true gradient passes to
        ``trigger`` unchanged and regresses ``S(trigger)`` on it. Eval: identity."""
        if not self.training:
            return trigger
        impl = resolve(self.backend, self.synthesizer, trigger)
        if impl is None:
            s = self._synth_graph(trigger)
            if not s.requires_grad:
                return trigger
            return _RefUpdater.apply(self._stats_sink(), trigger, s)
        x, c = self._fused_inputs(trigger)
        params = self.synthesizer.flat_params()
        if impl.step is not None:
            return impl.step(trigger, x, c, params, self._stats_slot(trigger), None)[0]
        return _fused.fused_trigger(impl, self._stats_sink(), trigger, x, c, params)[0]

    # -- pipelined mode ------------------------------------------------------
    def _pipelined_impl(self, trigger: Tensor):
        return resolve(self.backend, self.synthesizer, trigger) or reference_impl()

    def _forward_pipelined(self, trigger: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # no graph, no update: leave the pending update alone
            return trigger
        impl = self._pipelined_impl(trigger)
        x, c = self._fused_inputs(trigger)
        params = self.synthesizer.flat_params()
        plain = [p.detach() for p in params]
        prev = self._pending
        carrier = None
        if prev is not None:
            prev["stale"] = True  # a true gradient arriving for it from now on is applied at once
        with torch.no_grad(), _fused._no_autocast(x):
            if prev is not None and prev["g"] is not None:
                s, zs, grads, partials = impl.pipelined(x, c, plain, prev["x"], prev["c"], prev["zs"], prev["s"],
                                                        prev["g"], prev["scale"])
                if self.track_stats:
                    self._stats.record(partials, prev["scale"])
            else:
                s, zs = impl.forward(x, c, plain)
        if prev is not None and prev["g"] is not None:
            carrier = _fused.grad_carrier(tuple(grads), params)
        self._pending = {"x": x, "c": c, "zs": zs, "s": s, "g": None, "stale": False}
        if any(p.requires_grad for p in params):
            out = _PipelineCapture.apply(self, self._pending, trigger.detach(), trigger.new_empty(0).requires_grad_())
        else:  # frozen synthesizer: nothing to capture
            out = trigger.detach()
        if carrier is not None and carrier.requires_grad:
            _backward(carrier)
        self._inject(trigger, self._shape_like(s, trigger))
        return out

    def _deliver(self, p: dict, g: Tensor, scale: float) -> None:
        """Apply the update of pending step ``p`` for the true gradient ``g`` now,
        with the current weights, through autograd."""
        params = self.synthesizer.flat_params()
        impl = self._pipelined_impl(p["x"])
        with torch.no_grad(), _fused._no_autocast(p["x"]):
            grads, partials = impl.update(p["x"], p["c"], [q.detach() for q in params], p["zs"], p["s"], g, scale,
                                          None)
        if self.track_stats:
            self._stats.record(partials, scale)
        with torch.enable_grad():
            carrier = _fused.grad_carrier(tuple(grads), params)
        if carrier.requires_grad:  # else the synthesizer was frozen since
            _backward(carrier)

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
            self._deliver(prev, prev["g"], prev["scale"])

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda(), ...: the pending update moves with the weights.
        super()._apply(fn, *args, **kwargs)
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
                 backend: Optional[str] = None, warmup_steps: int = 0, track_stats: bool = True) -> None:
        super().__init__()
        self.forward_interface = ForwardInterface(forward_synthesizer, backend=backend, track_stats=track_stats)
        self.backward_interface = BackwardInterface(backward_synthesizer, backend=backend,
                                                    warmup_steps=warmup_steps, track_stats=track_stats)

    def forward(self, message: Tensor, trigger: Tensor) -> Tensor:
        if not self.training:
            return message
        synthetic = self.forward_interface._send(message, trigger)
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
