#!/usr/bin/env python
"""Build docs/results.md and its plots from the examples' JSON logs.

    python scripts/make_results.py [--runs docs/logs/results] [--out docs]

Every number on the page comes from a log; nothing is typed in by hand. The
logs are committed (docs/logs/results/), so the page rebuilds without
rerunning anything. A log's file name is ``<group>_s<seed>.json``: the runs
of one group differ only in their seed, and each row of the page is the mean
and sample standard deviation over a group's seeds.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
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
# Logs and seeds
# ---------------------------------------------------------------------------
SEED_RE = re.compile(r"^(?P<group>.+)_s(?P<seed>\d+)\.json$")


def load_logs(runs: str) -> List[dict]:
    """Every finished example log in ``runs`` named ``<group>_s<seed>.json``."""
    logs = []
    for path in sorted(glob.glob(os.path.join(runs, "*.json"))):
        m = SEED_RE.match(os.path.basename(path))
        if not m:
            print(f"skipping {path}: not named <group>_s<seed>.json", file=sys.stderr)
            continue
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if "example" not in d or not d.get("runs"):
            continue
        if not d.get("finished"):
            print(f"skipping {path}: the run has not finished", file=sys.stderr)
            continue
        d["_path"], d["_group"], d["_seed"] = path, m["group"], int(m["seed"])
        logs.append(d)
    return logs


def groups(logs: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for d in sorted(logs, key=lambda d: d["_seed"]):
        out.setdefault(d["_group"], []).append(d)
    return out


def by_variant_seed(ds: List[dict]) -> Dict[str, Dict[int, dict]]:
    """``{variant: {seed: run}}``, seeds in increasing order: runs of two variants are paired by their seed,
    never by their position (a log missing a variant must not shift the others)."""
    out: Dict[str, Dict[int, dict]] = {}
    for d in sorted(ds, key=lambda d: d["_seed"]):
        for r in d["runs"]:
            out.setdefault(r["variant"], {})[d["_seed"]] = r
    return out


def warn(msg: str) -> None:
    print(f"make_results: warning: {msg}", file=sys.stderr)


def _unpaired(what: str, a: Dict[int, dict], b: Dict[int, dict], name_a: str, name_b: str) -> None:
    """Warn about the seeds that have a run of one of two paired variants but not of the other."""
    for seed in sorted(set(a) ^ set(b)):
        has, lacks = (name_a, name_b) if seed in a else (name_b, name_a)
        warn(f"{what}: seed {seed} has {has} but no {lacks}; left out of the paired difference")


# ---------------------------------------------------------------------------
# Versions: the logs did not all run on the same torch
# ---------------------------------------------------------------------------
def _machine_value(d: dict, key: str) -> str:
    v = d.get("machine", {}).get(key)
    return "?" if v is None else str(v)


def _by_value(ds: List[dict], key: str) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for d in sorted(ds, key=lambda d: d.get("_seed", 0)):
        out.setdefault(_machine_value(d, key), []).append(d)
    return dict(sorted(out.items()))


def version_text(ds: List[dict], key: str = "torch", name: str = "torch") -> str:
    """``"torch X"``, or, where the seeds of ``ds`` ran on different versions, each version with its seeds."""
    by = _by_value(ds, key)
    if len(by) == 1:
        return f"{name} {next(iter(by))}"
    return f"{name} " + ", ".join(
        f"{v} (seed{'s' if len(xs) > 1 else ''} {', '.join(str(x['_seed']) for x in xs)})" for v, xs in by.items())


def timing_note(row_groups) -> str:
    """A warning for a table whose ms/step cells come from logs run on different torch versions (``row_groups``:
    ``(label of the rows, logs)``; label ``""``: the unmarked rows); ``""`` where they all ran on one."""
    row_groups = [(label, ds) for label, ds in row_groups if ds]
    if len({_machine_value(d, "torch") for _, ds in row_groups for d in ds}) < 2:
        return ""
    if len(row_groups) == 1:
        who = [f"the rows ran on {version_text(row_groups[0][1])}"]
    else:
        who = [(f"the rows marked *{label}* on " if label else "the unmarked rows ran on ") + version_text(ds)
               for label, ds in row_groups]
    mixed = any(len(_by_value(ds, "torch")) > 1 for _, ds in row_groups)
    return (" **ms/step mixes torch versions:** " + ", ".join(who) + "; timings from different torch versions are "
            "not comparable, so compare ms/step only between rows run on the same version"
            + (" (a row whose seeds ran on different versions averages across them)" if mixed else "") + ".")


def mean_std(xs: List[float]):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _not_finite(xs: List[float]) -> int:
    """Seeds whose value is missing or NaN (a diverged run: mean_std leaves them out, the page must not)."""
    return sum(1 for x in xs if x is None or (isinstance(x, float) and not math.isfinite(x)))


def pm(xs: List[float], spec: str = "{:.2f}") -> str:
    m, s, n = mean_std(xs)
    if m is None:
        return "-"
    out = f"{spec.format(m)} ± {spec.format(s)}" if n > 1 else spec.format(m)
    bad = _not_finite(xs)
    return out + (f" ({bad} of {len(xs)} seeds diverged, left out)" if bad else "")


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


def compare(a: List[float], b: List[float], lower_is_better: bool, name_a: str, name_b: str) -> str:
    """Which of two sets of seeds is better: only where the difference of the
    means exceeds both standard deviations ("beyond 2 std" where it exceeds
    twice the larger one); else "within noise"."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if ma is None or mb is None:
        return "-"
    bad = _not_finite(a) + _not_finite(b)
    if bad:  # a diverged seed is a result too: no claim rests on the seeds that happened to survive
        return f"no claim: {bad} seed{'s' if bad > 1 else ''} diverged"
    diff = abs(ma - mb)
    if diff <= max(sa, sb) or min(na, nb) < 2:
        return f"within noise (diff {diff:.3g})" if min(na, nb) >= 2 else "one seed: no claim"
    better = name_b if (mb < ma) == lower_is_better else name_a
    strength = "beyond 2 std" if diff > 2 * max(sa, sb) else "beyond 1 std, within 2"
    return f"{better} better ({strength}: diff {diff:.3g}, std {sa:.2g} / {sb:.2g})"


#: Groups whose logs may predate a flag: (group suffix, the flag's arguments, why the log lacks it). Such a
#: log ran when the flag's settings were the example's defaults: its command is shown with the flag (which
#: reproduces it now), and the schedule says so.
PREDATES_FLAG = (
    ("_dnipytorch", ["--dni-pytorch"], "ran before the example's defaults changed, without `--dni-pytorch`; "
                                       "their logged settings are the flag's"),
    ("_basic", ["--synth", "mlp"], "ran while the `BasicSynthesizer` was the example's default, so without "
                                   "`--synth mlp`, and were logged under the default's name, renamed since; the "
                                   "flag reproduces them: checked bit for bit on a short run"),
)


def _missing_flag(d: dict):
    """``(flag arguments, why)`` when ``d``'s group is in ``PREDATES_FLAG`` and its argv lacks the flag."""
    return next(((args, why) for suffix, args, why in PREDATES_FLAG
                 if d.get("_group", "").endswith(suffix) and args[0] not in d.get("argv", [])), None)


def command(d: dict) -> str:
    argv = list(d.get("argv", []))
    if "--log" in argv and d.get("_path"):  # where the log is now (a file renamed after the run)
        i = argv.index("--log") + 1
        if i < len(argv):
            argv[i] = os.path.join(os.path.dirname(argv[i]), os.path.basename(d["_path"]))
    missing = _missing_flag(d)
    if missing:
        argv += missing[0]
    return f"python -m dni_fast.examples.{d['example']} " + " ".join(argv)


def seeds_line(ds: List[dict]) -> str:
    return f"{len(ds)} seed{'s' if len(ds) != 1 else ''} ({', '.join(str(d['_seed']) for d in ds)})"


