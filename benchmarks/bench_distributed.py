"""Decoupled stages across processes beside torch's pipeline schedules (issue 13).

The model split: the DESIGN MLP without BatchNorm (784-256x6-10), rank 0
holding the first 2 layers and the synthesizer (``BasicSynthesizer(256,
n_hidden=1)``), rank 1 the other 5; B=256; Adam; gloo on 127.0.0.1; every
process at one intra-op thread (2 ranks x 1 thread on this 2-core VM: the
honest setting). The training loops are the example's
(``dni_fast/examples/mnist_distributed.py``), so the benchmark and the
example measure the same thing.

What it measures, in one run:

1. **Compute alone** (this process, one thread, ``time_many`` interleaved):
   each rank's step on its own (rank 0: its two layers, the synthetic
   gradient, Adam, the synthesizer's regression and Adam; rank 1: five
   layers, loss, Adam) and the single-process backprop step. The ideal
   decoupled throughput is ``B / max_k(step_k)``; the target is at least 0.85
   of it.
2. **Messages**: gloo ping-pong between the two ranks for a 16-byte header
   and a ``(B, 256)`` fp32 activation (the throughput model's latency and
   bandwidth).
3. **Throughput**, in rounds: every round trains each method for
   ``--steps`` steps from the same weights (decoupled; ``ScheduleGPipe`` and
   ``Schedule1F1B`` at m = 4 and 8; single-process backprop on rank 0 alone);
   the order of methods alternates between rounds, and each method's
   samples/s is the median over rounds. Peak memory per rank: the peak RSS
   (``VmHWM``, reset before each run) minus the RSS before it.
4. **Accuracy after a fixed budget**: each method trains on the same
   ``--samples`` (default one epoch of MNIST) and reports its last training
   loss and the MNIST test accuracy.
5. With ``--worlds 2,3,4``: 3 and 4 ranks as well (decoupled and GPipe),
   for correctness and accuracy only: more processes than cores do not time
   honestly.

    python benchmarks/bench_distributed.py                  # the issue's run
    python benchmarks/bench_distributed.py --quick          # seconds, digits

Rows go to ``benchmarks/results/bench_distributed_cpu.csv`` with the
device, versions, date and the command line.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dni_fast.decoupled import Stage
from dni_fast.examples import _common as C
from dni_fast.examples import mnist_distributed as E
from dni_fast.timing import time_many

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment as _environment  # noqa: E402  (one record of the machine for every benchmark)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["date", "device", "torch", "python", "dni_fast", "command", "kind", "world", "threads", "method", "m",
          "B", "steps", "samples_per_s", "p20", "p80", "vs_single", "vs_best_torch", "ideal_samples_per_s",
          "fraction_of_ideal", "peak_delta_mib", "peak_rss_mib", "samples", "train_loss", "test_loss", "test_acc",
          "extra"]
TIMED = [("decoupled", 0), ("decoupled-d2", 0), ("decoupled-cdni", 0), ("decoupled-cdni-d2", 0), ("gpipe", 4),
         ("gpipe", 8), ("1f1b", 4), ("1f1b", 8), ("backprop", 0)]


# ---------------------------------------------------------------------------
# 1. compute alone
# ---------------------------------------------------------------------------
def compute_alone(B: int, min_run_time: float, regression: str = "current") -> Dict[str, float]:
    """ms per step of each rank's work alone and of single-process backprop, at one thread."""
    torch.set_num_threads(1)
    stages, synths = E.build(2, 0)
    x = torch.randn(B, 1, 28, 28)
    y = torch.randint(0, 10, (B,))
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    s0 = Stage(0, 2, stages[0], synths[0], adam, delay=0, regression=regression)
    s1 = Stage(1, 2, stages[1], None, adam, delay=0)
    h1 = torch.randn(B, 256)
    g = torch.randn(B, 256) * 1e-3

    def rank0():
        s0.forward(s0.steps, x)
        s0.deliver(s0.steps - 1, g)
        s0.regress(s0.steps - 1)

    def rank1():
        s1.forward(s1.steps, h1, target=y, loss_fn=F.cross_entropy)

    torch.manual_seed(0)
    model = nn.Sequential(*E.build(2, 0)[0])
    opt = adam(model.parameters())

    def single():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    res = time_many({"rank 0": rank0, "rank 1": rank1, "single": single}, torch.device("cpu"),
                    min_run_time=min_run_time)
    return {k: v["ms"] for k, v in res.items()}


