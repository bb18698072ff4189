"""Build of dni_fast's C++/CUDA extension, ``dni_fast._C``.

Package metadata, packages and package-dir live in pyproject.toml; this file
adds the extension and records how it was built. Build it with the torch you
will run it with:

    CFLAGS=-g0 pip install --no-build-isolation -e .

(``--no-build-isolation``: with build isolation pip would build against a
second, multi-GB torch in a temporary environment, and the extension would
not load with yours.)

The extension is built by default, and a build that fails makes the install
fail with the compiler's message: it never installs silently without it.
Environment switches, TRUE or FALSE:

* ``DNI_FAST_BUILD_EXT``: FALSE installs the pure-Python package (the
  ``cpp``/``cuda`` backends then say they were skipped on purpose).
* ``DNI_FAST_FORCE_CUDA``: TRUE builds the CUDA part or fails saying what is
  missing; FALSE never builds it. Default: built when this torch has CUDA and
  the CUDA toolkit is complete (nvcc *and* the CUDA runtime headers and
  library); otherwise only the CPU part is built, and the reason is recorded.

What was decided is written to ``dni_fast/_build_info.json`` (next to the
extension), which ``python -m dni_fast info`` and the backends' "unavailable"
reasons read: never built, skipped on purpose, failed (and why), or built
against another torch.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
INFO_NAME = "_build_info.json"
OPT_OUT = ("To install without the extension (the cpp/cuda backends are then unavailable): "
           "DNI_FAST_BUILD_EXT=FALSE pip install --no-build-isolation -e .")


def _env_flag(name: str):
    """True, False, or None when unset/empty. Accepts TRUE/FALSE (and 1/0, ON/OFF, YES/NO)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    v = raw.upper()
    if v in ("TRUE", "1", "ON", "YES"):
        return True
    if v in ("FALSE", "0", "OFF", "NO"):
        return False
    raise SystemExit(f"dni_fast setup: {name}={raw!r} is not TRUE or FALSE")


def _log(msg: str) -> None:
    print(f"dni_fast setup: {msg}", file=sys.stderr)


def _fail(msg: str) -> None:
    raise SystemExit(f"dni_fast setup: {msg}\n{OPT_OUT}")


def _write_info(info: dict, *dirs: str) -> None:
    """Record the build decision next to the package's modules (every dir given)."""
    info = dict(info, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, INFO_NAME), "w") as f:
            json.dump(info, f, indent=1)


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX", "").split()
    candidates = [cxx[0]] if cxx else ["c++", "g++", "clang++"]
    return any(shutil.which(c) for c in candidates)


def _cuda_toolkit_problem(cuda_home) -> str:
    """What keeps the CUDA part from building with this toolkit, or "" when nothing.

    torch's ``CUDA_HOME`` only says where nvcc is; a machine can have nvcc (a
    compiler wrapper) without the CUDA runtime headers and library that every
    CUDA translation unit and the link need, and that must not break the build
    of the CPU part.
    """
    if cuda_home is None:
        return "no CUDA toolkit was found (set CUDA_HOME to the folder holding bin/nvcc)"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    incs = [os.path.join(cuda_home, "include")] + glob.glob(os.path.join(cuda_home, "targets", "*", "include"))
    if not any(os.path.exists(os.path.join(d, "cuda_runtime_api.h")) for d in incs):
        return (f"nvcc was found ({nvcc}) but not the CUDA runtime headers (cuda_runtime_api.h under "
                f"{cuda_home}/include): install the full CUDA toolkit, or set CUDA_HOME to a complete one (an nvcc "
                f"on PATH may be a wrapper script around a toolkit elsewhere, such as /usr/local/cuda-<version>)")
    libs = [os.path.join(cuda_home, d) for d in ("lib64", "lib")] + glob.glob(
        os.path.join(cuda_home, "targets", "*", "lib"))
    if not any(glob.glob(os.path.join(d, "libcudart.so*")) for d in libs):
        return f"nvcc and the CUDA headers were found under {cuda_home} but not libcudart: install the full CUDA toolkit"
    return ""


