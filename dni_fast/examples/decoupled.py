"""A four-stage MNIST network trained decoupled, with each executor, beside plain backprop.

The network: four stages of two ``Linear + BatchNorm`` layers with ReLU
between and before them, 256 wide (the first from the 784 pixels, the last
ending in ``ReLU, Linear(256, 10)``); a ``BasicSynthesizer(256, n_hidden=1)``
after each of the first three
(``dni.DecoupledSequential``, docs/decoupled.md). Variants, each from the
same seed and on the same batches:

* ``backprop``: the same four stages trained end to end (one thread);
* ``sequential``: the reference schedule on the caller's thread (delay 0:
  dni-pytorch's every-layer behaviour);
* ``sequential d=1``: the same schedule with the true gradients one step late;
* ``threads``: a worker thread per stage (delay 1: ``sequential d=1``'s
  schedule with the stages overlapping; bit for bit the same numbers at
  equal intra-op thread counts, which this example does not pin: here the
  sequential variants use the default count and each worker one thread, so
  rounding differs and the runs drift apart);
* ``streams``: a CUDA stream per stage (only where CUDA is available).

It prints samples/s of training (the first step included) and the test
accuracy of each. Throughput depends on the machine: on a 2-core CPU the
stages are small enough that the threads' overlap matters (see
``benchmarks/bench_decoupled.py`` for the interleaved measurement).

    python -m dni_fast.examples.decoupled --data mnist --epochs 2
    python -m dni_fast.examples.decoupled --quick --data digits
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.decoupled import DecoupledSequential
from dni_fast.examples import _common as C

VARIANTS = ("backprop", "sequential", "sequential d=1", "threads", "streams")


def make_stages(input_dim: int, width: int = 256, n_classes: int = 10, n_stages: int = 4) -> List[nn.Module]:
    """Stage k: ``[ReLU,] Linear, BatchNorm, ReLU, Linear, BatchNorm`` (the
    first starts from the flattened image, the last ends in ``ReLU,
    Linear(width, n_classes)``). A stage hands on the batch-normalised
    pre-activation, as the MLP examples place their interfaces: a synthetic
    gradient for a post-ReLU output would push units into ReLU's flat side,
    where no gradient ever brings them back."""
    stages = []
    for k in range(n_stages):
        layers = [nn.Flatten()] if k == 0 else [nn.ReLU()]
        layers += [nn.Linear(input_dim if k == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU(),
                   nn.Linear(width, width), nn.BatchNorm1d(width)]
        if k == n_stages - 1:
            layers += [nn.ReLU(), nn.Linear(width, n_classes)]
        stages.append(nn.Sequential(*layers))
    return stages


def make_synths(width: int = 256, n_stages: int = 4, context_dim: Optional[int] = None) -> List[nn.Module]:
    return [dni.BasicSynthesizer(width, n_hidden=1, context_dim=context_dim) for _ in range(n_stages - 1)]


def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=None, batch_size=64, lr=1e-3)
    p.add_argument("--variants", nargs="+", default=["all"], choices=("all",) + VARIANTS,
                   help="which variants to train (streams only with CUDA)")
    p.add_argument("--width", type=int, default=256, help="width of every stage")
    p.add_argument("--cdni", action="store_true", help="condition the synthesizers on the label (cDNI)")
    p.add_argument("--regression", choices=("current", "stored"), default="current",
                   help="DecoupledSequential(regression=...): regress the synthesizers' current prediction "
                        "(learns at delay >= 1) or the one stored when the stage ran (docs/design.md §4 as "
                        "written; see docs/decoupled.md)")
    p.epilog = "Default epochs: 3 on MNIST, 30 on digits, 1 with --quick."
    return p


def train_variant(name: str, args, data) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if name == "streams" else "cpu")
    stages = [s.to(device) for s in make_stages(data.input_dim, args.width, data.n_classes)]
    ctx_dim = data.n_classes if args.cdni else None
    synths = [s.to(device) for s in make_synths(args.width, context_dim=ctx_dim)]
    if args.synth_init == "zero":
        C.zero_synthesizer_output(nn.ModuleList(synths))
    iface_kw = C.interface_kwargs(args, "cdni" if args.cdni else "dni")
    if iface_kw:  # e.g. normalize_targets: the schedule honours the interface's options
        synths = [dni.BackwardInterface(s, **iface_kw) for s in synths]
    # fused Adam: one C++ call per step that releases the GIL; CPU's default for-loop Adam holds it for a large
    # part of a stage's step, which serialises the `threads` workers (docs/decoupled.md)
    adam = lambda p: torch.optim.Adam(p, lr=args.lr, fused=True)  # noqa: E731
    if name == "backprop":
        model = nn.Sequential(*stages)
        opt = adam(model.parameters())
    else:
        executor, delay = {"sequential": ("sequential", 0), "sequential d=1": ("sequential", 1),
                           "threads": ("threads", 1), "streams": ("streams", 1)}[name]
        model = DecoupledSequential(stages, synths, adam, executor=executor, delay=delay,
                                    regression=args.regression)
    g = torch.Generator().manual_seed(args.seed)
    steps, samples, train_time = 0, 0, 0.0
    losses = []
    for epoch in range(args.epochs):
        for idx in C.batch_indices(len(data.x_train), args.batch_size, g):
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            t0 = time.perf_counter()
            if name == "backprop":
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            else:
                ctx = C.one_hot(y, data.n_classes) if args.cdni else None
                loss = model.step(x, y, F.cross_entropy, context=ctx)
            train_time += time.perf_counter() - t0
            steps += 1
            samples += len(idx)
            if loss is not None:
                losses.append(loss.detach())
    if name != "backprop":
        t0 = time.perf_counter()
        losses += model.flush()
        train_time += time.perf_counter() - t0
    acc, test_loss = C.evaluate(model, data.x_test.to(device), data.y_test.to(device))
    last = losses[-min(len(losses), 50):]
    rec = {"variant": name, "test_acc": acc, "test_loss": test_loss, "steps": steps,
           "samples_per_s": samples / max(train_time, 1e-9), "train_time_s": train_time,
           "final_train_loss": float(torch.stack([l.float() for l in last]).mean()) if last else None}
    if name != "backprop":
        stats = model.stats()
        # cos_mean is NaN where every true gradient was exactly 0 (undefined): left out
        cos = [s["backward"]["cos_mean"] for s in stats
               if s["backward"]["count"] and s["backward"]["cos_mean"] == s["backward"]["cos_mean"]]
        rec["synth_cos_mean"] = sum(cos) / len(cos) if cos else None
        model.close()
    return rec


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=("synth_init", "normalize_targets"))
    C.setup(args)
    data = C.load_image_data(args)
    args.epochs = C.default_epochs(args, data, mnist=3, digits=30)
    names = VARIANTS if "all" in args.variants else tuple(v for v in VARIANTS if v in args.variants)
    if not torch.cuda.is_available():
        if "streams" in names and "all" not in args.variants:
            print("decoupled: skipping 'streams' (needs CUDA)", file=sys.stderr)
        names = tuple(v for v in names if v != "streams")
    log = C.RunLog("decoupled", args)
    log.data["config"].update({"data_name": data.name, "n_train": len(data.x_train), "n_test": len(data.x_test),
                               "epochs": args.epochs, "variants": list(names)})
    print(f"decoupled: {data.name} ({len(data.x_train)} train / {len(data.x_test)} test), {args.epochs} epochs, "
          f"batch {args.batch_size}, 4 stages of width {args.width}, Adam lr {args.lr}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in names:
        rec = train_variant(name, args, data)
        rows.append(rec)
        log.add(rec)
        print(f"  {name:<16s} test acc {rec['test_acc']:6.2f}%  {rec['samples_per_s']:8.0f} samples/s", flush=True)
    print()
    base = next((r["samples_per_s"] for r in rows if r["variant"] == "backprop"), None)
    for r in rows:
        r["speed_vs_backprop"] = None if base is None else r["samples_per_s"] / base
    C.print_table(rows, [("variant", "variant", "{}"), ("test_acc", "test acc %", "{:.2f}"),
                         ("samples_per_s", "samples/s", "{:.0f}"), ("speed_vs_backprop", "vs backprop", "{:.2f}x"),
                         ("final_train_loss", "train loss", "{:.3f}"), ("synth_cos_mean", "cos(SG, g)", "{:.3f}")])
    return log.finish({"results": {r["variant"]: {k: r.get(k) for k in ("test_acc", "samples_per_s", "steps",
                                                                         "final_train_loss", "synth_cos_mean")}
                                   for r in rows}})


if __name__ == "__main__":
    main(sys.argv[1:])
