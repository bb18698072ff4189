"""How much of the true gradient could a synthesizer predict? The offline ceiling
beside the online synthesizer, for the copy task, Penn Treebank char and the
MNIST MLP (docs/synthetic_gradients.md, "The ceiling").

Trains one DNI variant with the example's own ``main`` (every example option
after ``--`` passes through), then, on the trained model held fixed, collects
rows of (trigger, gradient) at each interface and reports, on held-out rows:

* ``online``: the example's own synthesizer, cos(S, g);
* ``ridge`` and ``mlp``: ``dni_fast.diagnostics.predictability``, regressors
  fitted offline on the other rows (the ceiling for a synthesizer that sees
  the same features);
* for the RNNs, three gradients at the truncation boundary: ``chunk`` (the
  chunk's own loss: what truncated BPTT sees), ``target`` (plus the
  synthetic gradient injected at the chunk's end: what the synthesizer
  regresses on) and ``beyond`` (the loss of the next ``--horizon`` chunks,
  backpropagated without truncation: what a synthetic gradient should add);
  for the MLP, ``true`` (full backprop) and ``target`` (what the interface
  regresses on), each from the activation alone and from the activation and
  the label (cDNI's features);
* ``dead``: per hidden layer of the synthesizer, the fraction of ReLU units
  off for every collected row (``dni_fast.diagnostics.dead_units``);
* for the RNNs, ``--lags``: a ridge fit on the model as it was k optimizer
  steps before the end, scored on the final model: how fast the map from
  state to gradient moves while the model trains;
* ``--freeze-at N``: the model's own learning rate is set to 0 after N
  steps, so that the synthesizer trains on, against a model that no longer
  moves (``online_during`` and ``online_after``, from the run's curve).

    python scripts/sg_ceiling.py copy --T 4 --log docs/logs/diag/ceiling_copy.json
    python scripts/sg_ceiling.py ptb --T 4 -- --train-tokens 200000 --eval-tokens 20000
    python scripts/sg_ceiling.py mlp -- --epochs 3 --valid 10000

The example's own options follow ``--``; the MNIST MLP's and the copy
task's default synthesizer is the ``RidgeSynthesizer`` (``-- --synth mlp``
for the ``BasicSynthesizer``, which the committed ``ceiling_mlp`` and
``ceiling_copy*`` logs ran).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import dni_fast.diagnostics as dd
from dni_fast.examples import _common as C


class _Capture:
    """Patch an example's model class to keep its instances, and the shared
    ``make_optimizer`` to snapshot the model and freeze it on request."""

    def __init__(self, module, cls_name: str, lags, freeze_at: int, total_steps: int) -> None:
        self.models, self.snaps, self.total_steps = [], {}, total_steps
        cap = self
        base = getattr(module, cls_name)

        class Captured(base):
            def __init__(s, *a, **k):
                super().__init__(*a, **k)
                cap.models.append(s)

        Captured.__name__ = base.__name__
        setattr(module, cls_name, Captured)
        make = C.make_optimizer

        def make_optimizer(model, args):
            opt = make(model, args)
            n = [0]

            def hook(o, *_):
                n[0] += 1
                if total_steps - n[0] in lags:
                    cap.snaps[total_steps - n[0]] = copy.deepcopy(model.state_dict())
                if freeze_at and n[0] == freeze_at:
                    for group in o.param_groups:
                        if group.get("name") == "model":
                            group["lr"] = 0.0

            opt.register_step_post_hook(hook)
            return opt

        C.make_optimizer = make_optimizer


def _dead(synth, x, context=None):
    """``dead_units`` for a ``BasicSynthesizer``; ``None`` for one without ReLU units (``--synth ridge``)."""
    from dni_fast import BasicSynthesizer

    return dd.dead_units(synth, x, context) if isinstance(synth, BasicSynthesizer) else None


def _score(x, grads: dict, s, mlp_steps: int, extra_features=None) -> dict:
    """The online synthesizer's outputs ``s`` and the ceilings, for each named gradient, on the same held-out rows."""
    out = {}
    for name, g in grads.items():
        p = dd.predictability(x, g, mlp_steps=mlp_steps, baseline=s)
        r = {"online": p["baseline"], "ridge": p["ridge"], "mlp": p["mlp"], "ridge_penalty": p["ridge_penalty"]}
        if extra_features is not None:
            p2 = dd.predictability(torch.cat([x, extra_features], 1), g, mlp_steps=mlp_steps)
            r.update(ridge_label=p2["ridge"], mlp_label=p2["mlp"])
        r["g_rms"] = float(g.double().pow(2).mean().sqrt())
        out[name] = r
    return out


# -- the RNN examples ----------------------------------------------------------

