"""Diagnostics for synthetic gradients: optimizer parameter groups with a
synthesizer learning rate, the numbers worth recording during training, and
plots of the curves an example's run log holds.

    import dni_fast.diagnostics as dd
    opt = torch.optim.Adam(dd.param_groups(model, lr=1e-3, synth_lr=1e-4))
    ...
    dd.plot_run("runs/mnist_mlp.json", "mnist_mlp_diag.png")

See docs/synthetic_gradients.md for what the curves showed on the examples.
Importing this module imports neither matplotlib nor the examples; the
plotting functions need matplotlib (the ``examples`` extra).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["synthesizer_parameters", "param_groups", "grad_rms", "adam_summary", "interface_records",
           "load_run", "plot_run", "plot_compare", "summarize", "CURVES", "flat_cos", "ridge_fit",
           "predictability", "dead_units"]


def _interfaces(model: nn.Module):
    from dni_fast.interfaces import UnidirectionalInterface

    return [m for m in model.modules() if isinstance(m, UnidirectionalInterface)]


def synthesizer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of every synthesizer of the interfaces in ``model`` (each once)."""
    seen, out = set(), []
    for iface in _interfaces(model):
        for p in iface.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def param_groups(model: nn.Module, lr: float, synth_lr: Optional[float] = None) -> List[dict]:
    """Optimizer parameter groups: the synthesizers' parameters at ``synth_lr``
    (default ``lr``), everything else at ``lr``. Empty groups are left out.

    ``torch.optim.Adam(param_groups(model, 1e-3, synth_lr=1e-4))``."""
    synth = synthesizer_parameters(model)
    ids = {id(p) for p in synth}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr, "name": "model"})
    if synth:
        groups.append({"params": synth, "lr": lr if synth_lr is None else synth_lr, "name": "synthesizers"})
    return groups


def grad_rms(params: Iterable[torch.Tensor]) -> Optional[float]:
    """Root mean square of the gradients of ``params`` over all their elements
    (``None`` when none has a gradient)."""
    sq, n = 0.0, 0
    for p in params:
        if p.grad is not None:
            sq += float(p.grad.detach().float().pow(2).sum())
            n += p.grad.numel()
    return math.sqrt(sq / n) if n else None


def adam_summary(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> Optional[dict]:
    """What Adam does with ``params`` (after a step): ``sqrt_v_min`` and
    ``sqrt_v_median``, the bias-corrected RMS of their gradients that Adam
    divides by, against its ``eps``; and ``step_ratio``, the mean over elements
    of ``|m_hat| / (sqrt(v_hat) + eps)``: 1 when the gradient keeps one sign
    (Adam moves every weight by the full learning rate), near 0 when it is
    mostly noise. ``None`` before the first step."""
    sv, ratio, n, eps = [], 0.0, 0, None
    for p in params:
        st = opt.state.get(p)
        if not st or "exp_avg_sq" not in st:
            continue
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        b1, b2 = group["betas"]
        eps = group["eps"]
        t = float(st["step"])
        v = st["exp_avg_sq"].detach().float() / (1 - b2 ** t)
        m = st["exp_avg"].detach().float() / (1 - b1 ** t)
        s = v.sqrt()
        sv.append(s.flatten())
        ratio += float((m.abs() / (s + eps)).sum())
        n += m.numel()
    if not n:
        return None
    allv = torch.cat(sv)
    return {"sqrt_v_min": float(allv.min()), "sqrt_v_median": float(allv.median()), "eps": eps,
            "step_ratio": ratio / n}


def _defined(x: float) -> Optional[float]:
    return None if x != x else x  # NaN -> None


def interface_records(model: nn.Module, reset: bool = True) -> Dict[str, dict]:
    """``{name: {cos, rel_err, s_norm, g_norm, loss, count}}`` (means since the
    last reset) for the interfaces of ``model`` that recorded anything, by
    module name. Reading syncs with the device."""
    from dni_fast.interfaces import UnidirectionalInterface

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, UnidirectionalInterface):
            continue
        s = m.stats()
        if s.get("count"):
            # cos and rel_err are NaN when every true gradient was exactly 0 (undefined): None in the logs
            out[name] = {"cos": _defined(s["cos_mean"]), "rel_err": _defined(s["rel_err_mean"]),
                         "s_norm": s["s_norm_mean"], "g_norm": s["g_norm_mean"], "loss": s["loss_mean"],
                         "count": s["count"]}
        if reset:
            m.reset_stats()
    return out


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------
#: The per-interface curves a run log's ``history["interfaces"]`` holds, and their axis labels.
CURVES = {
    "cos": "cos(S, g)",
    "rel_err": "|S - g| / |g|",
    "s_norm": "|S| and |g| (dashed)",
    "synth_grad_rms": "synthesizer grad RMS; Adam sqrt(v) min (dotted)",
}


