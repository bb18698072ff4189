"""Tile configurations of the fused synthesizer step and its three launch
objects: autotuned on a GPU, fixed tiles under the interpreter or with
``DNI_FAST_TRITON_AUTOTUNE=0``. Device code: ``synth_step_kernels.py``."""
from __future__ import annotations

import os

from .synth_step_kernels import triton

# TRITON_INTERPRET is read by triton when a kernel is decorated, so what matters
# is its value when the kernels are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Tile sizes used under the interpreter (no autotuning there: it would run
#: every config through numpy). Large tiles are fast in the interpreter; tests
#: may lower them to exercise multi-tile loops and masks on small shapes.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_H": 32, "BLOCK_K": 32}
#: Tiles on a GPU when autotuning is off (DNI_FAST_TRITON_AUTOTUNE=0: the GPU test run).
FIXED_GPU = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_H": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}

# Smallest BLOCK_H / BLOCK_M among the configs: workspaces whose size depends on
# the config chosen by the autotuner (slot counts) are sized for it.
MIN_BLOCK_H = 32
MIN_BLOCK_M = 16

AUTOTUNED = False
fwd_launch = upd_launch = pipe_launch = None

if triton is not None:
    from .synth_step_kernels import _synth_fwd_kernel, _synth_pipe_kernel, _synth_upd_kernel

    def _cfgs(names, rows):
        return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]

    # Hopper-oriented: tiles 64/128 on the big dims (wgmma wants M >= 64 per
    # warpgroup), plus 16/32-row or 32-column tiles because at the target size
    # (B=256, D=1024) the grids are otherwise 4-16 programs on 132 SMs.
    _FWD_CONFIGS = _cfgs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 128, 8, 4), (64, 64, 128, 4, 4),
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
    ])
    # (128, 32, 128) runs 3 stages: at 4 it needs 270-287 KB of shared memory on sm_90 (bf16, and bf16 with
    # fp32 weights; compiled for sm_90 by Triton's ptxas), over the 227 KB a block may have on H100/H200.
    _UPD_CONFIGS = _cfgs(("BLOCK_N", "BLOCK_H", "BLOCK_K"), [
        (32, 32, 64, 4, 4), (64, 32, 64, 4, 3), (128, 32, 128, 4, 3), (64, 64, 64, 4, 3),
        (64, 64, 128, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 4), (128, 128, 64, 8, 3),
    ])
    _KEYS = ["Dt", "Dc", "D0", "D1", "D2", "N_BUCKET", "L", "HAS_C", "PREC"]

    # Shared memory a block may use on sm_90 (H100/H200: 227 KB).
    _SMEM = 232_448

    def _prune(names):
        """Drop configs whose pipelined tiles cannot fit in Hopper's shared
        memory: the autotuner would compile them only to skip them. Calibrated
        on every config compiled for sm_90 (benchmarks/check_triton_sm90.py
        --all, 208 kernel variants): the forward stages its x tile and its
        weight tile (each in its own dtype: fp32 weights under autocast), and
        then no config it keeps is over the limit and one that fits is dropped;
        the update's dots also stage their product tile, bounded at 200 KB
        (none kept over the limit, 5 that fit dropped)."""
        bm, bn, bk = names
        forward = bm == "BLOCK_M"

        def prune(configs, named_args, **kwargs):
            # Triton's autotuner names only the positional arguments in named_args; the launchers pass
            # everything by keyword, which arrives in kwargs.
            args = {**named_args, **kwargs}
            x, w = args.get("x"), args.get("wt")
            es = x.element_size() if x is not None else 4
            ew = w.element_size() if w is not None else es
            keep = []
            for cfg in configs:
                kw = cfg.kwargs
                if forward:
                    fits = cfg.num_stages * (kw[bm] * kw[bk] * es + kw[bk] * kw[bn] * ew) <= _SMEM
                else:
                    a = kw[bm] * kw[bk] + kw[bk] * kw[bn] + kw[bm] * kw[bn]
                    fits = cfg.num_stages * a * es <= 200 * 1024
                if fits:
                    keep.append(cfg)
            return keep or configs[:1]

        return {"early_config_prune": prune}

    def _tune(configs, names):
        kw = dict(configs=configs, key=_KEYS, prune_configs_by=_prune(names))
        try:  # tuning results cached on disk across processes (triton >= 3.2)
            return triton.autotune(cache_results=True, **kw)
        except TypeError:  # pragma: no cover
            return triton.autotune(**kw)

    if INTERPRET or os.environ.get("DNI_FAST_TRITON_AUTOTUNE", "1") == "0":
        fwd_launch = _synth_fwd_kernel
        upd_launch = _synth_upd_kernel
        pipe_launch = _synth_pipe_kernel
        AUTOTUNED = False
    else:
        fwd_launch = _tune(_FWD_CONFIGS, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))(_synth_fwd_kernel)
        upd_launch = _tune(_UPD_CONFIGS, ("BLOCK_N", "BLOCK_H", "BLOCK_K"))(_synth_upd_kernel)
        pipe_launch = _tune(_UPD_CONFIGS, ("BLOCK_N", "BLOCK_H", "BLOCK_K"))(_synth_pipe_kernel)
        AUTOTUNED = True


def meta(names):
    """Explicit meta-parameters when not autotuning (interpreter or disabled)."""
    if AUTOTUNED:
        return {}
    src = INTERPRET_CONFIG if INTERPRET else FIXED_GPU
    out = {k: src[k] for k in names}
    if not INTERPRET:
        out["num_warps"] = src["num_warps"]
        out["num_stages"] = src["num_stages"]
    return out