def _rnn_rows(step_fn, first_state, chunks, horizon: int, synth, sg_factor: float):
    """Rows (state, chunk, target, beyond, S) at each chunk start, the model fixed.

    ``step_fn(state_flat, chunk) -> (loss, end_state_flat)`` runs one chunk."""
    X, G_chunk, G_target, G_beyond, S = [], [], [], [], []
    state = first_state
    for i in range(len(chunks) - horizon):
        s0 = state.detach().requires_grad_()
        total, s = 0.0, s0
        for k in range(horizon):
            loss, s = step_fn(s, chunks[i + k])
            if k == 0:
                g_chunk = torch.autograd.grad(loss, s0, retain_graph=True)[0]
                with torch.no_grad():
                    sg_end = synth(s.detach())
                g_target = torch.autograd.grad(loss + sg_factor * (sg_end * s).sum(), s0, retain_graph=True)[0]
                next_state = s.detach()
            total = total + loss
        g_beyond = torch.autograd.grad(total, s0)[0]
        with torch.no_grad():
            S.append(synth(s0.detach()))
        X.append(s0.detach())
        G_chunk.append(g_chunk)
        G_target.append(g_target)
        G_beyond.append(g_beyond)
        state = next_state
    cat = torch.cat
    return cat(X), {"chunk": cat(G_chunk), "target": cat(G_target), "beyond": cat(G_beyond)}, cat(S)


