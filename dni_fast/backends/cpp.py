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

from dni_fast import _ext
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

    def _load_primitives(self) -> Primitives:
        C = _ext.get_ext()
        self._step = C.trigger_step
        return Primitives(C.synth_forward, C.synth_update, C.synth_pipelined)

    def trigger(self, synth, trigger, context, stats, scale, inject_into, overlap=False):
        if overlap:  # the native step runs its update inside C++'s backward: defer it through the Python glue
            return super().trigger(synth, trigger, context, stats, scale, inject_into, overlap=True)
        x, c = flatten_inputs(synth, trigger, context)
        slot = None if stats is None else stats.reserve(scale, trigger.device)
        step = self.__dict__.get("_step") or (self.primitives and self._step)
        # One native call: forward, autograd node, and the injection (GIL released).
        return step(trigger, x, c, synth.flat_params(), scale, slot, inject_into)