def flat_cos(s: torch.Tensor, g: torch.Tensor) -> float:
    """cos(S, g) over the whole flattened tensors, as ``interface.stats()``
    computes it for one step: ``sum(S*g) / sqrt(sum(S^2) sum(g^2))`` (0 where
    either is all zero). ``s`` and ``g`` of the same shape."""
    if s.shape != g.shape:
        raise ValueError(f"flat_cos: shapes differ, {tuple(s.shape)} and {tuple(g.shape)}")
    s, g = s.detach().double(), g.detach().double()
    den = (s.pow(2).sum() * g.pow(2).sum()).sqrt()
    return float((s * g).sum() / den) if den > 0 else 0.0


def _split(n: int, frac: float, seed: int):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * frac)
    return idx[:k], idx[k:]


def ridge_fit(x: torch.Tensor, g: torch.Tensor, penalty: float,
              standardise: Optional[tuple] = None):
    """Ridge regression of ``g (N, Dg)`` on the standardised ``x (N, Dx)``
    plus a bias, in fp64 (``penalty`` per row: the system is
    ``A^T A + penalty * N * I``). ``standardise``: the ``(mean, std)`` of
    the features to use, default ``x``'s own. Returns
    ``predict(x') -> (N', Dg)``, which applies the same standardisation."""
    if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"ridge_fit: expected x (N, Dx) and g (N, Dg) with the same N, got "
                         f"{tuple(x.shape)} and {tuple(g.shape)}")
    x, g = x.detach().cpu().double(), g.detach().cpu().double()
    mu, sd = standardise if standardise is not None else (x.mean(0), x.std(0).clamp_min(1e-12))

    def feats(z):
        if z.dim() != 2 or z.shape[1] != x.shape[1]:
            raise ValueError(f"ridge_fit: the fit has {x.shape[1]} features, got rows of shape {tuple(z.shape)}")
        z = z.detach().cpu().double()
        return torch.cat([(z - mu) / sd, torch.ones(len(z), 1, dtype=z.dtype)], 1)

    a = feats(x)
    w = torch.linalg.solve(a.T @ a + penalty * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ g)
    return lambda z: feats(z) @ w


