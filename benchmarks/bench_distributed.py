"""Decoupled stages across processes beside torch's pipeline schedules (issue 13).

The model split: the DESIGN MLP without BatchNorm (784-256x6-10), rank 0
holding the first 2 layers and the synthesizer (``BasicSynthesizer(256,
n_hidden=1)``), rank 1 the other 5; B=256; Adam; gloo on 127.0.0.1; every
process at one intra-op thread (2 ranks x 1 thread on this 2-core VM: the
honest setting). The training loops are the example's
(``dni_fast/examples/mnist_distributed.py``), so the benchmark and the
example measure the same thing.

What it measures, in one run:

1. **Messages**: gloo ping-pong between the two ranks for a 16-byte header
   and a ``(B, 256)`` fp32 activation (the throughput model's latency and
   bandwidth).
2. **Throughput**, in rounds: every round trains each method for
   ``--steps`` steps from the same weights (decoupled; ``ScheduleGPipe`` and
   ``Schedule1F1B`` at m = 4 and 8; single-process backprop on rank 0 alone)
   and runs one **compute-alone** block: rank 0 times (one thread,
   ``time_many`` interleaved, ``--min-run-time`` s per callable) each rank's
   step on its own (rank 0: its two layers, the synthetic gradient, Adam, the
   synthesizer's regression and Adam; rank 1: five layers, loss, Adam) and
   the single-process backprop step, while rank 1 waits in a barrier (gloo's
   wait takes no CPU). The order (the compute-alone block first, then the
   methods) is reversed every other round, and each method's samples/s is
   the median over rounds; ``p20``/``p80`` are the 20 % and 80 % quantiles of
   the rounds' samples/s, interpolated linearly between the sorted values
   (``quantile``; with 3 rounds the 0.2-quantile is 40 % of the way from the
   smallest to the median). Peak memory per rank: the peak RSS (``VmHWM``,
   reset before each run) minus the RSS before it.
3. **Ideal**: the ideal decoupled throughput of a round is ``B /
   max_k(step_k)`` from that round's compute-alone block (on the data's input
   width: 784 for MNIST, 64 for digits); ``ideal_samples_per_s`` is the
   median over rounds of it, and ``fraction_of_ideal`` the median over rounds
   of a round's samples/s over the same round's ideal. The target is at least
   0.85. ``extra.compute_alone_ms`` holds the per-step medians over rounds,
   ``extra.compute_alone_ms_rounds`` every round's. (Rows without
   ``compute_alone_ms_rounds`` are older: their ideal was timed once, in the
   parent before the processes started, minutes before the rounds, and their
   p20/p80 were sorted values picked by index: with 3 rounds the minimum and
   the median.)
4. **Accuracy after a fixed budget**: each method trains on the same
   ``--samples`` (default one epoch of MNIST) and reports its last training
   loss and the MNIST test accuracy.
5. With ``--worlds 2,3,4``: 3 and 4 ranks as well (decoupled and GPipe),
   for correctness and accuracy only: more processes than cores do not time
   honestly.

    python benchmarks/bench_distributed.py                  # the issue's run
    python benchmarks/bench_distributed.py --quick          # seconds, digits

Rows go to ``benchmarks/results/bench_distributed_cpu.csv`` with the
device, versions, date and the command line (a file with another header is
refused, before the run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

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
from results_csv import append_rows, check_header  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["date", "device", "torch", "python", "dni_fast", "command", "kind", "world", "threads", "method", "m",
          "B", "steps", "samples_per_s", "p20", "p80", "vs_single", "vs_best_torch", "ideal_samples_per_s",
          "fraction_of_ideal", "peak_delta_mib", "peak_rss_mib", "samples", "train_loss", "test_loss", "test_acc",
          "extra"]
TIMED = [("decoupled", 0), ("decoupled-d2", 0), ("decoupled-cdni", 0), ("decoupled-cdni-d2", 0), ("gpipe", 4),
         ("gpipe", 8), ("1f1b", 4), ("1f1b", 8), ("backprop", 0)]
ALONE = ("compute alone", 0)  # the block of every round that times each rank's step alone (rank 0; rank 1 waits)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``xs``, interpolated linearly between the sorted values (numpy's default,
    ``statistics.quantiles(method="inclusive")``): ``quantile([1, 2, 3], 0.2) == 1.4``. Indexing the sorted
    list at ``int(q * (n - 1))`` instead gave, with 3 rounds, the minimum as p20 and the median as p80."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of no values")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---------------------------------------------------------------------------
# compute alone (a block of every round, part 2) and the ideal (part 3)
# ---------------------------------------------------------------------------
def alone_fns(B: int, regression: str = "current", input_dim: int = 784) -> Dict[str, Callable[[], None]]:
    """The compute-alone callables: each rank's step on its own and the single-process backprop step."""
    stages, synths = E.build(2, 0, input_dim)
    x = torch.randn(B, input_dim)
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
    model = nn.Sequential(*E.build(2, 0, input_dim)[0])
    opt = adam(model.parameters())

    def single():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return {"rank 0": rank0, "rank 1": rank1, "single": single}


