"""MNIST CNN with a convolutional synthesizer, written through the public API.

A custom synthesizer is any ``nn.Module`` with ``forward(trigger, context)``;
``ConvSynthesizer`` below keeps the feature map's shape (padded 5x5
convolutions), adds a projection of the context (one-hot label) to every
position for cDNI, and zero-initialises its output convolution so that the
first synthetic gradients are zero. Custom synthesizers always run through
plain autograd, whatever the backend.

The classifier: conv 5x5 (10) - BN - max-pool - ReLU - conv 5x5 (20) - BN -
max-pool - ReLU - fc 50 - BN - ReLU - fc 10 - BN, with a ``BackwardInterface``
on each convolutional block's output (before its ReLU).

    python -m dni_fast.examples.mnist_cnn --data mnist --epochs 1
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.examples import _common as C

MODES = ("backprop", "dni", "cdni")


class ConvSynthesizer(nn.Module):
    """Predicts the gradient of a ``(B, C, H, W)`` feature map from the map
    itself: ``n_hidden`` hidden 5x5 convolutions of ``width`` channels with
    ReLU, then an output 5x5 convolution back to ``channels``, initialised to
    zero. With ``context_dim`` the context ``(B, context_dim)`` is projected to
    ``width`` channels and added at every position of the first layer."""

    def __init__(self, channels: int, n_hidden: int = 1, width: Optional[int] = None,
                 context_dim: Optional[int] = None, kernel: int = 5, spatial: Optional[tuple] = None) -> None:
        super().__init__()
        # spatial=(H, W): the context is projected to a separate value at every position instead of one value
        # per channel broadcast over the map (docs/synthetic_gradients.md: the head's gradient for a label is a
        # position-dependent pattern, which a translation-equivariant synthesizer cannot produce from a
        # uniform context).
        self.spatial = tuple(spatial) if spatial else None
        width = width or channels
        pad = kernel // 2
        ins = [channels] + [width] * n_hidden
        self.hidden = nn.ModuleList(nn.Conv2d(a, width, kernel, padding=pad) for a in ins[:-1])
        ctx_ch = width if n_hidden else channels
        npos = self.spatial[0] * self.spatial[1] if self.spatial else 1
        self.context = nn.Linear(context_dim, ctx_ch * npos) if context_dim else None
        self.out = nn.Conv2d(ins[-1], channels, kernel, padding=pad)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, trigger: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        z = trigger
        for i, conv in enumerate(self.hidden):
            z = conv(z)
            if i == 0 and self.context is not None:
                z = z + self._context(context, z)
            z = F.relu(z)
        z = self.out(z)
        if not self.hidden and self.context is not None:
            z = z + self._context(context, z)
        return z

    def _context(self, context: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.context(context)
        if self.spatial is None:
            return c[:, :, None, None]
        return c.view(c.shape[0], -1, *self.spatial)


class CNN(nn.Module):
    def __init__(self, mode: str = "dni", synth_hidden: int = 1, n_classes: int = 10,
                 interface_kwargs: Optional[dict] = None, spatial_context: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.n_classes = mode, n_classes
        self.conv1, self.bn1 = nn.Conv2d(1, 10, 5), nn.BatchNorm2d(10)
        self.conv2, self.bn2 = nn.Conv2d(10, 20, 5), nn.BatchNorm2d(20)
        self.fc1, self.bn3 = nn.Linear(320, 50), nn.BatchNorm1d(50)
        self.fc2, self.bn4 = nn.Linear(50, n_classes), nn.BatchNorm1d(n_classes)
        if mode == "backprop":
            self.dni1 = self.dni2 = None
        else:
            ctx = n_classes if mode == "cdni" else None
            kw = interface_kwargs or {}
            sp = spatial_context
            self.dni1 = dni.BackwardInterface(ConvSynthesizer(10, synth_hidden, context_dim=ctx,
                                                              spatial=(12, 12) if sp else None), **kw)
            self.dni2 = dni.BackwardInterface(ConvSynthesizer(20, synth_hidden, context_dim=ctx,
                                                              spatial=(4, 4) if sp else None), **kw)

    def forward(self, x, y=None):
        context = C.one_hot(y, self.n_classes) if self.mode == "cdni" and self.training else None
        with dni.synthesizer_context(context):
            x = F.max_pool2d(self.bn1(self.conv1(x)), 2)
            if self.dni1 is not None:
                x = self.dni1(x)
            x = F.max_pool2d(self.bn2(self.conv2(F.relu(x))), 2)
            if self.dni2 is not None:
                x = self.dni2(x)
            x = F.relu(self.bn3(self.fc1(F.relu(x).flatten(1))))
            return self.bn4(self.fc2(x))


def build_parser():
    # Recommended settings (docs/synthetic_gradients.md): a cosine learning-rate decay, as for mnist_mlp;
    # --dni-pytorch restores a constant rate and dni-pytorch's synthesizer init.
    p = C.base_parser(__doc__.split("\n")[0], epochs=None, batch_size=64, lr=1e-3, lr_schedule="cosine")
    p.add_argument("--mode", choices=("all",) + MODES, nargs="+", default=["all"], help="which variants to train")
    p.add_argument("--synth-hidden", type=C.non_negative_int, default=1, help="hidden convolutions of each synthesizer")
    p.add_argument("--synth-context", choices=("uniform", "spatial"), default="uniform",
                   help="cDNI: the label's projection is one value per channel over the whole map (uniform) or "
                        "one per position (spatial)")
    # The feature maps' gradients are ~1e-6 to 1e-4 per element: normalised targets (docs/synthetic_gradients.md)
    p.set_defaults(normalize_targets="all")
    p.epilog = "Default epochs: 2 on MNIST, 30 on digits, 1 with --quick."
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = C.parse(build_parser(), argv)
    C.setup(args)
    data = C.load_image_data(args)
    if data.x_train.shape[-1] != 28:
        raise SystemExit("mnist_cnn needs 28x28 images")
    args.epochs = C.default_epochs(args, data, mnist=2, digits=30)
    modes = MODES if "all" in args.mode else tuple(m for m in MODES if m in args.mode)
    variants = {m: (lambda m=m: CNN(m, args.synth_hidden, interface_kwargs=C.interface_kwargs(args, m),
                                     spatial_context=args.synth_context == "spatial")) for m in modes}
    return C.run_classifier_variants("mnist_cnn", args, data, variants, {"synth_hidden": args.synth_hidden})


if __name__ == "__main__":
    main(sys.argv[1:])
