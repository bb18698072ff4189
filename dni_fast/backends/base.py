"""What a backend is: its facts and the entry points the interfaces call.

Every backend, ``reference`` included, is one object of a ``Backend``
subclass, registered once in ``dni_fast/backends/__init__.py``. The interfaces
(``dni_fast/interfaces.py``) call its entry points and never ask which backend
they hold; ``resolve`` picks the object. See docs/design.md §2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from dni_fast.regression import RegressionLoss
from dni_fast.stats import SynthStats

__all__ = ["Backend", "Primitives", "BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this synthesizer call."""


@dataclass(frozen=True)
class Primitives:
    """The three fused primitives of a backend, with the signatures, shapes and
    math of their fp32 twins in ``kernels/synth_ref.py``: ``forward(x, c,
    params) -> (s, zs)``, ``update(x, c, params, zs, s, g, scale, grad_scale)
    -> (grads, partials)`` and ``pipelined(...)`` (step t+1's forward with step
    t's update)."""

    forward: Callable
    update: Callable
    pipelined: Callable


class Backend:
    """One way to run a synthesizer step.

    Facts (class attributes): ``name``; ``devices`` (device types it runs on);
    ``dtypes`` (compute dtypes it accepts); ``max_hidden`` (the largest
    ``n_hidden`` of a ``BasicSynthesizer`` it fuses, ``None`` for any
    synthesizer, custom ones included); ``fused`` (whether it runs the fused
    primitives rather than the synthesizer module through autograd);
    ``how_to_get`` (what to do when it is unavailable).

    Entry points (each takes the synthesizer module, the trigger ``(*, Dt)``
    and the context from ``synthesizer_context``, already validated by the
    interface):

    * :meth:`receive` -> ``S (*, Do)``, detached;
    * :meth:`trigger` -> ``(out, S)``: ``out`` is the pass-through tensor whose
      backward regresses ``S`` on the true gradient with the given ``scale``;
      ``S`` is injected into ``inject_into``'s graph when that is given; with
      ``overlap`` the regression's products go to the overlap worker
      (``dni_fast/_overlap.py``) instead of running in the backward;
    * :meth:`send` -> ``(loss, S)``: the forward regression of ``S`` on a
      message; ``loss`` (or ``None``) is what to backpropagate;
    * :attr:`primitives`: for the pipelined mode and the op tests.
    """

    name: str = ""
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = ()
    max_hidden: Optional[int] = None
    fused: bool = True
    how_to_get: str = ""

    # -- facts ---------------------------------------------------------------
    def status(self, device: torch.device) -> Tuple[bool, str]:
        """``(available, reason)`` on ``device``; the reason says how to get it."""
        if device.type not in self.devices:
            where = " and ".join(d.upper() for d in self.devices)
            return False, (f"the {self.name} backend runs on {where} tensors, not {device.type.upper()} ones; "
                           "use backend='auto' to pick what runs here")
        return self._status(device)

    def _status(self, device: torch.device) -> Tuple[bool, str]:
        return True, ""

    def takes_params(self, compute: torch.dtype, param: torch.dtype) -> bool:
        """Whether this backend computes in ``compute`` with parameters of dtype
        ``param`` (under autocast the two differ)."""
        return True

    def interpreted(self, device: torch.device) -> bool:
        """Whether this backend runs in an interpreter on ``device`` (for tests
        only: ``auto`` and the benchmarks never use it)."""
        return False

    def dtype_names(self) -> str:
        return ", ".join(str(d).replace("torch.", "") for d in self.dtypes)

    def describe(self) -> dict:
        """The backend's facts, for ``python -m dni_fast info`` and the docs."""
        return {"name": self.name, "devices": list(self.devices), "dtypes": self.dtype_names(),
                "max_hidden": self.max_hidden, "fused": self.fused}

    def __repr__(self) -> str:
        return f"<dni_fast backend {self.name!r}>"

    # -- entry points ----------------------------------------------------------
    @property
    def primitives(self) -> Primitives:
        """The backend's primitives, loaded on first use (they may import Triton
        or the extension) and kept."""
        p = self.__dict__.get("_primitives")
        if p is None:
            p = self.__dict__["_primitives"] = self._load_primitives()
        return p

    def _load_primitives(self) -> Primitives:
        raise NotImplementedError

    def receive(self, synth: nn.Module, trigger: Tensor, context: Any) -> Tensor:
        raise NotImplementedError

    def trigger(self, synth: nn.Module, trigger: Tensor, context: Any, stats: Optional[SynthStats], scale: float,
                inject_into: Optional[Tensor], overlap: bool = False) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def send(self, synth: nn.Module, trigger: Tensor, context: Any, message: Tensor, stats: Optional[SynthStats],
             loss: RegressionLoss, scale: float) -> Tuple[Optional[Tensor], Tensor]:
        raise NotImplementedError
