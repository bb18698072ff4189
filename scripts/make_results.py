#!/usr/bin/env python
"""Build docs/results.md and its plots from the examples' JSON logs in runs/.

    python scripts/make_results.py [--runs runs] [--out docs]

Every number on the page comes from a log; nothing is typed in by hand. For
each example (and, for ptb_lm, each level) the most recent log is used.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional

from dni_fast.examples._extras import require

matplotlib = require("matplotlib", "scripts/make_results.py (the plots)")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABEL = {"backprop": "backprop", "dni": "DNI", "cdni": "cDNI", "bptt": "BPTT"}
COLOR = {"backprop": "tab:gray", "dni": "tab:blue", "cdni": "tab:orange", "bptt": "tab:gray"}
PAPER = ("Jaderberg et al. 2016, *Decoupled Neural Interfaces using Synthetic Gradients* "
         "([arXiv:1608.05343](https://arxiv.org/abs/1608.05343))")
REF_NOTE = ("**Published numbers.** The paper reports its results in Table 1 (MNIST and CIFAR-10 FCN/CNN test error, "
            "Bprop vs DNI vs cDNI) and Table 2 / Fig. 4 (copy-task lengths and Penn Treebank bits per character against "
            "the truncation length), for far longer schedules and larger models than ours. "
            "We have not transcribed those numbers here: where a cell says *see paper* the number is in that "
            "table; we do not quote figures we could not check against the source. dni-pytorch's examples "
            "(`examples/mnist-mlp`, `mnist-cnn`, `mnist-full-unlock`, `rnn`) give commands but report no numbers "
            "(*not reported*).")


# ---------------------------------------------------------------------------
def load_logs(runs: str) -> List[dict]:
    logs = []
    for path in sorted(glob.glob(os.path.join(runs, "*.json"))):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if "example" in d and d.get("runs") and not d.get("finished"):
            print(f"skipping {path}: the run has not finished", file=sys.stderr)
        elif "example" in d and d.get("runs"):
            d["_path"] = path
            d["_mtime"] = os.path.getmtime(path)
            logs.append(d)
    return logs


DEFAULTS = {"loss": "mean", "synth_init": "zero"}


def latest(logs: List[dict], example: str, **config) -> Optional[dict]:
    """The most recent log of ``example`` whose configuration matches ``config``
    (settings not named must be the examples' defaults)."""
    want = {**DEFAULTS, **config}
    cands = [d for d in logs if d["example"] == example
             and all(d["config"].get(k, DEFAULTS.get(k)) == v for k, v in want.items())]
    return max(cands, key=lambda d: d["_mtime"]) if cands else None


def fmt(x, spec="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def method_of(variant: str) -> str:
    return variant.split()[0]


def schedule(d: dict) -> str:
    c = d["config"]
    bits = []
    if "data_name" in c:
        bits.append(f"data **{c['data_name']}** ({c.get('n_train')} train / {c.get('n_test')} test images)")
    if c.get("corpus"):
        bits.append(f"data **{c['corpus']}**")
    for key, name in (("epochs", "epochs"), ("batch_size", "batch"), ("lr", "Adam lr"), ("seed", "seed")):
        if key == "epochs" and d["example"] == "copy_task":
            continue  # the copy task's budget is in time steps
        if c.get(key) is not None:
            bits.append(f"{name} {c[key]}")
    if c.get("loss"):
        bits.append(f"loss `{c['loss']}`")
    if c.get("synth_init"):
        bits.append(f"synthesizer init `{c['synth_init']}`")
    m = d.get("machine", {})
    bits.append(f"{m.get('torch_threads', '?')} torch thread(s)")
    return "Schedule: " + ", ".join(bits) + f". Command: `python -m dni_fast.examples.{d['example']} " \
        + " ".join(d.get("argv", [])) + "`."


# ---------------------------------------------------------------------------
def curves_png(d: dict, out: str, name: str, title: str, y_key="test_acc", y_label="test error (%)",
               transform=lambda v: 100.0 - v, x_key="epoch", x_label="epoch") -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in d["runs"]:
        h = r["history"]
        m = method_of(r["variant"])
        kw = dict(label=LABEL.get(m, m) + (" " + " ".join(r["variant"].split()[1:]) if " " in r["variant"] else ""),
                  color=COLOR.get(m) if len(d["runs"]) <= 3 else None)
        axes[0].plot(h[x_key], [transform(v) for v in h[y_key]], **kw)
        if any(c is not None for c in h.get("cos", [])):
            xs = [x for x, c in zip(h[x_key], h["cos"]) if c is not None]
            axes[1].plot(xs, [c for c in h["cos"] if c is not None], **kw)
    axes[0].set_xlabel(x_label)
    axes[0].set_ylabel(y_label)
    axes[0].set_title(title)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel(x_label)
    axes[1].set_ylabel("cos(synthetic, true gradient)")
    axes[1].set_title("synthetic gradient quality (mean over interfaces)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def classifier_section(d: dict, out: str, title: str, png: Optional[str], what: str) -> str:
    s = [f"## {title}\n", what + "\n", schedule(d) + "\n"]
    rows = []
    for r in d["runs"]:
        m = method_of(r["variant"])
        rows.append([r["variant"].replace(m, LABEL.get(m, m), 1), fmt(r["test_acc"]), fmt(r["test_error"]),
                     fmt(r.get("best_test_acc")), fmt(r.get("final_cos"), "{:.3f}"), fmt(r["ms_per_step"]),
                     fmt(r["train_time_s"], "{:.0f}"), "see paper" if d["example"] == "mnist_fcn" else "not reported"])
    s.append(table(["variant", "test acc %", "test error %", "best test acc %", "cos(SG, g) at end", "ms/step",
                    "train s", "paper / dni-pytorch"], rows))
    if png:
        s.append(f"\n![{title}]({curves_png(d, out, png, title)})\n")
    return "\n".join(s) + "\n"


ABLATIONS = {
    "synth_init": ("default", "`--synth-init default`: `BasicSynthesizer`'s own init (as dni-pytorch)",
                   "`BasicSynthesizer` zeroes its output layer's weight but, like dni-pytorch, keeps `nn.Linear`'s "
                   "default bias, so its first synthetic gradients are a random constant, far larger than the true "
                   "gradients. The examples zero that bias too (`--synth-init zero`, the default), so that synthetic "
                   "gradients start at exactly zero, as in the paper."),
    "loss": ("sum", "`--loss sum`: the loss summed over the batch instead of averaged",
             "The examples backpropagate the loss averaged over the batch (`--loss mean`, the default, as "
             "dni-pytorch's examples). Adam's steps hardly depend on the loss scale, so plain backprop ends nearly the "
             "same either way, but the synthesizers' regression targets are `batch` times larger with the sum, "
             "while their Adam steps stay the same size. The table shows the effect on accuracy and on the "
             "alignment of synthetic and true gradients."),
}


def ablation_section(main: dict, logs: List[dict]) -> str:
    """The MLP's DNI and cDNI variants against runs that change one setting."""
    base = {r["variant"]: r for r in main["runs"]}
    out = []
    for key, (value, title, why) in ABLATIONS.items():
        alt = latest(logs, main["example"], **{key: value})
        if not alt:
            continue
        rows = []
        for r in alt["runs"]:
            v = r["variant"]
            b = base.get(v, {})
            rows.append([LABEL.get(v, v), fmt(b.get("test_acc")), fmt(r["test_acc"]),
                         fmt(b.get("final_cos"), "{:.3f}"), fmt(r.get("final_cos"), "{:.3f}")])
        out.append(f"### Ablation: {title}\n\n{why}\n\n" + schedule(alt) + "\n\n"
                   + table(["variant", "test acc %, defaults", f"test acc %, {key}={value}", "cos(SG, g), defaults",
                            f"cos(SG, g), {key}={value}"], rows) + "\n")
    return "\n".join(out)


def fcn_section(d: dict, out: str) -> str:
    c = d["config"]
    s = [f"## MNIST FCN, a DNI after every layer (`mnist_fcn`)\n",
         f"`N` linear layers: `N-1` hidden layers of 256 units with BatchNorm and ReLU, each followed by a "
         f"`BackwardInterface`, and the output layer. Synthesizers: `BasicSynthesizer` with "
         f"{c.get('synth_hidden')} hidden layer(s) of {c.get('synth_width')} units. The paper's schedule is "
         f"Adam 3e-5 over a far longer run; ours is the short one below.\n", schedule(d) + "\n"]
    by: Dict[str, Dict[str, dict]] = {}
    for r in d["runs"]:
        m, depth = r["variant"].split(" ", 1)
        by.setdefault(depth, {})[m] = r
    methods = [m for m in ("backprop", "dni", "cdni") if any(m in v for v in by.values())]
    rows = [[depth] + [fmt(v[m]["test_error"]) if m in v else "-" for m in methods] + ["see paper Table 1"]
            for depth, v in by.items()]
    s.append(table(["depth"] + [f"{LABEL[m]} test error %" for m in methods] + ["paper"], rows))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for m in methods:
        xs = [int(k.split("-")[0]) for k, v in by.items() if m in v]
        ax.plot(xs, [v[m]["test_error"] for v in by.values() if m in v], "o-", label=LABEL[m], color=COLOR[m])
    ax.set_xlabel("layers")
    ax.set_ylabel("test error (%)")
    ax.set_title("MNIST FCN, DNI after every layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mnist_fcn_depth.png"), dpi=110)
    plt.close(fig)
    s.append("\n![FCN test error against depth](mnist_fcn_depth.png)\n")
    return "\n".join(s) + "\n"


def quickstart_section(d: dict) -> str:
    s = ["## Quickstart (`python -m dni_fast.examples.quickstart`)\n", schedule(d) + "\n"]
    rows = [[LABEL.get(r["variant"], r["variant"]), fmt(r["test_acc"]), fmt(r.get("final_cos"), "{:.3f}"),
             fmt(r["ms_per_step"]), fmt(r["train_time_s"], "{:.1f}")] for r in d["runs"]]
    s.append(table(["variant", "test acc %", "cos(SG, g) at end", "ms/step (training loop)", "train s"], rows))
    speed = d["summary"].get("speed")
    if speed:
        s.append(f"\nTraining-step time of the same DNI MLP per backend (batch {d['summary'].get('speed_batch_size')}, "
                 f"one fixed batch, median of 3 blocks), measured in the same process:\n")
        s.append(table(["backend", "ms/step", "speed-up vs reference", "time vs plain backprop", "note"],
                       [[r["backend"], fmt(r.get("ms_per_step"), "{:.3f}"),
                         fmt(r.get("speedup_vs_reference"), "{:.2f}x"), fmt(r.get("vs_backprop"), "{:.2f}x"),
                         r.get("note", "")] for r in speed]))
    total = d["summary"].get("total_time_s")
    if total:
        s.append(f"\nTraining time of the three variants together: {total:.0f} s.\n")
    return "\n".join(s) + "\n"


def ptb_section(d: dict, out: str) -> str:
    c = d["config"]
    level = c["level"]
    unit = "bpc" if level == "char" else "ppl"
    name = "bits per character" if unit == "bpc" else "perplexity"
    s = [f"## Penn Treebank, {level} level (`ptb_lm --level {level}`): {name}\n",
         f"LSTM {c.get('layers')}x{c.get('hidden')}, embedding {c.get('emb')}, truncated BPTT with T steps, "
         f"without and with a synthetic gradient at each truncation (`BackwardInterface` with "
         f"`BasicSynthesizer(n_hidden={c.get('synth_hidden')})` on `[h, c]`, synthetic gradient scaled by "
         f"{c.get('sg_factor')}). Trained on the first {fmt(d['runs'][0].get('train_tokens'), '{:,}')} training "
         f"tokens (in {c.get('batch_size')} parallel streams), validated and tested on the first "
         f"{fmt(c.get('eval_tokens'), '{:,}') if c.get('eval_tokens') else 'all'} tokens of each split.\n",
         schedule(d) + "\n"]
    by: Dict[int, Dict[str, dict]] = {}
    for r in d["runs"]:
        by.setdefault(r["bptt"], {})[r["method"]] = r
    rows = []
    for T, v in sorted(by.items()):
        rows.append([str(T)] + [fmt(v[m]["test_metric"], "{:.3f}") if m in v else "-" for m in ("bptt", "dni")]
                    + [fmt(v["dni"].get("final_cos"), "{:.3f}") if "dni" in v else "-"]
                    + [fmt(v[m]["ms_per_step"]) if m in v else "-" for m in ("bptt", "dni")]
                    + ["see paper" if level == "char" else "not reported"])
    s.append(table(["T", f"BPTT test {unit}", f"DNI test {unit}", "cos(SG, g) at end", "BPTT ms/step",
                    "DNI ms/step", "paper"], rows))
    s.append("\n" + compare_line(by, "test_metric", lower_is_better=True, what=f"test {unit}") + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    Ts = sorted(by)
    for m in ("bptt", "dni"):
        xs = [T for T in Ts if m in by[T]]
        axes[0].plot(xs, [by[T][m]["test_metric"] for T in xs], "o-", label=LABEL[m], color=COLOR[m])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(Ts, [str(t) for t in Ts])
    axes[0].set_xlabel("truncation length T")
    axes[0].set_ylabel(f"test {unit}")
    axes[0].set_title(f"PTB {level}: test {unit} against T")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    for r in d["runs"]:
        h = r["history"]
        axes[1].plot(h["tokens"], h["valid_metric"], label=r["variant"].replace("bptt", "BPTT").replace("dni", "DNI"),
                     linestyle="-" if r["dni"] else "--", color=_t_color(Ts, r["bptt"]))
    axes[1].set_xlabel("training tokens")
    axes[1].set_ylabel(f"validation {unit}")
    axes[1].set_title("learning curves")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = f"ptb_{level}_{unit}.png"
    fig.savefig(os.path.join(out, png), dpi=110)
    plt.close(fig)
    s.append(f"\n![PTB {level}]({png})\n")
    return "\n".join(s) + "\n"


def compare_line(by: Dict[int, Dict[str, dict]], key: str, lower_is_better: bool, what: str) -> str:
    """Where DNI beat, tied or lost to BPTT, from the logs (single seed)."""
    better, same, worse = [], [], []
    for T, v in sorted(by.items()):
        if "bptt" not in v or "dni" not in v:
            continue
        a, b = v["bptt"][key], v["dni"][key]
        (same if a == b else better if (b < a) == lower_is_better else worse).append(f"T={T}")
    parts = [f"{lbl} at {', '.join(x)}" for lbl, x in (("DNI better", better), ("equal", same), ("BPTT better", worse))
             if x]
    return f"On {what} (one seed each): " + "; ".join(parts) + "."


def copy_section(d: dict, out: str) -> str:
    c = d["config"]
    s = ["## Copy task (`copy_task`): longest sequence solved\n",
         f"LSTM {c.get('hidden')}, {c.get('n_symbols')} symbols, curriculum from length 1, next length once the last "
         f"{c.get('window')} episodes average under {c.get('threshold')} wrong symbols per sequence; "
         f"{fmt(c.get('timesteps'), '{:,}')} time steps of training per run (the same for every T). Synthetic "
         f"gradient scaled by {c.get('sg_factor')}.\n", schedule(d) + "\n"]
    by: Dict[int, Dict[str, dict]] = {}
    for r in d["runs"]:
        by.setdefault(r["bptt"], {})[r["method"]] = r
    rows = [[str(T)] + [str(v[m]["max_length"]) if m in v else "-" for m in ("bptt", "dni")]
            + [fmt(v[m]["train_time_s"], "{:.0f}") if m in v else "-" for m in ("bptt", "dni")] + ["see paper"]
            for T, v in sorted(by.items())]
    s.append(table(["T", "BPTT longest L", "DNI longest L", "BPTT train s", "DNI train s", "paper"], rows))
    s.append("\n" + compare_line(by, "max_length", lower_is_better=False, what="longest length solved") + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    Ts = sorted(by)
    w = 0.38
    for i, m in enumerate(("bptt", "dni")):
        axes[0].bar([j + (i - 0.5) * w for j in range(len(Ts))], [by[T][m]["max_length"] if m in by[T] else 0
                                                                  for T in Ts], w, label=LABEL[m], color=COLOR[m])
    axes[0].set_xticks(range(len(Ts)), [f"T={T}" for T in Ts])
    axes[0].set_ylabel("longest copy length solved")
    axes[0].set_title("copy task")
    axes[0].legend()
    axes[0].grid(alpha=0.3, axis="y")
    for r in d["runs"]:
        h = r["history"]
        axes[1].step([0] + h["timesteps"] + [r["timesteps"]], [0] + h["length"] + [r["max_length"]], where="post",
                     label=r["variant"].replace("bptt", "BPTT").replace("dni", "DNI"),
                     linestyle="-" if r["dni"] else "--", color=_t_color(Ts, r["bptt"]))
    axes[1].set_xlabel("training time steps")
    axes[1].set_ylabel("length solved")
    axes[1].set_title("curriculum progress")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "copy_task.png"), dpi=110)
    plt.close(fig)
    s.append("\n![copy task](copy_task.png)\n")
    return "\n".join(s) + "\n"


def _t_color(Ts: List[int], T: int):
    """One colour per truncation length (solid: DNI, dashed: BPTT)."""
    return plt.get_cmap("viridis")(Ts.index(T) / max(len(Ts) - 1, 1) * 0.85)


# ---------------------------------------------------------------------------
def machine_line(logs: List[dict]) -> str:
    m = max(logs, key=lambda d: d["_mtime"]).get("machine", {})
    threads = sorted({str(d.get("machine", {}).get("torch_threads")) for d in logs})
    return (f"Machine: {m.get('cpu_count')}-core CPU (`{m.get('processor')}`, {m.get('platform')}), no GPU; "
            f"Python {m.get('python')}, torch {m.get('torch')}, dni_fast {m.get('dni_fast')}. The runs used "
            f"{'/'.join(threads)} torch thread(s) (`OMP_NUM_THREADS=1`: the machine was shared) and the `auto` "
            f"backend unless stated; backends available: {', '.join(m.get('available_backends', []))}.")


def build(logs: List[dict], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    parts = ["# Results\n",
             "Generated by `python scripts/make_results.py` from the JSON logs that the examples write to `runs/` "
             "(`--log`). Every number below comes from those runs; rerun the commands shown to reproduce them. "
             f"The method is from {PAPER}; the API is dni-pytorch's.\n",
             machine_line(logs) + "\n",
             "Each run is a single seed, on short schedules that fit a shared 2-core CPU, so differences of a few "
             "tenths of a percent are within noise. Accuracies are on the test split after the last step; "
             "`cos(SG, g)` is the mean cosine similarity between the synthetic and the true gradient over the "
             "last stretch of training (`interface.stats()`), averaged over the interfaces.\n",
             REF_NOTE + "\n"]
    d = latest(logs, "quickstart")
    if d:
        parts.append(quickstart_section(d))
    d = latest(logs, "mnist_mlp")
    if d:
        parts.append(classifier_section(
            d, out, "MNIST MLP, update unlock (`mnist_mlp`)", "mnist_mlp_curves.png",
            "784-256-256-10 with BatchNorm; a `BackwardInterface(BasicSynthesizer(256, n_hidden=1))` after each "
            "hidden layer (before its ReLU). cDNI also gives the synthesizers the one-hot label."))
        parts.append(ablation_section(d, logs))
    d = latest(logs, "mnist_fcn")
    if d:
        parts.append(fcn_section(d, out))
    d = latest(logs, "mnist_cnn")
    if d:
        parts.append(classifier_section(
            d, out, "MNIST CNN with a convolutional synthesizer (`mnist_cnn`)", "mnist_cnn_curves.png",
            "Two conv blocks and two FC layers with BatchNorm; a `BackwardInterface` with a custom "
            "`ConvSynthesizer` (5x5 convolutions, zero-initialised output) after each conv block."))
    d = latest(logs, "mnist_full_unlock")
    if d:
        parts.append(classifier_section(
            d, out, "MNIST MLP, complete unlock (`mnist_full_unlock`)", "mnist_full_unlock_curves.png",
            "784-256-256-10; a `BidirectionalInterface` between the last hidden layer and the output layer: the "
            "output layer trains on a synthetic input predicted from the image, the layers below on a synthetic "
            "gradient."))
    for level in ("char", "word"):
        d = latest(logs, "ptb_lm", level=level)
        if d:
            parts.append(ptb_section(d, out))
    d = latest(logs, "copy_task")
    if d:
        parts.append(copy_section(d, out))
    order = ["quickstart", "mnist_mlp", "mnist_fcn", "mnist_cnn", "mnist_full_unlock", "ptb_lm", "copy_task"]
    logs_sorted = sorted(logs, key=lambda x: (order.index(x["example"]) if x["example"] in order else 99, x["_mtime"]))
    parts.append("## Reproduce\n\nFrom the repository root, with the data in `../shared/data` or `$DNI_FAST_DATA` "
                 "(`--log` paths as used for this page):\n\n```sh\nexport OMP_NUM_THREADS=1\n"
                 + "\n".join(f"python -m dni_fast.examples.{x['example']} " + " ".join(x.get("argv", []))
                             for x in logs_sorted)
                 + "\npython scripts/make_results.py\n```\n\nLogs used: "
                 + ", ".join(f"`{os.path.basename(x['_path'])}` ({x.get('finished', x.get('started'))})"
                             for x in logs_sorted) + ".\n")
    page = "\n".join(parts)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(page)
    return page


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs", help="folder with the examples' JSON logs")
    p.add_argument("--out", default="docs", help="where results.md and the PNGs go")
    args = p.parse_args(argv)
    logs = load_logs(args.runs)
    if not logs:
        raise SystemExit(f"no example logs in {args.runs}/ (run the examples with --log {args.runs}/NAME.json)")
    build(logs, args.out)
    print(f"wrote {os.path.join(args.out, 'results.md')} from {len(logs)} log(s)")


if __name__ == "__main__":
    main()