def _extensions():
    """(ext_modules, cmdclass): the extension, or ([], {}) when it is skipped on purpose."""
    build = _env_flag("DNI_FAST_BUILD_EXT")
    force_cuda = _env_flag("DNI_FAST_FORCE_CUDA")
    src_pkg = os.path.join(HERE, "dni_fast")
    if build is False:
        _log("DNI_FAST_BUILD_EXT=FALSE: installing without the C++/CUDA extension")
        _write_info({"requested": False, "built": False, "status": "skipped",
                     "reason": "installed with DNI_FAST_BUILD_EXT=FALSE"}, src_pkg)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch missing, or broken
        _fail(f"the C++ extension is built against torch, which cannot be imported ({type(e).__name__}: {e}). "
              "Install torch first, then build with `pip install --no-build-isolation -e .` (build isolation "
              "would build against a different, temporary torch).")
    if "pip-build-env" in (getattr(torch, "__file__", "") or ""):
        _log(f"WARNING: building inside pip's build isolation against a temporary torch {torch.__version__}; "
             "the extension will only load with that exact torch. Use --no-build-isolation.")
    if not _have_cxx():
        _fail("no C++ compiler was found (c++, g++ or clang++; or set CXX)")

    with_cuda, cuda_reason = False, ""
    if force_cuda is False:
        cuda_reason = "DNI_FAST_FORCE_CUDA=FALSE"
    elif torch.version.cuda is None:
        cuda_reason = f"this torch ({torch.__version__}) has no CUDA"
        if force_cuda:
            _fail(f"DNI_FAST_FORCE_CUDA=TRUE but {cuda_reason}; install a CUDA build of torch")
    else:
        cuda_reason = _cuda_toolkit_problem(cpp_extension.CUDA_HOME)
        if cuda_reason and force_cuda:
            _fail(f"DNI_FAST_FORCE_CUDA=TRUE but {cuda_reason}")
        with_cuda = not cuda_reason
    if cuda_reason:
        _log(f"building the CPU part only: {cuda_reason}")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for the data-centre generations (Ampere, Ada, Hopper) plus PTX.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
        _log(f"no GPU visible: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    csrc = "csrc"  # relative to this file: setuptools wants relative source paths
    sources = [os.path.join(csrc, f)
               for f in ("bindings.cpp", "overlap.cpp", "step.cpp", "synth_check.cpp", "synth_cpu.cpp")]
    define_macros = []
    if with_cuda:
        sources += [os.path.join(csrc, "synth_cuda.cpp"), os.path.join(csrc, "synth_cuda_kernels.cu")]
        define_macros.append(("DNI_FAST_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": ["-O3"], "nvcc": ["-O3"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": ["-O3"]}
    # every csrc file, so that an sdist made on a CPU-only machine still carries the CUDA sources
    depends = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*"))
                     if os.path.relpath(p, HERE) not in sources)
    ext = ext_cls(name="dni_fast._C", sources=sources, define_macros=define_macros, extra_compile_args=extra,
                  depends=depends)
    info = {"requested": True, "built": False, "status": "building", "cuda": with_cuda,
            "cuda_reason": cuda_reason, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    _log(f"building dni_fast._C ({'CPU + CUDA' if with_cuda else 'CPU only'}) against torch {torch.__version__}")
    _write_info(info, src_pkg)

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            # Both where the package's modules are installed from (build_lib, then
            # the wheel) and the source tree (editable and in-place installs run
            # from it; setuptools clears self.inplace while it builds, so it
            # cannot tell them apart here). The source tree's copy is gitignored.
            dirs = [os.path.join(self.build_lib, "dni_fast"), src_pkg]
            try:
                super().build_extension(ext)
            except BaseException as e:
                _write_info(dict(info, status="failed", reason=f"{type(e).__name__}: {e}"[-2000:]), *dirs)
                raise SystemExit(f"dni_fast setup: building the C++ extension dni_fast._C failed (the compiler's "
                                 f"message is above): {e}\n{OPT_OUT}") from e
            _write_info(dict(info, built=True, status="built"), *dirs)

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