def schedule(ds: List[dict]) -> str:
    d = ds[0]
    c = d["config"]
    bits = []
    if "data_name" in c:
        bits.append(f"data **{c['data_name']}** ({c.get('n_train')} train / {c.get('n_test')} test images)")
    if c.get("corpus"):
        bits.append(f"data **{c['corpus']}**")
    for key, name in (("epochs", "epochs"), ("batch_size", "batch"), ("lr", "Adam lr")):
        if key == "epochs" and d["example"] == "copy_task":
            continue  # the copy task's budget is in time steps
        if c.get(key) is not None:
            bits.append(f"{name} {c[key]}")
    # mnist_mlp's logs from before it had --synth ran the BasicSynthesizer, its only synthesizer then.
    synth = c.get("synth", "mlp" if d["example"] == "mnist_mlp" else None)
    if synth == "ridge":
        bits.append(f"synthesizer `RidgeSynthesizer(forget={c.get('synth_forget')}, ridge={c.get('synth_ridge')})`")
    elif synth == "mlp":
        bits.append("synthesizer `BasicSynthesizer`")
    for key, name in (("lr_schedule", "lr schedule"), ("synth_lr_mult", "synthesizer lr multiplier"),
                      ("normalize_targets", "normalize_targets"), ("sg_factor", "sg factor"), ("loss", "loss"),
                      ("synth_init", "synthesizer init")):
        if c.get(key) is not None:
            bits.append(f"{name} `{c[key]}`")
    m = d.get("machine", {})
    bits.append(f"{m.get('torch_threads', '?')} torch thread(s)")
    bits.append(version_text(ds))
    if len(_by_value(ds, "python")) > 1:
        bits.append(version_text(ds, "python", "Python"))
    cmds = sorted({command(x).replace(f"--seed {x['_seed']}", "--seed S").replace(f"_s{x['_seed']}.json", "_sS.json")
                   for x in ds})
    note = ""
    for _, _, why in PREDATES_FLAG:
        early = [x for x in ds if (_missing_flag(x) or (None, None))[1] == why]
        if early:
            note += f" (seed{'s' if len(early) > 1 else ''} {', '.join(str(x['_seed']) for x in early)} {why})"
    return ("Schedule: " + ", ".join(bits) + f"; {seeds_line(ds)}. Command"
            + ("" if len(cmds) == 1 else "s") + ": " + "; ".join(f"`{c}`" for c in cmds) + note + ".")


def by_variant(ds: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for d in ds:
        for r in d["runs"]:
            out.setdefault(r["variant"], []).append(r)
    return out


def _band(ax, xs, ys_list, **kw):
    """Mean curve with a ±1 std band over seeds (curves cut to the shortest)."""
    n = min(len(y) for y in ys_list)
    cols = [[y[i] for y in ys_list] for i in range(n)]
    mu = [mean_std(c)[0] for c in cols]
    sd = [mean_std(c)[1] or 0.0 for c in cols]
    xs = xs[:n]
    ok = [i for i in range(n) if mu[i] is not None]
    line, = ax.plot([xs[i] for i in ok], [mu[i] for i in ok], **kw)
    ax.fill_between([xs[i] for i in ok], [mu[i] - sd[i] for i in ok], [mu[i] + sd[i] for i in ok],
                    color=line.get_color(), alpha=0.2, lw=0)
    return line


# ---------------------------------------------------------------------------
# Classifiers (MLP, CNN, full unlock, quickstart)
# ---------------------------------------------------------------------------
def classifier_section(ds: List[dict], out: str, title: str, png: Optional[str], what: str,
                       baseline: Optional[List[dict]] = None, baseline_label: str = "dni-pytorch settings") -> str:
    s = [f"## {title}\n", what + "\n", schedule(ds) + "\n"]
    if baseline:
        s.append(f"Rows marked *{baseline_label}*: " + schedule(baseline) + "\n")
    rows = []

    def add_rows(group: List[dict], suffix: str):
        bp = {d["_seed"]: r["test_acc"] for d in group for r in d["runs"] if method_of(r["variant"]) == "backprop"}
        for v, runs in by_variant(group).items():
            m = method_of(v)
            seeds = [d["_seed"] for d in group for r in d["runs"] if r["variant"] == v]
            gaps = [_minus(bp[sd], r["test_acc"]) for sd, r in zip(seeds, runs) if sd in bp]
            # a diverged run logs None for its accuracies: the best is over the evaluations that have one
            drop = [_minus(max((a for a in r["history"]["test_acc"] if a is not None), default=None), r["test_acc"])
                    for r in runs]
            rows.append([v.replace(m, LABEL.get(m, m), 1) + suffix, pm([r["test_acc"] for r in runs]),
                         "-" if m == "backprop" else pm(gaps), pm(drop),
                         "-" if m == "backprop" else pm([r.get("final_cos") for r in runs], "{:.3f}"),
                         pm([r["ms_per_step"] for r in runs]), str(len(runs))])

    add_rows(ds, "")
    if baseline:
        add_rows(baseline, f" ({baseline_label})")
    s.append(table(["variant", "test acc %", "gap to backprop (points)", "drop from its best test acc",
                    "cos(SG, g) at end", "ms/step (shared machine)", "seeds"], rows))
    s.append("\nGap to backprop: per seed, backprop's test accuracy minus the variant's (same seed, same data order, "
             "same settings); "
             "drop: the best test accuracy seen during training minus the final one (0 when the run ends at its best). "
             "cos(SG, g): the mean over the interfaces and over the last evaluation interval."
             + timing_note([("", ds)] + ([(baseline_label, baseline)] if baseline else [])) + "\n")
    if png:
        s.append(f"\n![{title}]({curves_png(ds, baseline, out, png, title, baseline_label)})\n")
    return "\n".join(s) + "\n"


def curves_png(ds, baseline, out, name, title, baseline_label) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for src, style, suffix in ((ds, "-", ""), (baseline or [], "--", f" ({baseline_label})")):
        for v, runs in by_variant(src).items():
            m = method_of(v)
            label = v.replace(m, LABEL.get(m, m), 1) + suffix
            x = runs[0]["history"]["epoch"]
            _band(axes[0], x, [[_minus(100.0, a) for a in r["history"]["test_acc"]] for r in runs], label=label,
                  linestyle=style, color=COLOR.get(m))
            if m != "backprop":
                _band(axes[1], x, [r["history"]["cos"] for r in runs], label=label, linestyle=style,
                      color=COLOR.get(m))
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test error (%)")
    axes[0].set_title(title.split(" (")[0] + ": mean ± std over seeds", fontsize=9)
    axes[0].set_yscale("log")
    lo, hi = axes[0].get_ylim()
    axes[0].set_yticks([t for t in (0.5, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50) if lo <= t <= hi])
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("cos(synthetic, true gradient)")
    axes[1].set_title("synthetic gradient quality (mean over interfaces)", fontsize=9)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=100)
    plt.close(fig)
    return name


def _fcn_synth(c: dict) -> str:
    return ("`RidgeSynthesizer`" if c.get("synth") == "ridge" else
            f"`BasicSynthesizer` with {c.get('synth_hidden')} hidden layer(s) of {c.get('synth_width')} units")


def fcn_section(ds: List[dict], out: str, basic: Optional[List[dict]] = None) -> str:
    """The FCN table (and its gap figure) from ``ds``; ``basic``: the same runs with the ``BasicSynthesizer``,
    a second table."""
    s = ["## MNIST FCN, a DNI after every layer (`mnist_fcn`)\n",
         f"`N` linear layers: `N-1` hidden layers of 256 units with BatchNorm and ReLU, each followed by a "
         f"`BackwardInterface`, and the output layer. Synthesizers: {_fcn_synth(ds[0]['config'])}. The paper's "
         f"schedule is Adam 3e-5 over 500k steps; ours is the short one below.\n", schedule(ds) + "\n"]
    depths, rows = _fcn_rows(ds)
    s.append(table(FCN_COLS, rows))
    if basic:
        s.append(f"\nThe same nets with the {_fcn_synth(basic[0]['config'])} (`--synth mlp`). {schedule(basic)}\n")
        s.append(table(FCN_COLS, _fcn_rows(basic)[1]))
    _fcn_figure(depths, out)
    s.append("\n![FCN gap to backprop against training steps](mnist_fcn_gap.png)\n")
    return "\n".join(s) + "\n"


FCN_COLS = ["depth", "backprop test error %", "DNI test error %", "cDNI test error %", "DNI gap", "cDNI gap",
            "cDNI gap <= DNI gap / 2", "DNI cos", "cDNI cos"]


def _fcn_rows(ds: List[dict]):
    """The FCN table's rows, and ``{depth: {method: {seed: run}}}``: a gap is a variant's test error minus
    backprop's of the same seed."""
    runs = by_variant_seed(ds)
    depths: Dict[str, Dict[str, Dict[int, dict]]] = {}
    for v, rs in runs.items():
        m, depth = v.split(" ", 1)
        depths.setdefault(depth, {})[m] = rs
    rows = []
    for depth, v in depths.items():
        bp = {sd: r["test_error"] for sd, r in v.get("backprop", {}).items()}
        for m in ("dni", "cdni"):
            if m in v:
                _unpaired(f"mnist_fcn {depth}", v.get("backprop", {}), v[m], "backprop", m)
        gap = {m: [_minus(r["test_error"], bp[sd]) for sd, r in v.get(m, {}).items() if sd in bp]
               for m in ("dni", "cdni")}
        gd, gc = mean_std(gap["dni"])[0], mean_std(gap["cdni"])[0]
        half = "-" if gd is None or gc is None else ("yes" if gc <= gd / 2 else f"no ({gc / gd:.2f} of DNI's)"
                                                     if gd > 0 else "no (DNI has no gap)")
        rows.append([depth] + [pm([r["test_error"] for r in v.get(m, {}).values()])
                               for m in ("backprop", "dni", "cdni")]
                    + [pm(gap["dni"]), pm(gap["cdni"]), half,
                       pm([r.get("final_cos") for r in v.get("dni", {}).values()], "{:.3f}"),
                       pm([r.get("final_cos") for r in v.get("cdni", {}).values()], "{:.3f}")])
    return depths, rows


