"""Greedy InfoMax on MNIST patches: three gradient-isolated modules, each
trained by its own InfoNCE, against end-to-end CPC and a random encoder.

Every image (28x28, padded to 32x32) is cut into a 7x7 grid of 8x8 patches
with stride 4, and a patch encoder maps each patch to a vector; InfoNCE
(``dni_fast.local.InfoNCE``, GIM's: K=5 steps down the grid, skip 1, 16
negatives) makes the vector of a patch predict those of the patches below it.

The encoder, three modules (widths ``--widths a b c``):

* module 1: Conv(1, a, 2, stride 2), ReLU, Conv(a, a, 1), ReLU: a 16x16 map;
  each patch covers a 4x4 block of it (stride 2);
* module 2: Conv(a, b, 2, stride 2), ReLU, Conv(b, b, 1), ReLU: 8x8, a patch
  covers 2x2 (stride 1);
* module 3: Conv(b, c, 2), ReLU, Conv(c, c, 1), ReLU: 7x7, one position per
  patch.

No convolution is padded and the receptive field of a module-3 position is
exactly its 8x8 patch, so running the network on the whole image computes
every patch's encoding independently (as GIM's code does, patch by patch),
sharing the work of overlapping patches. A module's patch vectors are its map
averaged over each patch's block (GIM's per-patch pooling): a (B, C, 7, 7)
grid for InfoNCE.

Methods:

* ``gim``: ``GradientIsolated`` with one InfoNCE per module; each module's
  input is detached and its graph freed before the next module runs;
* ``cpc``: the same encoder as ONE module with one InfoNCE at the top
  (end-to-end backprop; GIM's baseline);
* ``random``: the encoder at its random initialisation.

Each is followed by a linear probe (logistic regression, Adam) on the frozen
features of every module, averaged over the 7x7 grid (GIM's protocol):
``probe_acc`` is that of module 3.

    python -m dni_fast.examples.gim_mnist --data mnist --seed 1
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dni_fast.examples import _common as C
from dni_fast.local import GradientIsolated, InfoNCE

METHODS = ("gim", "cpc", "random")


# ---------------------------------------------------------------------------
# The encoder and its patch grids
# ---------------------------------------------------------------------------
def encoder_modules(widths: Sequence[int] = (32, 64, 128)) -> List[nn.Module]:
    """The three modules (see the module docstring)."""
    a, b, c = widths
    return [
        nn.Sequential(nn.Conv2d(1, a, 2, stride=2), nn.ReLU(), nn.Conv2d(a, a, 1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(a, b, 2, stride=2), nn.ReLU(), nn.Conv2d(b, b, 1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(b, c, 2), nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU()),
    ]


# (kernel, stride) of the average pool that maps module i's map to its 7x7
# patch grid: the block each 8x8 patch covers, and the patch stride, in that
# module's resolution
_POOL = [(4, 2), (2, 1), (1, 1)]
GRID = 7  # rows (and columns) of every module's patch grid
MAX_K_STEPS = GRID - 2  # the context at row y predicts row y + k + skip, skip = 1: k <= 7 - 1 - 1


def patch_grid(i: int, h: torch.Tensor) -> torch.Tensor:
    """Module i's output (B, C, s, s) -> the (B, C, 7, 7) patch vectors."""
    k, s = _POOL[i]
    return h if k == 1 else F.avg_pool2d(h, k, s)


class GridInfoNCE(nn.Module):
    """InfoNCE on module i's patch grid (a local loss: ``loss(h)``)."""

    needs_target = False

    def __init__(self, i: int, channels: int, k_steps: int, negatives: int, backend: Optional[str]) -> None:
        super().__init__()
        self.i = i
        self.nce = InfoNCE(channels, k_steps=k_steps, negatives=negatives, backend=backend)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.nce(patch_grid(self.i, h))


