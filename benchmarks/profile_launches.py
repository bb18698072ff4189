"""Count device kernel launches per interface step with torch.profiler.

    python benchmarks/profile_launches.py [--device cuda] [--B 256 --D 1024]

On CUDA it lists every kernel (and memcpy/memset) launched by one synchronous
interface step per provider, and by one pipelined step, so the fused paths'
launch counts (docs/design.md §3: one for the forward and injection, one for the
regression and update) can be read off directly. On the CPU it prints the
Triton launch counter of the interpreter instead (the profiler sees no kernels).
"""
import argparse
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import dni_fast as dni

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--D", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type != "cuda":
        print("no CUDA device: run the interpreter launch-count tests instead "
              "(pytest tests/test_kernels_triton.py -k launch)")
        return
    plain = count_cuda(bench.plain_linear_step(args.B, args.D, dtype, device))
    print(f"plain Linear fwd+bwd: {sum(plain.values())} launches")
    for p in bench.available_providers(device, compile=False):
        names = count_cuda(bench.interface_step(p, args.B, args.D, args.D, dtype, device))
        total = sum(names.values())
        print(f"\n{p}: {total} launches per interface step ({total - sum(plain.values())} beyond the plain Linear)")
        for n, k in names.most_common():
            print(f"  {k:3d}  {n[:110]}")


if __name__ == "__main__":
    main()
