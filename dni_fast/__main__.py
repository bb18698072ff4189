"""Command line: ``python -m dni_fast {info,bench}`` (also the ``dni-fast`` script).

    python -m dni_fast info        # versions, the build record and every backend's status
    python -m dni_fast bench ...   # the microbenchmarks (benchmarks/cli.py; needs the source checkout)
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def _info() -> int:
    import dni_fast as dni
    from dni_fast import _ext, backends

    try:
        import triton

        tv = triton.__version__
    except Exception as e:  # not installed, or broken
        tv = f"not importable ({type(e).__name__})"
    print(f"{'dni_fast':10} {dni.__version__}")
    print(f"{'torch':10} {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"{'triton':10} {tv}")
    print(f"{'python':10} {platform.python_version()}")
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devs:
        print(f"{'gpu':10} {torch.cuda.get_device_name()}")
    info = _ext.build_info()
    print(f"{'build':10} " + ("no build record (never built with pip install)" if info is None else
                             ", ".join(f"{k}={info[k]}" for k in ("status", "cuda", "torch", "time") if k in info)))
    if info and info.get("cuda_reason"):
        print(f"{'':10} CUDA part not built: {info['cuda_reason']}")
    try:
        chosen = dni.get_backend()
    except ValueError as e:  # a bad DNI_FAST_BACKEND: the diagnostic command says so instead of failing
        chosen = f"(invalid: {e})"
    print(f"{'backend':10} {chosen} (DNI_FAST_BACKEND={os.environ.get('DNI_FAST_BACKEND', 'unset')})")
    for b in backends.registered():
        facts = b.describe()
        print(f"  {b.name:10} devices {','.join(facts['devices'])}; dtypes {facts['dtypes']}; "
              f"{'runs any synthesizer' if b.max_hidden is None else f'fuses n_hidden <= {b.max_hidden}'}")
        for d in devs:
            ok, why = b.status(torch.device(d))
            print(f"    {d:5} {'available' if ok else 'unavailable: ' + why}")
    return 0


def _bench(argv) -> int:
    # The harness lives in the source checkout's benchmarks/, outside the package.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "cli.py").is_file():
        raise SystemExit("python -m dni_fast bench: the benchmarks ship with the source checkout, not the package; "
                         "clone the repository and run it from there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import cli

    return cli.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        return _info()
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
