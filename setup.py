"""Build of dni_fast's optional C++/CUDA extension, ``dni_fast._C``.

Package metadata, packages and package-dir live in pyproject.toml; this file
only adds the extension. Build it with the torch you will run it with:

    CFLAGS=-g0 pip install --no-build-isolation -e .

(``--no-build-isolation``: build isolation would install a second, multi-GB
torch to build against.) Environment switches, TRUE or FALSE:

* ``DNI_FAST_BUILD_EXT``: build the extension at all. Default: TRUE when torch
  is importable and a C++ compiler is found. FALSE installs the pure-Python
  package; the ``cpp``/``cuda`` backends are then unavailable.
* ``DNI_FAST_FORCE_CUDA``: TRUE builds the CUDA part even when no GPU is
  visible (it needs a torch with CUDA and nvcc, and fails loudly without them);
  FALSE never builds it. Default: built when torch has CUDA
  (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX", "").split()
    candidates = [cxx[0]] if cxx else ["c++", "g++", "clang++"]
    return any(shutil.which(c) for c in candidates)


def _extensions():
    """(ext_modules, cmdclass) for the extension, or ([], {}) when it is not built."""
    build = _env_flag("DNI_FAST_BUILD_EXT")
    force_cuda = _env_flag("DNI_FAST_FORCE_CUDA")
    if build is False:
        _log("DNI_FAST_BUILD_EXT=FALSE: skipping the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch missing, or broken
        if build:
            raise SystemExit(f"dni_fast setup: DNI_FAST_BUILD_EXT=TRUE but torch cannot be imported ({e}); "
                             "install torch first and build with --no-build-isolation")
        _log(f"torch cannot be imported ({e}): skipping the extension")
        return [], {}
    if build is None and not _have_cxx():
        _log("no C++ compiler found: skipping the extension (set CXX, or DNI_FAST_BUILD_EXT=TRUE to insist)")
        return [], {}

    with_cuda = False
    if force_cuda is not False:
        have_torch_cuda = torch.version.cuda is not None
        cuda_home = cpp_extension.CUDA_HOME
        if force_cuda:
            if not have_torch_cuda:
                raise SystemExit("dni_fast setup: DNI_FAST_FORCE_CUDA=TRUE but this torch "
                                 f"({torch.__version__}) has no CUDA; install a CUDA build of torch")
            if cuda_home is None:
                raise SystemExit("dni_fast setup: DNI_FAST_FORCE_CUDA=TRUE but no CUDA toolkit was found; "
                                 "set CUDA_HOME to the directory holding bin/nvcc")
        with_cuda = have_torch_cuda and cuda_home is not None
        if have_torch_cuda and not with_cuda:
            _log("torch has CUDA but no CUDA toolkit was found (CUDA_HOME): building the CPU part only")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for the data-centre generations (Ampere, Ada, Hopper) plus PTX.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
        _log(f"no GPU visible: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

    csrc = "csrc"  # relative to this file: setuptools wants relative source paths
    sources = [os.path.join(csrc, f) for f in ("bindings.cpp", "step.cpp", "synth_check.cpp", "synth_cpu.cpp")]
    cxx_flags = ["-O3"]
    define_macros = []
    if with_cuda:
        sources += [os.path.join(csrc, "synth_cuda.cpp"), os.path.join(csrc, "synth_cuda_kernels.cu")]
        define_macros.append(("DNI_FAST_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    # every csrc file, so that an sdist made on a CPU-only machine still carries the CUDA sources
    depends = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*"))
                     if os.path.relpath(p, HERE) not in sources)
    ext = ext_cls(
        name="dni_fast._C",
        sources=sources,
        define_macros=define_macros,
        extra_compile_args=extra,
        depends=depends,
    )
    # By default a failed build only warns and installs the pure-Python package
    # (the cpp/cuda backends then report themselves unavailable);
    # DNI_FAST_BUILD_EXT=TRUE makes it an error.
    ext.optional = build is None
    _log(f"building dni_fast._C ({'CPU + CUDA' if with_cuda else 'CPU only'}) against torch {torch.__version__}"
         + ("" if build else "; a failure only warns (DNI_FAST_BUILD_EXT=TRUE makes it fatal)"))

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # torch's ninja path raises RuntimeError, which setuptools does not filter
                if not getattr(ext, "optional", False):
                    raise
                from setuptools.errors import CompileError

                _log(f"WARNING: building {ext.name} failed; installing without it ({e})")
                raise CompileError(str(e)) from e

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
