"""Compile every Triton kernel of dni_fast for sm_90 (H100/H200) on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts what the
GPU compiler rejects (a ``tl.dot`` tile under 16, a shared-memory footprint
over the 227 KB a Hopper block may have, a dtype rule). This script runs the
real compiler instead: Triton's driver is replaced by a stand-in that reports
an sm_90 target and launches nothing, and each launcher of
``dni_fast.kernels`` is called on small CPU tensors with its launch object
swapped for one that compiles (``JITFunction.warmup``) with the launcher's own
arguments. Every kernel variant that a launcher builds (n_hidden 0-2, with and
without a context, fp32 under TF32 and IEEE, bf16, fp16 with fp32 weights, the
InfoNCE vision and sequence forms) is compiled with the fixed tile config
(``DNI_FAST_TRITON_AUTOTUNE=0``, the GPU test run's), which must compile and
fit in shared memory. ``--all`` also compiles every autotune config that the
autotuner's shared-memory prune keeps for that dtype: each must compile; one
that does not fit is reported (the autotuner skips it after compiling it:
wasted tuning time, not a failure).

    python benchmarks/check_triton_sm90.py          # ~1-2 min on 2 cores (CI runs it, --quiet)
    python benchmarks/check_triton_sm90.py --all    # every autotune config (~10 min)

Exit status 1 on a failure; 0 with a message when this Triton has no compiler
for sm_90 or a different driver API (nothing checked).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Before Triton decorates any kernel: compiled kernels, not interpreted ones, and the fixed tile config.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["DNI_FAST_TRITON_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

SMEM_LIMIT = 232_448  # bytes a block may use on sm_90 (227 KB: cudaDevAttrMaxSharedMemoryPerBlockOptin)


def _install_stand_in_driver() -> str:
    """Make Triton compile for sm_90 without a GPU; returns why not ("" when done)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
    except Exception as e:  # pragma: no cover - another Triton layout
        return f"this Triton has no driver API to replace ({type(e).__name__}: {e})"

    class CompileOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):  # pragma: no cover - never timed
            raise RuntimeError("check_triton_sm90 compiles only")

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    if not hasattr(driver, "set_active"):
        return "this Triton's driver cannot be replaced (no triton.runtime.driver.set_active)"
    driver.set_active(CompileOnly())
    return ""


class _Compile:
    """Stands in for a launch object (``kernel[grid](...)``): compiles the kernel with the launch's own
    arguments, with the fixed tiles the launcher passed and, given ``configs`` (``--all``), with each config
    that ``prune`` (the autotuner's, called with the same arguments) keeps; records every result."""

    verbose = True

    def __init__(self, kernel, name: str, results: list, configs=(), prune=None) -> None:
        self.kernel, self.name, self.results = kernel, name, results
        self.configs, self.prune = list(configs), prune
        self.tag = ""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kept = self.configs
            if kept and self.prune is not None:
                kept = self.prune(kept, {}, **kwargs)
            for cfg in [{}] + [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]:
                self._compile(args, {**kwargs, **cfg}, cfg)
        return launch

    def _compile(self, args, kw: dict, cfg: dict) -> None:
        t = time.perf_counter()
        try:
            compiled = self.kernel.warmup(*args, grid=(1,), **kw)
            shared = int(compiled.metadata.shared)
            fits = shared <= SMEM_LIMIT
            # an autotune config over the limit is skipped by the autotuner: reported, not a failure
            ok = fits or bool(cfg)
            why = "" if fits else f"needs {shared} B of shared memory, over sm_90's {SMEM_LIMIT}"
        except Exception as e:
            ok, shared, why = False, -1, f"{type(e).__name__}: {str(e)[-400:]}"
        self.results.append((ok, self.name, self.tag, cfg, shared, time.perf_counter() - t, why))
        if self.verbose:
            mark = "FAIL" if not ok else "over" if why else "ok  "
            print(f"{mark} {self.name:11s} {self.tag:28s} {cfg or 'fixed tiles'} shared={shared} B "
                  f"{time.perf_counter() - t:.1f} s {why}", flush=True)


