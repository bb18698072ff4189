"""The ``triton`` backend: the fused Triton kernels of ``kernels/synth_step.py``.

One launch for the synthesizer forward, one for the regression and every
parameter gradient, one for the pipelined step. On CUDA devices; on the CPU
only under ``TRITON_INTERPRET=1`` (tests), which ``auto`` never picks.
"""
from __future__ import annotations

from typing import Tuple

import torch

from dni_fast.backends.base import Primitives
from dni_fast.backends.fused import FusedBackend

__all__ = ["TritonBackend"]


class TritonBackend(FusedBackend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    how_to_get = ("install Triton (`pip install triton`) and run on a CUDA device (on the CPU, only for tests, "
                  "with TRITON_INTERPRET=1 set before dni_fast is imported)")

    def _status(self, device: torch.device) -> Tuple[bool, str]:
        try:
            from dni_fast.kernels.synth_step import triton_available
        except Exception as e:  # ImportError, or triton failing to initialise
            return False, f"the triton kernels cannot be imported ({type(e).__name__}: {e}); {self.how_to_get}"
        ok, why = triton_available(device)
        return ok, ("" if ok else f"{why}; {self.how_to_get}")

    def interpreted(self, device: torch.device) -> bool:
        """Whether the kernels would run in Triton's interpreter on ``device``."""
        return device.type != "cuda"

    def _load_primitives(self) -> Primitives:
        from dni_fast.kernels import synth_step as k

        return Primitives(k.synth_forward_triton, k.synth_update_triton, k.synth_pipelined_triton)
