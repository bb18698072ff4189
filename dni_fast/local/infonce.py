"""InfoNCE losses of Greedy InfoMax (vision) and CPC (sequences), docs/design.md §7.

The math, the shapes and the fused paths live in :mod:`dni_fast.kernels.infonce`;
this module holds the ``nn.Module`` s (their ``W`` weights, the negative
sampling, input checks) and :func:`resolve_backend`, the one place where an
InfoNCE call chooses how it runs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from dni_fast.backends import BackendUnavailableError, get_backend
from dni_fast.kernels import infonce as _K

__all__ = ["BACKENDS", "resolve_backend", "InfoNCE", "SequenceInfoNCE"]

#: InfoNCE backends: ``auto`` picks; ``reference`` is GIM's computation in
#: fp32 (:func:`dni_fast.kernels.infonce.infonce_ref`); ``chunked`` the fused
#: torch path (any device); ``triton`` the fused kernels.
BACKENDS = ("auto", "reference", "chunked", "triton")

_HOW_TO_GET_TRITON = ("install Triton (`pip install triton`) and run on a CUDA device (on the CPU, only for tests, "
                      "with TRITON_INTERPRET=1 set before dni_fast is imported); backend='chunked' runs anywhere")


def _check_name(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown InfoNCE backend {name!r}; choose one of {', '.join(BACKENDS)} (or None for auto)")
    return name.lower()


def resolve_backend(requested: Optional[str], z: Tensor) -> str:
    """The backend an InfoNCE call on ``z`` runs with: ``reference``,
    ``chunked`` or ``triton``.

    * ``None`` / ``"auto"``: ``reference`` when the global dni_fast backend is
      ``"reference"`` (``dni_fast.use_backend("reference")`` makes the whole
      library use its ground truth), and for dtypes the fused paths do not
      take (fp64); else ``triton`` on a CUDA device where Triton is available,
      else ``chunked``. Never the Triton interpreter.
    * an explicit name: that backend, or ``BackendUnavailableError`` saying
      how to get it.
    """
    name = _check_name(requested)
    if name in (None, "auto"):
        if get_backend() == "reference" or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return "reference"
        if z.device.type == "cuda" and _K.triton_available(z.device)[0]:
            return "triton"
        return "chunked"
    if name == "triton":
        ok, why = _K.triton_available(z.device)
        if not ok:
            raise BackendUnavailableError(f"InfoNCE backend 'triton' is not available on {z.device}: {why}; "
                                          f"{_HOW_TO_GET_TRITON}")
    return name


def _check_context(c: Optional[Tensor]) -> None:
    """Before the fused paths cast ``c`` to z's dtype: an integer context is an error on every backend (the
    reference's own check would never see it after a cast)."""
    if c is not None and not (isinstance(c, Tensor) and c.is_floating_point()):
        raise TypeError(f"c must be a floating-point tensor, got "
                        f"{c.dtype if isinstance(c, Tensor) else type(c).__name__}")


