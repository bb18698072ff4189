"""The ``cuda`` backend: the C++/CUDA extension ``dni_fast._C`` on CUDA tensors.

cuBLAS products (through ATen, so the math-mode switches behave as in
PyTorch) and two fused epilogue kernels (``csrc/synth_cuda_kernels.cu``), the
step enqueued from C++ with no host synchronisation. Built only where torch
has CUDA and the CUDA toolkit is complete (setup.py).
"""
from __future__ import annotations

from typing import Tuple

import torch

from dni_fast import _ext
from dni_fast.backends.cpp import CppBackend

__all__ = ["CudaBackend"]


class CudaBackend(CppBackend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    how_to_get = _ext.CUDA_BUILD_HINT

    def _status(self, device: torch.device) -> Tuple[bool, str]:
        return _ext.cuda_available()
