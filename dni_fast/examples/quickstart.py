"""Quickstart: train an MLP with synthetic gradients, then time every backend.

One command, no data files, about a minute on a 2-core laptop CPU:

    python -m dni_fast.examples.quickstart

1. Trains the 784-256-256-10 BatchNorm MLP of ``mnist_mlp`` three ways on
   scikit-learn's digits (upsampled to 28x28; ``--data mnist`` for real MNIST):
   plain backprop, DNI (a ``BackwardInterface`` after each hidden layer, so
   each layer updates from a synthetic gradient at once) and cDNI (the
   synthesizers also see the label), and prints their test accuracy.
2. Times a training step of the same DNI model on every backend that
   ``dni.available_backends()`` lists here, against ``reference`` and against
   plain backprop, all interleaved in one run (``dni_fast.timing.time_many``):
   the ratios are measured side by side; absolute times on a shared CPU are
   indicative only.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

import dni_fast as dni
from dni_fast.examples import _common as C
from dni_fast.examples.mnist_mlp import MLP


def speed_table(data, batch_size: int, min_run_time: float) -> list:
    """ms per training step (forward, backward, Adam) of the DNI MLP on each
    available backend, and of plain backprop, on one fixed batch. Every
    provider is timed side by side, interleaved in blocks (``dni_fast.timing.
    time_many``), so that the ratios survive a machine whose speed drifts."""
    from dni_fast import backends
    from dni_fast.timing import time_many

    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.x_train), generator=g)[:batch_size]
    x, y = data.x_train[idx], data.y_train[idx]
    steps, notes = {"(plain backprop)": C.train_step(MLP(data.input_dim, mode="backprop"), x, y)}, {}
    cpu = torch.device("cpu")
    for b in backends.registered():
        if not b.status(cpu)[0]:
            continue
        if b.interpreted(cpu):  # the Triton interpreter: for tests, far too slow to time
            notes[b.name] = "skipped: CPU interpreter (tests only)"
            continue
        steps[b.name] = C.train_step(MLP(data.input_dim, mode="dni", backend=b.name), x, y)
    times = time_many(steps, cpu, min_run_time=min_run_time)
    bp, ref = times["(plain backprop)"]["ms"], times["reference"]["ms"]
    rows = []
    for name, t in times.items():
        row = {"backend": name, "ms_per_step": t["ms"], "vs_backprop": t["ms"] / bp}
        if name != "(plain backprop)":
            row["speedup_vs_reference"] = ref / t["ms"]
        rows.append(row)
    rows += [{"backend": name, "note": note} for name, note in notes.items()]
    return rows


def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=None, batch_size=64, lr=1e-3,
                      data_choices=("digits", "mnist", "auto"))
    p.add_argument("--speed-time", type=float, default=1.5, help="seconds of timing per backend (interleaved)")
    p.add_argument("--no-speed", action="store_true", help="skip the backend timing")
    p.epilog = "Default epochs: 40 on digits, 2 on MNIST, 1 with --quick."
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=set(C.TUNING_OPTIONS) - {"normalize_targets"})
    C.setup(args)
    data = C.load_image_data(args)
    args.epochs = C.default_epochs(args, data, mnist=2, digits=40)
    if args.quick:
        args.speed_time = min(args.speed_time, 0.1)
    variants = {m: (lambda m=m: MLP(data.input_dim, mode=m)) for m in ("backprop", "dni", "cdni")}
    print("== 1. Accuracy: backprop vs DNI vs cDNI ==")
    result = C.run_classifier_variants("quickstart", args, data, variants, {"hidden": [256, 256]})
    if not args.no_speed:
        print(f"\n== 2. Speed: one training step of the DNI MLP, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads, every backend timed side by side (interleaved) ==")
        rows = speed_table(data, args.batch_size, args.speed_time)
        C.print_table(rows, [("backend", "backend", "{}"), ("ms_per_step", "ms/step", "{:.3f}"),
                             ("speedup_vs_reference", "speed-up vs reference", "{:.2f}x"),
                             ("vs_backprop", "time vs backprop", "{:.2f}x"), ("note", "note", "{}")])
        missing = [b for b in ("cpp", "cuda", "triton") if b not in dni.available_backends("cpu")]
        if missing:
            print("\nnot available here: " + "; ".join(f"{b}: {dni.backend_status(b, 'cpu')[1]}" for b in missing))
        result["summary"]["speed"] = rows
        result["summary"]["speed_batch_size"] = args.batch_size
        C.save_json(args.log, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
