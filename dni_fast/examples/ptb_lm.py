"""LSTM language model trained with truncated BPTT, with and without DNI.

Truncated BPTT cuts the gradient every T steps. With DNI, a synthesizer
predicts the gradient that the cut-off future would have sent into the last
state of each chunk (the paper's Figure 3), exactly as dni-pytorch's
``examples/rnn`` does:

* ``make_trigger`` on the chunk's initial state: the true gradient that reaches
  it (the chunk's own loss plus the synthetic gradient injected at its end,
  i.e. a bootstrapped target) trains the synthesizer;
* ``backward(final_state, factor)`` at the chunk's end injects the synthetic
  gradient (scaled by ``--sg-factor``: 0.1 as in dni-pytorch with the
  ``BasicSynthesizer``, ``--synth mlp``; 0.5 with the default
  ``RidgeSynthesizer``, chosen on the validation split);
* both inside ``dni.defer_backward()``, since real and synthetic gradients go
  through one graph.

The LSTM state is a tuple ``(h, c)`` of ``(layers, batch, hidden)``; one
interface serves both: the trigger is ``[h, c]`` of every layer concatenated
per batch row, ``(batch, 2 * layers * hidden)``, so that the regression loss is
normalised by the batch size.

``--level char`` reports bits per character (as in the paper), ``--level
word`` perplexity. The data is Penn Treebank (``--data ptb``) or an embedded
generated corpus (``--data synthetic``); ``--train-tokens`` trains on a slice.

    python -m dni_fast.examples.ptb_lm --level char --bptt 2 4 8
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.examples.data import load_text
from dni_fast.examples import _common as C


class LSTMLM(nn.Module):
    """Embedding, LSTM, linear decoder; optionally a BackwardInterface on the
    state between truncated chunks."""

    def __init__(self, n_tokens: int, emb: int, hidden: int, layers: int = 1, dropout: float = 0.0,
                 use_dni: bool = False, synth_hidden: int = 2, sg_factor: float = 0.1,
                 backend: Optional[str] = None, interface_kwargs: Optional[dict] = None,
                 synthesizer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers, self.hidden, self.sg_factor = layers, hidden, sg_factor
        self.sg_control = "none"
        self.probe: Optional[C.BoundaryProbe] = None  # set by train_one: S against the true gradient
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(n_tokens, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, n_tokens)
        if use_dni and synthesizer is None:
            synthesizer = dni.BasicSynthesizer(2 * layers * hidden, n_hidden=synth_hidden)
        self.dni = (dni.BackwardInterface(synthesizer, backend=backend, **(interface_kwargs or {}))
                    if use_dni else None)

    def init_state(self, batch: int):
        z = self.decoder.weight.new_zeros(self.layers, batch, self.hidden)
        return z, z.clone()

    def pack(self, state) -> torch.Tensor:
        """``(h, c)`` -> ``(batch, 2 * layers * hidden)``."""
        h, c = state
        return torch.cat([h, c], 0).transpose(0, 1).reshape(h.shape[1], -1)

    def unpack(self, flat: torch.Tensor):
        s = flat.view(flat.shape[0], 2 * self.layers, self.hidden).transpose(0, 1)
        return s[:self.layers].contiguous(), s[self.layers:].contiguous()

    def forward(self, tokens: torch.Tensor, state):
        """``tokens (T, B)`` -> logits ``(T, B, V)``, final state."""
        use_dni = self.dni is not None and self.training
        if use_dni:
            flat = self.dni.make_trigger(self.pack(state))
            if self.probe is not None:
                self.probe.take(flat, self.dni.receive(flat.detach()))
            state = self.unpack(flat)
        out, state = self.rnn(self.drop(self.encoder(tokens)), state)
        if use_dni:
            flat = self.pack(state)
            if self.sg_control == "shuffle":  # a control: S of another row's state (same distribution, no match)
                perm = torch.roll(torch.arange(flat.shape[0], device=flat.device), 1)
                dni.backward(flat, self.dni.receive(flat.detach()[perm]) * self.sg_factor)
            else:
                self.dni.backward(flat, factor=self.sg_factor)
        return self.decoder(self.drop(out)), state


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``(N,)`` -> ``(N // batch, batch)``: ``batch`` parallel streams."""
    n = ids.numel() // batch
    return ids[:n * batch].view(batch, n).t().contiguous()


@torch.no_grad()
def evaluate(model: LSTMLM, data: torch.Tensor, chunk: int = 100) -> float:
    """Mean cross-entropy per token (nats) over ``data (N, B)``."""
    model.eval()
    state = model.init_state(data.shape[1])
    total, count = 0.0, 0
    for i in range(0, data.shape[0] - 1, chunk):
        x, y = data[i:i + chunk], data[i + 1:i + 1 + chunk]
        x = x[:len(y)]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    if count == 0:
        raise ValueError(f"ptb_lm.evaluate: data of shape {tuple(data.shape)} has no token to predict")
    return total / count