def pad32(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(N, 1, 28, 28) normalised images -> (N, 1, 32, 32), padded with black."""
    return F.pad(x, (2, 2, 2, 2), value=(0.0 - mean) / std)


# ---------------------------------------------------------------------------
# Training and probing
# ---------------------------------------------------------------------------
def build(method: str, args) -> tuple:
    """(the three modules, a GradientIsolated or None)."""
    mods = encoder_modules(args.widths)
    opt = lambda p: torch.optim.Adam(p, lr=args.lr)  # noqa: E731
    kw = dict(k_steps=args.k_steps, negatives=args.negatives, backend=args.infonce_backend)
    if method == "gim":
        losses = [GridInfoNCE(i, w, **kw) for i, w in enumerate(args.widths)]
        return mods, GradientIsolated(mods, losses, opt)
    if method == "cpc":
        return mods, GradientIsolated([nn.Sequential(*mods)], [GridInfoNCE(2, args.widths[2], **kw)], opt)
    return mods, None


def train(gi: GradientIsolated, x_train: torch.Tensor, args, desc: str) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = max(len(x_train) // args.batch_size, 1)
    total = steps_per_epoch * args.epochs
    every = max(total // 20, 1)
    hist: Dict[str, list] = {"step": [], "loss": []}
    acc, n, step, t_train = None, 0, 0, 0.0
    bar = C.progress(total=total, desc=desc, disable=args.no_progress)
    gi.train()
    for _ in range(args.epochs):
        for idx in C.batch_indices(len(x_train), args.batch_size, g):
            t0 = time.perf_counter()
            losses = [v for v in gi.step(x_train[idx]) if v is not None]
            t_train += time.perf_counter() - t0
            vals = torch.stack(losses)
            acc = vals if acc is None else acc + vals
            n += 1
            step += 1
            bar.update(1)
            if step % every == 0 or step == total:
                mean = (acc / n).tolist()
                hist["step"].append(step)
                hist["loss"].append(mean)
                bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in mean))
                acc, n = None, 0
    bar.close()
    return {"steps": step, "train_time_s": t_train, "ms_per_step": 1000 * t_train / max(step, 1),
            "final_infonce": hist["loss"][-1] if hist["loss"] else None, "history": hist}


@torch.no_grad()
def features(mods: Sequence[nn.Module], x: torch.Tensor, batch: int = 500) -> List[torch.Tensor]:
    """Every module's patch vectors averaged over the grid: [(N, C_i)]."""
    for m in mods:
        m.eval()
    out: List[List[torch.Tensor]] = [[] for _ in mods]
    for i in range(0, len(x), batch):
        h = x[i:i + batch]
        for j, m in enumerate(mods):
            h = m(h)
            out[j].append(patch_grid(j, h).mean((2, 3)))
    for m in mods:
        m.train()
    return [torch.cat(o) for o in out]


def linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 epochs: int, seed: int, n_classes: int = 10) -> float:
    """Test accuracy (%) of logistic regression on standardised features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = nn.Linear(a.shape[1], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in C.batch_indices(len(a), 256, g):
            opt.zero_grad()
            F.cross_entropy(clf(a[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return 100.0 * (clf(b).argmax(1) == y_test).float().mean().item()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=None, batch_size=32, lr=1e-3)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to train")
    p.add_argument("--widths", nargs=3, type=C.positive_int, default=[32, 64, 128], metavar=("A", "B", "C"),
                   help="channels of the three modules")
    p.add_argument("--k-steps", type=C.positive_int, default=5,
                   help=f"InfoNCE prediction steps (rows ahead, GIM: 5; at most {MAX_K_STEPS} on the 7x7 patch grid)")
    p.add_argument("--negatives", type=C.positive_int, default=16, help="InfoNCE negatives per position (GIM: 16)")
    p.add_argument("--infonce-backend", default=None, choices=["auto", "reference", "chunked", "triton"],
                   help="InfoNCE backend (default: auto)")
    p.add_argument("--train-images", type=C.positive_int, default=None,
                   help="images for the unsupervised training (default: 20000 on MNIST, all on digits)")
    p.add_argument("--probe-images", type=C.positive_int, default=None,
                   help="labelled training images for the linear probe (default: 10000 on MNIST, all on digits)")
    p.add_argument("--probe-epochs", type=C.positive_int, default=None, help="linear probe epochs (default 30; 5 with --quick)")
    p.epilog = "Default epochs: 2 on MNIST, 20 on digits, 1 with --quick."
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=())
    if args.k_steps > MAX_K_STEPS:
        parser.error(f"--k-steps {args.k_steps}: at most {MAX_K_STEPS}, since the patch grid has 7 rows and row y "
                     f"predicts row y + k + 1 (InfoNCE's skip of 1)")
    C.setup(args)
    data = C.load_image_data(args)
    if tuple(data.x_train.shape[-2:]) != (28, 28):
        raise SystemExit("gim_mnist needs 28x28 images")
    args.epochs = C.default_epochs(args, data, mnist=2, digits=20)
    mnist = data.name == "mnist"
    n_train = args.train_images or (20000 if mnist and not args.quick else len(data.x_train))
    n_probe = args.probe_images or (10000 if mnist and not args.quick else len(data.x_train))
    args.probe_epochs = args.probe_epochs or (5 if args.quick else 30)
    x_all = pad32(data.x_train, data.mean, data.std)
    x_test = pad32(data.x_test, data.mean, data.std)
    x_train = x_all[:n_train]
    log = C.RunLog("gim_mnist", args)
    log.data["config"].update({"data_name": data.name, "n_train": len(x_train), "n_probe": min(n_probe, len(x_all)),
                               "n_test": len(x_test), "epochs": args.epochs})
    print(f"gim_mnist: {data.name} ({len(x_train)} unlabelled train / {min(n_probe, len(x_all))} probe / "
          f"{len(x_test)} test), {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, widths "
          f"{args.widths}, InfoNCE K={args.k_steps} N={args.negatives}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    with C.timed() as elapsed:
        for method in args.methods:
            torch.manual_seed(args.seed)
            mods, gi = build(method, args)
            rec = {"variant": method}
            if gi is not None:
                rec.update(train(gi, x_train, args, method))
            else:
                rec.update({"steps": 0, "train_time_s": 0.0, "ms_per_step": None, "final_infonce": None})
            t0 = time.perf_counter()
            f_tr = features(mods, x_all[:n_probe])
            f_te = features(mods, x_test)
            y_tr = data.y_train[:n_probe]
            rec["probe_acc_per_module"] = [linear_probe(a, y_tr, b, data.y_test, args.probe_epochs, args.seed)
                                           for a, b in zip(f_tr, f_te)]
            rec["probe_acc"] = rec["probe_acc_per_module"][-1]
            rec["probe_time_s"] = time.perf_counter() - t0
            rows.append(rec)
            log.add(rec)
            per = " / ".join(f"{a:.2f}" for a in rec["probe_acc_per_module"])
            print(f"  {method:<7s} probe acc (modules 1/2/3) {per} %  "
                  f"(train {C.fmt_time(rec['train_time_s'])}, probe {C.fmt_time(rec['probe_time_s'])})", flush=True)
        total = elapsed()
    for r in rows:
        r["m1"], r["m2"], r["m3"] = r["probe_acc_per_module"]
    print()
    C.print_table(rows, [("variant", "method", "{}"), ("m1", "module 1 %", "{:.2f}"), ("m2", "module 2 %", "{:.2f}"),
                         ("m3", "module 3 %", "{:.2f}"), ("ms_per_step", "ms/step", "{:.1f}"),
                         ("train_time_s", "train s", "{:.1f}")])
    print(f"\ntotal time {C.fmt_time(total)}")
    return log.finish({"results": {r["variant"]: {"probe_acc": r["probe_acc"],
                                                  "probe_acc_per_module": r["probe_acc_per_module"],
                                                  "final_infonce": r["final_infonce"], "ms_per_step": r["ms_per_step"],
                                                  "train_time_s": r["train_time_s"]} for r in rows},
                       "total_time_s": total})


if __name__ == "__main__":
    main(sys.argv[1:])
