"""A throughput model of decoupled stages against GPipe/1F1B, checked against the measurements.

Inputs, all measured (the latest rows of ``benchmarks/results/bench_distributed_cpu.csv``
and ``bench_decoupled_cpu.csv``; run those first):

* ``t_k``: each rank's step alone at one thread (ms): rank 0 = its two
  layers (784->256, 256->256) + the synthesizer's step, rank 1 = five layers;
  ``t_single``: single-process backprop of the whole network;
* one-way message times of a header (``alpha``, the latency) and of a
  ``(B, 256)`` fp32 activation, which give the bandwidth ``beta``.

Derived per-layer costs (B = 256): ``c`` = t_1 / 5 per 256-wide layer (the
output layer counted as one), ``c_in`` = (t_single - 6c) for the 784-wide
first layer, and the synthesizer's step ``s`` = t_0 - c_in - c.

**Decoupled** (no backward locking, no bubble): stage k's step is its own
compute plus, above the first stage, the synthesizer's step, plus the CPU
cost of its messages (``o``: two sends and two receives of a header and a
payload). With ``delay >= 1`` the gradient's round trip is off the critical
path while ``delay * P >= 2 (alpha + S / beta) + t_{k+1}`` (true here). So
``samples/s = B / max_k (t_k + o)``.

**GPipe / 1F1B** with m microbatches of B/m: ``(m + p - 1)`` slots of one
microbatch's forward and backward on the slowest stage, plus that
microbatch's messages on the critical path (the bubble ``(p-1)/(m+p-1)``),
plus the optimizer step: ``step = (m + p - 1) (t_mb + 2 (alpha + S/(m beta)))
+ t_opt``. 1F1B has GPipe's bubble (it saves memory, not time), so one curve
serves both. Small microbatches run matrix products less efficiently than
the full batch: ``t_mb = eta(m) * t_stage / m``, with ``eta`` fitted from the
measured p = 2 runs (reported).

**Scaling to 8-64 stages**: p equal stages of two 256-wide layers each (a
network that grows with p, one stage per machine): decoupled
``B / (2c + s + o)``, flat in p; GPipe with m = 4, 8, 32; and one machine
running all p stages with backprop, ``B / (2 p c)``.

**Check**: the predictions for the measured cases (2 ranks: decoupled, GPipe
and 1F1B at m = 4, 8, single process; in process: ``threads`` on 4 stages
and 2 cores, ``B / max(max_k t_k, sum_k t_k / cores)``), with the error;
where it exceeds 20% the output says so and the docs say why.

    python benchmarks/throughput_model.py          # table + benchmarks/results/throughput_model.png
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Dict, List

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def latest(path: str, pred) -> List[dict]:
    """The rows of the latest run (the last ``date``) in ``path`` that satisfy ``pred``."""
    if not os.path.exists(path):
        raise SystemExit(f"throughput_model: {path} is missing; run the benchmark first")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if pred(r)]
    if not rows:
        raise SystemExit(f"throughput_model: no usable rows in {path}")
    last = rows[-1]["date"]
    return [r for r in rows if r["date"] == last]


class Model:
    def __init__(self, t0: float, t1: float, t_single: float, alpha: float, act_ms: float, B: int,
                 width: int = 256) -> None:
        self.B, self.t0, self.t1, self.t_single = B, t0, t1, t_single
        self.alpha = alpha  # ms, one way, a small message
        self.S = B * width * 4  # bytes of an activation
        self.beta = self.S / max(act_ms - alpha, 1e-6) if act_ms > alpha else self.S / act_ms  # bytes per ms
        self.c = t1 / 5  # one 256-wide layer (forward, backward, Adam)
        self.c_in = max(t_single - 6 * self.c, self.c)  # the 784-wide first layer
        self.s = max(t0 - self.c_in - self.c, 0.0)  # the synthesizer's step
        self.o = 2 * (2 * alpha)  # per step: two messages out, two in, a header and a payload each (CPU cost)
        self.eta: Dict[int, float] = {}

    def msg(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta

    # -- the measured split (p = 2) ------------------------------------------------------
    def decoupled_2(self) -> float:
        return self.B / (max(self.t0, self.t1) + self.o) * 1e3

    def stage_times_2(self) -> List[float]:
        """Backprop work of each rank (no synthesizer)."""
        return [self.t0 - self.s, self.t1]

    def pipeline(self, stage_ms: List[float], m: int, eta: float = 1.0) -> float:
        p = len(stage_ms)
        t_mb = eta * max(stage_ms) / m
        step = (m + p - 1) * (t_mb + 2 * self.msg(self.S / m))
        return self.B / step * 1e3

    def fit_eta(self, m: int, measured: float) -> float:
        """eta(m) such that the GPipe prediction at p = 2 equals the measurement."""
        stage = self.stage_times_2()
        p = 2
        step = self.B / measured * 1e3
        t_mb = step / (m + p - 1) - 2 * self.msg(self.S / m)
        self.eta[m] = max(t_mb * m / max(stage), 0.1)
        return self.eta[m]

    # -- scaling: p equal stages of two layers ------------------------------------------------
    def scaled(self, p: int) -> Dict[str, float]:
        stage = 2 * self.c
        out = {"decoupled": self.B / (stage + self.s + self.o) * 1e3,
               "single machine": self.B / (p * stage) * 1e3}
        for m in (4, 8, 32):
            eta = self.eta.get(m, max(self.eta.values()) if self.eta else 1.0)
            out[f"gpipe/1f1b m={m}"] = self.pipeline([stage] * p, m, eta)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distributed", default=os.path.join(RESULTS, "bench_distributed_cpu.csv"))
    ap.add_argument("--decoupled", default=os.path.join(RESULTS, "bench_decoupled_cpu.csv"))
    ap.add_argument("--plot", default=os.path.join(RESULTS, "throughput_model.png"))
    ap.add_argument("--table", default=os.path.join(RESULTS, "throughput_model.csv"))
    a = ap.parse_args(argv)

    rows = latest(a.distributed, lambda r: r["world"] == "2" and r["samples_per_s"] != "")
    extra = json.loads(rows[0]["extra"])
    alone, msgs = extra["compute_alone_ms"], extra["messages_ms"]
    B = int(rows[0]["B"])
    model = Model(alone["rank 0"], alone["rank 1"], alone["single"], msgs["header"], msgs["activation"], B)
    measured = {(r["method"] + (f" m={r['m']}" if r["m"] else "")): float(r["samples_per_s"]) for r in rows}
    print(f"inputs (ms, B={B}): rank 0 {model.t0:.2f}, rank 1 {model.t1:.2f}, single {model.t_single:.2f}; "
          f"layer c={model.c:.2f}, first layer {model.c_in:.2f}, synthesizer s={model.s:.2f}; latency "
          f"{model.alpha:.3f} ms, bandwidth {model.beta / 1e6:.2f} GB/s, messages o={model.o:.2f} ms/step")

    checks = []
    checks.append(("2 ranks", "decoupled", model.decoupled_2(), measured.get("decoupled")))
    checks.append(("2 ranks", "backprop (1 process)", model.B / model.t_single * 1e3, measured.get("backprop")))
    for m in (4, 8):
        g = measured.get(f"gpipe m={m}")
        for name in ("gpipe", "1f1b"):
            meas = measured.get(f"{name} m={m}")
            checks.append(("2 ranks", f"{name} m={m} (eta=1)", model.pipeline(model.stage_times_2(), m), meas))
        if g:
            eta = model.fit_eta(m, g)
            checks.append(("2 ranks", f"1f1b m={m} (eta fitted on gpipe: {eta:.2f})",
                           model.pipeline(model.stage_times_2(), m, eta), measured.get(f"1f1b m={m}")))
    try:
        drows = latest(a.decoupled, lambda r: r["W"] == "512" and r["B"] == "64")
        stage_ms = json.loads(drows[0]["extra"])["stage_ms"]
        cores = json.loads(drows[0]["extra"])["cores"]
        pred = 64 / max(max(stage_ms), sum(stage_ms) / cores) * 1e3
        meas = next(float(r["samples_per_s"]) for r in drows if r["provider"] == "threads")
        checks.append(("in process, 4 stages, 2 cores", "threads", pred, meas))
    except SystemExit:
        pass

    print(f"\n{'case':<32}{'what':<40}{'predicted':>11}{'measured':>11}{'error':>8}")
    for case, what, pred, meas in checks:
        err = "" if not meas else f"{(pred - meas) / meas * 100:+.0f}%"
        flag = "  > 20%" if meas and abs(pred - meas) / meas > 0.2 else ""
        print(f"{case:<32}{what:<40}{pred:>11.0f}{(f'{meas:.0f}' if meas else '-'):>11}{err:>8}{flag}")

    ps = [2, 4, 8, 16, 32, 64]
    table = [{"p": p, **model.scaled(p)} for p in ps]
    keys = list(table[0].keys())[1:]
    print(f"\npredicted samples/s, p equal stages of two 256-wide layers (B={B}), one stage per machine:")
    print(f"{'p':>4}" + "".join(f"{k:>18}" for k in keys))
    for r in table:
        print(f"{r['p']:>4}" + "".join(f"{r[k]:>18.0f}" for k in keys))
    with open(a.table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["p"] + keys)
        w.writeheader()
        w.writerows({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot (pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        ax[0].plot(ps, [r[k] for r in table], marker="o", label=k)
        ax[1].plot(ps, [r[k] / r["single machine"] for r in table], marker="o", label=k)
    for axis, title in zip(ax, ("samples/s (model)", "speed-up over one machine (model)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ps, [str(p) for p in ps])
        axis.set_xlabel("stages = machines")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    ax[1].set_yscale("log", base=2)
    ax[0].legend(fontsize=8)
    fig.suptitle(f"Decoupled stages vs GPipe/1F1B bubble, stages of 2x Linear(256), B={B} "
                 f"(inputs measured on {rows[0]['device']}, torch {rows[0]['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)
    print(f"\nplot: {a.plot}; table: {a.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
