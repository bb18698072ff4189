"""MNIST MLP with complete unlock: a BidirectionalInterface (Sec. 3.4 of the paper).

The net is 784-256-256-10 with BatchNorm and ReLU. Between the last hidden
layer and the output layer sits a ``dni.BidirectionalInterface``:

* its forward synthesizer predicts the hidden activation from the image
  (``trigger_dim=784``), so the output layer trains on a *synthetic input*
  and need not wait for the layers below (forward unlock);
* its backward synthesizer predicts the gradient of the real activation, so
  the layers below need not wait for the output layer (update unlock).

In evaluation mode the real activation passes through. Both synthesizers are
``BasicSynthesizer(256, n_hidden=2)``; cDNI conditions both on the label.

    python -m dni_fast.examples.mnist_full_unlock --data mnist --epochs 2
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.examples import _common as C

MODES = ("backprop", "dni", "cdni")


class UnlockedMLP(nn.Module):
    def __init__(self, input_dim: int = 784, hidden: int = 256, n_classes: int = 10, mode: str = "dni",
                 synth_hidden: int = 2) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.n_classes = mode, n_classes
        self.hidden1, self.bn1 = nn.Linear(input_dim, hidden, bias=False), nn.BatchNorm1d(hidden)
        self.hidden2, self.bn2 = nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden)
        self.output, self.output_bn = nn.Linear(hidden, n_classes, bias=False), nn.BatchNorm1d(n_classes)
        if mode == "backprop":
            self.unlock = None
        else:
            ctx = n_classes if mode == "cdni" else None
            self.unlock = dni.BidirectionalInterface(
                dni.BasicSynthesizer(hidden, n_hidden=synth_hidden, trigger_dim=input_dim, context_dim=ctx),
                dni.BasicSynthesizer(hidden, n_hidden=synth_hidden, context_dim=ctx))

    def forward(self, x, y=None):
        image = x.flatten(1)
        context = C.one_hot(y, self.n_classes) if self.mode == "cdni" and self.training else None
        with dni.synthesizer_context(context):
            h = self.bn1(self.hidden1(image))
            h = self.bn2(self.hidden2(F.relu(h)))
            if self.unlock is not None:
                h = self.unlock(h, image)  # training: synthetic input out, synthetic gradient in
            return self.output_bn(self.output(F.relu(h)))


def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=None, batch_size=64, lr=1e-3)
    p.add_argument("--mode", choices=("all",) + MODES, nargs="+", default=["all"], help="which variants to train")
    p.add_argument("--synth-hidden", type=C.non_negative_int, default=2, help="hidden layers of both synthesizers")
    p.epilog = "Default epochs: 5 on MNIST, 40 on digits, 1 with --quick."
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=set(C.TUNING_OPTIONS) - {"normalize_targets"})
    C.setup(args)
    data = C.load_image_data(args)
    args.epochs = C.default_epochs(args, data, mnist=5, digits=40)
    modes = MODES if "all" in args.mode else tuple(m for m in MODES if m in args.mode)
    variants = {m: (lambda m=m: UnlockedMLP(data.input_dim, mode=m, synth_hidden=args.synth_hidden)) for m in modes}
    return C.run_classifier_variants("mnist_full_unlock", args, data, variants, {"synth_hidden": args.synth_hidden})


if __name__ == "__main__":
    main(sys.argv[1:])
