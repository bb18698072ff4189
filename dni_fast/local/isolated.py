"""Gradient-isolated training: every module learns from its own local loss.

Greedy InfoMax (Löwe et al. 2019) and DGL (Belilovsky et al. 2020) cut a
network into modules; module i trains on a loss computed on its own output,
and module i+1 receives that output detached, so no gradient ever crosses a
module boundary and no module waits for the ones above it.

:class:`GradientIsolated` runs that schedule and realises its memory saving:
module i's loss is backpropagated, and its graph freed, *before* module i+1
runs. (GIM's own code detaches between modules but backpropagates the sum of
the losses at the end, so every module's graph is alive at once.)
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dni_fast import _overlap
from dni_fast._manager import require_grad_mode
from dni_fast.interfaces import BackwardInterface

__all__ = ["GradientIsolated", "BoundaryCrossingError"]

LossSpec = Union[None, Callable[..., Tensor], nn.Module]
OptimizerSpec = Union[Callable[[List[nn.Parameter]], torch.optim.Optimizer], torch.optim.Optimizer]


class BoundaryCrossingError(RuntimeError):
    """A gradient reached a module from outside its own loss."""


def _needs_target(loss) -> bool:
    return bool(getattr(loss, "needs_target", True))


class _EnterInterface:
    """The guard's forward pre-hook on a ``BackwardInterface`` of module ``j``: notes its input while the
    interface runs. A class, not a closure, so that ``copy.deepcopy`` rebinds it to the copy (and pickle can
    save it). It holds its owner weakly: the hooks stay on the user's modules, and must not keep a discarded
    ``GradientIsolated`` (its optimizers and their state) alive; they are removed when it is collected."""

    def __init__(self, owner: Optional["GradientIsolated"], j: int) -> None:
        self.owner, self.j = (weakref.ref(owner) if owner is not None else _no_owner), j

    def _inputs(self) -> Optional[List[Optional[Tensor]]]:
        owner = self.owner()
        return None if owner is None else owner._iface_inputs[self.j]

    def __call__(self, module, args) -> None:
        inputs = self._inputs()
        if inputs is not None:
            inputs.append(args[0] if args else None)

    def __deepcopy__(self, memo):
        # the copy's hook serves the copy of the owner (deepcopy'd through memo: the same object as the copy's)
        owner = self.owner()
        return type(self)(copy.deepcopy(owner, memo) if owner is not None else None, self.j)

    def __reduce__(self):
        return type(self), (self.owner(), self.j)

    def __setstate__(self, state: dict) -> None:
        # an object pickled by an earlier dni_fast holds its owner strongly
        self.__dict__.update(state)
        owner = self.__dict__.get("owner")
        if owner is None:
            self.owner = _no_owner
        elif not callable(owner) or isinstance(owner, nn.Module):
            self.owner = weakref.ref(owner)


class _LeaveInterface(_EnterInterface):
    """The matching forward hook: drops the input once the interface has returned."""

    def __call__(self, module, args, output) -> None:
        inputs = self._inputs()
        if inputs:
            inputs.pop()


def _no_owner() -> None:
    """The owner of a hook whose ``GradientIsolated`` was collected (in a copy of its modules): none."""


def _remove_dead(handles) -> None:
    """Take off the guard hooks whose ``GradientIsolated`` is gone (a shallow copy shares the original's
    hook objects and handles: when the copy goes, the original's hooks must stay)."""
    for h in handles:
        d = h.hooks_dict_ref()
        hook = None if d is None else d.get(h.id)
        if hook is None or (isinstance(hook, _EnterInterface) and hook.owner() is None):
            h.remove()


class GradientIsolated(nn.Module):
    """Modules trained by local losses, with their inputs detached.

    Args:
        modules: the n modules, applied in order (module i+1 takes module i's
            output).
        losses: one per module:

            * a callable ``loss(h, y) -> scalar`` on the module's output ``h``
              (``loss(h)`` when ``loss.needs_target`` is False, as for
              :class:`~dni_fast.local.InfoNCE`); ``nn.Module`` losses train
              their own parameters with the module. Module i+1 receives
              ``h.detach()``.
            * a ``dni_fast.BackwardInterface``: module i trains on the
              synthetic gradient it injects into ``h``; module i+1 receives
              its trigger, through which the true gradient from module i+1
              regresses the synthesizer (and goes no further).
            * ``None``: module i has no loss of its own. Its output goes on
              undetached, and module i+1 must feed it straight into a
              ``BackwardInterface`` (module i's only gradient is that
              interface's injection). Any other gradient that reaches module
              i's output raises :class:`BoundaryCrossingError`.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once
            per module with the parameters of the module and its loss; or one
            ``torch.optim.Optimizer`` shared by all (built by the caller over
            every parameter).
        train_module: ``None`` trains every module; ``i`` trains module i only
            (GIM's ``--train_module``): modules before it run under
            ``no_grad`` (in eval mode when ``frozen_eval``), modules after it
            do not run.
        frozen_eval: put frozen modules in eval mode while they run, so that
            their BatchNorm statistics stay frozen too.

    ``step(x, y=None, start=0)`` trains on one batch and returns the losses,
    one detached 0-dim tensor per module (``None`` for a module without a
    loss, an interface, or not trained). Every optimizer steps once at the end
    of ``step``: module i+1's input was computed before any update, so this
    is the same as stepping each module in its turn, and it lets a
    synthesizer's regression gradient (which arrives in module i+1's turn)
    join the same step.

    ``forward(x, upto=None)`` runs modules ``[0, upto)`` as a plain network
    (no losses; the interfaces given as ``losses`` are not called, those
    inside a module are, as that module calls them). ``cache_outputs``
    serves the module-by-module schedule.

    ``step`` refuses to run under ``torch.no_grad()`` and with an interface
    it relies on in eval mode (which would let a gradient cross a module
    boundary).
    """

    def __init__(self, modules: Sequence[nn.Module], losses: Sequence[LossSpec], optimizer: OptimizerSpec,
                 train_module: Optional[int] = None, frozen_eval: bool = True) -> None:
        super().__init__()
        modules, losses = list(modules), list(losses)
        if not modules:
            raise ValueError("GradientIsolated needs at least one module")
        if len(losses) != len(modules):
            raise ValueError(f"GradientIsolated got {len(modules)} modules but {len(losses)} losses; give one loss "
                             f"(or None) per module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules[{i}] must be an nn.Module, got {type(m).__name__}")
        for i, l in enumerate(losses):
            if l is not None and not callable(l):
                raise TypeError(f"losses[{i}] must be a callable, an nn.Module, a BackwardInterface or None, got "
                                f"{type(l).__name__}")
            if (l is None or isinstance(l, BackwardInterface)) and i == len(modules) - 1:
                raise ValueError(f"losses[{i}] is {'None' if l is None else 'a BackwardInterface'}, but module {i} is "
                                 f"the last: nothing after it would train it (or its synthesizer)")
        self.stages = nn.ModuleList(modules)
        # nn.Module losses are registered (state_dict, .to(), parameters);
        # plain callables are kept aside
        self.loss_modules = nn.ModuleDict({str(i): l for i, l in enumerate(losses) if isinstance(l, nn.Module)})
        self._losses = losses
        self.frozen_eval = frozen_eval
        self._train_module: Optional[int] = None
        self.train_module = train_module
        # the loss-None guard: inputs of the BackwardInterface calls in flight,
        # per module
        self._iface_inputs: List[List[Tensor]] = [[] for _ in modules]
        self._guard_hooks = []
        for j, m in enumerate(modules):
            if j > 0 and losses[j - 1] is None:
                for sub in m.modules():
                    if isinstance(sub, BackwardInterface):
                        self._guard_hooks.append(sub.register_forward_pre_hook(_EnterInterface(self, j)))
                        self._guard_hooks.append(sub.register_forward_hook(_LeaveInterface(self, j),
                                                                           always_call=True))
        self._remove_hooks_when_collected()
        # optimizers
        self.shared_optimizer: Optional[torch.optim.Optimizer] = None
        self.optimizers: List[Optional[torch.optim.Optimizer]] = []
        owner: dict = {}
        for i in range(len(modules)):
            for p in self.module_parameters(i):
                j = owner.setdefault(id(p), i)
                if j != i and not isinstance(optimizer, torch.optim.Optimizer):
                    # Two per-module optimizers would both step it: twice the learning rate, two Adam states.
                    raise ValueError(f"a parameter ({tuple(p.shape)}) belongs to module {j}'s turn and module {i}'s "
                                     f"(a shared loss module or tied weights): each module's optimizer would step "
                                     f"it. Give each module its own loss module, or pass one torch.optim.Optimizer "
                                     f"shared by all")
        if isinstance(optimizer, torch.optim.Optimizer):
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for i in range(len(modules)):
                missing = [p for p in self.module_parameters(i) if id(p) not in held]
                if missing:
                    raise ValueError(f"the shared optimizer does not hold {len(missing)} parameter(s) of module {i} "
                                     f"or its loss (first: {tuple(missing[0].shape)}): they would never train. Build "
                                     f"it over every parameter (e.g. over GradientIsolated(...).parameters() of a "
                                     f"model holding the modules and losses), or set requires_grad=False on those "
                                     f"meant to stay fixed")
            self.shared_optimizer = optimizer
        elif callable(optimizer):
            for i in range(len(modules)):
                params = self.module_parameters(i)
                self.optimizers.append(optimizer(params) if params else None)
        else:
            raise TypeError(f"optimizer must be a function params -> torch.optim.Optimizer or an Optimizer, got "
                            f"{type(optimizer).__name__}")

    # ------------------------------------------------------------------ setup
    def _remove_hooks_when_collected(self) -> None:
        # The guard's hooks live on the user's modules: take them off when this object goes. The callback holds
        # the handles, not self; a copy (deepcopy, pickle) registers its own through __setstate__.
        if self._guard_hooks:
            weakref.finalize(self, _remove_dead, list(self._guard_hooks))

    def __setstate__(self, state) -> None:
        state.pop("_offloaded", None)  # (an earlier dni_fast's)
        super().__setstate__(state)
        self._remove_hooks_when_collected()

    @property
    def losses(self) -> List[LossSpec]:
        """The local losses, one per module (``None`` where there is none)."""
        return list(self._losses)

    @property
    def train_module(self) -> Optional[int]:
        return self._train_module

    @train_module.setter
    def train_module(self, i: Optional[int]) -> None:
        n = len(self.stages)
        if i is not None:
            if not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"train_module must be None or a module index in [0, {n}), got {i!r}")
            l = self._losses[i]
            if l is None or isinstance(l, BackwardInterface):
                raise ValueError(f"train_module={i}: module {i}'s loss is "
                                 f"{'None' if l is None else 'a BackwardInterface'}, which needs module {i + 1} to "
                                 f"train it; give module {i} a local loss to train it alone")
        self._train_module = i

    def module_parameters(self, i: int) -> List[nn.Parameter]:
        """The parameters that module i's turn trains: the module's, then its
        loss's (a head, InfoNCE's ``W``, a synthesizer), without duplicates."""
        seen, out = set(), []
        sources = [self.stages[i]]
        if isinstance(self._losses[i], nn.Module):
            sources.append(self._losses[i])
        for src in sources:
            for p in src.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _guard(self, i: int, h: Tensor) -> None:
        """Raise if a gradient reaches module i's output (whose loss is None)
        other than as the injection of a BackwardInterface of module i+1 that
        takes this very tensor as its input."""
        if not h.requires_grad:
            return
        ref = weakref.ref(h)  # not h itself: h -> hook -> h would be a cycle that delays freeing h

        def hook(grad):
            # Legitimate: the injection of an interface of module i+1 into this very tensor, inline (while that
            # interface runs) or on the overlap worker (overlap="injection": the thread running it knows its root).
            t = ref()
            if not (any(u is t for u in self._iface_inputs[i + 1]) or _overlap.injecting_into(t)):
                raise BoundaryCrossingError(
                    f"a gradient reached module {i}'s output from outside a BackwardInterface of module {i + 1}. "
                    f"Module {i}'s loss is None, so module {i + 1} must feed its input straight into a "
                    f"dni_fast.BackwardInterface (which cuts the graph); otherwise module {i + 1}'s loss (or a "
                    f"later module's) would train module {i}. Give module {i} a local loss, or make it end in a "
                    f"BackwardInterface by passing one as losses[{i}].")
            return grad

        h.register_hook(hook)

    # ----------------------------------------------------------------- running
    @contextlib.contextmanager
    def _frozen(self, modules: Sequence[nn.Module]):
        """no_grad, and eval mode (restored afterwards) when frozen_eval."""
        modes = [m.training for m in modules]
        if self.frozen_eval:
            for m in modules:
                m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, t in zip(modules, modes):
                m.train(t)

    def forward(self, x: Tensor, upto: Optional[int] = None) -> Tensor:
        """Modules ``[0, upto)`` (all by default) applied to ``x``, as one
        network: no losses and none of the interfaces given as losses (an
        interface inside a module runs as part of it: in train mode it
        injects), gradients as autograd makes them."""
        n = len(self.stages)
        upto = n if upto is None else upto
        if not isinstance(upto, int) or not 0 <= upto <= n:
            raise ValueError(f"upto must be None or in [0, {n}], got {upto!r}")
        for m in list(self.stages)[:upto]:
            x = m(x)
        return x

    def _call_loss(self, i: int, h: Tensor, y: Optional[Tensor]) -> Tensor:
        loss = self._losses[i]
        if _needs_target(loss):
            if y is None:
                raise ValueError(f"module {i}'s loss needs the targets: call step(x, y)")
            out = loss(h, y)
        else:
            out = loss(h)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(f"module {i}'s loss must return a scalar tensor, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out.reshape(())

    def _zero_grad(self, trained: Sequence[int]) -> None:
        if self.shared_optimizer is not None:
            self.shared_optimizer.zero_grad(set_to_none=True)
            return
        for i in trained:
            if self.optimizers[i] is not None:
                self.optimizers[i].zero_grad(set_to_none=True)

    def _step_optimizers(self, trained: Sequence[int]) -> None:
        if self.shared_optimizer is not None:
            self.shared_optimizer.step()
            return
        for i in trained:
            if self.optimizers[i] is not None:
                self.optimizers[i].step()

    def _check_can_train(self, trained: Sequence[int]) -> None:
        """Refuse, by name, the set-ups in which the step could not isolate the modules' gradients."""
        require_grad_mode("GradientIsolated.step")
        for i in trained:
            # An interface in eval mode passes its input through: module i+1's true gradient would train module i.
            ifaces = [(f"losses[{i}]", self._losses[i])] if isinstance(self._losses[i], BackwardInterface) else []
            if self._losses[i] is None and i + 1 < len(self.stages):
                ifaces += [(f"the BackwardInterface {name or '(module itself)'} of module {i + 1}", m)
                           for name, m in self.stages[i + 1].named_modules() if isinstance(m, BackwardInterface)]
            for what, m in ifaces:
                if not m.training:
                    raise RuntimeError(f"GradientIsolated.step: {what} is in eval mode, where it passes its input "
                                       f"through undetached and injects nothing, so module {i + 1}'s gradient would "
                                       f"train module {i}; call .train() on the model before step()")

    def step(self, x: Tensor, y: Optional[Tensor] = None, start: int = 0) -> List[Optional[Tensor]]:
        """Train on one batch.

        Args:
            x: the input of module ``start`` (the data when ``start == 0``; a
                cached output of module ``start - 1`` otherwise, see
                :meth:`cache_outputs`).
            y: targets, for the losses that need them.
            start: the first module to run.

        Returns:
            n entries: module i's loss as a detached 0-dim tensor (no host
            sync), or ``None``.
        """
        n = len(self.stages)
        if not 0 <= start < n:
            raise ValueError(f"start must be in [0, {n}), got {start}")
        tm = self._train_module
        if tm is not None and start > tm:
            raise ValueError(f"start={start} is past train_module={tm}")
        first = start if tm is None else tm
        last = n - 1 if tm is None else tm
        trained = list(range(first, last + 1))
        if self._losses[last] is None or isinstance(self._losses[last], BackwardInterface):
            raise ValueError(f"module {last} runs last in this step but has no local loss to train it")
        self._check_can_train(trained)
        out_losses: List[Optional[Tensor]] = [None] * n
        # Detached: module `start`'s loss must not reach whatever computed x (an upstream model's graph).
        h = x.detach() if isinstance(x, Tensor) else x
        if first > start:  # frozen prefix (train_module)
            with self._frozen(list(self.stages)[start:first]):
                for i in range(start, first):
                    h = self.stages[i](h)
        self._zero_grad(trained)
        for i in trained:
            out = self.stages[i](h)
            if not isinstance(out, Tensor):
                raise TypeError(f"GradientIsolated: module {i} returned a {type(out).__name__}; each module must "
                                f"return one tensor (the next module's input, and what its local loss sees)")
            loss = self._losses[i]
            if loss is None:
                self._guard(i, out)
                h = out
            elif isinstance(loss, BackwardInterface):
                h = loss(out)  # injects S(out) into module i now; returns the trigger on out.detach()
            else:
                value = self._call_loss(i, out, y)
                # backpropagate and free module i's graph before module i+1 runs (nothing to backpropagate: a
                # module without parameters under a loss without any)
                if value.requires_grad:
                    value.backward()
                elif self.module_parameters(i):
                    raise RuntimeError(f"module {i}'s loss does not require grad (it was computed from a detached "
                                       f"output, or under torch.no_grad()), so module {i} and its loss would never "
                                       f"train; compute the loss from the module's output with autograd on")
                out_losses[i] = value.detach()
                h = out.detach()
            del out
        self._step_optimizers(trained)  # a synchronisation point: the offloaded injections have run
        return out_losses

    @torch.no_grad()
    def cache_outputs(self, batches: Iterable, upto: Optional[int] = None,
                      device: Optional[torch.device] = None) -> List[Tuple[Tensor, Optional[Tensor]]]:
        """Outputs of modules ``[0, upto)`` for every batch, computed once.

        The module-by-module schedule (train module 0 for a while, then 1, ...)
        need not run the frozen modules again every epoch::

            for i in range(len(gi.stages)):
                gi.train_module = i
                cached = gi.cache_outputs(loader)          # modules [0, i), once
                for epoch in range(epochs):
                    for h, y in cached:
                        gi.step(h, y, start=i)

        Args:
            batches: an iterable of inputs ``x`` or ``(x, y)`` pairs.
            upto: default ``train_module`` (0 when it is None: the inputs).
            device: where to keep the cache (default: where it was computed).

        Returns:
            a list of ``(h, y)`` (``y`` None when the batches carry none).
            The frozen modules run in eval mode when ``frozen_eval``.
        """
        upto = (self._train_module or 0) if upto is None else upto
        if not 0 <= upto <= len(self.stages):
            raise ValueError(f"upto must be in [0, {len(self.stages)}], got {upto}")
        out = []
        with self._frozen(list(self.stages)[:upto]):
            for b in batches:
                if isinstance(b, (tuple, list)):
                    x, y = b[0], (b[1] if len(b) > 1 else None)
                else:
                    x, y = b, None
                h = self.forward(x, upto)
                if device is not None:
                    h = h.to(device)
                    y = y.to(device) if y is not None else None
                out.append((h, y))
        return out
