"""Timing that survives a noisy machine: ``time_many`` measures several
callables side by side, interleaved. Used by the benchmarks (benchmarks/) and
the quickstart's speed table; not imported by ``import dni_fast``."""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch

__all__ = ["time_ms", "time_many"]


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> Dict[str, float]:
    """Median (and 20/80 % quantiles on GPU) of ``fn`` in milliseconds."""
    fn()  # warm-up: first-call allocation, kernel compilation
    fn()
    if device.type == "cuda":
        from triton.testing import do_bench

        q20, q50, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=50, rep=max(100, int(min_run_time * 1000)))
        return {"ms": q50, "p20": q20, "p80": q80}
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = sorted(m.times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e3  # noqa: E731
    return {"ms": m.median * 1e3, "p20": q(0.2), "p80": q(0.8)}


def time_many(fns: Dict[str, Callable[[], object]], device: torch.device,
              min_run_time: float = 0.5, block_s: float = 0.01) -> Dict[str, Dict[str, float]]:
    """``time_ms`` for several callables measured side by side.

    On the CPU the callables run interleaved: round after round, each one runs
    a block of about ``block_s`` seconds, and each gets the median (and 20/80 %
    quantiles) of its per-block means. On the shared 2-core CI VM the speed of
    the whole machine drifts by up to 1.6x over tens of seconds (measured: a
    plain Linear step at B=16, D=128 took 56 us in one run and 101 us in the
    next), so timing providers one after another gave ratios that moved from
    1.1x to 1.6x between runs; interleaving exposes every provider to the same
    drift. Blocks are 10 ms: with 2 ms blocks a 0.7 ms step ran 3 times a block,
    and its first, cache-cold run after another callable's block showed in the
    mean (B=64, D=256: 818 us with 2 ms blocks, 727 us with 20 ms blocks).
    On CUDA the same, each block ended by a device synchronisation and timed
    on the host: the steps timed here are launch-bound (50-500 us of many small
    kernels), so the host's speed, which drifts as the CPU's does, is part of
    what is measured; timing each callable in turn (``do_bench``) exposed them
    to different drift. A callable whose calls differ (a refit every k-th call)
    must be timed as a whole cycle: a block of one call would show the median
    call only."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    per_call = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call allocation, compilation
        sync()
        t0 = time.perf_counter()
        fn()
        fn()
        sync()
        per_call[name] = max((time.perf_counter() - t0) / 2, 1e-7)
    reps = {name: max(1, int(block_s / t)) for name, t in per_call.items()}
    round_s = sum(reps[n] * per_call[n] for n in fns)
    rounds = max(15, int(min_run_time * len(fns) / max(round_s, 1e-6)))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            k = reps[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    out = {}
    for name, ts in samples.items():
        ts.sort()
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        out[name] = {"ms": q(0.5), "p20": q(0.2), "p80": q(0.8)}
    return out
