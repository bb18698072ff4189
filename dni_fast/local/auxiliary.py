"""Local losses other than InfoNCE: DGL's auxiliary classifier and any user function.

A *local loss* is what :class:`~dni_fast.local.GradientIsolated` backpropagates
into one module: a callable ``loss(h, y) -> scalar`` on the module's output
``h`` (or ``loss(h)`` when its attribute ``needs_target`` is False, as for
InfoNCE). When it is an ``nn.Module``, its parameters (a classifier head, the
InfoNCE ``W``) train with the module's optimizer.

(The file is not called ``aux.py``: that name cannot exist on Windows.)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AuxClassifier", "LocalLoss"]


class AuxClassifier(nn.Module):
    """DGL's auxiliary classifier (Belilovsky et al. 2020, "Decoupled Greedy
    Learning of CNNs"): a small head on a module's output, trained with
    cross-entropy on the labels; its gradient trains the module.

    Args:
        in_features: channels C of a (B, C, H, W) feature map (``kind="conv"``)
            or width D of a (B, D) / (B, ..., D) feature (``kind="mlp"``).
        num_classes: number of classes.
        kind: ``"conv"``: ``conv_layers`` 3x3 convolutions of ``hidden``
            channels with ReLU, adaptive average pooling to ``pool x pool``,
            then a linear layer (DGL's head, reduced). ``"mlp"``: ``hidden``
            units and ReLU (``conv_layers`` hidden layers; 0 for a linear
            head), then a linear layer.
        hidden: width of the hidden layers (default: ``in_features``).
        conv_layers: number of hidden layers.
        pool: spatial size after pooling (``"conv"`` only).

    ``forward(h, y)`` returns the mean cross-entropy; ``logits(h)`` the
    (B, num_classes) logits.
    """

    needs_target = True

    def __init__(self, in_features: int, num_classes: int, kind: str = "conv", hidden: Optional[int] = None,
                 conv_layers: int = 1, pool: int = 2) -> None:
        super().__init__()
        if kind not in ("conv", "mlp"):
            raise ValueError(f"AuxClassifier kind must be 'conv' or 'mlp', got {kind!r}")
        if in_features < 1 or num_classes < 1 or conv_layers < 0 or pool < 1:
            raise ValueError(f"AuxClassifier: invalid sizes in_features={in_features}, num_classes={num_classes}, "
                             f"conv_layers={conv_layers}, pool={pool}")
        self.kind, self.in_features, self.num_classes, self.pool = kind, in_features, num_classes, pool
        hidden = hidden or in_features
        layers = []
        width = in_features
        for _ in range(conv_layers):
            layers += [nn.Conv2d(width, hidden, 3, padding=1) if kind == "conv" else nn.Linear(width, hidden),
                       nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width * (pool * pool if kind == "conv" else 1), num_classes)

    def logits(self, h: Tensor) -> Tensor:
        """(B, num_classes) logits of the module output ``h``."""
        want = 4 if self.kind == "conv" else None
        if want is not None and h.dim() != 4:
            raise ValueError(f"AuxClassifier(kind='conv') expects (B, C, H, W) feature maps, got shape "
                             f"{tuple(h.shape)}; use kind='mlp' for flat features")
        width = h.shape[1] if self.kind == "conv" else h.shape[-1]
        if width != self.in_features:
            raise ValueError(f"AuxClassifier was built for {self.in_features} input "
                             f"{'channels' if self.kind == 'conv' else 'features'}, got {width}")
        x = self.body(h)
        if self.kind == "conv":
            x = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        else:
            x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)  # (B, ..., D): mean over the middle dims
        return self.head(x)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        if y is None:
            raise ValueError("AuxClassifier needs the labels y (GradientIsolated.step(x, y))")
        return F.cross_entropy(self.logits(h), y)


class LocalLoss(nn.Module):
    """Any function as a module's local loss.

    Args:
        fn: ``fn(h, y) -> scalar`` (or ``fn(h)`` with ``needs_target=False``).
        needs_target: whether ``fn`` takes the labels.
        modules: ``nn.Module`` s whose parameters ``fn`` uses (a head, an
            :class:`~dni_fast.local.InfoNCE`): registered here, so that they
            move with ``.to()``, appear in ``state_dict`` and train with the
            module's optimizer.

    Example: GIM on patch features that must be pooled into a grid first::

        nce = InfoNCE(64)
        loss = LocalLoss(lambda h: nce(to_grid(h)), needs_target=False, modules=[nce])
    """

    def __init__(self, fn: Callable[..., Tensor], needs_target: bool = True,
                 modules: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"LocalLoss needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.needs_target = bool(needs_target)
        self.parts = nn.ModuleList(modules)

    def forward(self, h: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return self.fn(h, y) if self.needs_target else self.fn(h)