def compute_alone(B: int, min_run_time: float, regression: str = "current", input_dim: int = 784,
                  fns: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, float]:
    """ms per step of each rank's work alone and of single-process backprop, at one thread, interleaved
    (``fns``: callables from ``alone_fns``, made once and timed again every round)."""
    torch.set_num_threads(1)
    res = time_many(fns or alone_fns(B, regression, input_dim), torch.device("cpu"), min_run_time=min_run_time)
    return {k: v["ms"] for k, v in res.items()}


def ideal_samples_per_s(B: int, alone: Dict[str, float]) -> float:
    """The ideal decoupled throughput: the batch over the slower rank's step alone."""
    return B / max(alone["rank 0"], alone["rank 1"]) * 1e3


def summarise_rounds(B: int, timed: List[dict], alone: List[dict]) -> Dict[str, dict]:
    """Per method (``label``): the median samples/s over rounds, its interpolated 20/80 % quantiles and,
    where the round has a compute-alone block, the median over rounds of the fraction of that round's
    ideal. ``timed``: ``{"round", "method", "m", "samples_per_s"}``; ``alone``: ``{"round", "rank 0",
    "rank 1", "single"}`` (ms)."""
    ideal = {a["round"]: ideal_samples_per_s(B, a) for a in alone}
    runs: Dict[str, List[dict]] = {}
    for r in timed:
        runs.setdefault(label(r["method"], r["m"]), []).append(r)
    out = {}
    for key, rs in runs.items():
        v = [r["samples_per_s"] for r in rs]
        fr = [r["samples_per_s"] / ideal[r["round"]] for r in rs if r.get("round") in ideal]
        out[key] = {"median": statistics.median(v), "p20": quantile(v, 0.2), "p80": quantile(v, 0.8),
                    "fraction_of_ideal": statistics.median(fr) if fr else None}
    return out