def predictability(x: torch.Tensor, g: torch.Tensor, *, train_frac: float = 0.7, seed: int = 0,
                   ridge: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0), mlp_hidden: int = 256,
                   mlp_steps: int = 3000, mlp_lr: float = 1e-3, batch_size: int = 512,
                   baseline: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """How much of the true gradient ``g`` the features ``x`` can predict: the
    ceiling for a synthesizer that sees ``x``, measured offline.

    Fits, on a random ``train_frac`` of the rows, (1) ridge regression on the
    standardised features plus a bias (``ridge_fit``; the penalty chosen on a
    held-back fifth of the training rows) and (2) an MLP with two ReLU hidden
    layers of ``mlp_hidden`` units (Adam, ``mlp_steps`` steps of
    ``batch_size`` rows, the best of its checkpoints on held-back training
    rows), and returns each one's cos(prediction, g) over the held-out rows
    (``flat_cos``), plus the chosen ridge penalty and the counts. With
    ``baseline`` (N, Dg), for example a synthesizer's outputs on the same
    rows, its cosine over the same held-out rows too. A synthesizer trained
    online on the same rows can do no better than roughly these (it sees each
    row once); the gap between them and its ``stats()`` cosine is the part
    the online regression leaves (docs/synthetic_gradients.md, "The ceiling").

    Shapes: ``x (N, Dx)``, ``g (N, Dg)``, any float dtype (fit in fp64 and
    fp32 on the CPU). Deterministic for a ``seed``.
    """
    if x.dim() != 2 or g.dim() != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"predictability: expected x (N, Dx) and g (N, Dg) with the same N, got "
                         f"{tuple(x.shape)} and {tuple(g.shape)}")
    if baseline is not None and baseline.shape != g.shape:
        raise ValueError(f"predictability: baseline must have g's shape {tuple(g.shape)}, got "
                         f"{tuple(baseline.shape)}")
    if not 0.0 < train_frac < 1.0:
        raise ValueError(f"predictability: train_frac must be in (0, 1), got {train_frac!r}")
    n = x.shape[0]
    tr, te = _split(n, train_frac, seed)
    if len(te) < 1 or len(tr) < 10:
        raise ValueError(f"predictability: {n} rows are too few to fit and hold out (need >= 15)")
    x, g = x.detach().cpu().double(), g.detach().cpu().double()
    stats = (x[tr].mean(0), x[tr].std(0).clamp_min(1e-12))  # the training rows' own, for every fit below
    cut = int(len(tr) * 0.8)
    fit_rows, pick_rows = tr[:cut], tr[cut:]
    lam = max(ridge, key=lambda l: flat_cos(ridge_fit(x[fit_rows], g[fit_rows], l, stats)(x[pick_rows]),
                                            g[pick_rows]))
    ridge_cos = flat_cos(ridge_fit(x[tr], g[tr], lam, stats)(x[te]), g[te])

    # The MLP: standardised features, targets scaled to unit RMS (the fit is scale-free; Adam is not).
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden),
                            nn.ReLU(), nn.Linear(mlp_hidden, g.shape[1]))
    xf = ((x - stats[0]) / stats[1]).float()
    gf = (g / g[tr].pow(2).mean().sqrt().clamp_min(1e-300)).float()
    opt = torch.optim.Adam(net.parameters(), lr=mlp_lr)
    best, best_state = -2.0, None
    check = max(mlp_steps // 12, 1)
    for step in range(mlp_steps):
        b = fit_rows[torch.randint(0, len(fit_rows), (batch_size,), generator=gen)]
        loss = (net(xf[b]) - gf[b]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % check == 0 or step + 1 == mlp_steps:
            with torch.no_grad():
                c = flat_cos(net(xf[pick_rows]), gf[pick_rows])
            if c > best:
                best, best_state = c, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    with torch.no_grad():
        mlp_cos = flat_cos(net(xf[te]), gf[te])
    out = {"ridge": ridge_cos, "mlp": mlp_cos, "ridge_penalty": lam, "n_train": len(tr), "n_test": len(te)}
    if baseline is not None:
        out["baseline"] = flat_cos(baseline.detach().cpu()[te], g[te])
    return out


@torch.no_grad()
def dead_units(synthesizer: nn.Module, trigger: torch.Tensor,
               context: Optional[torch.Tensor] = None) -> List[float]:
    """For each hidden layer of a ``BasicSynthesizer``, the fraction of its
    ReLU units that are off (pre-activation <= 0) for every row of
    ``trigger (N, Dt)`` (and ``context (N, Dc)``): units that pass no signal
    and, under the regression, get no gradient, so they never come back. A
    layer whose units are all dead makes the synthesizer a constant (its
    last bias), and cos(S, g) then sits near 0 whatever the data
    (docs/synthetic_gradients.md, "Dead synthesizers")."""
    from dni_fast.synthesizer import BasicSynthesizer

    if not isinstance(synthesizer, BasicSynthesizer):
        raise TypeError(f"dead_units needs a BasicSynthesizer, got {type(synthesizer).__name__}")
    if trigger.dim() != 2 or trigger.shape[0] == 0:
        raise ValueError(f"dead_units: trigger must be (N, Dt) with N >= 1, got {tuple(trigger.shape)}")
    z = synthesizer.input_trigger(trigger)
    if synthesizer.input_context is not None:
        if context is None:
            raise ValueError("dead_units: this synthesizer takes a context; pass context=(N, Dc)")
        z = z + synthesizer.input_context(context)
    out = []
    for layer in synthesizer.layers:
        out.append(float((z.amax(0) <= 0).float().mean()))
        z = layer(torch.relu(z))
    return out


def load_run(log: Union[str, os.PathLike, dict]) -> dict:
    """A run log (path or the dict an example returned)."""
    if isinstance(log, dict):
        return log
    with open(log) as f:
        return json.load(f)


def _x_of(hist: dict):
    if hist.get("curves", {}).get("timesteps"):  # copy_task: its evaluation points
        return hist["curves"]["timesteps"], "time steps"
    for key, label in (("step", "training step"), ("timesteps", "time steps"), ("tokens", "tokens")):
        if hist.get(key):
            return hist[key], label
    return None, None


def plot_run(log: Union[str, os.PathLike, dict], out: Optional[Union[str, os.PathLike]] = None,
             variants: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Plot the training curves of a run log, one column per variant that has
    interfaces: cos(S, g), the relative error, |S| against |g|, and the
    synthesizer's gradient RMS against Adam's sqrt(v) and eps, each interface
    a line, against training steps. Returns the matplotlib figure; saves it to
    ``out`` when given (the file type from its suffix).

    Raises ``ValueError`` when no run in the log has per-interface curves
    (logs written before dni_fast 0.2's examples recorded them)."""
    from dni_fast.examples._extras import require

    matplotlib = require("matplotlib", "dni_fast.diagnostics.plot_run")
    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_run(log)
    runs = [r for r in data.get("runs", []) if r.get("history", {}).get("interfaces")]
    if variants is not None:
        runs = [r for r in runs if r.get("variant") in variants]
    if not runs:
        raise ValueError("plot_run: no run in this log has per-interface curves (history['interfaces'])")
    rows = list(CURVES)
    fig, axes = plt.subplots(len(rows), len(runs), figsize=(4.2 * len(runs), 2.6 * len(rows)), squeeze=False,
                             sharex="col")
    for j, r in enumerate(runs):
        hist = r["history"]
        x, xlabel = _x_of(hist)
        for k, (name, rec) in enumerate(hist["interfaces"].items()):
            color = f"C{k}"
            n = max((len(v) for v in rec.values() if isinstance(v, list)), default=0)
            if n == 0:
                continue  # an interface with no evaluation point
            xs = x if x is not None else list(range(n))
            xs = xs[-n:]

            def line(ax, key, **kw):
                ys = rec.get(key)
                if ys and any(v is not None for v in ys):
                    ax.plot(xs[:len(ys)], [math.nan if v is None else v for v in ys], color=color, **kw)

            line(axes[0, j], "cos", label=name)
            line(axes[1, j], "rel_err")
            line(axes[2, j], "s_norm")
            line(axes[2, j], "g_norm", linestyle="--")
            line(axes[3, j], "synth_grad_rms")
            line(axes[3, j], "sqrt_v_min", linestyle=":")
        axes[0, j].set_title(r.get("variant", r.get("method", "?")))
        axes[0, j].axhline(0.0, color="k", lw=0.5)
        axes[1, j].axhline(1.0, color="k", lw=0.5)  # predicting 0
        for i in (1, 2, 3):
            axes[i, j].set_yscale("log")
        eps = next((rec.get("adam_eps") for rec in hist["interfaces"].values() if rec.get("adam_eps")), None)
        if eps:
            axes[3, j].axhline(eps, color="r", lw=0.8, label="Adam eps")
            axes[3, j].legend(fontsize=7)
        axes[-1, j].set_xlabel(xlabel or "evaluation")
        axes[0, j].legend(fontsize=7)
    for i, key in enumerate(rows):
        axes[i, 0].set_ylabel(CURVES[key], fontsize=8)
    fig.suptitle(title or f"{data.get('example', '')} {' '.join(data.get('argv', []))}", fontsize=9)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=90)
    return fig


def _at(seq, i: int):
    return seq[i] if isinstance(seq, list) and i < len(seq) else None


def _num(v, spec: str) -> str:
    """A number of a log (null where it was NaN or inf, or missing) as text."""
    return "-" if v is None else format(v, spec)


def summarize(log: Union[str, os.PathLike, dict], points: Sequence[float] = (0.1, 0.3, 1.0)) -> str:
    """A text table of a run log's curves: for each run and interface, cos,
    rel_err, |S|, |g|, the synthesizer's gradient RMS and Adam's smallest
    sqrt(v) at the given fractions of training (the nearest evaluation)."""
    data = load_run(log)
    lines = []
    for r in data.get("runs", []):
        hist = r.get("history", {})
        acc = {k: r[k] for k in r if k.endswith("_acc") and not k.startswith("best")}
        metric = {k: r[k] for k in ("test_metric", "valid_metric", "max_length") if k in r}
        name = r.get("variant", r.get("method", "?"))  # mnist_distributed's records name a method
        lines.append(f"{name}: " + ", ".join(f"{k} {_num(v, '.3f')}" for k, v in {**acc, **metric}.items())
                     + (f", final_cos {r['final_cos']:.3f}" if r.get("final_cos") is not None else ""))
        for name, c in hist.get("interfaces", {}).items():
            n = len(c.get("cos") or [])
            if n == 0:
                continue  # no evaluation point (a run stopped at once)
            for f in points:
                i = min(max(int(round(f * n)) - 1, 0), n - 1)
                vals = " ".join(f"{k} {_num(_at(c.get(k), i), '.3g')}"
                                for k in ("cos", "rel_err", "s_norm", "g_norm", "synth_grad_rms", "sqrt_v_min"))
                lines.append(f"  {name} @{f:.0%}: {vals}")
        for name, v in hist.get("adam_step_ratio", {}).items():
            v = [x for x in v if x is not None]
            if v:
                lines.append(f"  adam step ratio {name}: start {v[0]:.3f} mid {v[len(v) // 2]:.3f} end {v[-1]:.3f}")
    return "\n".join(lines)


def plot_compare(runs: Sequence[tuple], keys: Sequence[str] = ("acc", "cos", "rel_err", "s_over_g"),
                 out: Optional[Union[str, os.PathLike]] = None, title: Optional[str] = None, interface: str = "mean"):
    """Compare runs from several logs on one figure, one panel per key:
    ``acc`` (the evaluation accuracy or metric), ``cos``, ``rel_err``,
    ``s_over_g`` (``|S| / |g|``), ``step_ratio`` (Adam's step ratio of the
    model's weight matrices, mean over them; ``step_ratio:<name>`` for one)
    or any per-interface curve name.

    ``runs``: ``(label, log, variant)`` tuples (``log`` a path or dict).
    ``interface``: ``"mean"`` averages the per-interface curves, or a module
    name picks one. Returns the figure; saves it to ``out`` when given."""
    from dni_fast.examples._extras import require

    matplotlib = require("matplotlib", "dni_fast.diagnostics.plot_compare")
    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"acc": "accuracy / metric", "cos": "cos(S, g)", "rel_err": "|S - g| / |g|", "s_over_g": "|S| / |g|",
              "step_ratio": "Adam step ratio |m|/sqrt(v)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for k, (label, log, variant) in enumerate(runs):
        data = load_run(log)
        r = next((r for r in data["runs"] if r["variant"] == variant), None)
        if r is None:
            raise ValueError(f"plot_compare: no run {variant!r} in {label!r}")
        hist = r["history"]
        x, xlabel = _x_of(hist)
        for ax, key in zip(axes[0], keys):
            ys = _curve(hist, key, interface)
            if ys is None:
                continue
            xs = (x or list(range(len(ys))))[-len(ys):]
            ax.plot(xs, [math.nan if v is None else v for v in ys], label=label, color=f"C{k}")
            ax.set_xlabel(xlabel or "evaluation")
    for ax, key in zip(axes[0], keys):
        ax.set_title(labels.get(key, labels["step_ratio"] + " " + key.partition(":")[2]
                                if key.startswith("step_ratio:") else key), fontsize=9)
        ax.grid(alpha=0.3)
        if key in ("rel_err", "s_over_g"):
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.5)
        if key == "cos":
            ax.axhline(0.0, color="k", lw=0.5)
    handles, labels_ = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels_), 3)
    rows = (len(labels_) + ncol - 1) // max(ncol, 1)
    fig.set_figheight(3.0 + 0.22 * rows)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * rows / (1 + 0.07 * rows) + 0.02, 1, 1))
    fig.legend(handles, labels_, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    if out is not None:
        fig.savefig(out, dpi=90)
    return fig


def _curve(hist: dict, key: str, interface: str = "mean"):
    if key == "acc":
        for k in ("valid_acc", "test_acc", "valid_metric"):
            if hist.get(k):
                return hist[k]
        return hist.get("curves", {}).get("length")
    if key.startswith("step_ratio"):  # "step_ratio" (mean over the weights) or "step_ratio:<parameter name>"
        ratios = hist.get("adam_step_ratio", {})
        name = key.partition(":")[2]
        cols = [v for n, v in ratios.items() if v and (not name or n == name)]
        return _mean_cols(cols) if cols else None
    ifaces = hist.get("interfaces") or {}
    if not ifaces:
        return None
    chosen = list(ifaces.values()) if interface == "mean" else [ifaces[interface]] if interface in ifaces else []
    if key == "s_over_g":
        cols = [[(s / g if s is not None and g else None) for s, g in zip(c["s_norm"], c["g_norm"])] for c in chosen]
    else:
        cols = [c[key] for c in chosen if key in c]
    return _mean_cols(cols) if cols else None


def _mean_cols(cols):
    n = min(len(c) for c in cols)
    out = []
    for i in range(n):
        v = [c[i] for c in cols if c[i] is not None]
        out.append(sum(v) / len(v) if v else None)
    return out


if __name__ == "__main__":  # python -m dni_fast.diagnostics LOG [--out PNG]
    import argparse

    ap = argparse.ArgumentParser(description="Summarise (and plot) the curves of an example's run log")
    ap.add_argument("log")
    ap.add_argument("--out", default=None, help="write the plot here")
    a = ap.parse_args()
    print(summarize(a.log))
    if a.out:
        try:
            plot_run(a.log, a.out)
        except ValueError as e:  # a log without per-interface curves (backprop only, gim_mnist, decoupled...)
            raise SystemExit(f"python -m dni_fast.diagnostics: no plot: {e}")
