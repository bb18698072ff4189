"""Local learning: gradient-isolated modules trained by their own losses.

DNI and Greedy InfoMax are two answers to the same locking problem: a module
should not wait for the gradient of the modules above it. DNI predicts that
gradient (``dni_fast.BackwardInterface``); Greedy InfoMax (Löwe et al. 2019)
and DGL (Belilovsky et al. 2020) replace it by a local loss. Both can be mixed
in one network with :class:`GradientIsolated`.

* :class:`InfoNCE` -- GIM's vision InfoNCE on a (B, C, H, W) patch grid, with
  its prediction weights ``W`` (K bias-free 1x1 convolutions), explicit or
  sampled negatives (``neg_idx``) and ``backend=`` (``reference``, ``chunked``,
  ``triton``; :func:`resolve_backend` decides for ``auto``). The fused paths
  never build the (positions x (1+N)) scores nor the gathered negatives
  (``dni_fast.kernels.infonce``).
* :class:`SequenceInfoNCE` -- CPC's InfoNCE on (B, L, C) sequences.
* :class:`AuxClassifier` -- DGL's auxiliary classifier head (cross-entropy).
* :class:`LocalLoss` -- any function as a module's local loss.
* :class:`GradientIsolated` -- the training schedule: each module's loss is
  backpropagated and its graph freed before the next module runs on the
  detached output; ``train_module=i``; ``cache_outputs`` for the
  module-by-module schedule.

The math and the names are docs/design.md §7; docs/local.md has the measurements.
"""
from dni_fast.local.auxiliary import AuxClassifier, LocalLoss
from dni_fast.local.infonce import BACKENDS, InfoNCE, SequenceInfoNCE, resolve_backend
from dni_fast.local.isolated import BoundaryCrossingError, GradientIsolated

__all__ = ["InfoNCE", "SequenceInfoNCE", "AuxClassifier", "LocalLoss", "GradientIsolated", "BoundaryCrossingError",
           "BACKENDS", "resolve_backend"]
