"""The benchmark command line: ``python -m dni_fast bench ...`` (from a checkout) or
``python -m benchmarks.cli ...``.

    python -m dni_fast bench                     # interface step + MLP, all providers
    python -m dni_fast bench --quick             # a few seconds, small sizes
    python -m dni_fast bench --threads 1 0       # at one thread and the default count
    python -m dni_fast bench --write-auto-table  # also refresh the table `auto` reads
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dni_fast.examples._common import non_negative_int, positive_float  # the examples' argparse types


def _at_least_2(text: str) -> int:
    v = int(text)
    if v < 2:  # (the MLP has BatchNorm: one row has no batch statistics)
        raise argparse.ArgumentTypeError(f"{text}: the MLP's batch needs at least 2 rows")
    return v


def _write_auto_table(B, rows, device: torch.device, env: dict) -> None:
    """Replace this device type's rules in dni_fast/_autotable.json by those measured in ``rows``."""
    from dni_fast.backends import clear_cache
    from dni_fast.backends.auto import TABLE_PATH as _TABLE_PATH

    try:
        with open(_TABLE_PATH) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {"rules": []}
    fresh = B.auto_table(rows, device.type, env)
    if not fresh["rules"]:
        # (another machine's CSV, another thread count, no reference rows): keep the table as it is
        raise SystemExit(f"dni_fast bench: no {device.type} rule could be derived from the rows given (this "
                         f"machine's, at this thread count, with a reference to compare against); "
                         f"{_TABLE_PATH} is unchanged")
    keep = [r for r in old.get("rules", []) if r.get("device") != device.type]
    table = {"note": "written by `python -m dni_fast bench --write-auto-table`; first matching rule wins",
             "sources": {**old.get("sources", {}), device.type: env}, "rules": fresh["rules"] + keep}
    with open(_TABLE_PATH, "w") as f:
        json.dump(table, f, indent=1)
    clear_cache()
    print(f"wrote {len(fresh['rules'])} {device.type} rules to {_TABLE_PATH}")


def _bench(args) -> int:
    from benchmarks import harness as B

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = B.environment(device)
    if args.auto_table_from:
        # this machine's rows only (the CSV's device string), at this thread count on the CPU
        rows = [r for r in B.rows_from_csv(args.auto_table_from, device=env["device"])
                if not (device.type == "cpu" and r.threads != torch.get_num_threads())]
        _write_auto_table(B, rows, device, env)
        return 0
    dtypes = [getattr(torch, d) for d in args.dtype]
    if args.sizes:
        sizes = list(args.sizes)
    elif device.type == "cuda":
        head = (256, 1024, 1024)  # docs/design.md §5's headline size first: a run cut short still has it
        sizes = [head] + ([] if args.quick else
                          [(b, d, d) for b in (64, 256, 1024) for d in (256, 1024, 4096) if (b, d, d) != head])
    else:
        sizes = [(16, 128, 128)] if args.quick else [(16, 128, 128), (64, 256, 256)]
    providers = args.providers or B.available_providers(device, compile=not args.no_compile and not args.quick)
    can = B.available_providers(device, compile=True)
    unknown = [p for p in providers if p not in can]
    if unknown:  # (the interface step skipped them and the MLP crashed)
        raise SystemExit(f"dni_fast bench: provider(s) {', '.join(unknown)} cannot run on {device.type} here; "
                         f"choose from {', '.join(can)} (`python -m dni_fast info` says why a backend is missing)")
    # torch.compile recompiles for every size and dtype (10-20 s each on a GPU); the
    # issue asks for it at the headline size, the first one on CUDA.
    compile_sizes = set(sizes[:1]) if device.type == "cuda" else set(sizes)
    min_t = 0.1 if args.quick else args.min_run_time
    all_rows = []
    threads = args.threads if device.type == "cpu" else [0]
    default_threads = torch.get_num_threads()
    t_start = time.monotonic()
    mlp_b = args.mlp_batch or (256 if device.type == "cuda" else 64)

    def over_budget() -> bool:
        return args.time_budget is not None and time.monotonic() - t_start > args.time_budget

    shown = [False]

    def emit(rows) -> None:
        # each group reaches the CSV as soon as it is measured, so a run cut
        # short (a device-time limit) keeps what it measured
        B.print_rows(rows, header=not shown[0])
        shown[0] = shown[0] or bool(rows)
        all_rows.extend(rows)
        if args.csv and rows:
            B.append_csv(rows, args.csv, env)

    for th in threads:
        torch.set_num_threads(th if th > 0 else default_threads)
        print(f"\n# device={env['device']} torch={env['torch']} triton={env['triton']} "
              f"threads={torch.get_num_threads()} date={env['date']}")
        shown[0] = False
        for i, size in enumerate(sizes):
            if i > 0 and over_budget():
                print(f"  [budget] {args.time_budget:.0f} s spent: skipping sizes {sizes[i:]}")
                break
            provs = [p for p in providers if p != "torch.compile" or size in compile_sizes]
            for dt in dtypes:
                for tf32 in ([False, True] if (device.type == "cuda" and dt == torch.float32 and args.tf32)
                             else [False]):
                    emit(B.bench_interface([size], provs, dt, device, tf32=tf32, min_run_time=min_t))
            if i == 0 and not args.no_mlp:  # the MLP after the headline size, before the long tail
                for ac in [None] + ([torch.bfloat16] if args.mlp_autocast else []):
                    emit(B.bench_mlp(mlp_b, providers, device, min_run_time=min_t * 2, overlap=args.overlap,
                                     adam=args.mlp_adam, graphs=args.graphs, autocast=ac))
    torch.set_num_threads(default_threads)
    if args.csv and all_rows:
        print(f"\nappended {len(all_rows)} rows to {args.csv}")
    if args.write_auto_table:
        _write_auto_table(B, [r for r in all_rows if r.threads == default_threads or device.type != "cpu"], device,
                          env)
    return 0


