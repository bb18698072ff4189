"""The synthesizer's regression loss: the one definition every backend uses.

A synthesizer ``S`` regresses on a target ``t`` (the true gradient for a
``BackwardInterface``, the true message for a ``ForwardInterface``) with

    L = scale / 2 * sum((S - t) ** 2),    dL/dS = delta = scale * (S - t).

Only ``scale`` differs between the two interfaces (docs/design.md §1):

* ``BACKWARD_LOSS``: ``scale = 2 / t.size(0)``, dni-pytorch's normalisation of
  ``sum((S - g)^2)`` by the **first dimension** (not the number of rows);
* ``FORWARD_LOSS``: ``scale = 2 / t.numel()``, ``F.mse_loss``'s mean over all
  elements.

The interfaces compute ``scale`` once per step from the target's shape (the
true gradient has the trigger's shape, so it is known at forward time) and
pass it down to every kernel, C++ call and statistics row; nothing below
recomputes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RegressionLoss", "BACKWARD_LOSS", "FORWARD_LOSS"]


def _sum_sq_first_dim(s: Tensor, t: Tensor) -> Tensor:
    return ((s - t) ** 2).sum() / t.size(0)


@dataclass(frozen=True)
class RegressionLoss:
    """``scale(shape)`` and the plain-PyTorch loss it is the gradient scale of."""

    name: str
    _scale: Callable[[Sequence[int]], float]
    #: the loss in plain PyTorch, ``loss(S, target) -> 0-dim``, as dni-pytorch writes it
    torch_loss: Callable[[Tensor, Tensor], Tensor]

    def scale(self, shape: Sequence[int]) -> float:
        """``scale`` for a target of ``shape``; 0.0 for an empty target (no step)."""
        if len(shape) == 0:
            raise ValueError(f"{self.name} regression: the target must have at least one dimension")
        if any(d == 0 for d in shape):
            return 0.0
        return self._scale(shape)


BACKWARD_LOSS = RegressionLoss("backward (sum of squares / first dim)", lambda shape: 2.0 / shape[0],
                               _sum_sq_first_dim)
FORWARD_LOSS = RegressionLoss("forward (F.mse_loss)", lambda shape: 2.0 / _numel(shape), F.mse_loss)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