def run_copy(opts, rest) -> dict:
    from dni_fast.examples import copy_task as CT

    argv = ["--mode", "dni", "--bptt", str(opts.T), "--no-progress", "--seed", str(opts.seed)] + rest
    args = C.parse(CT.build_parser(), argv)
    timesteps = 600 if args.quick else args.timesteps  # what copy_task.main runs (--quick: 600)
    cap = _Capture(CT, "CopyRNN", opts.lags, opts.freeze_at, timesteps // opts.T)
    result = CT.main(argv)
    run = result["runs"][-1]
    m = cap.models[-1]
    H, L = m.hidden, run["max_length"] + 1  # the length it was learning at the end
    m.train()

    def rows():
        g = torch.Generator().manual_seed(1234)
        stream = CT.EpisodeStream(args.batch_size, args.n_symbols, g)
        chunks = [stream.take(opts.T, L) for _ in range(opts.rows + opts.horizon + 5)]
        state = m.init_state(args.batch_size)
        with torch.no_grad():  # settle the state on the stream first
            for x, _, _ in chunks[:5]:
                _, state = m.rnn(m.embed(x), state)

        def step(flat, chunk):
            x, y, _ = chunk
            h, c = flat.split(H, -1)
            o, (h2, c2) = m.rnn(m.embed(x), (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
            loss = F.cross_entropy(m.readout(o).flatten(0, 1), y.flatten(), ignore_index=-1,
                                   reduction="sum") / x.shape[1]
            return loss, torch.cat([h2, c2], -1)[0]

        return _rnn_rows(step, torch.cat(state, -1)[0], chunks[5:], opts.horizon, m.dni.synthesizer,
                         m.sg_factor)  # what the run injected

    return _rnn_report(m, rows, cap, run, {"longest_L": run["max_length"]}, opts)


def run_ptb(opts, rest) -> dict:
    from dni_fast.examples import ptb_lm as PL

    argv = ["--mode", "dni", "--bptt", str(opts.T), "--no-progress", "--seed", str(opts.seed)] + rest
    args = C.parse(PL.build_parser(), argv)
    # loaded here as ptb_lm.main loads it, and handed to main: the step count below needs it
    corpus = PL.load_text(args.data, args.level, args.data_dir, max_lines=2000 if args.quick else None)
    PL.load_text = lambda *a, **k: corpus
    n_train = min(3000 if args.quick else (args.train_tokens or len(corpus.train)), len(corpus.train))
    total = ((n_train // args.batch_size - 1) // opts.T) * args.epochs
    cap = _Capture(PL, "LSTMLM", opts.lags, opts.freeze_at, total)
    result = PL.main(argv)
    run = result["runs"][-1]
    m = cap.models[-1]
    train = corpus.train[:args.train_tokens] if args.train_tokens else corpus.train
    data = PL.batchify(train, args.batch_size)
    m.train()

    def rows():
        need = opts.rows + opts.horizon
        chunks = [(data[i:i + opts.T], data[i + 1:i + 1 + opts.T])
                  for i in range(0, min(need * opts.T, data.shape[0] - opts.T - 1), opts.T)]
        state = m.init_state(args.batch_size)

        def step(flat, chunk):
            x, y = chunk
            out, st = m.rnn(m.encoder(x), m.unpack(flat))
            loss = F.cross_entropy(m.decoder(out).flatten(0, 1), y.flatten())
            return loss, m.pack(st)

        return _rnn_rows(step, m.pack(state), chunks, opts.horizon, m.dni.synthesizer, m.sg_factor)  # as injected

    return _rnn_report(m, rows, cap, run, {"test_bpc": run.get("test_metric")}, opts)


def _rnn_report(m, rows, cap, run, extra: dict, opts) -> dict:
    X, G, S = rows()
    out = {"online_final_cos": run.get("final_cos"), **extra, "rows": int(X.shape[0]),
           "dead": _dead(m.dni.synthesizer, X), "gradients": _score(X, G, S, opts.mlp_steps)}
    curve = run["history"]["curves"]["cos"] if "curves" in run["history"] else run["history"]["cos"]
    out["cos_curve"] = curve
    missing = sorted(set(opts.lags) - set(cap.snaps))
    if missing:
        raise RuntimeError(f"sg_ceiling: no snapshot for --lags {missing}: the run had only "
                           f"{cap.total_steps} optimizer steps")
    if opts.lags:
        final = copy.deepcopy(m.state_dict())
        tr, te = dd._split(X.shape[0], 0.7, 0)  # predictability's split (seed 0)
        lam = out["gradients"]["chunk"]["ridge_penalty"]
        lag_rows = {}
        for lag in sorted(cap.snaps):  # lag 0 is the final model: its fit scores the same on both
            m.load_state_dict(cap.snaps[lag])
            Xl, Gl, _ = rows()
            fit = dd.ridge_fit(Xl[tr], Gl["chunk"][tr], lam)
            lag_rows[lag] = {"own": dd.flat_cos(fit(Xl[te]), Gl["chunk"][te]),
                             "final": dd.flat_cos(fit(X[te]), G["chunk"][te])}
        m.load_state_dict(final)
        out["lags"] = lag_rows
    return out


# -- the MNIST MLP ------------------------------------------------------------

def run_mlp(opts, rest) -> dict:
    from dni_fast.examples import mnist_mlp as MM

    models = _Capture(MM, "MLP", [], 0, 0).models
    argv = ["--mode", "dni", "cdni", "--no-progress", "--seed", str(opts.seed)] + rest
    result = MM.main(argv)
    args = C.parse(MM.build_parser(), argv)
    C.setup(args)
    data = C.load_image_data(args)
    out = {}
    for m, run in zip(models, result["runs"]):
        m.train()
        n = min(opts.rows * 64, len(data.x_train))
        xs, gt, gtarget, ss, ys = [[], []], [[], []], [[], []], [[], []], []
        for b in range(0, n - 63, 64):
            x, y = data.x_train[b:b + 64].flatten(1), data.y_train[b:b + 64]
            hs, h = [], x
            for lin, bn in zip(m.linears, m.norms):
                h = bn(lin(h))
                hs.append(h)
                h = F.relu(h)
            loss = F.cross_entropy(m.output_bn(m.output(h)), y)
            g = torch.autograd.grad(loss, hs, retain_graph=True)
            ctx = C.one_hot(y, m.n_classes) if m.mode == "cdni" else None
            with torch.no_grad():
                s = [iface.synthesizer(hi.detach(), ctx) for iface, hi in zip(m.dnis, hs)]
            # what each interface regresses on: the one above's synthetic gradient carried down, the top the true one
            tg = [torch.autograd.grad(hs[i + 1], hs[i], s[i + 1], retain_graph=True)[0] for i in range(len(hs) - 1)]
            tg.append(g[-1])
            for i in range(len(hs)):
                xs[i].append(hs[i].detach())
                gt[i].append(g[i])
                gtarget[i].append(tg[i])
                ss[i].append(s[i])
            ys.append(y)
        onehot = C.one_hot(torch.cat(ys), m.n_classes).float()
        per = {}
        for i in range(len(xs)):
            X = torch.cat(xs[i])
            ctx = onehot if m.mode == "cdni" else None
            per[f"dnis.{i}"] = {"dead": _dead(m.dnis[i].synthesizer, X, ctx),
                                "gradients": _score(X, {"true": torch.cat(gt[i]), "target": torch.cat(gtarget[i])},
                                                    torch.cat(ss[i]), opts.mlp_steps, extra_features=onehot)}
        out[m.mode] = {"online_final_cos": run.get("final_cos"), "test_acc": run.get("test_acc"), "interfaces": per,
                       "rows": int(torch.cat(ys).numel())}
    return out


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("example", choices=("copy", "ptb", "mlp"))
    p.add_argument("--T", type=int, default=4, help="truncation (copy, ptb)")
    p.add_argument("--seed", type=int, default=100, help="a seed the results page does not report")
    p.add_argument("--rows", type=int, default=500, help="chunks (RNNs) or batches (MLP) of rows to collect")
    p.add_argument("--horizon", type=int, default=4, help="chunks in the 'beyond' gradient (RNNs)")
    p.add_argument("--lags", type=int, nargs="*", default=[], help="optimizer steps before the end to snapshot")
    p.add_argument("--freeze-at", type=int, default=0, help="set the model's learning rate to 0 after N steps")
    p.add_argument("--mlp-steps", type=int, default=3000, help="Adam steps of each offline MLP fit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default=None, help="write the report here as JSON")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    rest = ["--threads", str(opts.threads)] + rest
    t0 = time.time()
    report = {"copy": run_copy, "ptb": run_ptb, "mlp": run_mlp}[opts.example](opts, rest)
    doc = {"script": "scripts/sg_ceiling.py", "argv": argv + (["--"] + rest[2:] if rest[2:] else []),
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(time.time() - t0, 1),
           "report": report}
    print(json.dumps(report, indent=1, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
    if opts.log:
        os.makedirs(os.path.dirname(os.path.abspath(opts.log)), exist_ok=True)
        with open(opts.log, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
