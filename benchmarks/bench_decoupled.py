"""DecoupledSequential's executors side by side (issue 10, "Benchmarks" 1 and 3).

The network: four stages of ``2 x (Linear(W, W) + ReLU)``, the last ending in
``Linear(W, 10)``; a ``BasicSynthesizer(W, n_hidden=1)`` after each of the
first three; Adam (lr 1e-4; fused=True unless --adam says otherwise, see ADAM); cross-entropy; random data, batch B. Defaults:
W=512, B=64 and W=256, B=32.

Providers, all measured interleaved in one run (``dni_fast.timing.time_many``:
the 2-core VM drifts by up to 1.6x within a minute, so only numbers from one
run are compared):

* ``sequential/1t``, ``sequential/<N>t``: the reference schedule on the
  caller's thread at 1 and at the default ``N`` intra-op threads;
* ``threads``: a worker per stage, each at ``max(1, N // 4)`` = 1 intra-op
  thread here (the default); ``threads/1t`` pins it (the same thing on 2 cores);
* ``backprop/1t``, ``backprop/<N>t``: the same four stages trained by plain
  backprop (no synthesizer), for scale;
* per stage alone (``stage k``): one stage's step (forward, synthetic
  gradient, backward, Adam, the synthesizer's regression and its Adam) at
  1 thread; the ideal ``threads`` speed-up on ``c`` cores is
  ``sum / max(max_k, sum / c)``.

Each timed call is ``K`` steps followed by ``synchronize()`` (so no work of
one provider runs inside another's block); times are per step. The two
ratios issue 10 asks for: ``threads`` against ``sequential/1t`` (the overlap
itself; target >= 1.6x) and against ``sequential/<N>t`` (target >= 1.0x).

    python benchmarks/bench_decoupled.py                      # CPU, both sizes
    python benchmarks/bench_decoupled.py --device cuda        # GPU (benchmark 3)

On a GPU (not measured yet: no GPU was available) it times ``streams``
against ``sequential`` on four equal stages that under-fill the device
(W=1024, B=64 by default); target: streams at most 0.7x sequential's time.
There ``speedup_vs_sequential_1t`` is left empty (no 1-thread run) and
``speedup_vs_sequential_default`` is the ratio to ``sequential``;
``--min-run-time`` applies there too.
Rows go to ``benchmarks/results/bench_decoupled_<device>.csv`` with the
device, versions and date (a file with another header is refused).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast._overlap import available_cores
from dni_fast.decoupled import DecoupledSequential, Stage
from dni_fast.timing import time_many

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment  # noqa: E402  (one record of the machine for every benchmark)
from results_csv import append_rows, check_header  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["date", "device", "torch", "python", "dni_fast", "bench", "provider", "W", "B", "stages", "threads",
          "ms_per_step", "p20", "p80", "samples_per_s", "speedup_vs_sequential_1t", "speedup_vs_sequential_default",
          "extra"]


def make_stages(W: int, n: int = 4, device="cpu") -> List[nn.Module]:
    stages = [nn.Sequential(nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU()) for _ in range(n)]
    stages[-1].append(nn.Linear(W, 10))
    return [s.to(device) for s in stages]


def make_synths(W: int, n: int = 4, device="cpu") -> List[nn.Module]:
    out = []
    for _ in range(n - 1):
        s = dni.BasicSynthesizer(W, n_hidden=1)
        with torch.no_grad():  # predict something from the start (the zero init predicts the bias)
            s.layers[-1].weight.normal_(0, 1e-3)
        out.append(s.to(device))
    return out


# Adam's implementation matters for the threads executor: CPU's default is the
# for-loop ("single tensor") Adam, about eight Python-dispatched ops per
# parameter, which hold the GIL for ~40% of a stage's step at W=256, B=32
# (cProfile), so that two stages on two threads ran 1.01x faster than on one.
# fused=True is one C++ call that releases the GIL (1.36x there, 1.70x at
# W=512, B=64). --adam chooses; the rows record which.
ADAM = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}
_adam_kw = ADAM["fused"]
_regression = "current"  # --regression: DecoupledSequential(regression=...)


def adam(p):
    return torch.optim.Adam(p, lr=1e-4, **_adam_kw)


def decoupled(executor: str, W: int, B: int, K: int, threads, device="cpu", n=4) -> Callable[[], None]:
    torch.manual_seed(0)
    m = DecoupledSequential(make_stages(W, n, device), make_synths(W, n, device), adam, executor=executor,
                            threads_per_stage=threads, regression=_regression)
    xs = [torch.randn(B, W, device=device) for _ in range(K)]
    ys = [torch.randint(0, 10, (B,), device=device) for _ in range(K)]

    def run():
        for x, y in zip(xs, ys):
            m.step(x, y, F.cross_entropy)
        m.synchronize()

    run.model = m  # keep it alive (its workers stop when it is collected)
    return run


def backprop(W: int, B: int, K: int, threads: int, device="cpu", n=4) -> Callable[[], None]:
    torch.manual_seed(0)
    net = nn.Sequential(*make_stages(W, n, device))
    opt = adam(net.parameters())
    xs = [torch.randn(B, W, device=device) for _ in range(K)]
    ys = [torch.randint(0, 10, (B,), device=device) for _ in range(K)]

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for x, y in zip(xs, ys):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
        finally:
            torch.set_num_threads(old)

    return run


def stage_alone(k: int, W: int, B: int, K: int, n=4) -> Callable[[], None]:
    """Stage k's whole step (delay 0: its regression right after) at 1 thread."""
    torch.manual_seed(0)
    stages, synths = make_stages(W, n), make_synths(W, n)
    st = Stage(k, n, stages[k], synths[k] if k < n - 1 else None, adam, delay=0, regression=_regression)
    h = torch.randn(B, W)
    y = torch.randint(0, 10, (B,))
    g = torch.randn(B, W) * 1e-3

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(K):
                st.forward(st.steps, h, target=y, loss_fn=F.cross_entropy)
                if not st.last:
                    st.deliver(st.steps - 1, g)
                    st.regress(st.steps - 1)
        finally:
            torch.set_num_threads(old)

    return run


