"""Per-interface statistics of the synthesizer's regression, kept on the device."""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from dni_fast._compile import compiler_disable

__all__ = ["SynthStats", "partials_of", "apply_with_row"]

# A reserved row holds this in every column until its update writes it. Column 2
# is sum(S^2): never negative, and NaN or inf when S is not finite, so a written
# row never reads as unwritten (a NaN fill would, for a NaN step).
_UNWRITTEN = -1.0

#: Called before the rows are read (set by dni_fast.overlap: wait until the
#: worker has written the rows of the updates it is computing).
before_read: Optional[Callable[[], None]] = None
#: Whether ``before_read`` may be called now (set by dni_fast.overlap: not on a
#: thread that is running an overlap job, which would wait for itself). When
#: it may not, a full ring is set aside and folded at the next read.
can_wait: Optional[Callable[[], bool]] = None


def partials_of(s: Tensor, g: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The four partial sums of one step, fp32 (4,): ``[sum((s-g)^2), sum(s*g),
    sum(s^2), sum(g^2)]`` (what every fused update returns too), written into
    ``out`` (a statistics row) when given."""
    sf, gf = s.detach().float(), g.detach().float()
    d = sf - gf
    return torch.stack([(d * d).sum(), (sf * gf).sum(), (sf * sf).sum(), (gf * gf).sum()], out=out)


class SynthStats:
    """Regression loss, cosine, relative error and norms of one interface.

    Each step writes its four partial sums (:func:`partials_of`) into a row of
    a ring, reserved at its forward on every backend and mode (the steps are
    ordered by their forwards, and a step counts once however many backwards
    run through it: ``retain_graph``), written by its first update: recording
    is one small device copy and never syncs. Everything
    else is derived from the rows when :meth:`read` is called, or when the ring
    fills (every ``CAPACITY`` steps).

    A row reserved at forward time may be written after its ring was folded (a
    ``stats()`` read between a forward and its backward; an RNN that makes more
    than ``CAPACITY`` triggers before one backward): such a ring is kept and
    folded again, counting only the rows written since, for ``CARRY`` more
    folds. A step whose true gradient never arrives within that leaves its row
    unwritten and is not counted.

    A step whose synthetic or true gradient holds a NaN or an inf (detected on
    the device from the sums of squares, which are then not finite; a sum of
    squares that overflows fp32 counts too) is counted in ``nonfinite`` and
    kept out of the means.
    """

    CAPACITY = 128
    CARRY = 2  # each carried ring costs a re-fold (a few small ops) at each of the next folds

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every step recorded so far. A row reserved at forward time and written after the reset (a
        step whose backward comes after it) still counts, as on the backends that record at backward time."""
        carried = []
        if self.__dict__.get("_ring") is not None and self._scales and self._late:
            self._retire_current()
        for ring, scales, _counted, left, *rest in self.__dict__.get("_rings", []):  # (4 items: an older pickle)
            half = rest[0] if rest else None
            if left > 1:  # may still get late rows: what is written now is forgotten, later rows count
                carried.append([ring, scales, ring[:len(scales), 2] != _UNWRITTEN, left, half])
        self._ring: Optional[Tensor] = None  # (CAPACITY, 4) fp32
        self._scales: List[float] = []
        self._late = False  # a row of the current ring was reserved for a later write
        # Rings that left the current slot, oldest first, as [ring, scales, rows counted so far (bool, device;
        # None: never folded), folds left, the scales halved on the device (None: not yet made)]: set aside
        # full (see can_wait), or carried for their late rows.
        self._rings: List[list] = carried
        # (8,): sums of (loss, cos, rel_err, s_norm, g_norm), count, nonfinite, count with g != 0
        self._sum: Optional[Tensor] = None
        self._last: Optional[Tensor] = None  # (5,) last finite (loss, cos, rel_err, s_norm, g_norm)

    def reserve(self, scale: float, device: torch.device, late: bool = True) -> Tensor:
        """A fresh (4,) fp32 row for one step's partials; the step's loss is
        ``scale / 2 * partials[0]``. ``late``: the row may be written after a
        fold (reserved at forward time)."""
        if self._ring is None or self._ring.device != device or len(self._scales) == self.CAPACITY:
            if can_wait is not None and not can_wait():
                self._retire_current()
            else:
                self._fold()
            # A new ring rather than reuse: a row reserved by a step whose
            # backward has not run yet may still be written later. Filled once
            # per CAPACITY steps instead of once per row (~3 us a step).
            # Never an inference tensor (a ring first needed inside torch.inference_mode): the rows are
            # written by updates that run outside it.
            with torch.inference_mode(False):
                self._ring = torch.full((self.CAPACITY, 4), _UNWRITTEN, dtype=torch.float32, device=device)
            self._late = False
        row = self._ring[len(self._scales)]
        self._scales.append(scale)
        self._late = self._late or late
        return row

    def step_row(self, scale: float, device: torch.device) -> Optional[Tensor]:
        """The row of one step, reserved at its forward (so that every backend
        orders the steps by their forwards, and counts a step once however many
        backwards run through it), or ``None`` for a forward that builds no
        graph (no update will write it). Written by the step's first backward."""
        return self.reserve(scale, device) if torch.is_grad_enabled() else None

    def record(self, partials: Tensor, scale: float) -> None:
        self.reserve(scale, partials.device, late=False).copy_(partials)

    def _retire_current(self) -> None:
        """Move the current ring to ``_rings``: folded once, or ``1 + CARRY`` times
        when a row of it may still be written."""
        if self._scales and self._ring is not None:
            self._rings.append([self._ring, self._scales, None, 1 + (self.CARRY if self._late else 0), None])
        self._ring, self._scales = None, []

    def _fold(self, final: bool = False) -> None:
        """Fold every ring into the sums, oldest first, counting each row once.
        ``final``: a read, which syncs anyway: drop the rings that are complete."""
        self._retire_current()
        if not self._rings:
            return
        if before_read is not None:
            before_read()
        rings, self._rings = self._rings, []
        for ring, scales, counted, left, *rest in rings:  # (4 items: a ring pickled by an earlier dni_fast)
            half = rest[0] if rest else None
            if half is None:  # made once per ring (its scales are final), not at each of its folds
                half = _halved(scales, ring.device)
            counted = self._fold_one(ring, half, counted)
            if left > 1 and not (final and bool(counted.all())):
                self._rings.append([ring, scales, counted, left - 1, half])

    def _fold_one(self, ring: Tensor, half: Tensor, counted: Optional[Tensor]) -> Tensor:
        """Add the rows of ``ring`` written and not ``counted`` before (``half``: (n,) fp64, the rows' loss
        scales halved); returns the rows counted now."""
        n = half.shape[0]
        p = ring[:n].double()
        written = p[:, 2] != _UNWRITTEN
        new = written if counted is None else written & ~counted
        finite = torch.isfinite(p).all(1)
        ok = new & finite
        s2, g2 = p[:, 2].clamp_min(0), p[:, 3].clamp_min(0)
        tiny = 1e-300
        # cos(S, g) from fp32 partials: when S is so small that its squares underflow (|S|^2 == 0) while
        # S . g does not (a huge g), the quotient is meaningless (seen: 9e285 in a diverging run). S that
        # rounds to nothing predicts nothing: 0, as for S == 0. Rounding can also push |cos| a hair past 1.
        cos = torch.where(s2 > 0, p[:, 1] / torch.sqrt(s2 * g2).clamp_min(tiny), 0.0).clamp(-1.0, 1.0)
        vals = torch.stack([p[:, 0] * half,                                   # loss
                            cos,                                              # cos(S, g)
                            torch.sqrt(p[:, 0].clamp_min(0) / g2.clamp_min(tiny)),  # |S-g| / |g|
                            torch.sqrt(s2), torch.sqrt(g2)], 1)
        # cos and |S-g|/|g| are undefined for a true gradient of exactly 0 (a chunk with no loss, the
        # first steps below a zero-initialised synthesizer): such steps count in the loss and norms but
        # not in those two means (counted as 0 and 1e150 they made both means meaningless).
        defined = ok & (g2 > 0)
        per_col = torch.stack([ok, defined, defined, ok, ok], 1)
        vals = torch.where(per_col, vals, 0.0)
        sums = torch.cat([vals.sum(0), ok.sum().reshape(1).double(), (new & ~finite).sum().reshape(1).double(),
                          defined.sum().reshape(1).double()])
        idx = torch.arange(1, n + 1, device=p.device)[:, None]
        last_idx = (per_col * idx).argmax(0)  # per column: the last step where it is defined
        last = vals.gather(0, last_idx[None, :])[0]
        prev = self._last if self._last is not None else torch.full((5,), math.nan, dtype=torch.float64,
                                                                     device=p.device)
        self._last = torch.where(per_col.any(0), last, prev.to(p.device))
        self._sum = sums if self._sum is None else sums + self._sum.to(sums.device)
        return written

    def state(self) -> dict:
        """The folded sums (syncs; every row written by then is counted), for a checkpoint."""
        self._fold(final=True)
        return {"sum": None if self._sum is None else self._sum.detach().clone(),
                "last": None if self._last is None else self._last.detach().clone()}

    def load_state(self, st: Optional[dict]) -> None:
        """Restore :meth:`state` (``None``: forget everything, as ``reset``)."""
        self.reset()
        if st:
            self._sum, self._last = st.get("sum"), st.get("last")

    def read(self) -> dict:
        """Python numbers (syncs): the last and mean ``loss`` and ``cos``, the last
        ``rel_err`` (``|S-g|/|g|``), ``s_norm`` and ``g_norm`` with their means,
        ``count`` (finite steps recorded) and ``nonfinite`` (steps with a NaN or
        inf in S or g). ``cos`` and ``rel_err`` (last and mean) leave out the
        steps whose true gradient is exactly 0, where they are undefined (NaN
        when every step so far was such a step)."""
        self._fold(final=True)
        sums = self._sum.tolist() if self._sum is not None else [0.0] * 8
        count, nonfinite, defined = int(sums[5]), int(sums[6]), int(sums[7])
        keys = ("loss", "cos", "rel_err", "s_norm", "g_norm")
        if count == 0:
            out = {k: math.nan for k in keys}
            out.update({f"{k}_mean": math.nan for k in keys})
        else:
            last = self._last.tolist()
            out = {k: last[i] for i, k in enumerate(keys)}
            for i, k in enumerate(keys):
                n = defined if k in ("cos", "rel_err") else count
                out[f"{k}_mean"] = sums[i] / n if n else math.nan
        out["count"] = count
        out["nonfinite"] = nonfinite
        return out


def _halved(scales: List[float], device: torch.device) -> Tensor:
    """``scales * 0.5`` as (n,) fp64 on ``device`` (exact: a halving); made there when they are all equal,
    as they are for a fixed batch shape (no host-to-device copy)."""
    if all(x == scales[0] for x in scales):
        return torch.full((len(scales),), scales[0] * 0.5, dtype=torch.float64, device=device)
    return torch.tensor(scales, dtype=torch.float64).to(device, non_blocking=True) * 0.5


@compiler_disable  # the row is a fresh tensor a step: torch.compile would guard on it and recompile every step
def apply_with_row(fn, stats: Optional[SynthStats], scale: float, on: Tensor, *args, lead: tuple = ()):
    """``fn.apply(*lead, row, scale, *args)``: an updater ``torch.autograd.Function`` given the step's
    statistics row, reserved now, at the forward (``SynthStats.step_row``; ``None`` without ``stats``)."""
    return fn.apply(*lead, None if stats is None else stats.step_row(scale, on.device), scale, *args)