def _fcn_figure(depths: Dict[str, Dict[str, Dict[int, dict]]], out: str) -> None:
    fig, axes = plt.subplots(1, len(depths), figsize=(3.4 * len(depths), 3.2), squeeze=False, sharey=True)
    for ax, (depth, v) in zip(axes[0], depths.items()):
        bp = v.get("backprop", {})
        for m in ("dni", "cdni"):
            rs = {sd: r for sd, r in v.get(m, {}).items() if sd in bp}  # paired by seed
            if not rs:
                continue
            curves = [[_minus(b, a) for a, b in zip(r["history"]["test_acc"], bp[sd]["history"]["test_acc"])]
                      for sd, r in rs.items()]
            _band(ax, next(iter(rs.values()))["history"]["step"], curves, label=LABEL[m], color=COLOR[m])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(depth, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error minus backprop's (points)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("MNIST FCN: gap to backprop over training, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mnist_fcn_gap.png"), dpi=100)
    plt.close(fig)


def quickstart_section(ds: List[dict]) -> str:
    s = ["## Quickstart (`python -m dni_fast.examples.quickstart`)\n", schedule(ds) + "\n"]
    rows = [[LABEL.get(v, v), pm([r["test_acc"] for r in rs]), pm([r.get("final_cos") for r in rs], "{:.3f}"),
             pm([r["ms_per_step"] for r in rs]), str(len(rs))] for v, rs in by_variant(ds).items()]
    s.append(table(["variant", "test acc %", "cos(SG, g) at end", "ms/step (training loop)", "seeds"], rows))
    note = timing_note([("", ds)])
    if note:
        s.append(note.strip() + "\n")
    d = next((x for x in ds if x["summary"].get("speed")), None)
    if d:
        speed = d["summary"]["speed"]
        s.append(f"\nTraining-step time of the same DNI MLP per backend (batch {d['summary'].get('speed_batch_size')}, "
                 f"one fixed batch), every backend timed side by side in one process, interleaved in blocks "
                 f"(`dni_fast.timing.time_many`: the VM's speed drifts), in seed {d['_seed']}'s run:\n")
        s.append(table(["backend", "ms/step", "speed-up vs reference", "time vs plain backprop", "note"],
                       [[r["backend"], fmt(r.get("ms_per_step"), "{:.3f}"),
                         fmt(r.get("speedup_vs_reference"), "{:.2f}x"), fmt(r.get("vs_backprop"), "{:.2f}x"),
                         r.get("note", "")] for r in speed]))
    return "\n".join(s) + "\n"


# ---------------------------------------------------------------------------
# Truncated BPTT: PTB and the copy task
# ---------------------------------------------------------------------------
def by_method_T(ds: List[dict]) -> Dict[int, Dict[str, List[dict]]]:
    out: Dict[int, Dict[str, List[dict]]] = {}
    for d in ds:
        for r in d["runs"]:
            out.setdefault(r["bptt"], {}).setdefault(r["method"], []).append(r)
    return out


def ptb_section(ds: List[dict], out: str, baseline: Optional[List[dict]] = None,
                control: Optional[List[dict]] = None) -> str:
    c = ds[0]["config"]
    level = c["level"]
    unit = "bpc" if level == "char" else "ppl"
    name = "bits per character" if unit == "bpc" else "perplexity"
    s = [f"## Penn Treebank, {level} level (`ptb_lm --level {level}`): {name}\n",
         f"LSTM {c.get('layers')}x{c.get('hidden')}, embedding {c.get('emb')}, truncated BPTT with T steps, "
         f"without and with a synthetic gradient at each truncation (`BackwardInterface` with "
         + ("a `RidgeSynthesizer`" if c.get("synth") == "ridge" else
            f"`BasicSynthesizer(n_hidden={c.get('synth_hidden')})`")
         + " on `[h, c]`). Trained on the first "
         f"{fmt(ds[0]['runs'][0].get('train_tokens'), '{:,}')} training tokens (in {c.get('batch_size')} parallel "
         f"streams), validated and tested on the first "
         f"{fmt(c.get('eval_tokens'), '{:,}') if c.get('eval_tokens') else 'all'} tokens of each split.\n",
         schedule(ds) + "\n"]
    if baseline:
        s.append("DNI with *dni-pytorch settings*: " + schedule(baseline) + "\n")
    by = by_method_T(ds)
    bb = by_method_T(baseline) if baseline else {}
    true_cos = _has_true_cos(ds)
    rows = []
    for T, v in sorted(by.items()):
        bpt = [r["test_metric"] for r in v.get("bptt", [])]
        dn = [r["test_metric"] for r in v.get("dni", [])]
        row = [str(T), pm(bpt, "{:.3f}"), pm(dn, "{:.3f}")]
        if bb:
            row.append(pm([r["test_metric"] for r in bb.get(T, {}).get("dni", [])], "{:.3f}"))
        row += [pm([r.get("final_cos") for r in v.get("dni", [])], "{:.3f}")]
        if true_cos:
            row.append(pm([r.get("final_true_cos") for r in v.get("dni", [])], "{:.3f}"))
        row.append(compare(bpt, dn, True, "BPTT", "DNI"))
        if bb:
            bd = bb.get(T, {})
            row += [pm([r.get("final_cos") for r in bd.get("dni", [])], "{:.3f}"),
                    compare([r["test_metric"] for r in bd.get("bptt", [])], [r["test_metric"] for r in bd.get("dni", [])],
                            True, "BPTT", "DNI (dni-pytorch settings)"),
                    " ".join(fmt(r["test_metric"], "{:.3f}") for r in bd.get("dni", []))]
        rows.append(row)
    hdr = ["T", f"BPTT test {unit}", f"DNI test {unit}"] + ([f"DNI test {unit} (dni-pytorch settings)"] if bb else []) \
        + ["DNI cos(SG, g) at the boundary"] + ([TRUE_COS_HEADER] if true_cos else []) + ["DNI vs BPTT"] \
        + (["cos, dni-pytorch settings", "dni-pytorch settings vs BPTT", "dni-pytorch settings, per seed"] if bb else [])
    s.append(table(hdr, rows))
    if control:
        cb = by_method_T(control)
        crow = []
        for T, v in sorted(cb.items()):
            dn = [r["test_metric"] for r in v.get("dni", [])]
            bpt = [r["test_metric"] for r in by.get(T, {}).get("bptt", [])]
            real = [r["test_metric"] for r in bb.get(T, {}).get("dni", [])]
            crow.append([str(T), pm(dn, "{:.3f}"), pm(real, "{:.3f}"), pm(bpt, "{:.3f}"),
                         compare(bpt, dn, True, "BPTT", "shuffled SG"), compare(real, dn, True, "real SG", "shuffled SG")])
        s.append("\n**Control: a shuffled synthetic gradient.** The same dni-pytorch settings, but the gradient injected "
                 "at each chunk's end is the synthesizer's prediction for *another* stream's state (`--sg-control "
                 "shuffle`): the same magnitudes and distribution, no information about this state. "
                 + schedule(control) + "\n")
        s.append(table(["T", f"shuffled SG test {unit}", f"real SG test {unit} (dni-pytorch settings)",
                        f"BPTT test {unit}", "shuffled vs BPTT", "shuffled vs real"], crow))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    Ts = sorted(by)
    for m, src, style, label in (("bptt", by, "-", "BPTT"), ("dni", by, "-", "DNI"),
                                 ("dni", bb, "--", "DNI (dni-pytorch settings)")):
        xs = [T for T in Ts if src.get(T, {}).get(m)]
        if not xs:
            continue
        mus = [mean_std([r["test_metric"] for r in src[T][m]]) for T in xs]
        axes[0].errorbar(xs, [u[0] for u in mus], yerr=[u[1] for u in mus], fmt="o" + style, capsize=3,
                         label=label, color=COLOR[m] if style == "-" else "tab:cyan")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(Ts, [str(t) for t in Ts])
    axes[0].set_xlabel("truncation length T")
    axes[0].set_ylabel(f"test {unit}")
    axes[0].set_title(f"PTB {level}: test {unit} against T (mean ± std)", fontsize=9)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for T in Ts:
        rs = by[T].get("dni", [])
        if rs:
            _band(axes[1], rs[0]["history"]["tokens"], [r["history"]["cos"] for r in rs], label=f"DNI T={T}",
                  color=_t_color(Ts, T))
        rs = bb.get(T, {}).get("dni", [])
        if rs:
            _band(axes[1], rs[0]["history"]["tokens"], [r["history"]["cos"] for r in rs],
                  label=f"T={T}, dni-pytorch settings", color=_t_color(Ts, T), linestyle="--")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xlabel("training tokens")
    axes[1].set_ylabel("cos(S, g) at the truncation boundary")
    axes[1].set_title("synthetic gradient quality", fontsize=9)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = f"ptb_{level}_{unit}.png"
    fig.savefig(os.path.join(out, png), dpi=100)
    plt.close(fig)
    s.append(f"\n![PTB {level}]({png})\n")
    return "\n".join(s) + "\n"


#: The column of the RNN sections for ``final_true_cos`` (the examples' BoundaryProbe: S against the chunk's own
#: gradient, without the carried synthetic part of the regression target).
TRUE_COS_HEADER = "DNI cos(SG, true g) at the boundary"


def _has_true_cos(ds: List[dict]) -> bool:
    return any(r.get("final_true_cos") is not None for d in ds for r in d["runs"])


def copy_section(ds: List[dict], out: str, baseline: Optional[List[dict]] = None) -> str:
    c = ds[0]["config"]
    s = ["## Copy task (`copy_task`): longest sequence solved\n",
         f"LSTM {c.get('hidden')}, {c.get('n_symbols')} symbols, curriculum from length 1, next length once the last "
         f"{c.get('window')} episodes average under {c.get('threshold')} wrong symbols per sequence; "
         f"{fmt(c.get('timesteps'), '{:,}')} time steps of training per run (the same for every T and method).\n",
         schedule(ds) + "\n"]
    if baseline:
        s.append("DNI with *dni-pytorch settings*: " + schedule(baseline) + "\n")
    by = by_method_T(ds)
    bb = by_method_T(baseline) if baseline else {}
    true_cos = _has_true_cos(ds)
    rows = []
    for T, v in sorted(by.items()):
        bpt = [r["max_length"] for r in v.get("bptt", [])]
        dn = [r["max_length"] for r in v.get("dni", [])]
        row = [str(T), pm(bpt, "{:.1f}"), pm(dn, "{:.1f}")]
        if bb:
            row.append(pm([r["max_length"] for r in bb.get(T, {}).get("dni", [])], "{:.1f}"))
        row.append(pm([r.get("final_cos") for r in v.get("dni", [])], "{:.3f}"))
        if true_cos:
            row.append(pm([r.get("final_true_cos") for r in v.get("dni", [])], "{:.3f}"))
        row += [compare(bpt, dn, False, "BPTT", "DNI"), " ".join(_copy_pair(d, T) for d in ds if _copy_pair(d, T))]
        rows.append(row)
    s.append(table(["T", "BPTT longest L", "DNI longest L"] + (["DNI longest L (dni-pytorch settings)"] if bb else [])
                   + ["DNI cos(SG, g) at the boundary"] + ([TRUE_COS_HEADER] if true_cos else [])
                   + ["DNI vs BPTT", "per seed (BPTT/DNI)"], rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    Ts = sorted(by)
    for d in ds:
        for r in d["runs"]:
            h = r["history"]
            axes[0].step([0] + h["timesteps"] + [r["timesteps"]], [0] + h["length"] + [r["max_length"]], where="post",
                         linestyle="-" if r["dni"] else "--", color=_t_color(Ts, r["bptt"]), alpha=0.8,
                         label=(f"{'DNI' if r['dni'] else 'BPTT'} T={r['bptt']}" if d is ds[0] else None))
            if r["dni"] and h.get("curves"):
                axes[1].plot(h["curves"]["timesteps"], h["curves"]["cos"], color=_t_color(Ts, r["bptt"]),
                             alpha=0.8, label=f"T={r['bptt']}" if d is ds[0] else None)
    axes[0].set_xlabel("training time steps")
    axes[0].set_ylabel("length solved")
    axes[0].set_title("curriculum progress (each seed a line; dashed: BPTT)", fontsize=9)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_xlabel("training time steps")
    axes[1].set_ylabel("cos(S, g) at the truncation boundary")
    axes[1].set_title("DNI's synthetic gradient quality (each seed a line)", fontsize=9)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "copy_task.png"), dpi=100)
    plt.close(fig)
    s.append("\n![copy task](copy_task.png)\n")
    return "\n".join(s) + "\n"


def _copy_pair(d: dict, T: int) -> str:
    """``"BPTT/DNI"`` longest lengths of one seed's log at ``T`` ("-" for a method it lacks; "" for neither)."""
    got = {r["method"]: r.get("max_length") for r in d["runs"] if r["bptt"] == T}
    if not got:
        return ""
    return "/".join("-" if got.get(m) is None else str(got[m]) for m in ("bptt", "dni"))


def _t_color(Ts: List[int], T: int):
    """One colour per truncation length."""
    return plt.get_cmap("viridis")(Ts.index(T) / max(len(Ts) - 1, 1) * 0.85)


# ---------------------------------------------------------------------------
# Issue 11's targets, met or missed, from the same logs
# ---------------------------------------------------------------------------
def _verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("**met**" if ok else "missed")


def _minus(a, b):
    """``a - b``, or ``None`` where either is missing (a diverged run's null)."""
    return None if a is None or b is None else a - b


def strict_mean_std(xs: List[float]):
    """``mean_std``, but ``(None, None, 0)`` when a seed is missing or diverged: a target is judged on every
    seed or not at all."""
    return (None, None, 0) if _not_finite(xs) else mean_std(xs)


def targets_section(g: Dict[str, List[dict]]) -> str:
    rows = []

    def cos_rows(group: str, label: str):
        for v, runs in by_variant(g.get(group, [])).items():
            m = method_of(v)
            if m == "backprop":
                continue
            need = 0.3 if m == "cdni" else 0.2
            mu = strict_mean_std([r.get("final_cos") for r in runs])[0]
            rows.append([f"{label}: cos(SG, g) at the end, {v.replace(m, LABEL[m], 1)}", f">= {need}", pm([r.get("final_cos") for r in runs],
                                                                                  "{:.3f}"),
                         _verdict(None if mu is None else mu >= need),
                         "" if mu is None or mu >= need else f"short by {need - mu:.3f}"])

    cos_rows("mnist_mlp", "MNIST MLP")
    cos_rows("mnist_cnn", "MNIST CNN")
    cos_rows("mnist_fcn", "MNIST FCN")
    for group, label in (("ptb_char", "PTB char"), ("copy_task", "copy task")):
        for T, v in sorted(by_method_T(g.get(group, [])).items()):
            rs = v.get("dni", [])
            if not rs:
                continue
            for key, what in (("final_cos", "cos(SG, g)"), ("final_true_cos", "cos(SG, true g)")):
                vals = [r.get(key) for r in rs]
                if all(x is None for x in vals):
                    continue  # logs from before the boundary probe
                mu = strict_mean_std(vals)[0]
                rows.append([f"{label}: {what} at the truncation boundary, T={T}", ">= 0.2", pm(vals, "{:.3f}"),
                             _verdict(None if mu is None else mu >= 0.2),
                             "" if mu is None or mu >= 0.2 else f"short by {0.2 - mu:.3f}"])
    ds = g.get("mnist_mlp", [])
    if ds:
        bp = {d["_seed"]: r["test_acc"] for d in ds for r in d["runs"] if r["variant"] == "backprop"}
        for v, need in (("cdni", 0.3), ("dni", 1.0)):
            gaps = [_minus(bp[d["_seed"]], r["test_acc"]) for d in ds for r in d["runs"] if r["variant"] == v
                    and d["_seed"] in bp]
            mu = strict_mean_std(gaps)[0]
            if mu is not None:
                rows.append([f"MNIST MLP, {ds[0]['config'].get('epochs')} epochs: {LABEL[v]} gap to backprop "
                             f"(points)", f"<= {need}", pm(gaps), _verdict(mu <= need),
                             "" if mu <= need else f"over by {mu - need:.2f}"])
        for v in ("dni", "cdni"):
            drops = [_minus(max((a for a in r["history"]["test_acc"] if a is not None), default=None), r["test_acc"])
                     for d in ds for r in d["runs"] if r["variant"] == v]
            mu = strict_mean_std(drops)[0]
            if mu is not None:
                rows.append([f"MNIST MLP: no degradation, {LABEL[v]} (best test acc during training minus final)",
                             "<= 0.2 (evaluation noise)", pm(drops), _verdict(mu <= 0.2),
                             "" if mu <= 0.2 else f"over by {mu - 0.2:.2f}"])
    for group, suffix in (("ptb_char", ""), ("ptb_char_dnipytorch", " (dni-pytorch settings)")):
        for T, v in sorted(by_method_T(g.get(group, [])).items()):
            a = [r["test_metric"] for r in v.get("bptt", [])]
            b = [r["test_metric"] for r in v.get("dni", [])]
            if a and b:
                (ma, sa, _), (mb, sb, _) = strict_mean_std(a), strict_mean_std(b)
                if ma is None or mb is None:
                    rows.append([f"PTB char, T={T}: DNI{suffix} test bpc below BPTT's beyond 2 std",
                                 "BPTT - DNI > 2 std", "a seed diverged", _verdict(False), "no claim"])
                    continue
                ok = ma - mb > 2 * max(sa, sb) and min(len(a), len(b)) >= 3
                rows.append([f"PTB char, T={T}: DNI{suffix} test bpc below BPTT's beyond 2 std", "BPTT - DNI > 2 std",
                             f"{ma - mb:+.3f} (std {sa:.3f} / {sb:.3f})", _verdict(ok),
                             "" if ok else f"difference {ma - mb:+.3f} against 2 std = {2 * max(sa, sb):.3f}"])
    for T, v in sorted(by_method_T(g.get("copy_task", [])).items()):
        a = [r["max_length"] for r in v.get("bptt", [])]
        b = [r["max_length"] for r in v.get("dni", [])]
        if a and b:
            (ma, sa, _), (mb, sb, _) = strict_mean_std(a), strict_mean_std(b)
            ok = None if ma is None or mb is None else mb > ma + max(sa, sb)
            rows.append([f"copy task, T={T}: DNI solves a longer sequence than BPTT", "DNI L > BPTT L",
                         f"{pm(b, '{:.1f}')} vs {pm(a, '{:.1f}')}", _verdict(ok), ""])
    for group, label in (("mnist_fcn", "MNIST FCN"), ("mnist_cnn", "MNIST CNN")):
        runs = by_variant_seed(g.get(group, []))
        for v in runs:
            if not v.startswith("dni"):
                continue
            rest = v[3:]
            bpv, cv = "backprop" + rest, "cdni" + rest
            if bpv not in runs or cv not in runs:
                continue
            bp = runs[bpv]  # each gap pairs a variant's run with backprop's of the same seed
            if group == "mnist_cnn":  # (the FCN table has warned about its own)
                for w in (v, cv):
                    _unpaired(f"{group}{rest}", bp, runs[w], "backprop", w)
            gd = [_minus(r["test_error"], bp[sd]["test_error"]) for sd, r in runs[v].items() if sd in bp]
            gc = [_minus(r["test_error"], bp[sd]["test_error"]) for sd, r in runs[cv].items() if sd in bp]
            md, mc = strict_mean_std(gd)[0], strict_mean_std(gc)[0]
            ok = mc <= md / 2 if md is not None and mc is not None and md > 0 else None
            rows.append([f"{label}{rest}: cDNI's gap to backprop at most half of DNI's", "cDNI gap <= DNI gap / 2",
                         f"cDNI {pm(gc)} vs DNI {pm(gd)}", _verdict(ok),
                         "" if ok or ok is None else f"cDNI's gap is {mc / md:.2f} of DNI's"])
    if not rows:
        return ""
    return ("## Issue 11's targets\n\nComputed from the same logs (means over seeds; a target on a difference is met "
            "only beyond the stated noise).\n\n"
            + table(["target", "needed", "measured", "", "by how much"], rows) + "\n")


# ---------------------------------------------------------------------------
def _which_logs(ds: List[dict], every: Dict[str, List[dict]]) -> str:
    """The groups of ``ds`` (the logs with one value), each whole or with its seeds where only some have it."""
    out = []
    for group, xs in sorted(groups(ds).items()):
        whole = len(xs) == len(every.get(group, xs))
        out.append(f"`{group}`" + ("" if whole else f" (seed{'s' if len(xs) > 1 else ''} "
                                                    f"{', '.join(str(x['_seed']) for x in xs)})"))
    return ", ".join(out)


def _machine_field(logs: List[dict], key: str, name: str, show=lambda v: v) -> str:
    """``name value`` where every log agrees; else each value with the logs that had it."""
    by: Dict[str, List[dict]] = {}
    for d in logs:
        v = d.get("machine", {}).get(key)
        by.setdefault("?" if v is None else str(show(v)), []).append(d)
    if len(by) == 1:
        return f"{name} {next(iter(by))}"
    every = groups(logs)
    return " and ".join(f"{name} {v} ({len(xs)} logs: {_which_logs(xs, every)})" for v, xs in sorted(by.items()))


def machine_line(logs: List[dict]) -> str:
    threads = sorted({str(d.get("machine", {}).get("torch_threads")) for d in logs})
    by: Dict[tuple, List[dict]] = {}
    for d in logs:
        m = d.get("machine", {})
        by.setdefault((str(m.get("cpu_count")), str(m.get("processor")), str(m.get("platform"))), []).append(d)
    if len(by) == 1:
        n, proc, plat = next(iter(by))
        cpu = f"Machine: {n}-core CPU (`{proc}`, {plat}), no GPU"
    else:
        every = groups(logs)
        cpu = "Machines: " + "; ".join(f"{n}-core CPU (`{proc}`, {plat}) for {len(xs)} logs: {_which_logs(xs, every)}"
                                       for (n, proc, plat), xs in sorted(by.items())) + "; no GPU"
    torch = _machine_field(logs, "torch", "torch")
    one_torch = len({_machine_value(d, "torch") for d in logs}) == 1
    backends = _machine_field(logs, "available_backends", "backends available:", lambda v: ", ".join(v or []))
    return (f"{cpu}; {_machine_field(logs, 'python', 'Python')}, "
            + (f"{torch}, {_machine_field(logs, 'dni_fast', 'dni_fast')}" if one_torch else
               f"{_machine_field(logs, 'dni_fast', 'dni_fast')}; the logs ran on {torch} (each section's schedule "
               f"names its own)")
            + ". The runs used "
            f"{'/'.join(threads)} torch thread(s) (`OMP_NUM_THREADS=1`: the machine was shared) and the `auto` "
            f"backend unless stated; {backends}.")


MLP_WHAT = ("784-256-256-10 with BatchNorm; a `BackwardInterface` after each hidden layer (after its BatchNorm, "
            "before its ReLU), so the first layer learns from a synthesizer whose target is the second one's "
            "synthetic gradient, backpropagated. The synthesizer is a `RidgeSynthesizer(256)` (a linear map refitted "
            "in closed form; the example's default) or, in the rows marked *dni-pytorch settings*, dni-pytorch's "
            "`BasicSynthesizer(256, n_hidden=1)` trained by Adam on its regression loss. cDNI also gives the "
            "synthesizers the one-hot label. Settings chosen on a validation split: see "
            "docs/synthetic_gradients.md.")


def build(logs: List[dict], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    g = groups(logs)
    parts = ["# Results\n",
             "Generated by `python scripts/make_results.py` from the JSON logs committed in `docs/logs/results/` "
             "(each named `<group>_s<seed>.json`; the examples write them with `--log`). Every number below comes "
             "from those logs; rerun the commands shown to reproduce them. "
             f"The method is from {PAPER}; the API is dni-pytorch's. Why the synthetic gradients of the earlier "
             "page did not learn, and how the examples' defaults were chosen: docs/synthetic_gradients.md.\n",
             machine_line(logs) + "\n",
             "Every row is the mean ± the sample standard deviation over the seeds named beside it. A method is "
             "called better only where the difference of the means exceeds both standard deviations. Accuracies "
             "are on the test split after the last step (settings were chosen on a validation split held out of "
             "the training set, never on the test split); `cos(SG, g)` is the mean cosine similarity between the "
             "synthetic and the true gradient over the last evaluation interval (`interface.stats()`), averaged "
             "over the interfaces. At an RNN's truncation boundary that \"true gradient\" is the synthesizer's "
             "bootstrapped regression target (the chunk's own gradient plus the synthetic gradient injected at the "
             "chunk's end, carried back); `cos(SG, true g)` compares the synthetic gradient with the chunk's own "
             "gradient alone (the examples' `BoundaryProbe`; docs/synthetic_gradients.md, \"The true gradient at "
             "the boundary\").\n",
             REF_NOTE + "\n"]
    if "quickstart" in g:
        parts.append(quickstart_section(g["quickstart"]))
    if "mnist_mlp" in g:
        parts.append(classifier_section(g["mnist_mlp"], out, "MNIST MLP, update unlock (`mnist_mlp`)",
                                        "mnist_mlp_curves.png", MLP_WHAT, g.get("mnist_mlp_dnipytorch")))
    if "mnist_fcn" in g:
        parts.append(fcn_section(g["mnist_fcn"], out, g.get("mnist_fcn_basic")))
    if "mnist_cnn" in g:
        parts.append(classifier_section(
            g["mnist_cnn"], out, "MNIST CNN with a convolutional synthesizer (`mnist_cnn`)", "mnist_cnn_curves.png",
            "Two conv blocks and two FC layers with BatchNorm; a `BackwardInterface` with a custom "
            "`ConvSynthesizer` (5x5 convolutions, zero-initialised output) after each conv block.",
            g.get("mnist_cnn_dnipytorch")))
    if "mnist_full_unlock" in g:
        parts.append(classifier_section(
            g["mnist_full_unlock"], out, "MNIST MLP, complete unlock (`mnist_full_unlock`)",
            "mnist_full_unlock_curves.png",
            "784-256-256-10; a `BidirectionalInterface` between the last hidden layer and the output layer: the "
            "output layer trains on a synthetic input predicted from the image, the layers below on a synthetic "
            "gradient."))
    for level in ("char", "word"):
        if f"ptb_{level}" in g:
            parts.append(ptb_section(g[f"ptb_{level}"], out, g.get(f"ptb_{level}_dnipytorch"),
                                     g.get(f"ptb_{level}_shuffle")))
    if "copy_task" in g:
        parts.append(copy_section(g["copy_task"], out, g.get("copy_task_dnipytorch")))
    parts.append(targets_section(g))
    shown = [k for k in g]
    parts.append("## Reproduce\n\nFrom the repository root, with the data in `../shared/data` or `$DNI_FAST_DATA`; "
                 "each command once per seed (the `--log` paths as used for this page):\n\n```sh\n"
                 "export OMP_NUM_THREADS=1\n"
                 + "\n".join(command(d) for k in shown for d in g[k])
                 + "\npython scripts/make_results.py\n```\n\nLogs used: "
                 + ", ".join(f"`{os.path.basename(d['_path'])}`" for k in shown for d in g[k]) + ".\n")
    page = "\n".join(parts)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(page)
    return page


# ---------------------------------------------------------------------------
# The diagnosis page's tables and figures (docs/synthetic_gradients.md)
# ---------------------------------------------------------------------------
#: (table, label, log in docs/logs/diag, variant): the runs the diagnosis compares. Labels say what changed
#: against the row "dni-pytorch-like" (mean loss, zero-initialised synthesizer output, constant lr 1e-3).
DIAG_RUNS = {
    "mlp": [
        ("mean loss, constant lr (before)", "mlp_base", "{v}"),
        ("--loss sum", "mlp_sum", "{v}"),
        ("--normalize-targets", "mlp_norm", "{v}"),
        ("--normalize-targets --synth-lr-mult 0.1", "mlp_norm_lr01", "{v}"),
        ("--normalize-targets --synth-lr-mult 3", "mlp_norm_lr3", "{v}"),
        ("--normalize-targets --synth-hidden 2", "mlp_norm_sh2", "{v}"),
        ("--lr-schedule cosine", "mlp_base_cos", "{v}"),
        ("--lr-schedule cosine --synth-lr-schedule constant", "mlp_cos_synthconst", "{v}"),
        ("--lr-schedule cosine --synth-lr-mult 0.1", "mlp_cos_lr01", "{v}"),
        ("--normalize-targets --lr-schedule cosine", "mlp_norm_cos", "{v}"),
        ("--lr-schedule cosine --synth ridge (the default now)", "mlp_ridge", "{v}"),
        ("--lr-schedule cosine --synth ridge --synth-forget 0.995", "mlp_ridge_f0995", "{v}"),
    ],
    "ptb": [
        ("BPTT", "ptb_base", "bptt T=4"),
        ("DNI, dni-pytorch settings (sg factor 0.1, mean loss)", "ptb_base", "dni T=4"),
        ("DNI --loss sum", "ptb_sum", "dni T=4"),
        ("DNI --normalize-targets", "ptb_norm", "dni T=4"),
        ("DNI --normalize-targets --sg-factor 1", "ptb_norm_f1", "dni T=4"),
        ("DNI, control: --sg-control shuffle", "ptb_shuffle", "dni T=4"),
        ("BPTT --lr-schedule cosine", "ptb_cos", "bptt T=4"),
        ("DNI --lr-schedule cosine", "ptb_cos", "dni T=4"),
    ],
    "cnn": [
        ("backprop, --lr-schedule cosine", "cnn_cos", "backprop"),
        ("DNI, --lr-schedule cosine", "cnn_cos", "dni"),
        ("cDNI, --lr-schedule cosine", "cnn_cos", "cdni"),
        ("DNI, --lr-schedule cosine --normalize-targets", "cnn_norm_cos", "dni"),
        ("cDNI, --lr-schedule cosine --normalize-targets", "cnn_norm_cos", "cdni"),
        ("cDNI, --lr-schedule cosine --normalize-targets --synth-context spatial", "cnn_spatial_norm_cos", "cdni"),
    ],
    "fcn": [
        ("backprop, lr 1e-4", "fcn_norm", "backprop 3-layer"),
        ("DNI, lr 1e-4 --normalize-targets", "fcn_norm", "dni 3-layer"),
        ("cDNI, lr 1e-4 --normalize-targets", "fcn_norm", "cdni 3-layer"),
        ("backprop, lr 1e-3", "fcn_lr1e3", "backprop 3-layer"),
        ("DNI, lr 1e-3", "fcn_lr1e3", "dni 3-layer"),
        ("cDNI, lr 1e-3", "fcn_lr1e3", "cdni 3-layer"),
        ("DNI, lr 1e-3 --normalize-targets", "fcn_norm_lr1e3", "dni 3-layer"),
        ("cDNI, lr 1e-3 --normalize-targets", "fcn_norm_lr1e3", "cdni 3-layer"),
    ],
    # The deep nets: 3 epochs (the old default) against 10, and the RidgeSynthesizer, lr 1e-3, cosine decay,
    # normalised targets for cDNI (the defaults).
    "fcn_deep": [
        (f"{m}, {n}-layer, {e}", log, f"{v} {n}-layer")
        for n in (5, 6)
        for m, v, e, log in (("backprop", "backprop", "3 epochs", "fcn_e3"), ("DNI", "dni", "3 epochs", "fcn_e3"),
                             ("cDNI", "cdni", "3 epochs", "fcn_e3"),
                             ("backprop", "backprop", "10 epochs", "fcn_e10"), ("DNI", "dni", "10 epochs", "fcn_e10"),
                             ("cDNI", "cdni", "10 epochs", "fcn_e10"),
                             ("DNI", "dni", "10 epochs, --synth ridge", "fcn_e10_ridge"),
                             ("cDNI", "cdni", "10 epochs, --synth ridge --normalize-targets cdni", "fcn_e10_ridge"),
                             ("cDNI", "cdni", "10 epochs, --synth ridge --normalize-targets none",
                              "fcn_e10_ridge_nonorm"))
    ],
    "copy": [
        ("BPTT", "copy_base", "bptt T=4"),
        ("DNI, dni-pytorch settings (sg factor 0.1)", "copy_base", "dni T=4"),
        ("DNI --normalize-targets", "copy_norm", "dni T=4"),
        ("DNI --normalize-targets --sg-factor 1", "copy_norm_f1", "dni T=4"),
        ("DNI, RidgeSynthesizer (sg factor 0.1, dni-pytorch's)", "copy_ridge", "dni T=4"),
        ("DNI, RidgeSynthesizer --sg-factor 0.5 (the default now)", "copy_sg0.5", "dni T=4"),
        ("DNI, RidgeSynthesizer --sg-factor 0 (nothing injected: BPTT, the synthesizer only watches)",
         "copy_ridge_f0", "dni T=4"),
        ("DNI, RidgeSynthesizer --sg-factor 1", "copy_ridge_f1", "dni T=4"),
    ],
}


class DiagError(RuntimeError):
    """docs/synthetic_gradients.md cannot be rewritten safely: nothing is written."""


def _diag_log(path: str, where: str) -> Optional[dict]:
    """The log at ``path``, or ``None`` with a warning naming what lacks it."""
    if not os.path.exists(path):
        warn(f"missing log {path}: {where} is left out")
        return None
    with open(path) as f:
        return json.load(f)


def _diag_run(diag: str, name: str, variant: str, where: Optional[str] = None) -> Optional[dict]:
    """The run ``variant`` of the log ``diag/name.json``; ``None`` where either is missing, with a warning
    naming ``where`` (none without it)."""
    path = os.path.join(diag, name + ".json")
    if where is None:
        if not os.path.exists(path):
            return None
        with open(path) as f:
            d = json.load(f)
    else:
        d = _diag_log(path, where)
        if d is None:
            return None
    r = next((r for r in d["runs"] if r["variant"] == variant), None)
    if r is None and where is not None:
        warn(f"{path} has no run {variant!r}: {where} is left out")
    return r


def _mean(xs) -> Optional[float]:
    """The mean, or ``None`` for no values (a run that went to NaN at once)."""
    return statistics.fmean(xs) if xs else None


def _median(xs) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _last(xs, k: int = 1):
    v = [x for x in (xs or []) if x is not None]
    return statistics.fmean(v[-k:]) if v else None


def diag_table(diag: str, which: str, variant: str = "") -> str:
    rows = []
    for label, name, v in DIAG_RUNS[which]:
        r = _diag_run(diag, name, v.format(v=variant), f"the row {label!r} of the {which} table")
        if r is None:
            continue
        h = r["history"]
        ifs = h.get("interfaces", {})
        cos = " / ".join(fmt(c["cos"][-1], "{:.3f}") for c in ifs.values()) or "-"
        mean_cos = " / ".join(fmt(_mean([x for x in c["cos"] if x is not None]), "{:.3f}")
                              for c in ifs.values()) or "-"
        sg = " / ".join(fmt(c["s_norm"][-1] / c["g_norm"][-1] if c["g_norm"][-1] and c["s_norm"][-1] is not None
                            else None, "{:.3g}")
                        for c in ifs.values()) or "-"
        rel = " / ".join(fmt(_median([x for x in c["rel_err"] if x is not None]), "{:.2f}")
                         for c in ifs.values()) or "-"
        eps = " / ".join(fmt(min(x for x in c["sqrt_v_median"] if x) / c["adam_eps"], "{:.2g}")
                         if c.get("adam_eps") and any(c["sqrt_v_median"]) else "-" for c in ifs.values()) or "-"
        ratio = h.get("adam_step_ratio", {})
        if which in ("mlp", "cnn", "fcn", "fcn_deep"):
            acc = [fmt(r.get("valid_acc"), "{:.2f}"), fmt(r.get("best_valid_acc"), "{:.2f}")]
            step = fmt(_last(ratio.get("conv2.weight" if which == "cnn" else "linears.1.weight"), 5), "{:.3f}")
        elif which == "ptb":
            acc = [fmt(r.get("valid_metric"), "{:.3f}"), "-"]
            step = fmt(_last(ratio.get("rnn.weight_hh_l0"), 5), "{:.3f}")
        else:
            acc = [str(r.get("max_length")), "-"]
            step = fmt(_last(ratio.get("rnn.weight_hh_l0"), 5), "{:.3f}")
        rows.append([label] + acc + [cos, mean_cos, sg, rel, step, eps])
    if not rows:
        return ""
    acc_cols = ["valid acc % (end)", "best valid acc %"]
    metric = {"mlp": acc_cols, "cnn": acc_cols, "fcn": acc_cols, "fcn_deep": acc_cols, "ptb": ["valid bpc (end)", "-"],
              "copy": ["longest L solved", "-"]}[which]
    what = {"mlp": "Adam step ratio, layer 2 (last 5 evals)", "fcn": "Adam step ratio, layer 2 (last 5 evals)",
            "fcn_deep": "Adam step ratio, layer 2 (last 5 evals)",
            "cnn": "Adam step ratio, conv2 (last 5 evals)", "ptb": "Adam step ratio, LSTM W_hh (last 5 evals)",
            "copy": "Adam step ratio, LSTM W_hh (last 5 evals)"}[which]
    return table(["run"] + metric + ["cos(S, g) at end", "cos(S, g), mean over training", "|S|/|g| at end",
                                     "median rel. error |S-g|/|g|", what,
                                     "synth. Adam sqrt(v) median, smallest over training / eps"], rows)


#: The copy task's injection scale, swept on a held-out seed (100) at every T: the logs copy_sg<factor>.json.
COPY_SG = ("0.1", "0.2", "0.3", "0.5", "0.7", "1.0")


def copy_sg_table(diag: str) -> str:
    """One row per ``--sg-factor``: the longest length solved and the boundary cosine at the end, per T."""
    logs = []
    for f in COPY_SG:
        d = _diag_log(os.path.join(diag, f"copy_sg{f}.json"), f"the copy_sg row --sg-factor {f}")
        if d is not None:
            logs.append((f, {r["bptt"]: r for r in d["runs"]}))
    if not logs:
        return ""
    # every T any log has, a column each ("-" in the rows of a log without it): the logs need not agree
    ts = sorted(set().union(*(runs for _, runs in logs)))

    def diverged(r):  # the norms went non-finite: the statistics stop (None) from then on
        ifs = r["history"].get("interfaces", {})
        return any(c["s_norm"] and c["s_norm"][-1] is None for c in ifs.values())

    rows = []
    for f, runs in logs:
        got = [runs.get(t) for t in ts]
        rows.append([f] + ["-" if r is None else str(r["max_length"]) + (" (diverged)" if diverged(r) else "")
                           for r in got]
                    + [" / ".join("-" if r is None or diverged(r) else fmt(r.get("final_cos"), "{:.3f}")
                                  for r in got)])
    return table(["--sg-factor"] + [f"longest L, T={t}" for t in ts]
                 + ["cos(S, g) at the boundary, end (T=" + ", ".join(map(str, ts)) + ")"], rows)


#: The language model's synthesizer and injection scale, chosen on the validation split (seed 1, 500k
#: characters): the default before (ptb_basic_norm_s1.json: the seeded log of seed 1 as it was, BasicSynthesizer
#: with normalised targets at 0.1, with BPTT beside it) and the ridge synthesizer at each factor.
PTB_SG = (("BPTT", "ptb_basic_norm_s1", "bptt"),
          ("DNI, BasicSynthesizer, normalised targets, 0.1 (the default before)", "ptb_basic_norm_s1", "dni"),
          ("DNI, RidgeSynthesizer, --sg-factor 0.3", "ptb_ridge_sg03", "dni"),
          ("DNI, RidgeSynthesizer, --sg-factor 0.5 (the default now)", "ptb_ridge_sg05", "dni"),
          ("DNI, RidgeSynthesizer, --sg-factor 0.7", "ptb_ridge_sg07", "dni"),
          ("DNI, RidgeSynthesizer, --sg-factor 1", "ptb_ridge_sg10", "dni"))


def ptb_sg_table(diag: str) -> str:
    """Validation bpc at the end, per T, and the mean over T, for each run of ``PTB_SG``."""
    rows, ts = [], (2, 4, 8)
    for label, name, method in PTB_SG:
        d = _diag_log(os.path.join(diag, name + ".json"), f"the ptb_sg row {label!r}")
        if d is None:
            continue
        runs = {r["bptt"]: r for r in d["runs"] if r["variant"].startswith(method + " ")}
        vals = [runs[t].get("valid_metric") if t in runs else None for t in ts]
        ok = [v for v in vals if v is not None]
        rows.append([label] + [fmt(v, "{:.3f}") for v in vals]
                    + [fmt(sum(ok) / len(ok) if len(ok) == len(ts) else None, "{:.3f}")])
    if not rows:
        return ""
    return table(["run"] + [f"valid bpc, T={t}" for t in ts] + ["mean over T"], rows)


def ptb_control_table(diag: str, results: str) -> str:
    """T=2, per seed: test bpc of BPTT and DNI (the seeded logs) and of the shuffled control
    (``ptb_ridge_shuffle_s<seed>.json``: the same run injecting another stream's synthetic gradient)."""
    rows, cols = [], {"BPTT": [], "DNI": [], "control": []}
    for seed in (1, 2, 3):
        paths = (os.path.join(results, f"ptb_char_s{seed}.json"), os.path.join(diag, f"ptb_ridge_shuffle_s{seed}.json"))
        missing = [q for q in paths if not os.path.exists(q)]
        for q in missing:
            warn(f"missing log {q}: the ptb_control row of seed {seed} is left out")
        if missing:
            continue
        with open(paths[0]) as fh:
            runs = {r["variant"]: r for r in json.load(fh)["runs"]}
        with open(paths[1]) as fh:
            ctl = next(r for r in json.load(fh)["runs"] if r["variant"] == "dni T=2")
        vals = [runs["bptt T=2"]["test_metric"], runs["dni T=2"]["test_metric"], ctl["test_metric"]]
        for k, v in zip(cols, vals):
            cols[k].append(v)
        rows.append([str(seed)] + [fmt(v, "{:.3f}") for v in vals])
    if not rows:
        return ""
    rows.append(["mean ± std"] + [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
                                  for v in cols.values()])
    return table(["seed", "BPTT test bpc", "DNI test bpc", "DNI, shuffled control, test bpc"], rows)


#: The boundary probe (dni_fast.examples._common.BoundaryProbe) on one DNI run of each RNN example, with the
#: recommended settings: copy task seed 100 (held out), language model seed 1 (the validation runs' seed).
BOUNDARY = (("copy task", "copy_probe_s100"), ("PTB char", "ptb_probe_s1"))


def boundary_table(diag: str) -> str:
    """Per example and T, at the end (the last evaluation interval): cos(S, g) against the bootstrapped
    target, cos(S, g_own) against the chunk's own (true) gradient, |c| / |g_own| and cos(g_own, c), where
    c is the carried synthetic part of the target."""
    rows = []
    for label, name in BOUNDARY:
        d = _diag_log(os.path.join(diag, name + ".json"), f"the boundary rows of the {label}")
        if d is None:
            continue
        runs = sorted((r for r in d["runs"] if r["dni"]), key=lambda r: r["bptt"])
        for r in runs:
            h = r["history"]
            h = h.get("curves", h)  # copy_task keeps its curves under history["curves"]
            own, carried = _last(h.get("true_g_norm")), _last(h.get("true_carried_norm"))
            result = (str(r["max_length"]) if "max_length" in r else fmt(r.get("valid_metric"), "{:.3f}"))
            rows.append([label, str(r["bptt"]), result, fmt(r.get("final_cos"), "{:.3f}"),
                         fmt(r.get("final_true_cos"), "{:.3f}"),
                         fmt(carried / own if own and carried is not None else None, "{:.3f}"),
                         fmt(_last(h.get("true_cos_own_carried")), "{:.3f}")])
    if not rows:
        return ""
    return table(["example", "T", "longest L / valid bpc", "cos(S, g): the bootstrapped target",
                  "cos(S, g_own): the true gradient", "|c| / |g_own|", "cos(g_own, c)"], rows)


def _n_rows(md: str) -> int:
    """The body rows of the markdown table ``md`` (0 for none, or no table)."""
    return max(sum(1 for line in md.splitlines() if line.startswith("|")) - 2, 0)


DIAG_START, DIAG_END = "<!-- diag:{} -->", "<!-- /diag -->"


def replace_blocks(text: str, blocks: Dict[str, str], doc: str = "the page") -> str:
    """``text`` with the body of each block ``<!-- diag:NAME -->`` ... ``<!-- /diag -->`` replaced by
    ``blocks[NAME]``. Raises ``DiagError`` (nothing replaced) for a start marker without its end marker, or a
    table with no rows: either would silently delete part of the page."""
    for name, body in blocks.items():
        start = DIAG_START.format(name)
        i = text.find(start)
        if i < 0:
            continue
        j = text.find(DIAG_END, i + len(start))
        if j < 0:
            raise DiagError(f"{doc}: {start} has no {DIAG_END} after it (refusing to rewrite the page: the rest "
                            f"of it would be lost)")
        k = text.find("<!-- diag:", i + len(start))
        if 0 <= k < j:
            raise DiagError(f"{doc}: {start} is not closed by {DIAG_END} before the next block starts")
        if _n_rows(body) == 0:
            raise DiagError(f"{doc}: the table for {start} has no rows (its logs are missing: see the warnings); "
                            f"refusing to replace the block")
        text = text[:i + len(start)] + "\n" + body + text[j:]
    return text


def diagnosis(diag: str, doc: str, out: str, runs_dir: Optional[str] = None) -> None:
    """Rewrite the generated blocks of ``doc`` (between ``<!-- diag:NAME -->`` and
    ``<!-- /diag -->``) from the logs in ``diag``, and its figures in ``out``. Every missing log is warned
    about (stderr); ``DiagError``, with ``doc`` left as it was, for a block without its end marker or one whose
    table would have no rows."""
    from dni_fast import diagnostics as dd

    blocks = {"mlp_dni": lambda: diag_table(diag, "mlp", "dni"), "mlp_cdni": lambda: diag_table(diag, "mlp", "cdni"),
              "ptb": lambda: diag_table(diag, "ptb"), "copy": lambda: diag_table(diag, "copy"),
              "cnn": lambda: diag_table(diag, "cnn"), "fcn": lambda: diag_table(diag, "fcn"),
              "fcn_deep": lambda: diag_table(diag, "fcn_deep"), "copy_sg": lambda: copy_sg_table(diag),
              "ptb_sg": lambda: ptb_sg_table(diag), "boundary": lambda: boundary_table(diag),
              "ptb_control": lambda: ptb_control_table(
                  diag, runs_dir or os.path.join(os.path.dirname(diag), "results"))}

    # the page first, checked before anything is written: every table (so that every missing log is warned
    # about), then the checks
    text = None
    if os.path.exists(doc):
        with open(doc) as f:
            text = f.read()
        made = {name: make() for name, make in blocks.items() if DIAG_START.format(name) in text}
        text = replace_blocks(text, made, doc)  # (refuses a table without rows)
    else:
        warn(f"{doc} does not exist: its tables are not written")
    os.makedirs(out, exist_ok=True)

    def runs(which, variant="", names=None):
        out_runs = []
        for label, name, v in DIAG_RUNS[which]:
            if names is not None and name not in names:
                continue
            if _diag_run(diag, name, v.format(v=variant)) is not None:
                out_runs.append((label, os.path.join(diag, name + ".json"), v.format(v=variant)))
        return out_runs

    pick = ["mlp_base", "mlp_sum", "mlp_norm", "mlp_base_cos", "mlp_cos_synthconst"]
    figs = [
        ("diag_mlp_dni.png", runs("mlp", "dni", pick), ("acc", "cos", "s_over_g", "step_ratio:linears.1.weight"),
         "MNIST MLP, plain DNI (validation split; cos and |S|/|g| averaged over the two interfaces)"),
        ("diag_mlp_cdni.png", runs("mlp", "cdni", pick), ("acc", "cos", "s_over_g", "step_ratio:linears.1.weight"),
         "MNIST MLP, cDNI (validation split)"),
        ("diag_ptb.png", [r for r in runs("ptb") if "ptb_norm_f1" not in r[1]],
         ("acc", "cos", "s_over_g", "step_ratio:rnn.weight_hh_l0"),
         "PTB char, T=4, 200k training characters (validation bpc; the diverged --sg-factor 1 run is left out)"),
        ("diag_copy.png", runs("copy"), ("acc", "cos", "s_over_g", "step_ratio:rnn.weight_hh_l0"),
         "copy task, T=4 (length solved)"),
    ]
    for png, rs, keys, title in figs:
        if rs:
            fig = dd.plot_compare(rs, keys=keys, out=os.path.join(out, png), title=title)
            plt.close(fig)
    base = os.path.join(diag, "mlp_base.json")
    if os.path.exists(base):
        fig = dd.plot_run(base, os.path.join(out, "diag_mlp_base_interfaces.png"), variants=["dni", "cdni"],
                          title="MNIST MLP before (mean loss, constant lr): per-interface curves")
        plt.close(fig)
    if text is not None:
        with open(doc, "w") as f:
            f.write(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=os.path.join("docs", "logs", "results"),
                   help="folder with the examples' JSON logs, named <group>_s<seed>.json")
    p.add_argument("--out", default="docs", help="where results.md and the PNGs go")
    p.add_argument("--diag", default=os.path.join("docs", "logs", "diag"),
                   help="the diagnosis runs' logs (docs/synthetic_gradients.md's tables and figures)")
    args = p.parse_args(argv)
    if args.diag and os.path.isdir(args.diag):
        try:
            diagnosis(args.diag, os.path.join(args.out, "synthetic_gradients.md"), args.out, args.runs)
        except DiagError as e:
            raise SystemExit(f"make_results: {e}")
    elif args.diag:
        warn(f"--diag {args.diag} is not a folder: docs/synthetic_gradients.md is not rebuilt")
    logs = load_logs(args.runs)
    if not logs:
        raise SystemExit(f"no example logs in {args.runs}/ (run the examples with --log {args.runs}/NAME_s1.json)")
    build(logs, args.out)
    print(f"wrote {os.path.join(args.out, 'results.md')} from {len(logs)} log(s)")


if __name__ == "__main__":
    main()