# ---------------------------------------------------------------------------
# 2-5. the processes
# ---------------------------------------------------------------------------
def ping_pong(rank: int, B: int, reps: int = 50) -> Dict[str, float]:
    """Round-trip halves (ms) of a 16-int64 header and a (B, 256) fp32 tensor."""
    out = {}
    for name, t in (("header", torch.zeros(16, dtype=torch.int64)), ("activation", torch.zeros(B, 256))):
        buf = torch.empty_like(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if rank == 0:
                dist.isend(t, 1, tag=7).wait()
                dist.irecv(buf, 1, tag=8).wait()
            else:
                dist.irecv(buf, 0, tag=7).wait()
                dist.isend(t, 0, tag=8).wait()
        out[name] = (time.perf_counter() - t0) / reps / 2 * 1e3
    return out


def worker(rank: int, world: int, init: str, q, cfg: dict) -> None:
    args = SimpleNamespace(**cfg["args"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        data = C.load_image_data(args)
        res = {"timed": [], "budget": [], "messages": None}
        if world == 2:
            res["messages"] = ping_pong(rank, args.batch_size)
            for r in range(cfg["rounds"]):
                order = TIMED if r % 2 == 0 else TIMED[::-1]
                for name, m in order:
                    run = E.run_method(name, rank, world, data, args, cfg["steps"], m or 4)
                    if rank == 0:
                        row = E.summarise(name, run, data, world, args)
                        res["timed"].append({"method": name, "m": m, **{k: row[k] for k in (
                            "samples_per_s", "peak_rss_mib", "peak_delta_mib")}})
            budget = TIMED
        else:
            budget = [("decoupled", 0), ("decoupled-d2", 0), ("decoupled-cdni", 0), ("decoupled-cdni-d2", 0),
                      ("gpipe", 4)]
        for name, m in budget:
            run = E.run_method(name, rank, world, data, args, cfg["budget_steps"], m or 4)
            if rank == 0:
                row = E.summarise(name, run, data, world, args)
                res["budget"].append({"method": name, "m": m, **row})
        q.put((rank, "ok", res if rank == 0 else None))
    except BaseException as e:
        import traceback

        q.put((rank, "error", "".join(traceback.format_exception(e))))
    finally:
        dist.destroy_process_group()


def spawn(world: int, cfg: dict) -> dict:
    return E.spawn_local(worker, world, cfg, what="bench_distributed", join_s=60.0)


def environment() -> Dict[str, str]:
    return {**_environment(torch.device("cpu")),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}


def _fmt(v, spec: str) -> str:
    return "-" if v is None or v == "" else format(v, spec)


def label(name: str, m: int) -> str:
    return name if not m else f"{name} m={m}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="auto", choices=["auto", "mnist", "digits"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=60, help="steps per timed run (5 of them warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each method once per round)")
    p.add_argument("--samples", type=int, default=60000, help="training samples of the accuracy runs")
    p.add_argument("--worlds", default="2", help="comma-separated world sizes; only 2 is timed")
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds per callable of part 1")
    p.add_argument("--quick", action="store_true", help="tiny configuration (digits, few steps)")
    p.add_argument("--regression", choices=("current", "stored"), default="current",
                   help="DecoupledStage(regression=...) (the example's default: current)")
    p.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/bench_distributed_cpu.csv; "
                                               "--quick writes none unless given)")
    a = p.parse_args(argv)
    if a.quick:
        a.data, a.steps, a.rounds, a.samples, a.min_run_time = "digits", 12, 1, 2560, 0.5
    B = a.batch_size
    env = environment()
    print(f"bench_distributed: {env['device']}, torch {env['torch']}, {env['date']}", flush=True)
    alone = compute_alone(B, a.min_run_time, a.regression)
    ideal = B / max(alone["rank 0"], alone["rank 1"]) * 1e3
    print(f"  compute alone (ms/step, 1 thread): rank 0 {alone['rank 0']:.2f}, rank 1 {alone['rank 1']:.2f}, "
          f"single process {alone['single']:.2f}; ideal decoupled {ideal:.0f} samples/s "
          f"({alone['single'] / max(alone['rank 0'], alone['rank 1']):.2f}x single)", flush=True)
    args = {"data": a.data, "data_dir": a.data_dir, "quick": False, "batch_size": B, "lr": a.lr, "seed": 1,
            "timeout": 120.0, "delay": 1, "threads": 1, "epochs": None, "regression": a.regression}
    rows = []
    for world in (int(w) for w in a.worlds.split(",")):
        cfg = {"args": args, "steps": a.steps, "rounds": a.rounds, "budget_steps": max(a.samples // B, 1)}
        res = spawn(world, cfg)
        extra = {"compute_alone_ms": {k: round(v, 4) for k, v in alone.items()}, "messages_ms": res["messages"],
                 "rounds": a.rounds, "regression": a.regression, "timed_steps": a.steps, "layers_per_stage": E.split(world),
                 "loadavg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        speeds: Dict[str, List[float]] = {}
        mems: Dict[str, dict] = {}
        for r in res["timed"]:
            key = label(r["method"], r["m"])
            speeds.setdefault(key, []).append(r["samples_per_s"])
            mems[key] = r
        med = {k: statistics.median(v) for k, v in speeds.items()}
        best_torch = max([v for k, v in med.items() if k.startswith(("gpipe", "1f1b"))], default=float("nan"))
        single = med.get("backprop", float("nan"))
        budget = {label(r["method"], r["m"]): r for r in res["budget"]}
        for key in dict.fromkeys(list(med) + list(budget)):
            s = sorted(speeds.get(key, []))
            b = budget.get(key, {})
            row = {**env, "kind": "timed+budget" if key in med else "budget", "world": world, "threads": 1,
                   "method": key.split()[0], "m": key.split("m=")[1] if "m=" in key else "", "B": B,
                   "steps": a.steps if key in med else "", "samples_per_s": round(med[key], 1) if key in med else "",
                   "p20": round(s[int(0.2 * (len(s) - 1))], 1) if s else "",
                   "p80": round(s[int(0.8 * (len(s) - 1))], 1) if s else "",
                   "vs_single": round(med[key] / single, 3) if key in med else "",
                   "vs_best_torch": round(med[key] / best_torch, 3) if key in med else "",
                   "ideal_samples_per_s": round(ideal, 1) if key in ("decoupled", "decoupled-d2") and world == 2 else "",
                   "fraction_of_ideal": round(med[key] / ideal, 3) if key in ("decoupled", "decoupled-d2") and key in med
                   else "",
                   "peak_delta_mib": json.dumps(mems.get(key, b).get("peak_delta_mib")),
                   "peak_rss_mib": json.dumps(mems.get(key, b).get("peak_rss_mib")),
                   "samples": b.get("steps", 0) and cfg["budget_steps"] * B, "train_loss": b.get("train_loss"),
                   "test_loss": b.get("test_loss"), "test_acc": b.get("test_acc"), "extra": json.dumps(extra)}
            rows.append(row)
        print(f"\n  world {world}: messages (ms, one way): {res['messages']}")
        print(f"  {'method':<18}{'samples/s':>10}{'vs single':>10}{'vs best torch':>14}{'peak MiB/rank':>16}"
              f"{'train loss':>11}{'test acc %':>11}")
        for r in rows:
            if r["world"] != world:
                continue
            print(f"  {label(r['method'], int(r['m']) if r['m'] else 0):<18}{_fmt(r['samples_per_s'], '.0f'):>10}"
                  f"{_fmt(r['vs_single'], '.2f'):>10}{_fmt(r['vs_best_torch'], '.2f'):>14}"
                  f"{r['peak_delta_mib']:>16}{_fmt(r['train_loss'], '.3f'):>11}{_fmt(r['test_acc'], '.2f'):>11}")
        for key in ("decoupled", "decoupled-d2", "decoupled-cdni", "decoupled-cdni-d2"):
            if world == 2 and key in med:
                # the ideal is the plain synthesizer's; cDNI's also reads a 10-wide label
                frac = f"{med[key] / ideal:.2f} of the ideal {ideal:.0f} samples/s; " if "cdni" not in key else ""
                print(f"  {key}: {frac}{med[key] / best_torch:.2f}x the best torch schedule; "
                      f"{med[key] / single:.2f}x single-process backprop", flush=True)
    if a.out is None and a.quick:
        print("--quick: rows not written (give --out to keep them)")
        return 0
    a.out = a.out or os.path.join(RESULTS, "bench_distributed_cpu.csv")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    new = not os.path.exists(a.out)
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    print(f"rows appended to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