def _size(text: str):
    """``B,D`` or ``B,D,H`` (positive integers) -> ``(B, D, H)``, ``H = D`` when omitted."""
    try:
        v = [int(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) not in (2, 3) or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is B,D or B,D,H (positive integers: batch rows, "
                                         "trigger width, hidden width), e.g. 64,256")
    return (v[0], v[1], v[1] if len(v) == 2 else v[2])


def parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(prog="python -m dni_fast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16", "float64"])
    b.add_argument("--sizes", nargs="+", metavar="B,D[,H]", type=_size,
                   help="interface-step sizes (default per device)")
    b.add_argument("--providers", nargs="+", help="default: every available provider")
    b.add_argument("--threads", nargs="+", type=non_negative_int, default=[0],
                   help="CPU thread counts; 0 = the default count")
    b.add_argument("--tf32", action="store_true", help="on CUDA, also measure fp32 with TF32 on (both paths)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    b.add_argument("--no-mlp", action="store_true")
    b.add_argument("--mlp-batch", type=_at_least_2)
    b.add_argument("--mlp-adam", choices=("loop", "foreach", "fused"), default="loop",
                   help="Adam's implementation in the MLP benchmark, for every provider (default loop: torch's "
                        "CPU default)")
    b.add_argument("--overlap", action="store_true", help="also run the MLP with drop-in overlap: the update on the worker (<backend>+overlap) and "
                        "the injection too (<backend>+injection)")
    b.add_argument("--graphs", action="store_true",
                   help="CUDA: also run every MLP provider with the whole step captured in a CUDA graph (<p>+graph)")
    b.add_argument("--mlp-autocast", action="store_true", help="also run the MLP under bf16 autocast")
    b.add_argument("--quick", action="store_true", help="one small size, short timings, no torch.compile")
    b.add_argument("--min-run-time", type=positive_float, default=0.5, help="seconds per measurement (CPU)")
    b.add_argument("--csv", default=None, help="append rows to this CSV (e.g. benchmarks/results/bench.csv)")
    b.add_argument("--write-auto-table", action="store_true", help="refresh dni_fast/_autotable.json")
    b.add_argument("--auto-table-from", metavar="CSV",
                   help="write dni_fast/_autotable.json from the rows of CSV (every run in it, this "
                        "device type) and measure nothing")
    b.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new size after S seconds (the rows so far are kept; the first size always runs)")
    return b


def main(argv=None) -> int:
    return _bench(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
