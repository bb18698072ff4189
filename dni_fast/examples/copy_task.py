"""Copy task: synthetic gradients extend the time an RNN can learn over.

An LSTM reads a stream of copy-task episodes (``L`` random symbols, a
delimiter, then ``L`` blank steps during which it must output the symbols in
order; ``dni_fast.examples.data.copy_task_episode``). It is trained with truncated
BPTT over chunks of ``T`` steps that cut across episodes, so a plain LSTM
gets no gradient from a recall step back to the symbol it needs once ``L``
exceeds about ``T``. With DNI (``make_trigger`` on each chunk's first state,
``backward(last_state, factor)`` on its last, in ``dni.defer_backward``; see
``ptb_lm``) a synthesizer supplies the gradient from beyond the truncation.

A curriculum as in the paper: ``L`` starts at 1 and grows by one whenever the
last ``--window`` episodes at the current length average fewer than
``--threshold`` wrong symbols per sequence (the paper: 0.15 bits). The result
is the longest ``L`` solved within a fixed budget of time steps.

    python -m dni_fast.examples.copy_task --bptt 2 4 8
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.examples.data import copy_task_episode
from dni_fast.examples import _common as C


class CopyRNN(nn.Module):
    """Embedding, LSTM, linear readout, and optionally a BackwardInterface on
    the state between truncated chunks (trigger ``[h, c]``, ``(B, 2H)``)."""

    def __init__(self, n_symbols: int, hidden: int, use_dni: bool, synth_hidden: int = 2, sg_factor: float = 0.1,
                 emb: int = 16, interface_kwargs: Optional[dict] = None, synthesizer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.hidden, self.sg_factor = hidden, sg_factor
        self.embed = nn.Embedding(n_symbols + 2, emb)
        self.rnn = nn.LSTM(emb, hidden)
        self.readout = nn.Linear(hidden, n_symbols)
        if use_dni and synthesizer is None:
            synthesizer = dni.BasicSynthesizer(2 * hidden, n_hidden=synth_hidden)
        self.dni = dni.BackwardInterface(synthesizer, **(interface_kwargs or {})) if use_dni else None
        self.probe: Optional[C.BoundaryProbe] = None  # set by train_one: S against the true gradient

    def init_state(self, batch: int):
        z = self.readout.weight.new_zeros(1, batch, self.hidden)
        return z, z.clone()

    def forward(self, x: torch.Tensor, state):
        use_dni = self.dni is not None and self.training
        if use_dni:
            flat = self.dni.make_trigger(torch.cat(state, -1)[0])
            if self.probe is not None:
                self.probe.take(flat, self.dni.receive(flat.detach()))
            state = tuple(s.unsqueeze(0).contiguous() for s in flat.split(self.hidden, -1))
        out, state = self.rnn(self.embed(x), state)
        if use_dni:
            self.dni.backward(torch.cat(state, -1)[0], factor=self.sg_factor)
        return self.readout(out), state


class EpisodeStream:
    """Synchronous episode streams for a batch, cut into chunks of ``T``
    steps; episodes are generated at the curriculum's current length."""

    def __init__(self, batch: int, n_symbols: int, generator: torch.Generator) -> None:
        self.batch, self.n_symbols, self.g = batch, n_symbols, generator
        self.x = torch.empty(0, batch, dtype=torch.long)
        self.y = torch.empty(0, batch, dtype=torch.long)
        self.ep = torch.empty(0, dtype=torch.long)
        self.lengths: dict = {}
        self.next_id = 0

    def take(self, T: int, length: int):
        while self.x.shape[0] < T:
            x, y = copy_task_episode(self.batch, length, self.n_symbols, self.g)
            self.lengths[self.next_id] = length
            self.x, self.y = torch.cat([self.x, x]), torch.cat([self.y, y])
            self.ep = torch.cat([self.ep, torch.full((x.shape[0],), self.next_id, dtype=torch.long)])
            self.next_id += 1
        out = self.x[:T], self.y[:T], self.ep[:T]
        self.x, self.y, self.ep = self.x[T:], self.y[T:], self.ep[T:]
        return out


