"""Fused InfoNCE against the reference: forward + backward time and peak memory.

    python benchmarks/bench_infonce.py                  # CPU sizes, CSV row per provider and size
    python benchmarks/bench_infonce.py --sizes gim      # GIM's shape only
    python benchmarks/bench_infonce.py --device cuda    # on a GPU (adds the Triton kernels)

Providers (one line each, with the ratio to ``reference`` measured in the
same run):

* ``reference``: ``infonce_ref`` -- GIM's computation (gathered negatives,
  score tensor, ``log_softmax``), fp32, plain autograd;
* ``chunked``: the fused path's torch engine (any device);
* ``triton``: the fused Triton kernels (CUDA only; never the interpreter);
* ``reference+compile`` (``--compile``): ``torch.compile`` of the reference.

One call is a forward and a backward: gradients for z (through ``W_k z``
and the context, c = z as in GIM) and for every ``W_k``. The negative indices
are drawn once per size (every provider gets the same ones).

Timing: on the CPU every provider of a size runs interleaved, block by block
(``time_many``; this VM's speed drifts by up to 1.6x within a minute), median
of the blocks; on CUDA the same, each block ended by a device sync.
Peak memory: the peak allocated during one call above what was allocated
before it (inputs and weights excluded, gradients included): on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the allocation and free events
of ``torch.profiler(profile_memory=True)`` summed in time order
(``dni_fast.local._memory``). Both count tensor storage. Printed and stored
in MiB (2**20 bytes; the CSV column keeps its old name, ``peak_mb``, so that
old and new rows share a file).

Rows are appended to ``benchmarks/results/infonce_<device>.csv`` with the
device, versions and date.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch

from dni_fast.kernels import infonce as K
from dni_fast.local._memory import peak_memory

from dni_fast.timing import time_many

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment as _environment  # noqa: E402  (one record of the machine for every benchmark)
from results_csv import append_rows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (kind, shape); vision shape (B, C, H, W, K, N), sequence (B, L, Cz, Cc, K, N)
SIZES = {
    "gim": ("vision", (32, 256, 7, 7, 5, 16)),          # GIM's STL-10 setting
    "batch128": ("vision", (128, 256, 7, 7, 5, 16)),
    "grid14": ("vision", (32, 256, 14, 14, 5, 16)),
    "b64grid14": ("vision", (64, 256, 14, 14, 5, 16)),   # the largest CPU size
    "b128grid14": ("vision", (128, 256, 14, 14, 5, 16)),
    "b64grid28": ("vision", (64, 256, 28, 28, 5, 16)),
    "cpc_audio": ("sequence", (8, 128, 512, 256, 12, 10)),  # GIM audio / CPC: 128 steps, K=12, N=10
}
SETS = {
    "cpu": ["gim", "batch128", "grid14", "b64grid14", "cpc_audio"],
    "cuda": ["gim", "batch128", "grid14", "b64grid14", "b128grid14", "b64grid28", "cpc_audio"],
    "gim": ["gim"],
}


def make_case(kind: str, shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    if kind == "vision":
        B, C, H, W, Kk, N = shape
        z = torch.randn(B, C, H, W, generator=g).to(device, dtype).requires_grad_()
        ws = [(torch.randn(C, C, generator=g) / C ** 0.5).to(device, dtype).requires_grad_() for _ in range(Kk)]
        P = K.vision_positions(H, W, B, Kk, 1)
        neg = [torch.randint(p, (p, N), generator=g).to(device) for p in P]
        leaves = [z] + ws
        ref = lambda: K.infonce_ref(z, None, ws, neg)  # noqa: E731
        fused = lambda impl: (lambda: K.infonce(z, None, ws, neg, impl=impl, check_range=False))  # noqa: E731
        return leaves, ref, fused, {"B": B, "C": C, "H": H, "W": W, "L": "", "Cc": "", "K": Kk, "N": N,
                                    "positions": sum(P)}
    B, L, Cz, Cc, Kk, N = shape
    z = torch.randn(B, L, Cz, generator=g).to(device, dtype).requires_grad_()
    c = torch.randn(B, L, Cc, generator=g).to(device, dtype).requires_grad_()
    ws = [(torch.randn(Cz, Cc, generator=g) / Cc ** 0.5).to(device, dtype).requires_grad_() for _ in range(Kk)]
    P = K.sequence_positions(L, B, Kk)
    neg = [torch.randint(B * L, (p, N), generator=g).to(device) for p in P]
    leaves = [z, c] + ws
    ref = lambda: K.sequence_infonce_ref(z, c, ws, neg)  # noqa: E731
    fused = lambda impl: (lambda: K.sequence_infonce(z, c, ws, neg, impl=impl, check_range=False))  # noqa: E731
    return leaves, ref, fused, {"B": B, "C": Cz, "H": "", "W": "", "L": L, "Cc": Cc, "K": Kk, "N": N,
                                "positions": sum(P)}


def fwd_bwd(loss_fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], None]:
    def run():
        for t in leaves:
            t.grad = None
        loss_fn().backward()
    return run


def providers(device: torch.device, compile_ref: bool) -> List[str]:
    out = ["reference", "chunked"]
    if device.type == "cuda" and K.triton_available(device)[0] and not K._INTERPRET:
        out.append("triton")
    if compile_ref:
        out.append("reference+compile")
    return out


def environment(device: torch.device) -> Dict[str, str]:
    return {**_environment(device), "threads": str(torch.get_num_threads())}


def run_size(name: str, device: torch.device, dtype: torch.dtype, provs: List[str], min_run_time: float,
             do_time: bool) -> List[dict]:
    kind, shape = SIZES[name]
    leaves, ref, fused, meta = make_case(kind, shape, device, dtype)
    fns: Dict[str, Callable[[], None]] = {}
    for p in provs:
        if p == "reference":
            fns[p] = fwd_bwd(ref, leaves)
        elif p == "reference+compile":
            fns[p] = fwd_bwd(torch.compile(ref), leaves)
        else:
            fns[p] = fwd_bwd(fused(p), leaves)
    mem = {}
    for p, fn in fns.items():
        fn()  # warm-up (compilation, autotuning, first allocations)
        for t in leaves:
            t.grad = None
        mem[p] = peak_memory(fn, device)["peak"]
    times = time_many(fns, device, min_run_time=min_run_time) if do_time else {p: {} for p in fns}
    rows = []
    for p in provs:
        t = times[p]
        ms = t.get("ms", float("nan"))
        ref_ms = times["reference"].get("ms", float("nan"))
        rows.append({"bench": "infonce_fwd_bwd", "size": name, "kind": kind, **meta, "dtype": str(dtype).split(".")[-1],
                     "provider": p, "ms": ms, "p20": t.get("p20", float("nan")), "p80": t.get("p80", float("nan")),
                     "speedup": ref_ms / ms, "peak_mb": mem[p] / 2 ** 20, "peak_vs_ref": mem[p] / mem["reference"]})
    return rows


def print_rows(rows: List[dict], header: bool) -> None:
    if header:
        print(f"{'size':11} {'provider':18} {'positions':>9} {'ms':>10} {'x ref':>6} {'peak MiB':>9} {'peak/ref':>8}")
        print("-" * 77)
    for r in rows:
        print(f"{r['size']:11} {r['provider']:18} {r['positions']:9d} {r['ms']:10.2f} {r['speedup']:6.2f} "
              f"{r['peak_mb']:9.1f} {r['peak_vs_ref']:8.3f}", flush=True)


def append_csv(rows: List[dict], path: str, env: Dict[str, str]) -> None:
    """Append ``rows`` (with ``env`` before them) to ``path``; refuses a file whose header is another one
    (``results_csv.append_rows``). Also bench_local_memory's."""
    append_rows(path, list(env) + list(rows[0]),
                ({**env, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}} for r in rows))


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=None,
                   help=f"size names or a set ({', '.join(SETS)}); default: the device's set. Sizes: "
                        + ", ".join(f"{k}={v}" for k, v in SIZES.items()))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per provider and size")
    p.add_argument("--no-time", action="store_true", help="peak memory only")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None, help="default: benchmarks/results/infonce_<device type>.csv")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and K._INTERPRET:
        sys.exit("TRITON_INTERPRET is set: unset it to benchmark (the interpreter is never a provider)")
    names: List[str] = []
    for s in args.sizes or [device.type]:
        names += SETS.get(s, [s])
    for n in names:
        if n not in SIZES:
            sys.exit(f"unknown size {n!r}; choose from {', '.join(SIZES)} or {', '.join(SETS)}")
    dtype = getattr(torch, args.dtype)
    provs = providers(device, args.compile)
    env = environment(device)
    print(f"InfoNCE forward+backward on {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}, "
          f"{env['threads']} threads, {args.dtype}; peak memory: "
          f"{'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'torch.profiler allocation events'}")
    out = []
    for i, n in enumerate(names):
        rows = run_size(n, device, dtype, provs, args.min_run_time, not args.no_time)
        print_rows(rows, header=i == 0)
        out += rows
        if not args.no_csv:  # per size, so that an interrupted run keeps what it measured
            append_csv(rows, args.csv or os.path.join(HERE, "results", f"infonce_{device.type}.csv"), env)
    return out


if __name__ == "__main__":
    main()
