"""The cost of one synthesizer step: RidgeSynthesizer against BasicSynthesizer.

One step is what an RNN example does per truncation boundary: a
``BackwardInterface`` forward on the state ``h (B, D)`` (the injection of
``S(h)`` and ``make_trigger``), the backward of a true gradient ``g``, and
the synthesizer's learning: for the ``BasicSynthesizer(D, n_hidden=2)``
(the RNN examples' ``--synth mlp``) its regression backward and an Adam
step; for the ``RidgeSynthesizer(D)`` (``--synth ridge``) the fold into its
statistics and the Cholesky solve, and no optimizer.

Providers (one line each; the ratio is to ``mlp/reference``, measured in the
same run, interleaved with ``dni_fast.timing.time_many``: this VM drifts by
up to 1.6x within a minute):

* ``mlp/reference``: the BasicSynthesizer through plain autograd;
* ``mlp/<backend>``: the same on each fused backend that runs here (``cpp``
  on the CPU; ``triton`` and ``cuda`` on a GPU), named: ``auto`` would pick
  ``reference`` where its table has no rule (D=1024 on the CPU);
* ``ridge``: the RidgeSynthesizer, refitting every step (the default);
* ``ridge/refit4``: refitting every 4th step (``refit_every=4``);
* ``ridge/W-every-refit``: the same fit, but ``W`` solved at every refit
  and predictions through ``W`` (``2 D^2 Do`` flops a refit), what
  predicting through the factor replaced.

Sizes: ``copy`` (B=32, D=128: the copy task's ``[h, c]``), ``ptb`` (B=32,
D=512: the character model's), ``wide`` (B=64, D=1024).

Every provider is timed over whole cycles of 4 steps (its time is a cycle's
over 4): ``ridge/refit4`` refits on one step in 4, and a timing block of one
step (what ``time_many`` uses once a call takes longer than its 10 ms blocks)
would report the median step, one without a refit.

    python benchmarks/bench_synthesizers.py                  # CPU, all sizes
    python benchmarks/bench_synthesizers.py --device cuda    # on a GPU

Rows go to ``benchmarks/results/synthesizers_<device>.csv`` with the device,
versions and date.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List

import torch

import dni_fast as dni
from dni_fast.timing import time_many

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment  # noqa: E402  (one record of the machine for every benchmark)

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"copy": (32, 128), "ptb": (32, 512), "wide": (64, 1024)}
CYCLE = 4  # steps per timed call: refit_every=4's period, and the 4 batches each step cycles through


def providers(device: torch.device) -> List[str]:
    from dni_fast import backends

    fused = [b.name for b in backends.registered()
             if b.fused and not b.interpreted(device) and b.status(device)[0]]
    return ["mlp/reference"] + [f"mlp/{n}" for n in fused] + ["ridge", "ridge/refit4", "ridge/W-every-refit"]


class _WEveryRefit(dni.RidgeSynthesizer):
    """``ridge/W-every-refit``: forms ``W`` at each refit (then ``forward`` predicts through it)."""

    def refit(self) -> None:
        super().refit()
        self.weight  # noqa: B018  (the property solves for W and caches it)


def make_step(provider: str, b: int, d: int, device: torch.device) -> Callable[[], None]:
    """One synthesizer step of ``provider`` at ``(B, D)`` on ``device``."""
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(b, d, generator=g).to(device) for _ in range(4)]
    gs = [torch.randn(b, d, generator=g).to(device) * 1e-2 for _ in range(4)]
    if provider.startswith("mlp"):
        torch.manual_seed(0)
        synth = dni.BasicSynthesizer(d, n_hidden=2).to(device)
        iface = dni.BackwardInterface(synth, backend=provider.split("/")[1], track_stats=False)
        opt = torch.optim.Adam(synth.parameters(), lr=1e-4)
    else:
        refit = 4 if provider.endswith("refit4") else 1
        cls = _WEveryRefit if provider.endswith("W-every-refit") else dni.RidgeSynthesizer
        iface = dni.BackwardInterface(cls(d, refit_every=refit).to(device), track_stats=False)
        opt = None
    i = [0]

    def step() -> None:
        k = i[0] % len(hs)
        i[0] += 1
        h = hs[k].clone().requires_grad_()
        iface(h).backward(gs[k])
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def run(sizes: List[str], device: torch.device, min_run_time: float) -> List[dict]:
    rows = []
    for name in sizes:
        b, d = SIZES[name]
        fns: Dict[str, Callable[[], None]] = {}
        for p in providers(device):
            try:
                step = make_step(p, b, d, device)
                step()
            except dni.BackendUnavailableError as e:  # a fused backend that cannot take this size: say so, go on
                print(f"  {name}: {p} unavailable ({e})")
                continue
            fns[p] = lambda step=step: [step() for _ in range(CYCLE)]
        t = time_many(fns, device, min_run_time=min_run_time)  # (synchronises a CUDA device after each block)
        per_step = {p: {k: v / CYCLE for k, v in t[p].items()} for p in fns}
        ref = per_step["mlp/reference"]["ms"]
        for p in fns:
            tp = per_step[p]
            rows.append({"size": name, "B": b, "D": d, "provider": p, "ms": tp["ms"], "p20": tp["p20"],
                         "p80": tp["p80"], "speedup_vs_mlp_reference": ref / tp["ms"],
                         "threads": torch.get_num_threads()})
    return rows


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per provider and size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--csv", default=None, help="default: benchmarks/results/synthesizers_<device type>.csv")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"synthesizer step on {env['device']} ({device.type}), torch {env['torch']}, "
          f"{torch.get_num_threads()} threads, {env['date']}")
    rows = run(args.sizes, device, args.min_run_time)
    print(f"{'size':6} {'B':>4} {'D':>5} {'provider':20} {'ms':>9} {'x mlp/reference':>16}")
    for r in rows:
        print(f"{r['size']:6} {r['B']:4d} {r['D']:5d} {r['provider']:20} {r['ms']:9.3f} "
              f"{r['speedup_vs_mlp_reference']:16.2f}")
    if not args.no_csv:
        path = args.csv or os.path.join(HERE, "results", f"synthesizers_{device.type}.csv")
        from results_csv import append_rows  # refuses a file with another header (benchmarks/ is on sys.path)

        append_rows(path, list(env) + list(rows[0]), ({**env, **r} for r in rows))
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