def _probe_point(curve: dict, probe: Optional[C.BoundaryProbe]) -> None:
    p = probe.read() if probe is not None else {}
    for k in C.BoundaryProbe.KEYS:
        curve["true_" + k].append(p.get(k))


def train_one(args, T: int, use_dni: bool, name: str) -> dict:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = CopyRNN(args.n_symbols, args.hidden, use_dni, args.synth_hidden, args.sg_factor,
                    interface_kwargs=C.interface_kwargs(args),
                    synthesizer=C.ridge_synthesizer(args, 2 * args.hidden) if use_dni else None)
    if args.synth_init == "zero":
        C.zero_synthesizer_output(model)
    opt = C.make_optimizer(model, args)
    rec = C.CurveRecorder(model, opt)
    model.probe = probe = C.BoundaryProbe() if use_dni else None
    own = C.own_parameters(model)
    stream = EpisodeStream(args.batch_size, args.n_symbols, g)
    state = model.init_state(args.batch_size)
    L, solved, window = 1, 0, []
    wrong: dict = {}
    finished = set()
    hist = {"timesteps": [], "length": [], "time": []}
    # the interface's curves, n_evals points; true_cos: S against the chunk's own gradient (C.BoundaryProbe)
    curve = {"timesteps": [], "cos": [], "length": [], **{"true_" + k: [] for k in C.BoundaryProbe.KEYS}}
    steps, timesteps, train_time = 0, 0, 0.0
    total = args.timesteps // T
    eval_every = max(total // max(args.n_evals, 1), 1)
    sched = C.make_schedule(opt, args, total)
    bar = C.progress(total=total, desc=name, disable=args.no_progress)
    model.train()
    while steps < total and L <= args.max_length:
        x, y, ep = stream.take(T, L)
        t0 = time.perf_counter()
        state = tuple(s.detach() for s in state)
        opt.zero_grad(set_to_none=True)
        scale = x.shape[1] if args.loss == "sum" else 1
        with dni.defer_backward():
            logits, state = model(x, state)
            # summed over the chunk's recall steps; per sequence, times the batch size with --loss sum
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum") / x.shape[1]
            if probe is not None:
                t1 = time.perf_counter()
                probe.measure(loss * scale)
                t0 += time.perf_counter() - t1
            dni.backward(loss * scale)
        if args.clip:
            nn.utils.clip_grad_norm_(own, args.clip * scale)
        evaluating = (steps + 1) % eval_every == 0
        if evaluating:
            t1 = time.perf_counter()
            rec.before_step()
            t0 += time.perf_counter() - t1
        opt.step()
        if sched is not None:
            sched.step()
        train_time += time.perf_counter() - t0
        steps += 1
        timesteps += T
        bar.update(1)
        if evaluating:
            curve["timesteps"].append(timesteps)
            curve["cos"].append(rec.record())
            curve["length"].append(solved)
            _probe_point(curve, probe)
        # curriculum bookkeeping: wrong symbols per episode
        with torch.no_grad():
            bad = ((logits.argmax(-1) != y) & (y >= 0)).sum(1).tolist()
        for e, b in zip(ep.tolist(), bad):
            wrong[e] = wrong.get(e, 0) + b
        last = int(ep[-1])
        for e in [e for e in wrong if e < last and e not in finished]:
            finished.add(e)
            if stream.lengths[e] == L:
                window.append(wrong.pop(e) / args.batch_size)
            else:
                wrong.pop(e)
        if len(window) >= args.window:
            if sum(window[-args.window:]) / args.window < args.threshold:
                solved = L
                L += 1
                hist["timesteps"].append(timesteps)
                hist["length"].append(solved)
                hist["time"].append(train_time)
                bar.set_postfix(solved=solved)
            window = []
    bar.close()
    last = rec.record() if steps % eval_every else None  # the stretch since the last point
    if last is not None or not curve["cos"]:
        curve["timesteps"].append(timesteps)
        curve["cos"].append(last)
        curve["length"].append(solved)
        _probe_point(curve, probe)
    hist["curves"] = curve
    if rec.curves:
        hist["interfaces"] = rec.curves
    hist["adam_step_ratio"] = rec.ratio
    final_cos = next((c for c in reversed(curve["cos"]) if c is not None), None)
    final_true_cos = next((c for c in reversed(curve["true_cos"]) if c is not None), None)
    return {"variant": name, "bptt": T, "dni": use_dni, "max_length": solved, "timesteps": timesteps,
            "steps": steps, "train_time_s": train_time, "ms_per_step": 1000.0 * train_time / max(steps, 1),
            "final_cos": final_cos, "final_true_cos": final_true_cos, "history": hist}


def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, batch_size=32, lr=3e-3, data_choices=("generated",))
    p.add_argument("--bptt", type=C.positive_int, nargs="+", default=[2, 4, 8], help="truncation lengths T")
    p.add_argument("--mode", choices=("all", "bptt", "dni"), default="all", help="which variants to train")
    p.add_argument("--hidden", type=C.positive_int, default=64, help="LSTM units")
    p.add_argument("--n-symbols", type=C.positive_int, default=8, help="alphabet size")
    p.add_argument("--synth-hidden", type=C.non_negative_int, default=2, help="synthesizer hidden layers (--synth mlp)")
    # Recommended (docs/synthetic_gradients.md, "A synthesizer that keeps up"): the closed-form ridge
    # synthesizer; --synth mlp (or --dni-pytorch) restores dni-pytorch's BasicSynthesizer.
    C.add_synth_options(p, default="ridge")
    # Recommended with the ridge synthesizer: 0.5, chosen on a held-out seed (100; docs/synthetic_gradients.md,
    # "The injection's scale"); dni-pytorch's 0.1 with --synth mlp or --dni-pytorch.
    p.add_argument("--sg-factor", type=float, default=None,
                   help="scale of the injected synthetic gradient (default: 0.5 with --synth ridge, 0.1 with "
                        "--synth mlp, dni-pytorch's)")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip the LSTM's gradient norm (of the per-sequence loss) to this (0: none)")
    p.add_argument("--timesteps", type=C.positive_int, default=60_000, help="training budget in time steps (per run)")
    p.add_argument("--max-length", type=C.positive_int, default=64, help="stop once this length is solved")
    p.add_argument("--window", type=C.positive_int, default=20, help="episodes per curriculum decision")
    p.add_argument("--threshold", type=float, default=0.15, help="wrong symbols per sequence to count as solved")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=set(C.TUNING_OPTIONS) - {"valid"})  # no held-out split (a held-out seed is)
    if args.quick:
        C.quick_defaults(args, bptt=[2], hidden=16, timesteps=600, window=4)
        args.synth_hidden = min(args.synth_hidden, 1)
    C.setup(args)
    log = C.RunLog("copy_task", args)
    print(f"copy_task: LSTM {args.hidden}, {args.n_symbols} symbols, T={args.bptt}, batch {args.batch_size}, "
          f"{args.timesteps} time steps per run, Adam lr {args.lr}, {args.loss} loss, seed {args.seed}, "
          f"backend {dni.get_backend()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows, total = C.truncation_sweep(args, log, lambda T, use_dni, label: train_one(args, T, use_dni, label),
                                     lambda rec: f"longest copy solved: {rec['max_length']:3d}")
    print()
    C.print_table(rows, [("variant", "variant", "{}"), ("max_length", "longest L solved", "{}"),
                         ("final_cos", "cos(SG, g)", "{:.3f}"), ("ms_per_step", "ms/step", "{:.2f}"),
                         ("train_time_s", "train time s", "{:.1f}")])
    print(f"\ntotal time {C.fmt_time(total)}")
    return log.finish({"total_time_s": total, "results": {r["variant"]: {"max_length": r["max_length"],
                                                                          "bptt": r["bptt"], "method": r["method"]}
                                                          for r in rows}})


if __name__ == "__main__":
    main(sys.argv[1:])