def _synth_cases():
    """(tag, n_hidden, context width, x dtype, parameter dtype, TF32) for the synthesizer step."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    for L in (0, 1, 2):
        yield f"L={L} fp32 tf32", L, 0, f32, f32, True
        yield f"L={L} bf16", L, 0, bf16, bf16, False
    yield "L=1 fp32 ieee, context", 1, 24, f32, f32, False
    yield "L=1 fp16 x, fp32 weights", 1, 0, f16, f32, False


def check_synth(results: list, all_configs: bool) -> None:
    from dni_fast.kernels import synth_step as ss
    from dni_fast.kernels import synth_step_kernels as kd
    from dni_fast.kernels import synth_step_tuning as tuning

    fwd_names, upd_names = ("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("BLOCK_N", "BLOCK_H", "BLOCK_K")

    def compile_as(kernel, name, configs, names):
        return _Compile(kernel, name, results, configs if all_configs else (),
                        tuning._prune(names)["early_config_prune"])

    launches = {"fwd": compile_as(kd._synth_fwd_kernel, "synth_fwd", tuning._FWD_CONFIGS, fwd_names),
                "upd": compile_as(kd._synth_upd_kernel, "synth_upd", tuning._UPD_CONFIGS, upd_names),
                "pipe": compile_as(kd._synth_pipe_kernel, "synth_pipe", tuning._UPD_CONFIGS, upd_names)}
    tuning.fwd_launch, tuning.upd_launch, tuning.pipe_launch = launches["fwd"], launches["upd"], launches["pipe"]

    N, D, H = 48, 64, 64  # sizes only shape the grid: the compiled code depends on the constexprs and dtypes
    g = torch.Generator().manual_seed(0)
    for tag, L, Dc, xdt, pdt, tf32 in _synth_cases():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        widths = [H] * L + [D]
        params = [torch.randn(widths[0], D, generator=g).to(pdt), torch.randn(widths[0], generator=g).to(pdt)]
        if Dc:
            params += [torch.randn(widths[0], Dc, generator=g).to(pdt), torch.randn(widths[0], generator=g).to(pdt)]
        for i in range(L):
            params += [torch.randn(widths[i + 1], widths[i], generator=g).to(pdt),
                       torch.randn(widths[i + 1], generator=g).to(pdt)]
        x = torch.randn(N, D, generator=g).to(xdt)
        c = torch.randn(N, Dc, generator=g).to(xdt) if Dc else None
        zs = [torch.randn(N, w, generator=g).to(xdt) for w in widths[:-1]]
        s, t = torch.randn(N, D, generator=g).to(xdt), torch.randn(N, D, generator=g).to(xdt)
        calls = {"fwd": lambda: ss.synth_forward_triton(x, c, params),
                 "upd": lambda: ss.synth_update_triton(x, c, params, zs, s, t, 0.5, torch.ones(())),
                 "pipe": lambda: ss.synth_pipelined_triton(x, c, params, x, c, zs, s, t, 0.5)}
        for which, call in calls.items():
            launches[which].tag = tag
            call()


def check_infonce(results: list, all_configs: bool) -> None:
    from dni_fast.kernels import infonce as K

    K._require_triton = lambda device: None  # the launchers' device check: this run compiles only
    configs = K._CONFIGS if all_configs else ()  # (no prune: every config is small)
    fwd = _Compile(K._infonce_fwd_kernel, "infonce_fwd", results, configs)
    bwd = _Compile(K._infonce_bwd_kernel, "infonce_bwd", results, configs)
    K._fwd_launch, K._bwd_launch = fwd, bwd
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        for N in (16, 10, 40):  # one block of negatives, a masked one, the online log-sum-exp over blocks
            P = K.vision_positions(5, 5, 4, 2, 1)
            neg = [torch.randint(p, (p, N), generator=g) for p in P]
            ws = [(torch.randn(64, 64, generator=g) / 8).to(dt).requires_grad_() for _ in range(2)]
            z = torch.randn(4, 64, 5, 5, generator=g).to(dt).requires_grad_()
            fwd.tag = bwd.tag = f"vision {str(dt)[6:]} N={N}"
            K.infonce(z, None, ws, neg, impl="triton").backward()
            sz = torch.randn(2, 12, 48, generator=g).to(dt).requires_grad_()
            sc = torch.randn(2, 12, 32, generator=g).to(dt).requires_grad_()
            sws = [(torch.randn(48, 32, generator=g) / 6).to(dt).requires_grad_() for _ in range(3)]
            sP = K.sequence_positions(12, 2, 3)
            sneg = [torch.randint(24, (p, N), generator=g) for p in sP]
            fwd.tag = bwd.tag = f"sequence {str(dt)[6:]} N={N}"
            K.sequence_infonce(sz, sc, sws, sneg, impl="triton").backward()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every autotune config too (slow)")
    p.add_argument("--quiet", action="store_true", help="print only the failures and the summary")
    args = p.parse_args(argv)
    _Compile.verbose = not args.quiet
    why = _install_stand_in_driver()
    if why:
        print(f"check_triton_sm90: skipped: {why}")
        return 0
    try:
        from dni_fast.kernels.synth_step_kernels import triton as _triton
    except Exception as e:  # pragma: no cover
        print(f"check_triton_sm90: skipped: the kernels cannot be imported ({type(e).__name__}: {e})")
        return 0
    if _triton is None:
        print("check_triton_sm90: skipped: triton is not installed")
        return 0
    results: list = []
    t0 = time.perf_counter()
    check_synth(results, args.all)
    check_infonce(results, args.all)
    bad = [r for r in results if not r[0]]
    over = [r for r in results if r[0] and r[6]]
    fitting = [r[4] for r in results if r[4] <= SMEM_LIMIT]
    print(f"check_triton_sm90: {len(results) - len(bad) - len(over)} of {len(results)} kernel variants compile for "
          f"sm_90 and fit in {SMEM_LIMIT} B of shared memory (largest {max(fitting, default=0)} B), "
          f"{time.perf_counter() - t0:.0f} s")
    for ok, name, tag, cfg, shared, _, why in over:
        print(f"  over the limit (the autotuner compiles and skips it) {name} {tag} {cfg}: {why}")
    for ok, name, tag, cfg, shared, _, why in bad:
        print(f"  FAILED {name} {tag} {cfg or 'fixed tiles'}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
