"""``BasicSynthesizer``: dni-pytorch's MLP synthesizer, layer for layer."""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _mm

from dni_fast._autocast import autocast_on

__all__ = ["BasicSynthesizer", "check_trigger_context"]


_LINEAR_FORWARD = nn.Linear.forward


class BasicSynthesizer(nn.Module):
    """MLP with ReLU that predicts a message from a trigger (and a context).

    ``z = input_trigger(trigger) [+ input_context(context)]``, then for each
    hidden layer ``z = layer(relu(z))``. The last layer's weight is zeroed (with
    ``n_hidden == 0``: the input weights), so a fresh synthesizer predicts the
    bias, as in the paper. Layers are created in dni-pytorch's order, so one
    seed gives the same weights and ``state_dict`` keys (``input_trigger``,
    ``input_context``, ``layers.N``) as dni-pytorch.

    Args:
        output_dim: width ``Do`` of the synthesized message.
        n_hidden: number of hidden layers (the fused backends cover 0 to 2).
        hidden_dim: hidden width ``H``, default ``output_dim``.
        trigger_dim: trigger width ``Dt``, default ``output_dim``.
        context_dim: context width ``Dc``; ``None`` means no context, and any
            context passed in is then ignored (as in dni-pytorch).

    Shapes: ``trigger (*, Dt)``, ``context (*, Dc)`` broadcastable against the
    trigger's leading dims, output ``(*, Do)``.
    """

    def __init__(
        self,
        output_dim: int,
        n_hidden: int = 0,
        hidden_dim: Optional[int] = None,
        trigger_dim: Optional[int] = None,
        context_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        sizes = {}
        for name, raw in (("output_dim", output_dim), ("n_hidden", n_hidden), ("hidden_dim", hidden_dim),
                          ("trigger_dim", trigger_dim), ("context_dim", context_dim)):
            v = raw
            if raw is not None:
                try:  # numpy integers too (np.prod(shape), y.max() + 1), as nn.Linear takes them
                    v = None if isinstance(raw, bool) else operator.index(raw)
                except TypeError:
                    v = None
                if v is None or v < (0 if name == "n_hidden" else 1):
                    kind = "non-negative" if name == "n_hidden" else "positive"
                    raise ValueError(f"BasicSynthesizer: {name} must be a {kind} int, got {raw!r}")
            sizes[name] = v
        output_dim, n_hidden, hidden_dim = sizes["output_dim"], sizes["n_hidden"], sizes["hidden_dim"]
        trigger_dim, context_dim = sizes["trigger_dim"], sizes["context_dim"]
        hidden_dim = output_dim if hidden_dim is None else hidden_dim
        trigger_dim = output_dim if trigger_dim is None else trigger_dim
        self.output_dim, self.n_hidden, self.hidden_dim = output_dim, n_hidden, hidden_dim
        self.trigger_dim, self.context_dim = trigger_dim, context_dim

        top = output_dim if n_hidden == 0 else hidden_dim
        self.input_trigger = nn.Linear(trigger_dim, top)
        self.input_context = nn.Linear(context_dim, top) if context_dim is not None else None
        self.layers = nn.ModuleList(
            nn.Linear(hidden_dim, hidden_dim if i < n_hidden - 1 else output_dim) for i in range(n_hidden)
        )
        # Zero-initialise the last layer, as in the paper (biases keep nn.Linear's init).
        with torch.no_grad():
            if n_hidden > 0:
                self.layers[-1].weight.zero_()
            else:
                self.input_trigger.weight.zero_()
                if self.input_context is not None:
                    self.input_context.weight.zero_()

    def extra_repr(self) -> str:
        return (f"output_dim={self.output_dim}, n_hidden={self.n_hidden}, hidden_dim={self.hidden_dim}, "
                f"trigger_dim={self.trigger_dim}, context_dim={self.context_dim}")

    # -- what the fused backends may do with it ----------------------------------
    def fused_blocker(self) -> Optional[str]:
        """Why the fused backends cannot compute exactly what :meth:`forward`
        computes, or ``None``. They read the layers' parameters
        (:meth:`flat_params`) and never call the modules, so an overridden
        ``forward``, a module hook (old-style ``weight_norm`` is one) or a
        layer that is not a plain ``nn.Linear`` with a bias would be skipped
        silently: every backend then runs the synthesizer on ``reference``
        (through its modules, as dni-pytorch does; a named fused backend
        warns once).
        Parametrized layers (``torch.nn.utils.parametrize``) fuse. Checked at
        every step (a few attribute reads): a hook added later counts."""
        cls = type(self)
        if cls.forward is not _BASIC_FORWARD:
            return f"{cls.__name__} overrides forward()"
        if _mm._global_forward_hooks or _mm._global_forward_pre_hooks or _mm._global_backward_hooks or \
                _mm._global_backward_pre_hooks:
            return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks:
            return "the synthesizer has a module hook"
        mods = self._modules
        ctx = mods.get("input_context")
        for i, m in enumerate((mods["input_trigger"], *(() if ctx is None else (ctx,)),
                               *mods["layers"]._modules.values())):
            d = m.__dict__  # plain dict reads: this runs every step
            if d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or \
                    d["_backward_pre_hooks"] or type(m).forward is not _LINEAR_FORWARD or \
                    d["_parameters"].get("bias", 0) is None:
                return self._blocker_of(m)
        return None

    def _blocker_of(self, m: nn.Module) -> str:
        name = next(n for n, x in self.named_modules() if x is m)
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"{name} has a module hook"
        if not isinstance(m, nn.Linear) or type(m).forward is not _LINEAR_FORWARD:
            return f"{name} is a {type(m).__name__}, not an nn.Linear"
        return f"{name} has no bias"

    # -- the flat parameter list the fused backends take (kernels/synth_ref.py) --
    def flat_params(self) -> List[Tensor]:
        """``[w_t, b_t, (w_c, b_c,) w_1, b_1, ...]`` in dni-pytorch's layer order.

        Read straight from the ``_modules``/``_parameters`` dicts: this runs on
        every fused step, and nn.Module attribute lookups made it 6.5 us."""
        mods = self._modules
        seq = [mods["input_trigger"]]
        ctx_layer = mods.get("input_context")
        if ctx_layer is not None:
            seq.append(ctx_layer)
        seq.extend(mods["layers"]._modules.values())
        out: List[Tensor] = []
        for m in seq:
            p = m._parameters
            w, b = p.get("weight"), p.get("bias")
            if w is None or b is None:
                # A parametrized layer (torch.nn.utils.parametrize: weight_norm, spectral_norm,
                # ...) computes its weight; gradients reach the originals through autograd.
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if not (isinstance(w, Tensor) and isinstance(b, Tensor)):
                    raise ValueError(f"BasicSynthesizer: the fused backends need every layer to be a Linear with a "
                                     f"bias, got {m!r}; use backend='reference' for other layers")
            out += (w, b)
        return out

    def weight_probe(self) -> Tensor:
        """A tensor with the trigger layer's weight dtype and device, read without computing the weight: a
        parametrized layer's ``.weight`` runs its parametrization (``spectral_norm``'s power iteration, with
        its side effect on ``_u``), and the checks that only need the dtype ran it once or twice more a step
        than ``reference`` does."""
        layer = self._modules["input_trigger"]
        w = layer._parameters.get("weight")
        if w is not None:
            return w
        plist = getattr(layer, "parametrizations", None)
        if plist is not None and "weight" in plist:
            p = plist["weight"]
            w = getattr(p, "original", None)
            if w is None:
                w = getattr(p, "original0", None)
            if isinstance(w, Tensor):
                return w
        return layer.weight  # a replaced layer (or old-style weight_norm: a plain attribute)

    def check_inputs(self, trigger: Any, context: Any) -> Optional[Tensor]:
        """Validate ``trigger`` and ``context``; return the context to use
        (``None`` when this synthesizer takes none). Raises with a message that
        names the problem (``check_trigger_context``)."""
        mods = self._modules  # the dicts, not Module.__getattr__ (~1 us a lookup): this runs every step
        w = self.weight_probe()
        # The context layer decides, as in dni-pytorch's forward: one attached after construction (or
        # replaced by another width) is used at its own width; one set to None takes no context.
        ctx_layer = mods.get("input_context")
        cdim = None if ctx_layer is None else ctx_layer.__dict__.get("in_features", self.context_dim)
        if ctx_layer is not None and cdim is None:
            raise TypeError(f"BasicSynthesizer: input_context is a {type(ctx_layer).__name__} without in_features "
                            f"and context_dim is None; set synthesizer.context_dim to the context's width")
        return check_trigger_context("BasicSynthesizer", "weights", trigger, context, self.trigger_dim, cdim,
                                     w.device, w.dtype)

    def forward(self, trigger: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Reference forward: ``trigger (*, Dt)``, ``context (*, Dc)`` -> ``(*, Do)``."""
        context = self.check_inputs(trigger, context)
        last = self.input_trigger(trigger)
        if context is not None:
            last = last + self.input_context(context)
        for layer in self.layers:
            last = layer(F.relu(last))
        return last


def check_trigger_context(owner: str, state: str, trigger: Any, context: Any, trigger_dim: int,
                          context_dim: Optional[int], device: torch.device,
                          dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """The input checks every synthesizer shares: ``trigger (*, trigger_dim)``
    floating-point on ``device`` (and of ``dtype`` outside autocast, when
    given); with ``context_dim`` set, ``context (*, context_dim)`` floating-point
    on ``device``, its leading dims broadcastable against the trigger's.
    Returns the context to use (``None`` without ``context_dim``); raises an
    error that starts with ``owner`` and names the problem (``state``: what
    the synthesizer keeps on ``device``, for the device message)."""
    if not isinstance(trigger, Tensor):
        raise TypeError(f"{owner}: trigger must be a tensor, got {type(trigger).__name__}")
    if not trigger.is_floating_point():
        raise TypeError(f"{owner}: trigger must be a floating-point tensor, got dtype {trigger.dtype}; "
                        "cast it with .float()")
    if trigger.dim() == 0 or trigger.shape[-1] != trigger_dim:
        raise ValueError(f"{owner}: trigger has shape {tuple(trigger.shape)}, but its last dim must be "
                         f"trigger_dim={trigger_dim}")
    if trigger.device != device:
        raise RuntimeError(f"{owner}: trigger is on {trigger.device} but the synthesizer's {state} are on "
                           f"{device}; move one of them (e.g. interface.to({trigger.device}))")
    if dtype is not None and trigger.dtype != dtype and not autocast_on(trigger):
        raise TypeError(f"{owner}: trigger dtype {trigger.dtype} differs from the synthesizer's "
                        f"{dtype} outside autocast; cast one of them, or run under torch.autocast")
    if context_dim is None:
        return None
    if context is None:
        raise ValueError(f"{owner}: context_dim={context_dim} is set but no context was given; "
                         "wrap the call in `with dni.synthesizer_context(context):`")
    if not isinstance(context, Tensor):
        raise TypeError(f"{owner}: context must be a tensor, got {type(context).__name__}")
    if not context.is_floating_point():
        raise TypeError(f"{owner}: context must be floating-point, got dtype {context.dtype} "
                        "(one-hot labels: F.one_hot(y, n).float())")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(f"{owner}: context has shape {tuple(context.shape)}, but its last dim must be "
                         f"context_dim={context_dim}")
    if context.device != device:
        raise RuntimeError(f"{owner}: context is on {context.device} but the synthesizer is on {device}")
    if dtype is not None and context.dtype != dtype and not autocast_on(trigger):
        raise TypeError(f"{owner}: context dtype {context.dtype} differs from the synthesizer's {dtype} outside "
                        "autocast; cast the context (e.g. context.to(trigger.dtype)), or run under torch.autocast")
    try:
        ok = torch.broadcast_shapes(trigger.shape[:-1], context.shape[:-1]) == trigger.shape[:-1]
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: context leading dims {tuple(context.shape[:-1])} do not broadcast "
                         f"against the trigger's {tuple(trigger.shape[:-1])}")
    return context


_BASIC_FORWARD = BasicSynthesizer.forward
