"""Table and plot of the gim_mnist runs (one JSON log per seed).

    python scripts/gim_results.py benchmarks/results/gim_mnist/seed*.json --plot docs/gim_mnist.png

Prints a markdown table: linear-probe test accuracy per method and module,
mean ± standard deviation over the seeds (and each seed's value), and the
final InfoNCE losses. The plot has the probe accuracies (bars: mean; dots:
seeds) and the InfoNCE training curves.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from typing import Dict, List


def load(paths: List[str]) -> List[dict]:
    logs = []
    for p in paths:
        with open(p) as f:
            logs.append(json.load(f))
    if not logs:
        sys.exit("no logs given")
    return logs


def collect(logs: List[dict]) -> Dict[str, dict]:
    """{method: {"acc": [[m1, m2, m3] per seed], "seeds": [...], "infonce": [...], "history": [...]}}"""
    out: Dict[str, dict] = defaultdict(lambda: {"acc": [], "seeds": [], "infonce": [], "history": [],
                                                "train_s": []})
    for log in logs:
        seed = log["config"]["seed"]
        for r in log["runs"]:
            d = out[r["variant"]]
            d["acc"].append(r["probe_acc_per_module"])
            d["seeds"].append(seed)
            d["infonce"].append(r.get("final_infonce"))
            d["history"].append(r.get("history"))
            d["train_s"].append(r.get("train_time_s"))
    return dict(out)


def fmt(vals: List[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(res: Dict[str, dict], logs: List[dict]) -> str:
    cfg = logs[0]["config"]
    lines = [f"Linear probe test accuracy (%), {cfg['data_name']}: {cfg['n_train']} unlabelled training images, "
             f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam {cfg['lr']}, widths {cfg['widths']}, "
             f"InfoNCE K={cfg['k_steps']} N={cfg['negatives']}; probe on {cfg['n_probe']} labelled images, "
             f"tested on {cfg['n_test']}. Mean ± std over seeds {sorted({l['config']['seed'] for l in logs})}.",
             "",
             "| method | module 1 | module 2 | module 3 | per seed (module 3) | final InfoNCE per loss |",
             "|---|---|---|---|---|---|"]
    names = {"gim": "Greedy InfoMax (3 isolated modules)", "cpc": "CPC end to end (1 module)",
             "random": "random init"}
    for m in ("gim", "cpc", "random"):
        if m not in res:
            continue
        d = res[m]
        cols = [fmt([a[i] for a in d["acc"]]) for i in range(3)]
        seeds = ", ".join(f"{a[2]:.2f}" for a in d["acc"])
        nce = "-"
        if d["infonce"][0]:
            k = len(d["infonce"][0])
            nce = " / ".join(f"{statistics.mean(v[i] for v in d['infonce']):.3f}" for i in range(k))
        lines.append(f"| {names.get(m, m)} | {cols[0]} | {cols[1]} | {cols[2]} | {seeds} | {nce} |")
    return "\n".join(lines)


def plot(res: Dict[str, dict], path: str) -> None:
    from dni_fast.examples._extras import require

    matplotlib = require("matplotlib", "scripts/gim_results.py (the plot)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("gim", "cpc", "random") if m in res]
    colors = {"gim": "tab:blue", "cpc": "tab:orange", "random": "tab:gray"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        acc = res[m]["acc"]
        for i in range(3):
            vals = [a[i] for a in acc]
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, statistics.mean(vals), width * 0.95, color=colors[m], label=m if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_xticks(range(3), ["module 1", "module 2", "module 3"])
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Frozen features, mean over the 7x7 patch grid")
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    for m in ("gim", "cpc"):
        if m not in res:
            continue
        for s, h in enumerate(res[m]["history"]):
            if not h:
                continue
            k = len(h["loss"][0])
            for i in range(k):
                label = None
                if s == 0:
                    label = f"{m} module {i + 1}" if m == "gim" else "cpc (top)"
                bx.plot(h["step"], [v[i] for v in h["loss"]], color=colors[m],
                        alpha=0.35 + 0.2 * i if m == "gim" else 0.8, lw=1,
                        ls=["-", "--", ":"][i] if m == "gim" else "-", label=label)
    bx.set_xlabel("training step (batch 32)")
    bx.set_ylabel("InfoNCE loss (log 17 = 2.83 at chance)")
    bx.set_title("InfoNCE during training (every seed)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    logs = load(args.logs)
    res = collect(logs)
    text = table(res, logs)
    print(text)
    if args.plot:
        plot(res, args.plot)
        print(f"\nplot written to {args.plot}")
    return text


if __name__ == "__main__":
    main()