# ---------------------------------------------------------------------------
# the processes (parts 1, 2, 4 and 5)
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
            res["alone"] = []
            fns = alone_fns(args.batch_size, args.regression, data.input_dim) if rank == 0 else None
            for r in range(cfg["rounds"]):
                order = [ALONE] + TIMED if r % 2 == 0 else TIMED[::-1] + [ALONE]
                for name, m in order:
                    if (name, m) == ALONE:
                        dist.barrier()  # rank 1 idle from here (gloo waits without spinning) ...
                        if rank == 0:
                            res["alone"].append({"round": r, **compute_alone(
                                args.batch_size, cfg["min_run_time"], fns=fns)})
                        dist.barrier()  # ... to here
                        continue
                    run = E.run_method(name, rank, world, data, args, cfg["steps"], m or 4)
                    if rank == 0:
                        row = E.summarise(name, run, data, world, args)
                        res["timed"].append({"round": r, "method": name, "m": m, **{k: row[k] for k in (
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
    p.add_argument("--min-run-time", type=float, default=3.0,
                   help="seconds per callable of the compute-alone block, in every round")
    p.add_argument("--quick", action="store_true", help="tiny configuration (digits, few steps)")
    p.add_argument("--regression", choices=("current", "stored"), default="current",
                   help="DecoupledStage(regression=...) (the example's default: current)")
    p.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/bench_distributed_cpu.csv; "
                                               "--quick writes none unless given)")
    a = p.parse_args(argv)
    if a.quick:
        a.data, a.steps, a.rounds, a.samples, a.min_run_time = "digits", 12, 1, 2560, 0.5
    B = a.batch_size
    out = a.out if a.out is not None or a.quick else os.path.join(RESULTS, "bench_distributed_cpu.csv")
    if out is not None:
        check_header(out, FIELDS)  # before minutes of measuring
    env = environment()
    print(f"bench_distributed: {env['device']}, torch {env['torch']}, {env['date']}", flush=True)
    args = {"data": a.data, "data_dir": a.data_dir, "quick": False, "batch_size": B, "lr": a.lr, "seed": 1,
            "timeout": 120.0, "delay": 1, "threads": 1, "epochs": None, "regression": a.regression}
    rows = []
    for world in (int(w) for w in a.worlds.split(",")):
        cfg = {"args": args, "steps": a.steps, "rounds": a.rounds, "budget_steps": max(a.samples // B, 1),
               "min_run_time": a.min_run_time}
        res = spawn(world, cfg)
        alone_rounds = res.get("alone") or []
        alone = ({k: statistics.median(r[k] for r in alone_rounds) for k in ("rank 0", "rank 1", "single")}
                 if alone_rounds else None)
        extra = {"compute_alone_ms": alone and {k: round(v, 4) for k, v in alone.items()},
                 "compute_alone_ms_rounds": [{k: round(v, 4) for k, v in r.items()} for r in alone_rounds],
                 "messages_ms": res["messages"],
                 "rounds": a.rounds, "regression": a.regression, "timed_steps": a.steps, "layers_per_stage": E.split(world),
                 "loadavg_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        ideal = (statistics.median(ideal_samples_per_s(B, r) for r in alone_rounds) if alone_rounds
                 else float("nan"))
        if alone:
            print(f"\n  compute alone (ms/step, 1 thread, median of {len(alone_rounds)} rounds): rank 0 "
                  f"{alone['rank 0']:.2f}, rank 1 {alone['rank 1']:.2f}, single process {alone['single']:.2f}; "
                  f"ideal decoupled {ideal:.0f} samples/s "
                  f"({alone['single'] / max(alone['rank 0'], alone['rank 1']):.2f}x single)", flush=True)
        stats = summarise_rounds(B, res["timed"], alone_rounds)
        mems: Dict[str, dict] = {}
        for r in res["timed"]:
            mems[label(r["method"], r["m"])] = r
        med = {k: v["median"] for k, v in stats.items()}
        best_torch = max([v for k, v in med.items() if k.startswith(("gpipe", "1f1b"))], default=float("nan"))
        single = med.get("backprop", float("nan"))
        budget = {label(r["method"], r["m"]): r for r in res["budget"]}
        for key in dict.fromkeys(list(med) + list(budget)):
            st = stats.get(key, {})
            frac = st.get("fraction_of_ideal") if key in ("decoupled", "decoupled-d2") and world == 2 else None
            b = budget.get(key, {})
            row = {**env, "kind": "timed+budget" if key in med else "budget", "world": world, "threads": 1,
                   "method": key.split()[0], "m": key.split("m=")[1] if "m=" in key else "", "B": B,
                   "steps": a.steps if key in med else "", "samples_per_s": round(med[key], 1) if key in med else "",
                   "p20": round(st["p20"], 1) if st else "", "p80": round(st["p80"], 1) if st else "",
                   "vs_single": round(med[key] / single, 3) if key in med else "",
                   "vs_best_torch": round(med[key] / best_torch, 3) if key in med else "",
                   "ideal_samples_per_s": round(ideal, 1) if frac is not None else "",
                   "fraction_of_ideal": round(frac, 3) if frac is not None else "",
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
                f_r = stats[key]["fraction_of_ideal"]
                frac = (f"{f_r:.2f} of the ideal (per round, median; ideal {ideal:.0f} samples/s); "
                        if "cdni" not in key and f_r is not None else "")
                print(f"  {key}: {frac}{med[key] / best_torch:.2f}x the best torch schedule; "
                      f"{med[key] / single:.2f}x single-process backprop", flush=True)
    if out is None:
        print("--quick: rows not written (give --out to keep them)")
        return 0
    append_rows(out, FIELDS, rows, extrasaction="ignore")  # the environment's triton is not a column here
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