def metric(loss: float, level: str) -> float:
    """Bits per character, or perplexity."""
    return loss / math.log(2) if level == "char" else math.exp(min(loss, 50.0))


def train_one(args, corpus, T: int, use_dni: bool, name: str) -> dict:
    torch.manual_seed(args.seed)
    model = LSTMLM(len(corpus), args.emb, args.hidden, args.layers, args.dropout, use_dni, args.synth_hidden,
                   args.sg_factor, interface_kwargs=C.interface_kwargs(args),
                   synthesizer=C.ridge_synthesizer(args, 2 * args.layers * args.hidden) if use_dni else None)
    model.sg_control = args.sg_control
    if args.synth_init == "zero":
        C.zero_synthesizer_output(model)
    opt = C.make_optimizer(model, args)
    rec = C.CurveRecorder(model, opt)
    model.probe = probe = C.BoundaryProbe() if use_dni else None
    own = C.own_parameters(model)
    train = corpus.train[:args.train_tokens] if args.train_tokens else corpus.train
    valid = corpus.valid[:args.eval_tokens] if args.eval_tokens else corpus.valid
    test = corpus.test[:args.eval_tokens] if args.eval_tokens else corpus.test
    train_b = batchify(train, args.batch_size)
    valid_b, test_b = batchify(valid, args.eval_batch_size), batchify(test, args.eval_batch_size)
    for what, b, n, size, flag in (("training", train_b, len(train), args.batch_size, "--batch-size"),
                                   ("validation", valid_b, len(valid), args.eval_batch_size, "--eval-batch-size"),
                                   ("test", test_b, len(test), args.eval_batch_size, "--eval-batch-size")):
        need = T + 1 if what == "training" else 2
        if b.shape[0] < need:  # else nothing is trained, or evaluated (a loss of 0: 0 bits per character)
            raise ValueError(f"ptb_lm: the {what} split ({n} tokens) in {size} streams ({flag}) leaves "
                             f"{b.shape[0]} tokens per stream, fewer than the {need} needed (T={T}); use more "
                             f"tokens or fewer streams")
    steps_per_epoch = (train_b.shape[0] - 1) // T
    total = steps_per_epoch * args.epochs
    eval_every = max(total // max(args.n_evals, 1), 1)
    sched = C.make_schedule(opt, args, total)
    # true_cos: S against the chunk's own gradient (C.BoundaryProbe), DNI only
    hist = {"step": [], "tokens": [], "train_loss": [], "valid_loss": [], "valid_metric": [], "cos": [], "time": [],
            **{"true_" + k: [] for k in C.BoundaryProbe.KEYS}}
    bar = C.progress(total=total, desc=name, disable=args.no_progress)
    step, train_time, run_loss, run_n = 0, 0.0, 0.0, 0
    model.train()
    for epoch in range(args.epochs):
        state = model.init_state(args.batch_size)
        for i in range(0, steps_per_epoch * T, T):
            x, y = train_b[i:i + T], train_b[i + 1:i + 1 + T]
            t0 = time.perf_counter()
            state = tuple(s.detach() for s in state)  # truncate
            opt.zero_grad(set_to_none=True)
            scale = y.numel() if args.loss == "sum" else 1  # summed over time and batch, or averaged
            with dni.defer_backward():
                logits, state = model(x, state)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                if probe is not None:
                    t1 = time.perf_counter()
                    probe.measure(loss * scale)
                    t0 += time.perf_counter() - t1
                dni.backward(loss * scale)
            if args.clip:  # the same threshold for the mean loss's gradient either way
                nn.utils.clip_grad_norm_(own, args.clip * scale)
            evaluating = (step + 1) % eval_every == 0 or step + 1 == total
            if evaluating:
                t1 = time.perf_counter()
                rec.before_step()
                t0 += time.perf_counter() - t1
            opt.step()
            if sched is not None:
                sched.step()
            train_time += time.perf_counter() - t0
            step += 1
            run_loss += loss.item()
            run_n += 1
            bar.update(1)
            if evaluating:
                vl = evaluate(model, valid_b)
                cos = rec.record()
                hist["step"].append(step)
                hist["tokens"].append(step * T * args.batch_size)
                hist["train_loss"].append(run_loss / run_n)
                hist["valid_loss"].append(vl)
                hist["valid_metric"].append(metric(vl, args.level))
                hist["cos"].append(cos)
                p = probe.read() if probe is not None else {}
                for k in C.BoundaryProbe.KEYS:
                    hist["true_" + k].append(p.get(k))
                hist["time"].append(train_time)
                run_loss, run_n = 0.0, 0
                bar.set_postfix(valid=f"{metric(vl, args.level):.3f}")
    bar.close()
    if rec.curves:
        hist["interfaces"] = rec.curves
    hist["adam_step_ratio"] = rec.ratio
    test_loss = evaluate(model, test_b)
    best = min(range(len(hist["valid_loss"])), key=hist["valid_loss"].__getitem__)
    return {
        "variant": name, "bptt": T, "dni": use_dni,
        "test_loss": test_loss, "test_metric": metric(test_loss, args.level),
        "valid_metric": hist["valid_metric"][-1], "best_valid_metric": hist["valid_metric"][best],
        "train_time_s": train_time, "ms_per_step": 1000.0 * train_time / max(step, 1), "steps": step,
        "train_tokens": int(train_b.numel()), "final_cos": hist["cos"][-1],
        "final_true_cos": hist["true_cos"][-1], "history": hist,
    }


def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, batch_size=32, lr=1e-3,
                      data_choices=("auto", "ptb", "synthetic"))
    # Recommended (docs/synthetic_gradients.md, "Penn Treebank"): the ridge synthesizer, injected at 0.5,
    # chosen on the validation split. With --synth mlp: normalised regression targets (with dni-pytorch's
    # settings, --dni-pytorch, that synthesizer's output is its own optimiser's noise, and it diverged in 2 of
    # 6 runs); the ridge synthesizer drops the normalisation unless --normalize-targets is given.
    p.set_defaults(n_evals=10, normalize_targets="all")
    p.add_argument("--level", choices=("char", "word"), default="char", help="character or word level")
    p.add_argument("--bptt", type=C.positive_int, nargs="+", default=[2, 4, 8], help="truncation lengths T")
    p.add_argument("--mode", choices=("all", "bptt", "dni"), default="all", help="which variants to train")
    p.add_argument("--hidden", type=C.positive_int, default=256, help="LSTM units")
    p.add_argument("--emb", type=int, default=None, help="embedding size (default: 64 char, 128 word)")
    p.add_argument("--layers", type=C.positive_int, default=1, help="LSTM layers")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout")
    p.add_argument("--synth-hidden", type=C.non_negative_int, default=2, help="synthesizer hidden layers (--synth mlp)")
    C.add_synth_options(p, default="ridge")
    p.add_argument("--sg-factor", type=float, default=None,
                   help="scale of the injected synthetic gradient (default: 0.5 with --synth ridge, 0.1 with "
                        "--synth mlp, dni-pytorch's)")
    p.add_argument("--sg-control", choices=("none", "shuffle"), default="none",
                   help="diagnosis control: 'shuffle' injects the synthetic gradient predicted from another stream's "
                        "state (the same magnitudes and distribution, no information about this state)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip the LSTM's gradient norm (of the mean loss) to this (0: none)")
    p.add_argument("--train-tokens", type=C.positive_int, default=None, help="train on the first N tokens only")
    p.add_argument("--eval-tokens", type=C.positive_int, default=None,
                   help="validate and test on the first N tokens only")
    p.add_argument("--eval-batch-size", type=C.positive_int, default=16, help="parallel streams when evaluating")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=set(C.TUNING_OPTIONS) - {"valid"})  # the corpus has its own valid split
    if args.quick:
        C.quick_defaults(args, bptt=[2], hidden=32, train_tokens=3000, eval_tokens=1000, n_evals=2)
        args.synth_hidden = min(args.synth_hidden, 1)
    if args.emb is None:
        args.emb = 64 if args.level == "char" else 128
    C.setup(args)
    corpus = load_text(args.data, args.level, args.data_dir, max_lines=2000 if args.quick else None)
    log = C.RunLog("ptb_lm", args)
    log.data["config"].update({"corpus": corpus.name, "vocab": len(corpus)})
    unit = "bpc" if args.level == "char" else "ppl"
    print(f"ptb_lm: {corpus.name}, vocab {len(corpus)}, train tokens "
          f"{min(args.train_tokens or len(corpus.train), len(corpus.train))}, LSTM {args.layers}x{args.hidden}, "
          f"T={args.bptt}, batch {args.batch_size}, Adam lr {args.lr}, {args.loss} loss, {args.epochs} epoch(s), "
          f"seed {args.seed}, "
          f"backend {dni.get_backend()}, {torch.get_num_threads()} threads", flush=True)
    rows, total = C.truncation_sweep(args, log, lambda T, use_dni, label: train_one(args, corpus, T, use_dni, label),
                                     lambda rec: f"test {unit} {rec['test_metric']:8.3f}")
    print()
    C.print_table(rows, [("variant", "variant", "{}"), ("test_metric", f"test {unit}", "{:.3f}"),
                         ("best_valid_metric", f"best valid {unit}", "{:.3f}"), ("final_cos", "cos(SG, g)", "{:.3f}"),
                         ("ms_per_step", "ms/step", "{:.2f}"), ("train_time_s", "train time s", "{:.1f}")])
    print(f"\ntotal time {C.fmt_time(total)}")
    return log.finish({"unit": unit, "level": args.level, "total_time_s": total,
                       "results": {r["variant"]: {"test": r["test_metric"], "bptt": r["bptt"], "method": r["method"]}
                                   for r in rows}})


if __name__ == "__main__":
    main(sys.argv[1:])
