"""GradientIsolated's peak memory against end-to-end backprop of the same encoder.

    python benchmarks/bench_local_memory.py                  # CPU, batch 128
    python benchmarks/bench_local_memory.py --device cuda --batch 512

The encoder is the three-module patch encoder of ``dni_fast.examples.gim_mnist``
(32x32 images, a 7x7 grid of 8x8 patches), InfoNCE with GIM's K=5, N=16.
Schedules (one training step each: forward, backward, Adam):

* ``gradient_isolated``: ``GradientIsolated``, one InfoNCE per module; each
  module's loss is backpropagated and its graph freed before the next module
  runs;
* ``gim_code``: what GIM's own code does -- the same three losses and
  detached inputs, but the losses are summed and backpropagated once at the
  end, so every module's graph is alive at once;
* ``end_to_end``: the same encoder trained end to end, one InfoNCE at the
  top (CPC; the reference of the ratio).

Peak memory: what one step allocates above what is allocated before it (the
data, the weights, Adam's state after a warm-up step), as in
``benchmarks/bench_infonce.py``: ``torch.profiler`` allocation events on the
CPU, ``torch.cuda.max_memory_allocated`` on CUDA; printed and stored in MiB
(2**20 bytes; the CSV column keeps its old name, ``peak_mb``, so that old and
new rows share a file). Step times are interleaved (informative only: the
schedules do different amounts of work). Rows are appended to
``benchmarks/results/local_memory_<device>.csv`` (a file with another header
is refused, not appended to).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Dict, List

import torch
from torch import nn

from dni_fast.examples.gim_mnist import GridInfoNCE, encoder_modules
from dni_fast.local import GradientIsolated
from dni_fast.local._memory import peak_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_infonce import append_csv, environment, time_many  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def encoder(widths, extra_layers: int) -> List[nn.Module]:
    """The example's three modules, each deepened by ``extra_layers`` 1x1
    convolutions + ReLU (more activation memory per module, as in GIM's
    ResNet modules; the InfoNCE inputs are unchanged)."""
    mods = encoder_modules(widths)
    for m, w in zip(mods, widths):
        for _ in range(extra_layers):
            m.append(nn.Conv2d(w, w, 1))
            m.append(nn.ReLU())
    return mods


def schedules(widths, extra_layers, device, backend) -> Dict[str, tuple]:
    """Fresh models (one seed): ``{name: (step(x), parameters)}``."""
    kw = dict(k_steps=5, negatives=16, backend=backend)
    adam = lambda p: torch.optim.Adam(p, lr=1e-4)  # noqa: E731
    out = {}

    torch.manual_seed(0)
    mods = [m.to(device) for m in encoder(widths, extra_layers)]
    gi = GradientIsolated(mods, [GridInfoNCE(i, w, **kw).to(device) for i, w in enumerate(widths)], adam)
    out["gradient_isolated"] = (lambda x, gi=gi: gi.step(x), list(gi.parameters()))

    torch.manual_seed(0)
    mods2 = [m.to(device) for m in encoder(widths, extra_layers)]
    losses2 = [GridInfoNCE(i, w, **kw).to(device) for i, w in enumerate(widths)]
    opt2 = adam([p for m in mods2 + losses2 for p in m.parameters()])

    def gim_code(x):
        opt2.zero_grad(set_to_none=True)
        h, total = x, 0
        for m, l in zip(mods2, losses2):
            h = m(h.detach())
            total = total + l(h)
        total.backward()
        opt2.step()
    out["gim_code"] = (gim_code, [p for m in mods2 + losses2 for p in m.parameters()])

    torch.manual_seed(0)
    enc = nn.Sequential(*encoder(widths, extra_layers)).to(device)
    top = GridInfoNCE(2, widths[2], **kw).to(device)
    e2e = GradientIsolated([enc], [top], adam)
    out["end_to_end"] = (lambda x, e2e=e2e: e2e.step(x), list(e2e.parameters()))
    return out


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 128 on the CPU, 512 on CUDA")
    p.add_argument("--widths", type=int, nargs=3, default=[64, 128, 256])
    p.add_argument("--extra-layers", type=int, nargs="+", default=[0, 4],
                   help="extra 1x1 conv layers per module (one measurement per value)")
    p.add_argument("--infonce-backend", default=None)
    p.add_argument("--min-run-time", type=float, default=3.0)
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    batches = args.batch or ([128] if device.type == "cpu" else [512])
    print(f"GradientIsolated vs end-to-end, encoder widths {args.widths}, InfoNCE K=5 N=16, on {env['device']}, "
          f"torch {env['torch']}, {env['threads']} threads")
    print(f"{'B':>5} {'extra':>5} {'schedule':18} {'peak MiB':>9} {'x e2e':>6} {'ms/step':>9}")
    out = []
    for B, extra in itertools.product(batches, args.extra_layers):
        fns = schedules(args.widths, extra, device, args.infonce_backend)
        x = torch.randn(B, 1, 32, 32, device=device)
        steps = {k: (lambda f=f: f(x)) for k, (f, _) in fns.items()}
        mem = {}
        for k, f in steps.items():
            f()  # warm-up: Adam's state, first allocations
            for q in fns[k][1]:  # free the gradients before the profile, not inside it
                q.grad = None
            mem[k] = peak_memory(f, device)["peak"]
        times = time_many(steps, device, min_run_time=args.min_run_time) if not args.no_time else {}
        rows = []
        for k in steps:
            ms = times.get(k, {}).get("ms", float("nan"))
            rows.append({"bench": "local_memory", "B": B, "widths": "x".join(map(str, args.widths)),
                         "extra_layers": extra, "schedule": k, "peak_mb": mem[k] / 2 ** 20,
                         "peak_vs_e2e": mem[k] / mem["end_to_end"], "ms": ms})
            print(f"{B:5d} {extra:5d} {k:18} {mem[k] / 2 ** 20:9.1f} {mem[k] / mem['end_to_end']:6.3f} {ms:9.1f}",
                  flush=True)
        out += rows
        if not args.no_csv:
            append_csv(rows, args.csv or os.path.join(HERE, "results", f"local_memory_{device.type}.csv"), env)
    return out


if __name__ == "__main__":
    main()
