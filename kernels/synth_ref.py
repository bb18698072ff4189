"""fp32 pure-PyTorch twins of the fused synthesizer-step primitives.

Every fast backend (``triton``, ``cpp``, ``cuda``) implements the same two
primitives with the same signatures, and is tested against these.

Shapes (leading dims of the user's tensors are flattened into ``N`` rows by the
caller):

    x       (N, Dt)   trigger
    c       (N, Dc)   context, or ``None`` when the synthesizer has no context
    params  flat sequence, in dni-pytorch's layer order:
            w_t (H0, Dt), b_t (H0,)                 input_trigger
            [w_c (H0, Dc), b_c (H0,)]               input_context, if c is given
            w_1 (H1, H0), b_1 (H1,), ... w_L, b_L   layers[0..L-1], L = n_hidden
            H0 = Do when L == 0, else the hidden width; the last layer has Do rows.
    zs      tuple of L tensors (N, H): pre-activations z_l, with
            z_0 = x w_t^T + b_t (+ c w_c^T + b_c),  z_{l} = relu(z_{l-1}) w_l^T + b_l
    s       (N, Do)   the synthesizer's output, S = z_L
    g       (N, Do)   the regression target (the true gradient, or the true message)

The regression loss is ``scale / 2 * sum((s - g) ** 2)`` and its gradient with
respect to ``s`` is ``delta = scale * (s - g)``: ``scale = 2 / g.size(0)`` for a
BackwardInterface (dni-pytorch's normalisation by the first dimension) and
``2 / g.numel()`` for a ForwardInterface (``F.mse_loss``); the caller computes
it once (``dni_fast/regression.py``).

``upcast`` (flash-attention's ``attention_ref`` switch): ``True`` (default)
computes in fp32 (fp64 for fp64 inputs), the reference every fast path is
held to; ``False`` computes in the inputs' own dtype, as PyTorch would run the
reference module in that precision. A low-precision fast path passes when its
error against ``upcast=True`` is at most twice that of ``upcast=False``
(docs/design.md §6).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def n_hidden_of(params: Sequence[Tensor], has_context: bool) -> int:
    """Number of hidden layers implied by the flat parameter list."""
    n = len(params) - 2 - (2 if has_context else 0)
    if n < 0 or n % 2:
        raise ValueError(f"bad synthesizer parameter list of length {len(params)} (has_context={has_context})")
    return n // 2


def _acc(t: Tensor, upcast: bool = True) -> torch.dtype:
    # fp32 accumulation for fp32/fp16/bf16; fp64 stays fp64; no upcast: t's own dtype.
    if not upcast:
        return t.dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def synth_forward_ref(x: Tensor, c: Optional[Tensor], params: Sequence[Tensor],
                      upcast: bool = True) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Synthesizer forward in fp32 (fp64 for fp64 inputs; ``x``'s dtype with
    ``upcast=False``).

    Returns ``(s, zs)``: ``s`` (N, Do) and the pre-activations ``zs`` (L tensors
    of (N, H)), both cast back to ``x.dtype``.
    """
    L = n_hidden_of(params, c is not None)
    acc = _acc(x, upcast)
    w = [p.to(acc) for p in params]
    z = torch.addmm(w[1], x.to(acc), w[0].t())
    i = 2
    if c is not None:
        z = z + torch.addmm(w[3], c.to(acc), w[2].t())
        i = 4
    zs = []
    for _ in range(L):
        zs.append(z)
        z = torch.addmm(w[i + 1], torch.relu(z), w[i].t())
        i += 2
    return z.to(x.dtype), tuple(t.to(x.dtype) for t in zs)


def synth_update_ref(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    zs: Sequence[Tensor],
    s: Tensor,
    g: Tensor,
    scale: float,
    grad_scale: Optional[Tensor] = None,
    upcast: bool = True,
) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """Regression loss and every synthesizer parameter gradient, in fp32
    (``s``'s dtype with ``upcast=False``; the partial sums are fp32 always).

    ``grad_scale`` is an optional 0-dim tensor on ``s``'s device that multiplies
    ``scale`` (the incoming gradient of a loss node); read on the device, so the
    batch size and the loss weight never force a host sync or a recompile.

    Returns ``(grads, partials)``:

    * ``grads``: one tensor per entry of ``params``, same shape and dtype;
    * ``partials``: fp32 (4,) = ``[sum((s-g)^2), sum(s*g), sum(s^2), sum(g^2)]``,
      from which the loss (``scale/2 * partials[0]``) and the cosine similarity
      between ``s`` and ``g`` follow.
    """
    L = n_hidden_of(params, c is not None)
    acc = _acc(s, upcast)
    sf, gf = s.to(acc), g.to(acc)
    s32, g32 = s.to(_acc(s)), g.to(_acc(s))
    d32 = s32 - g32
    partials = torch.stack([(d32 * d32).sum(), (s32 * g32).sum(), (s32 * s32).sum(), (g32 * g32).sum()]).float()
    diff = sf - gf
    d = diff * scale
    if grad_scale is not None:
        d = d * grad_scale.to(acc)
    w = [p.to(acc) for p in params]
    first_hidden = 4 if c is not None else 2
    grads = [None] * len(params)
    for l in range(L, 0, -1):
        i = first_hidden + 2 * (l - 1)
        z = zs[l - 1].to(acc)
        a = torch.relu(z)
        grads[i] = d.t() @ a
        grads[i + 1] = d.sum(0)
        d = (d @ w[i]) * (z > 0)
    grads[0] = d.t() @ x.to(acc)
    grads[1] = d.sum(0)
    if c is not None:
        grads[2] = d.t() @ c.to(acc)
        grads[3] = grads[1].clone()
    return tuple(gr.to(p.dtype) for gr, p in zip(grads, params)), partials


def synth_pipelined_ref(
    x: Tensor,
    c: Optional[Tensor],
    params: Sequence[Tensor],
    x_prev: Tensor,
    c_prev: Optional[Tensor],
    zs_prev: Sequence[Tensor],
    s_prev: Tensor,
    g_prev: Tensor,
    scale: float,
    upcast: bool = True,
) -> Tuple[Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
    """The pipelined step: step t+1's forward and step t's update, with the
    weights as they are now. Step t's update uses its saved ``s_prev`` and
    ``zs_prev`` (computed at step t) and the true gradient ``g_prev`` that
    arrived one step late.

    Returns ``(s, zs, grads_prev, partials_prev)``.
    """
    s, zs = synth_forward_ref(x, c, params, upcast=upcast)
    grads, partials = synth_update_ref(x_prev, c_prev, params, zs_prev, s_prev, g_prev, scale, upcast=upcast)
    return s, zs, grads, partials
