"""The ``cpp`` backend: the C++ extension ``dni_fast._C`` on CPU tensors.

Each primitive is one C++ call (BLAS with fused single-pass epilogues), and the
whole ``BackwardInterface`` step is one native call (``csrc/step.cpp``): the
fused forward, the injection and a C++ autograd node whose backward runs the
fused update, with no Python autograd overhead per step. ``cuda`` (same
extension, CUDA tensors) is a subclass.
"""
from __future__ import annotations

from typing import Tuple

import torch

from dni_fast import _ext, _overlap
from dni_fast.backends.base import Primitives
from dni_fast.backends.fused import FusedBackend, flatten_inputs

__all__ = ["CppBackend"]


class CppBackend(FusedBackend):
    name = "cpp"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    how_to_get = _ext.BUILD_HINT

    def _status(self, device: torch.device) -> Tuple[bool, str]:
        return _ext.cpp_available()

    def takes_params(self, compute: torch.dtype, param: torch.dtype) -> bool:
        # csrc/synth_check.cpp: the compute dtype, or fp32 weights with a half compute dtype (autocast). A half
        # model under the other half dtype's autocast (or fp64 weights under autocast) is refused.
        return param == compute or (param == torch.float32 and compute in (torch.float16, torch.bfloat16))

    def _load_primitives(self) -> Primitives:
        C = _ext.get_ext()
        self._step = C.trigger_step
        return Primitives(C.synth_forward, C.synth_update, C.synth_pipelined)

    def trigger(self, synth, trigger, context, stats, scale, inject_into, overlap=False):
        if overlap and trigger.is_cuda:
            # The native worker launches on its own thread's current stream, unordered with the caller's
            # stream and invisible to graph capture: on CUDA the overlapped update takes the Python path
            # (the same fused calls), which launches it on a side stream ordered with events.
            return super().trigger(synth, trigger, context, stats, scale, inject_into, overlap)
        x, c = flatten_inputs(synth, trigger, context)
        # No row for a forward that builds no graph (no_grad, inference_mode): no update will write it, and a
        # ring first allocated under inference_mode would be an inference tensor that training cannot write.
        slot = None if stats is None or not torch.is_grad_enabled() else stats.reserve(scale, trigger.device)
        step = self.__dict__.get("_step") or (self.primitives and self._step)
        # One native call: forward, autograd node, and the injection (GIL released).
        # With overlap the node's backward queues the update on the C++ worker
        # (csrc/overlap.cpp), which never needs the GIL; dni_fast/_overlap.py
        # collects it. With overlap="injection" the node's backward runs the
        # update where it is reached: the injections below run on the Python
        # overlap worker, and a third thread on the same cores only slowed the
        # step (1.86x backprop instead of 1.75x, docs/decoupled.md); the one
        # update the main backward reaches (the top interface's) runs there,
        # as one native call.
        params = synth.flat_params()
        threads = _overlap.worker_threads() if overlap and overlap != _overlap.INJECTION else 0
        if threads and _overlap.update_inline(params):  # hooked or parametrized: see update_inline
            threads = 0
        if threads:
            _overlap.uses_native_worker()
        return step(trigger, x, c, params, scale, slot, inject_into, threads)
