"""Decoupled stages across processes on ``torch.distributed`` (docs/design.md §8).

* :class:`DecoupledStage`: one stage of §4's schedule per rank of an
  already-initialised process group (gloo on the CPU, NCCL on GPUs), with
  plain ``isend``/``irecv``;
* :class:`PeerFailure`: what every rank raises when a stage dies, hangs past
  the timeout, or raises (its ``stage`` names the stage at fault);
* :class:`StepMismatch`: two neighbouring stages are at different step
  counts (a checkpoint loaded on some ranks only), raised at once.

``import dni_fast`` does not import this package. See docs/decoupled.md.
"""
from dni_fast.distributed.stage import DecoupledStage
from dni_fast.distributed.transport import PeerFailure, StepMismatch

__all__ = ["DecoupledStage", "PeerFailure", "StepMismatch"]