def _adam_name() -> str:
    return next(k for k, v in ADAM.items() if v == _adam_kw)


def _loadavg():
    """The machine's 1-minute load average (other users' work shows here: this VM is shared)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def write_rows(rows: List[dict], path: str) -> None:
    """Append ``rows`` under ``FIELDS`` (other keys, such as the environment's ``triton``, are dropped);
    a file with another header is refused (``results_csv.append_rows``)."""
    append_rows(path, FIELDS, rows, extrasaction="ignore")


def bench_cpu(W: int, B: int, K: int, min_run_time: float, env: dict) -> List[dict]:
    N = torch.get_num_threads()
    fns = {
        "sequential/1t": decoupled("sequential", W, B, K, 1),
        f"sequential/{N}t": decoupled("sequential", W, B, K, N),
        "threads": decoupled("threads", W, B, K, None),
        "threads/1t": decoupled("threads", W, B, K, 1),
        "backprop/1t": backprop(W, B, K, 1),
        f"backprop/{N}t": backprop(W, B, K, N),
    }
    for k in range(4):
        fns[f"stage {k}"] = stage_alone(k, W, B, K)
    res = time_many(fns, torch.device("cpu"), min_run_time=min_run_time, block_s=0.05)
    per_step = {name: r["ms"] / K for name, r in res.items()}
    seq1, seqN = per_step["sequential/1t"], per_step[f"sequential/{N}t"]
    stage_ms = [per_step[f"stage {k}"] for k in range(4)]
    total = sum(stage_ms)
    cores = available_cores()
    ideal = total / max(max(stage_ms), total / cores)
    extra = {"stage_ms": [round(s, 4) for s in stage_ms], "ideal_threads_speedup": round(ideal, 3),
             "cores": cores, "K": K, "synth": "BasicSynthesizer(W, n_hidden=1)", "optimizer": f"Adam({_adam_name()})", "regression": _regression,
             "loadavg_1min_after": _loadavg()}
    rows = []
    for name, r in res.items():
        threads = {"sequential/1t": 1, "threads/1t": 1, "backprop/1t": 1, "threads": max(1, N // 4)}.get(name, N)
        if name.startswith("stage"):
            threads = 1
        ms = per_step[name]
        rows.append({**env, "bench": "four_stages", "provider": name, "W": W, "B": B, "stages": 4,
                     "threads": threads, "ms_per_step": round(ms, 4), "p20": round(r["p20"] / K, 4),
                     "p80": round(r["p80"] / K, 4), "samples_per_s": round(B / ms * 1e3, 1),
                     "speedup_vs_sequential_1t": round(seq1 / ms, 3), "speedup_vs_sequential_default":
                         round(seqN / ms, 3), "extra": json.dumps(extra)})
    return rows


def bench_gpu(W: int, B: int, K: int, min_run_time: float, env: dict) -> List[dict]:
    dev = torch.device("cuda")
    fns = {"sequential": decoupled("sequential", W, B, K, None, device=dev),
           "streams": decoupled("streams", W, B, K, None, device=dev),
           "backprop": backprop(W, B, K, torch.get_num_threads(), device=dev)}
    return gpu_rows(time_many(fns, dev, min_run_time=min_run_time), W, B, K, env)


def gpu_rows(res: dict, W: int, B: int, K: int, env: dict) -> List[dict]:
    """bench_gpu's rows from ``time_many``'s result. There is no 1-thread run on the GPU:
    ``speedup_vs_sequential_1t`` stays empty, ``speedup_vs_sequential_default`` is the ratio to ``sequential``
    (the only sequential run; ``extra.time_vs_sequential`` is its inverse, the target's measure)."""
    seq = res["sequential"]["ms"] / K
    extra = {"K": K, "optimizer": f"Adam({_adam_name()})", "regression": _regression, "target": "<= 0.7"}
    rows = []
    for name, r in res.items():
        ms = r["ms"] / K
        rows.append({**env, "bench": "four_stages", "provider": name, "W": W, "B": B, "stages": 4, "threads": "",
                     "ms_per_step": round(ms, 4), "p20": round(r["p20"] / K, 4), "p80": round(r["p80"] / K, 4),
                     "samples_per_s": round(B / ms * 1e3, 1), "speedup_vs_sequential_1t": "",
                     "speedup_vs_sequential_default": round(seq / ms, 3),
                     "extra": json.dumps({**extra, "time_vs_sequential": round(ms / seq, 3)})})
    return rows


def _fmt(v) -> str:
    return "-" if v == "" or v is None else f"{v:.2f}"


def print_rows(rows: List[dict]) -> None:
    print(f"{'provider':<16}{'W':>5}{'B':>5}{'thr':>5}{'ms/step':>10}{'samples/s':>11}{'vs seq 1t':>11}"
          f"{'vs seq def':>11}")
    for r in rows:
        print(f"{r['provider']:<16}{r['W']:>5}{r['B']:>5}{str(r['threads']):>5}{r['ms_per_step']:>10.3f}"
              f"{r['samples_per_s']:>11.0f}{_fmt(r['speedup_vs_sequential_1t']):>11}"
              f"{_fmt(r['speedup_vs_sequential_default']):>11}")
    if rows and rows[0].get("extra"):
        e = json.loads(rows[0]["extra"])
        if "ideal_threads_speedup" in e:
            print(f"  stage ms alone at 1 thread: {e['stage_ms']}; ideal threads speed-up on {e['cores']} cores: "
                  f"{e['ideal_threads_speedup']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default=None, help="W:B pairs, e.g. 512:64,256:32 (GPU default 1024:64)")
    p.add_argument("--steps", type=int, default=16, help="steps per timed call (then synchronize)")
    p.add_argument("--min-run-time", type=float, default=6.0,
                   help="seconds of interleaved timing per provider (dni_fast.timing.time_many), on either device")
    p.add_argument("--adam", default="fused", choices=sorted(ADAM),
                   help="Adam's implementation for every stage and synthesizer (default fused)")
    p.add_argument("--regression", default="current", choices=("current", "stored"),
                   help="DecoupledSequential(regression=...) (default current: one more synthesizer forward per step)")
    p.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/bench_decoupled_<dev>.csv)")
    args = p.parse_args(argv)
    global _adam_kw, _regression
    _adam_kw = ADAM[args.adam]
    _regression = args.regression
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_decoupled: --device cuda needs a GPU; none here", file=sys.stderr)
        return 2
    sizes = args.sizes or ("512:64,256:32" if dev.type == "cpu" else "1024:64")
    env = environment(dev)
    out = args.out or os.path.join(RESULTS, f"bench_decoupled_{dev.type}.csv")
    check_header(out, FIELDS)  # before the timing: a file of another shape would be refused only at the end
    print(f"bench_decoupled: {env['device']}, torch {env['torch']}, {torch.get_num_threads()} intra-op threads, "
          f"Adam({args.adam}), regression={args.regression}, {env['date']}")
    for pair in sizes.split(","):
        W, B = (int(v) for v in pair.split(":"))
        rows = bench_cpu(W, B, args.steps, args.min_run_time, env) if dev.type == "cpu" else \
            bench_gpu(W, B, args.steps, args.min_run_time, env)
        print_rows(rows)
        write_rows(rows, out)
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
