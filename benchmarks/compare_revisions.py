"""Two revisions of dni_fast timed side by side, interleaved in one run.

Each revision is a source checkout with its extension built in place (a git
worktree: ``git worktree add /tmp/base <commit> && (cd /tmp/base &&
CFLAGS=-g0 python setup.py build_ext --inplace)``). Each runs in its own
worker process (its own ``dni_fast`` on ``sys.path``); the parent asks them in
turn to run one block of a workload and report the time, round after round,
so both revisions see the same drift of the machine (docs/design.md §5). Only
one worker computes at a time: the other waits on its pipe.

    python benchmarks/compare_revisions.py --base /tmp/base --head . --threads 1 \\
        --csv benchmarks/results/revisions_cpu.csv

Workloads use only the public API, so any revision runs them: the interface
step (``Linear(D, D)`` -> ``BackwardInterface(BasicSynthesizer(D, n_hidden=1))``
-> the true gradient) at B=16, D=128 and B=64, D=256, the same step at B=16,
D=128 with ``normalize_targets=True`` (``norm``) and with ``overlap=True``
(``overlap``; ``zero_grad`` synchronises), and the docs/design.md §5 MLP
(784-256x6-10, BatchNorm, 5 DNIs, Adam) at B=64; each on ``reference`` and
``cpp``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_csv import append_rows, check_header  # noqa: E402  (refuses a file with another header)

# "norm": the step with normalize_targets=True; "overlap": with overlap=True (zero_grad is the synchronisation)
WORKLOADS = [("step", 16, 128), ("step", 64, 256), ("norm", 16, 128), ("overlap", 16, 128), ("mlp", 64, 256)]
PROVIDERS = ["reference", "cpp"]
FIELDS = ["workload", "revision", "threads", "ms", "p20", "p80", "base_over_this", "rounds", "date", "device", "torch",
          "commit"]  # the CSV's columns: compare()'s keys, then main()'s


# ---------------------------------------------------------------------------
# worker: runs in the revision's own process
# ---------------------------------------------------------------------------
def _worker(threads: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import dni_fast as dni

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fns = {}
    for kind, B, D in WORKLOADS:
        for prov in PROVIDERS:
            if kind in ("step", "norm", "overlap"):
                lin = nn.Linear(D, D)
                opts = {"norm": {"normalize_targets": True}, "overlap": {"overlap": True}}.get(kind, {})
                iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1), backend=prov, **opts)
                x, g = torch.randn(B, D), torch.randn(B, D)

                def fn(lin=lin, iface=iface, x=x, g=g):
                    iface(lin(x)).backward(g)
                    lin.zero_grad(set_to_none=True)
                    iface.zero_grad(set_to_none=True)
            else:
                layers: List[nn.Module] = []
                dims = [784] + [D] * 6
                for i in range(6):
                    layers += [nn.Linear(dims[i], dims[i + 1]), nn.BatchNorm1d(D)]
                    if i < 5:
                        layers.append(dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=1), backend=prov))
                    layers.append(nn.ReLU())
                model = nn.Sequential(*layers, nn.Linear(D, 10))
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                x, y = torch.randn(B, 784), torch.randint(0, 10, (B,))

                def fn(model=model, opt=opt, x=x, y=y):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            fn()
            fn()
            fns[f"{kind}-{B}-{D}-{prov}"] = fn
    print(json.dumps({"ready": sorted(fns), "dni_fast": dni.__file__}), flush=True)
    for line in sys.stdin:
        name, reps = line.split()
        fn = fns[name]
        t0 = time.perf_counter()
        for _ in range(int(reps)):
            fn()
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


# ---------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------
class _Worker:
    def __init__(self, checkout: Path, threads: int):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads))
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(threads)], cwd=checkout,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())

    def run(self, name: str, reps: int) -> float:
        self.p.stdin.write(f"{name} {reps}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["s"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def compare(base: Path, head: Path, threads: int, seconds: float, block_s: float = 0.05) -> List[dict]:
    workers = {"base": _Worker(base, threads), "head": _Worker(head, threads)}
    for rev, w in workers.items():
        print(f"# {rev}: {w.info['dni_fast']}")
    names = workers["head"].info["ready"]
    reps = {}
    for n in names:  # one calibration block each
        t = workers["head"].run(n, 3) / 3
        reps[n] = max(1, int(block_s / max(t, 1e-6)))
    samples: Dict[tuple, List[float]] = {(rev, n): [] for rev in workers for n in names}
    t_end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < t_end or rounds < 10:
        for n in names:
            for rev in (("base", "head") if rounds % 2 == 0 else ("head", "base")):
                samples[(rev, n)].append(workers[rev].run(n, reps[n]) / reps[n] * 1e3)
        rounds += 1
    for w in workers.values():
        w.close()
    rows = []
    for n in names:
        base_ms = _median(samples[("base", n)])
        for rev in workers:
            ts = sorted(samples[(rev, n)])
            ms = _median(ts)
            rows.append({"workload": n, "revision": rev, "threads": threads, "ms": ms,
                         "p20": ts[int(0.2 * len(ts))], "p80": ts[min(len(ts) - 1, int(0.8 * len(ts)))],
                         "base_over_this": base_ms / ms, "rounds": rounds})
    return rows


def write_csv(rows: List[dict], path: str) -> None:
    """Append ``rows`` to ``path`` (a file with another header is refused: ``results_csv.append_rows``)."""
    append_rows(path, FIELDS, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help="checkout of the base revision (extension built in place)")
    ap.add_argument("--head", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--seconds", type=float, default=60.0, help="interleaved timing per thread count")
    ap.add_argument("--csv", help="append the rows here")
    args = ap.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return 0
    if args.base is None:
        ap.error("--base is required")
    if args.csv:
        check_header(args.csv, FIELDS)  # before the timing, not after it
    import torch

    rev = {k: subprocess.run(["git", "-C", str(p), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() for k, p in (("base", args.base), ("head", args.head))}
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "device": platform.processor() or platform.machine(), "torch": torch.__version__}
    all_rows = []
    for th in args.threads:
        rows = compare(args.base, args.head, th, args.seconds)
        print(f"\n{'workload':24} {'revision':10} {'thr':>3} {'ms':>9} {'p20':>9} {'p80':>9} {'base/this':>9}")
        for r in rows:
            r.update(env, commit=rev[r["revision"]])
            print(f"{r['workload']:24} {r['revision'] + ' ' + r['commit']:10} {r['threads']:3d} {r['ms']:9.4f} "
                  f"{r['p20']:9.4f} {r['p80']:9.4f} {r['base_over_this']:8.3f}x")
        all_rows += rows
    if args.csv:
        write_csv(all_rows, args.csv)
        print(f"\nappended {len(all_rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
