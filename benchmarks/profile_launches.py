"""Count device kernel launches per interface step with torch.profiler (CUDA only).

    python benchmarks/profile_launches.py [--device cuda] [--B 256 --D 1024]

On CUDA it lists every kernel (and memcpy/memset) launched, per provider, by
one synchronous interface step (``harness.interface_step``: ``Linear(D, D)``,
``BackwardInterface``, the true gradient) and by one step of the same
interface with ``pipelined=True`` after a first one (``pipelined_step``: its
forward also runs the previous step's update), beside the plain Linear's
forward and backward, so the fused paths' launch counts (docs/design.md §3:
one for the forward and injection, one for the regression and update; one
for both in the pipelined mode) can be read off directly. Without CUDA it
counts nothing (the profiler sees no kernels): it names the tests that check
the Triton kernels' launch counts under the interpreter instead.
"""
import argparse
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

# `python benchmarks/profile_launches.py` puts benchmarks/ on sys.path, not the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness as bench  # noqa: E402


def count_cuda(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names[e.name] += 1
    return names


def pipelined_step(provider: str, B: int, D: int, H: int, dtype: torch.dtype, device: torch.device):
    """``harness.interface_step`` with ``BackwardInterface(pipelined=True)``: from the second call on, a
    call's forward also applies the previous call's pending update (one fused call on a fused backend)."""
    return bench.interface_step(provider, B, D, H, dtype, device, pipelined=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--D", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type != "cuda":
        print("no CUDA device: nothing to profile; the interpreter's launch-count tests check the Triton kernels "
              "instead (pytest tests/test_triton.py tests/test_infonce.py -k launch)")
        return
    plain = count_cuda(bench.plain_linear_step(args.B, args.D, dtype, device))
    print(f"plain Linear fwd+bwd: {sum(plain.values())} launches")
    for p in bench.available_providers(device, compile=False):
        names = count_cuda(bench.interface_step(p, args.B, args.D, args.D, dtype, device))
        total = sum(names.values())
        print(f"\n{p}: {total} launches per interface step ({total - sum(plain.values())} beyond the plain Linear)")
        for n, k in names.most_common():
            print(f"  {k:3d}  {n[:110]}")
        if p == "torch.compile":
            continue
        # count_cuda's warm-up call leaves an update pending: the profiled call is a steady-state step
        names = count_cuda(pipelined_step(p, args.B, args.D, args.D, dtype, device))
        total = sum(names.values())
        print(f"{p}, pipelined=True: {total} launches per step after the first "
              f"({total - sum(plain.values())} beyond the plain Linear)")
        for n, k in names.most_common():
            print(f"  {k:3d}  {n[:110]}")


if __name__ == "__main__":
    main()