class InfoNCE(nn.Module):
    """Greedy InfoMax's vision InfoNCE on an encoded patch grid.

    Args:
        channels: C, the encoding width.
        k_steps: K prediction steps (rows ahead, before ``skip``).
        negatives: N negatives per position, drawn uniformly with replacement
            from all positions of ``W_k z`` in the batch.
        skip: the context at row y predicts row ``y + k + skip`` (GIM: 1).
        backend: ``None``/``"auto"``, ``"reference"``, ``"chunked"`` or
            ``"triton"`` (see :func:`resolve_backend`).

    Attributes:
        W: ``nn.ModuleList`` of K bias-free ``Conv2d(C, C, 1)``; ``W[k-1]``
            maps the future rows of step k.

    ``forward(z, c=None, neg_idx=None)``: z (B, C, H, W), c the context of the
    same shape (default z: GIM has no autoregressor), ``neg_idx`` K
    LongTensors, ``neg_idx[k-1]`` of shape (P_k, N) with P_k = (H-k-skip) W B,
    indexing positions flattened in (y, x, b) order. Returns the fp32 scalar
    loss, the mean over k of the mean over positions of
    ``-log_softmax([pos, neg_1..neg_N])[0]``.
    """

    needs_target = False  # GradientIsolated calls it as loss(h)

    def __init__(self, channels: int, k_steps: int = 5, negatives: int = 16, skip: int = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if channels < 1 or k_steps < 1 or negatives < 1 or skip < 0:
            raise ValueError(f"InfoNCE needs channels, k_steps, negatives >= 1 and skip >= 0; got channels={channels}, "
                             f"k_steps={k_steps}, negatives={negatives}, skip={skip}")
        self.channels, self.k_steps, self.negatives, self.skip = channels, k_steps, negatives, skip
        self.backend = _check_name(backend)
        self.W = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in range(k_steps))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, k_steps={self.k_steps}, negatives={self.negatives}, skip={self.skip}, "
                f"backend={self.backend}")

    def positions(self, z: Tensor) -> List[int]:
        """``[P_1, ..., P_K]`` for an input shaped like ``z``."""
        B, _, H, W = z.shape
        return _K.vision_positions(H, W, B, self.k_steps, self.skip)

    def sample_negatives(self, z: Tensor, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        """Draw ``neg_idx`` for ``z`` as ``forward`` does when it is not given."""
        P = self.positions(z)
        return _K.draw_negatives(P, P, self.negatives, z.device, generator)

    def forward(self, z: Tensor, c: Optional[Tensor] = None, neg_idx: Optional[Sequence[Tensor]] = None) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 4:
            raise ValueError(f"InfoNCE expects z of shape (B, C, H, W), got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if z.shape[1] != self.channels:
            raise ValueError(f"z has {z.shape[1]} channels, but this InfoNCE was built for {self.channels}")
        _K._check_float("z", z, 4)  # dtype, and a non-empty grid before negatives are drawn from it
        w0 = self.W[0].weight
        if w0.device != z.device:
            raise ValueError(f"z is on {z.device}, but the InfoNCE weights W are on {w0.device}; move one of them "
                             f"(e.g. loss.to(z.device))")
        backend = resolve_backend(self.backend, z)
        if neg_idx is None:
            neg_idx = self.sample_negatives(z)  # in range by construction
        else:
            P = self.positions(z)
            neg_idx = _K.check_neg_idx(neg_idx, P, P, z.device, n=self.negatives)
        weights = [m.weight for m in self.W]
        if backend == "reference":
            return _K.infonce_ref(z, c, weights, neg_idx, self.skip)
        _check_context(c)
        if c is not None and c.dtype != z.dtype:
            c = c.to(z.dtype)
        return _K.infonce(z, c, weights, neg_idx, self.skip, impl=backend, check_range=False)


class SequenceInfoNCE(nn.Module):
    """CPC's InfoNCE on sequences (Greedy InfoMax's audio loss).

    Args:
        context_dim: Cc, the width of the context c.
        z_dim: Cz, the width of the encodings z.
        k_steps: K; ``c[:, t]`` predicts ``z[:, t + k]`` for k = 1..K.
        negatives: N negatives per position, drawn uniformly with replacement
            from all B L positions of z.
        backend: as :class:`InfoNCE`.

    Attributes:
        W: ``nn.ModuleList`` of K bias-free ``Linear(Cc, Cz)``.

    ``forward(z, c, neg_idx=None)``: z (B, L, Cz), c (B, L, Cc), ``neg_idx[k-1]``
    a LongTensor (B (L-k), N) of rows of the (b, t)-flattened z; positions are
    flattened in (b, t) order. Returns the fp32 scalar loss.

    It takes two inputs, so as a :class:`~dni_fast.local.GradientIsolated`
    loss (called as ``loss(h)``) wrap it in a :class:`~dni_fast.local.LocalLoss`
    that computes ``z`` and ``c`` from the module's output.
    """

    needs_target = False

    def __init__(self, context_dim: int, z_dim: int, k_steps: int = 12, negatives: int = 10,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if context_dim < 1 or z_dim < 1 or k_steps < 1 or negatives < 1:
            raise ValueError(f"SequenceInfoNCE needs positive sizes; got context_dim={context_dim}, z_dim={z_dim}, "
                             f"k_steps={k_steps}, negatives={negatives}")
        self.context_dim, self.z_dim, self.k_steps, self.negatives = context_dim, z_dim, k_steps, negatives
        self.backend = _check_name(backend)
        self.W = nn.ModuleList(nn.Linear(context_dim, z_dim, bias=False) for _ in range(k_steps))

    def extra_repr(self) -> str:
        return (f"context_dim={self.context_dim}, z_dim={self.z_dim}, k_steps={self.k_steps}, "
                f"negatives={self.negatives}, backend={self.backend}")

    def positions(self, z: Tensor) -> List[int]:
        B, L, _ = z.shape
        return _K.sequence_positions(L, B, self.k_steps)

    def sample_negatives(self, z: Tensor, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        P = self.positions(z)
        return _K.draw_negatives(P, [z.shape[0] * z.shape[1]] * len(P), self.negatives, z.device, generator)

    def forward(self, z: Tensor, c: Tensor, neg_idx: Optional[Sequence[Tensor]] = None) -> Tensor:
        for name, t, width in (("z", z, self.z_dim), ("c", c, self.context_dim)):
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(f"SequenceInfoNCE expects {name} of shape (B, L, width), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.shape[2] != width:
                raise ValueError(f"{name} has width {t.shape[2]}, but this SequenceInfoNCE was built for {width}")
        _check_context(c)
        _K._check_float("z", z, 3)  # dtype, and a non-empty batch before negatives are drawn from it
        _K._check_float("c", c, 3)
        w0 = self.W[0].weight
        if w0.device != z.device:
            raise ValueError(f"z is on {z.device}, but the SequenceInfoNCE weights W are on {w0.device}")
        backend = resolve_backend(self.backend, z)
        if neg_idx is None:
            neg_idx = self.sample_negatives(z)
        else:
            P = self.positions(z)
            neg_idx = _K.check_neg_idx(neg_idx, P, [z.shape[0] * z.shape[1]] * len(P), z.device, n=self.negatives)
        weights = [m.weight for m in self.W]
        if backend == "reference":
            return _K.sequence_infonce_ref(z, c, weights, neg_idx)
        _check_context(c)
        if c.dtype != z.dtype:
            c = c.to(z.dtype)
        return _K.sequence_infonce(z, c, weights, neg_idx, impl=backend, check_range=False)
