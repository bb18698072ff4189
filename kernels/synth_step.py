"""The fused synthesizer step in Triton (the ``triton`` backend): host side.

Three primitives, with exactly the signatures and return conventions of their
fp32 PyTorch twins in :mod:`.synth_ref` (read that module for the math):

* :func:`synth_forward_triton`   -- the whole synthesizer forward, ONE launch;
* :func:`synth_update_triton`    -- regression delta, every parameter gradient
  and the four loss/cosine partial sums, ONE launch (n_hidden 0, 1 and 2);
* :func:`synth_pipelined_triton` -- step t+1's forward and step t's update in
  ONE launch (programs split between the two jobs, reading the same weights).

This file holds the host side only: input checks, workspaces and counters,
and the launchers, which build each kernel's arguments by name (every tensor
with its strides, ``s<name>0``/``s<name>1``). The device code is
:mod:`.synth_step_kernels`, the tile tables :mod:`.synth_step_tuning`, and the
design of the kernels (layouts, the one-launch update for n_hidden = 2, what
was measured) is docs/triton_kernels.md. Every launcher bumps
``LAUNCHES[<kernel name>]`` so that tests can count launches.
"""
from __future__ import annotations

import collections
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import synth_step_tuning as tuning
from ._triton_env import device_status, on_device
from .synth_ref import n_hidden_of
from .synth_step_kernels import TRITON_ERROR, triton

__all__ = ["LAUNCHES", "FWD_LAYOUT", "triton_available", "synth_forward_triton", "synth_update_triton",
           "synth_pipelined_triton"]

#: Kernel launches by kernel name (tests assert "one launch per primitive").
LAUNCHES: "collections.Counter[str]" = collections.Counter()

#: Forward layout: "rows" (default) or "tiles" (n_hidden == 1 only; docs/triton_kernels.md).
FWD_LAYOUT = os.environ.get("DNI_FAST_TRITON_FWD_LAYOUT", "rows")

_SLOT_BLOCK = 64  # partial-sum slots the last program of an update reduces per step
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_ESIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def triton_available(device) -> Tuple[bool, str]:
    """``(available, reason)``: whether these kernels can run on ``device``.

    True on a CUDA device with triton installed, and on the CPU only when
    ``TRITON_INTERPRET=1`` was set before the kernels were imported.
    """
    return device_status(device, TRITON_ERROR, tuning.INTERPRET, "dni_fast.kernels.synth_step")


# =============================================================================
# Checks
# =============================================================================
def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(f"the triton backend needs triton ({TRITON_ERROR}); pip install triton")


