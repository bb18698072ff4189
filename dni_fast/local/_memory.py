"""Peak memory of a callable, on the CPU and on CUDA (benchmarks and tests).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated before the call (the caching allocator's view:
  tensors, not the cache).
* CPU: torch has no allocator statistics for the CPU, so the call runs once
  under ``torch.profiler`` with ``profile_memory=True``; every allocation and
  free of the CPU allocator is an event with its byte count, and the peak is
  the maximum of their running sum in time order. It counts tensor storage
  only (not the allocator's slack, not MKL's or oneDNN's private scratch) --
  the same thing ``max_memory_allocated`` counts on CUDA.

Both report the peak *above* the memory in use when the call starts: the
inputs and the parameters are not counted, whatever the call allocates and
keeps (outputs, gradients) is.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], object], device) -> Dict[str, int]:
    """``{"peak": bytes, "end": bytes}``: the peak of memory allocated during
    ``fn()`` above the amount at its start, and the net amount still held at
    its end (what it returned or stored). One call of ``fn``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        end = torch.cuda.memory_allocated(device) - base
        del out
        return {"peak": int(peak), "end": int(end)}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return {"peak": int(peak), "end": int(cur)}