def _check_2d(name: str, t: Tensor, rows: Optional[int], cols: Optional[int], device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the trigger's device)")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has width {t.shape[1]}, expected {cols}")


def _check_forward(x: Tensor, c: Optional[Tensor], params: Sequence[Tensor], xname="x", cname="c"):
    """Validate (x, c, params); returns (L, Dt, Dc, (D0, D1, D2))."""
    _require_triton()
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{xname} must be a 2-D tensor (N, Dt), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    dev = x.device
    _check_2d(xname, x, None, None, dev)
    if c is not None:
        _check_2d(cname, c, x.shape[0], None, dev)
    L = n_hidden_of(params, c is not None)
    if L > 2:
        raise ValueError(f"the triton kernels support n_hidden 0..2, got {L}")
    Dt = x.shape[1]
    Dc = c.shape[1] if c is not None else 0
    _check_2d("params[0] (input_trigger.weight)", params[0], None, Dt, dev)
    D0 = params[0].shape[0]
    i = 2
    if c is not None:
        _check_2d("params[2] (input_context.weight)", params[2], D0, Dc, dev)
        i = 4
    widths = [D0]
    for l in range(L):
        _check_2d(f"params[{i + 2 * l}] (layers.{l}.weight)", params[i + 2 * l], None, widths[-1], dev)
        widths.append(params[i + 2 * l].shape[0])
    outs = [D0] + ([D0] if c is not None else []) + widths[1:]
    for j, (b, n) in enumerate(zip(params[1::2], outs)):
        if not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"params[{2 * j + 1}] (a bias) must have shape ({n},), got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if b.device != dev:
            raise ValueError(f"params[{2 * j + 1}] is on {b.device}, expected {dev} (the trigger's device)")
        if b.dtype not in _FLOAT:
            raise ValueError(f"params[{2 * j + 1}] must be a float tensor, got {b.dtype}")
    p0 = params[0].dtype
    for j, p in enumerate(params):
        if p.dtype != p0:  # one dtype for every parameter, as csrc/synth_check.cpp asks (a half layer in an fp32
            # synthesizer would get a gradient computed in another precision than its forward)
            raise ValueError(f"params[{j}] has dtype {p.dtype} but params[0] (input_trigger.weight) has {p0}; all "
                             f"synthesizer parameters must share one dtype")
    if min([Dt] + widths + ([Dc] if c is not None else [])) < 1:
        raise ValueError("every width must be at least 1")
    while len(widths) < 3:
        widths.append(0)
    return L, Dt, Dc, tuple(widths)


def _check_update(x, c, zs, s, g, L, D, xname="x", zname="zs", sname="s", gname="g"):
    N = x.shape[0]
    dev = x.device
    D0, D1, D2 = D
    if not isinstance(zs, (list, tuple)) or len(zs) != L:
        raise ValueError(f"{zname} must hold n_hidden={L} tensors, got "
                         f"{len(zs) if isinstance(zs, (list, tuple)) else type(zs).__name__}")
    for l, z in enumerate(zs):
        _check_2d(f"{zname}[{l}]", z, N, (D0, D1)[l], dev)
    Do = (D0, D1, D2)[L]
    _check_2d(sname, s, N, Do, dev)
    _check_2d(gname, g, N, Do, dev)


# =============================================================================
# Named arguments
# =============================================================================
def _mat(name: str, t: Optional[Tensor], stand_in: Tensor) -> Dict[str, object]:
    """``{name: t, s<name>0, s<name>1}``; an absent tensor becomes a stand-in
    with zero strides (its kernel branch is compiled out)."""
    if t is None:
        return {name: stand_in, f"s{name}0": 0, f"s{name}1": 0}
    return {name: t, f"s{name}0": t.stride(0), f"s{name}1": t.stride(1)}


def _vec(name: str, t: Tensor) -> Dict[str, object]:
    return {name: t, f"s{name}": t.stride(0)}


def _layers(params: Sequence[Tensor], has_c: bool, L: int):
    """``{"t": (w, b), "c": ..., "1": ..., "2": ...}``, absent layers standing in
    for by a present one (never read)."""
    t = (params[0], params[1])
    c, i = ((params[2], params[3]), 4) if has_c else (t, 2)
    one = (params[i], params[i + 1]) if L >= 1 else t
    two = (params[i + 2], params[i + 3]) if L >= 2 else one
    return {"t": t, "c": c, "1": one, "2": two}


def _weight_args(params, has_c, L, biases: bool) -> Dict[str, object]:
    layers = _layers(params, has_c, L)
    names = ("t", "c", "1", "2") if biases else ("1", "2")
    out: Dict[str, object] = {}
    for n in names:
        w, b = layers[n]
        out.update(_mat(f"w{n}", w, w))
        if biases:
            out.update(_vec(f"b{n}", b))
    return out


def _forward_args(x, c, params, outs, L) -> Dict[str, object]:
    """The forward's operands: x, c, every weight and bias, the outputs o0..o2."""
    o = list(outs) + [outs[-1]] * (3 - len(outs))
    return {**_mat("x", x, x), **_mat("c", c, x), **_weight_args(params, c is not None, L, biases=True),
            **_mat("o0", o[0], x), **_mat("o1", o[1], x), **_mat("o2", o[2], x)}


def _update_args(x, c, zs, s, g, grads, L, xname="x", cname="c") -> Dict[str, object]:
    """The update's operands but its weights: inputs (named ``xname``/``cname``),
    saved activations, s, g, and the gradient outputs (fresh, contiguous)."""
    has_c = c is not None
    gl = _layers(grads, has_c, L)
    return {**_mat(xname, x, x), **_mat(cname, c, x),
            **_mat("z0", zs[0] if L >= 1 else None, x), **_mat("z1", zs[1] if L >= 2 else None, x),
            **_mat("s", s, x), **_mat("g", g, x),
            "gwt": gl["t"][0], "gbt": gl["t"][1], "gwc": gl["c"][0], "gbc": gl["c"][1],
            "gw1": gl["1"][0], "gb1": gl["1"][1], "gw2": gl["2"][0], "gb2": gl["2"][1]}


# =============================================================================
# Workspaces
# =============================================================================
_COUNTERS: dict = {}


def _counters(device: torch.device) -> Tensor:
    """Per-(device, stream) int32 counters (tickets, done, exit) of the update.
    Kept zero between launches by the last program of each launch, so no launch
    pays for a zero fill; per stream so concurrent streams never share them."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # Inside a CUDA-graph capture a cached buffer would be wrong either way: one made here lives in
            # this graph's private pool (another graph captured on the same stream would reuse it, and it
            # goes with this graph), and its zero fill would only run when this graph replays. A fresh one
            # per launch is zeroed by a memset node at every replay and lives as long as the graph.
            return torch.zeros(4, dtype=torch.int32, device=device)
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(4, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round256(n: int) -> int:
    return (n + 255) // 256 * 256


def _n_bucket(n: int) -> int:
    # Autotune key for the batch size: a power of two in [16, 4096].
    b = 16
    while b < n and b < 4096:
        b *= 2
    return b


def _prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit inputs


def _update_workspace(L: int, N: int, D0: int, D1: int, dtype: torch.dtype, device) -> Dict[str, object]:
    """One uint8 workspace: fp32 partial-sum slots, then (L >= 1) the delta
    scratch for the owned hidden tiles in the compute dtype; with its byte
    offsets ``SCR_OFF1`` and ``SCR_OFF0`` and the counters."""
    owned = D1 if L == 2 else D0
    slot_bytes = _round256(_cdiv(owned, tuning.MIN_BLOCK_H) * 16)
    es = _ESIZE[dtype]
    off1 = slot_bytes
    off0 = off1 + (_round256(N * D1 * es) if L == 2 else 0)
    total = off0 + (_round256(N * D0 * es) if L >= 1 else 0)
    return {"ws": torch.empty(total, dtype=torch.uint8, device=device), "ctr": _counters(device),
            "SCR_OFF1": off1, "SCR_OFF0": off0}


def _n_update_programs(L: int, D0: int, D1: int, bh: int) -> int:
    return _cdiv(D1, bh) + _cdiv(D0, bh) if L == 2 else _cdiv(D0, bh)


def _n_forward_programs(L: int, N: int, D0: int, bm: int, bn: int) -> int:
    return _cdiv(N, bm) * (_cdiv(D0, bn) if L == 0 else 1)


def _grads_like(params: Sequence[Tensor]):
    # Fresh tensors: they are returned from an autograd.Function's backward.
    return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]


# =============================================================================
# The primitives
# =============================================================================
def synth_forward_triton(x: Tensor, c: Optional[Tensor], params: Sequence[Tensor]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The synthesizer forward in one launch.

    x (N, Dt), c (N, Dc) or None, params as in ``synth_ref`` (n_hidden 0..2).
    Computes in x's dtype with fp32 accumulation (weights of another dtype are
    cast as they are loaded). Inputs may be non-contiguous.

    Returns ``(s, zs)``: s (N, Do) and the L pre-activations zs, each (N, H),
    all in x's dtype and freshly allocated.
    """
    L, Dt, Dc, (D0, D1, D2) = _check_forward(x, c, params)
    N = x.shape[0]
    dev, dt = x.device, x.dtype
    outs = [torch.empty((N, d), dtype=dt, device=dev) for d in (D0, D1, D2)[: L + 1]]
    s, zs = outs[-1], tuple(outs[:-1])
    if N == 0:
        return s, zs
    tiles = FWD_LAYOUT == "tiles" and L == 1
    ws = x
    if tiles:
        # fp32 partial sums of S, then one int32 arrival counter per row block
        # (sized for the smallest BLOCK_M of the configs).
        ws = torch.zeros(N * D1 + _cdiv(N, tuning.MIN_BLOCK_M), dtype=torch.float32, device=dev)
        LAUNCHES["fill(torch.zeros)"] += 1
    args = {**_forward_args(x, c, params, outs, L), "ws": ws,
            "N": N, "Dt": Dt, "Dc": Dc, "D0": D0, "D1": D1, "D2": D2, "N_BUCKET": _n_bucket(N)}

    def grid(meta):
        if tiles:
            return (_cdiv(N, meta["BLOCK_M"]) * _cdiv(D0, meta["BLOCK_N"]),)
        return (_n_forward_programs(L, N, D0, meta["BLOCK_M"], meta["BLOCK_N"]),)

    with on_device(x):
        tuning.fwd_launch[grid](**args, L=L, HAS_C=c is not None, TILES=tiles, PREC=_prec(dt),
                                **tuning.meta(("BLOCK_M", "BLOCK_N", "BLOCK_K")))
    LAUNCHES["synth_forward"] += 1
    return s, zs


def synth_update_triton(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    s: Tensor,
    g: Tensor,
    scale: float,
    grad_scale: Optional[Tensor] = None,
) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """Regression delta, every parameter gradient and the loss partials, one launch.

    x (N, Dt), c (N, Dc) or None, params as in ``synth_ref``, zs the L saved
    pre-activations (N, H), s and g (N, Do). ``delta = scale * (s - g)`` times
    ``grad_scale`` (an optional 0-dim tensor on the device, read in the kernel:
    no host sync). Computes in x's dtype, accumulates in fp32.

    Returns ``(grads, partials)``: one fresh gradient per parameter, in that
    parameter's dtype (db_c equals db_t), and fp32 (4,)
    ``[sum((s-g)^2), sum(s*g), sum(s^2), sum(g^2)]``.
    """
    L, Dt, Dc, D = _check_forward(x, c, params)
    _check_update(x, c, zs, s, g, L, D)
    if grad_scale is not None:
        if not isinstance(grad_scale, Tensor) or grad_scale.numel() != 1 or grad_scale.device != x.device:
            raise ValueError("grad_scale must be a 1-element (0-dim) tensor on the trigger's device")
    N = x.shape[0]
    D0, D1, D2 = D
    grads = _grads_like(params)
    partials = torch.empty(4, dtype=torch.float32, device=x.device)
    args = {**_update_args(x, c, zs, s, g, grads, L), **_weight_args(params, c is not None, L, biases=False),
            **_update_workspace(L, N, D0, D1, x.dtype, x.device),
            "part": partials, "gs": grad_scale if grad_scale is not None else partials, "scale": float(scale),
            "N": N, "Dt": Dt, "Dc": Dc, "D0": D0, "D1": D1, "D2": D2, "N_BUCKET": _n_bucket(N)}

    def grid(meta):
        return (_n_update_programs(L, D0, D1, meta["BLOCK_H"]),)

    with on_device(x):
        tuning.upd_launch[grid](**args, L=L, HAS_C=c is not None, HAS_GS=grad_scale is not None,
                                PREC=_prec(x.dtype), SLOT_BLOCK=_SLOT_BLOCK,
                                **tuning.meta(("BLOCK_N", "BLOCK_H", "BLOCK_K")))
    LAUNCHES["synth_update"] += 1
    return tuple(grads), partials


def synth_pipelined_triton(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    x_prev: Tensor,
    c_prev: Optional[Tensor],
    zs_prev: Sequence[Tensor],
    s_prev: Tensor,
    g_prev: Tensor,
    scale: float,
) -> Tuple[Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
    """Step t+1's forward and step t's update in one launch (same weights).

    x (N, Dt), c (N, Dc) or None: step t+1's inputs. x_prev (NP, Dt), c_prev,
    zs_prev, s_prev, g_prev: step t's saved inputs, pre-activations and output,
    and its true gradient (NP may differ from N). Both jobs use ``params`` as
    they are now; s and zs are in x's dtype, the update computes in x_prev's.

    Returns ``(s, zs, grads_prev, partials_prev)`` as
    :func:`synth_forward_triton` and :func:`synth_update_triton`.
    """
    if (c is None) != (c_prev is None):
        raise ValueError("c and c_prev must both be given or both be None")
    L, Dt, Dc, D = _check_forward(x, c, params)
    _check_forward(x_prev, c_prev, params, "x_prev", "c_prev")
    _check_update(x_prev, c_prev, zs_prev, s_prev, g_prev, L, D, "x_prev", "zs_prev", "s_prev", "g_prev")
    if x_prev.device != x.device:
        raise ValueError(f"x_prev is on {x_prev.device}, expected {x.device}")
    if x_prev.dtype != x.dtype:
        raise ValueError(f"x_prev has dtype {x_prev.dtype}, x has {x.dtype}: one launch computes in one dtype")
    N, NP = x.shape[0], x_prev.shape[0]
    D0, D1, D2 = D
    dev, dt = x.device, x.dtype
    outs = [torch.empty((N, d), dtype=dt, device=dev) for d in (D0, D1, D2)[: L + 1]]
    s, zs = outs[-1], tuple(outs[:-1])
    grads = _grads_like(params)
    partials = torch.empty(4, dtype=torch.float32, device=dev)
    # The forward's operands (x, c, every weight) plus the update's, whose
    # inputs are named xp/cp; both halves read the same weights.
    args = {**_forward_args(x, c, params, outs, L),
            **_update_args(x_prev, c_prev, zs_prev, s_prev, g_prev, grads, L, xname="xp", cname="cp"),
            **_update_workspace(L, NP, D0, D1, dt, dev),
            "part": partials, "gs": partials, "scale": float(scale),
            "N": N, "NP": NP, "Dt": Dt, "Dc": Dc, "D0": D0, "D1": D1, "D2": D2, "N_BUCKET": _n_bucket(max(N, NP))}

    def grid(meta):
        return (_n_update_programs(L, D0, D1, meta["BLOCK_H"])
                + _n_forward_programs(L, N, D0, meta["BLOCK_N"], meta["BLOCK_H"]),)

    with on_device(x):
        tuning.pipe_launch[grid](**args, L=L, HAS_C=c is not None, PREC=_prec(dt), SLOT_BLOCK=_SLOT_BLOCK,
                                 **tuning.meta(("BLOCK_N", "BLOCK_H", "BLOCK_K")))
    LAUNCHES["synth_pipelined"] += 1
    return s, zs, tuple(grads), partials
