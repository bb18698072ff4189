"""The install: the extension that was built loads, the reasons given when it
cannot, the build's failure modes (run on a copy of the sources), and what
``import dni_fast`` loads."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dni_fast as dni
from dni_fast import _ext

REPO = Path(__file__).resolve().parent.parent


def test_the_extension_that_was_built_loads():
    """When the build record says the extension was built, it must load: a
    test run never passes quietly without the extension it expected."""
    info = _ext.build_info()
    if info is None or info.get("requested") is False:
        pytest.skip(f"the extension was not requested here (build record: {info})")
    ok, why = dni.backend_status("cpp", "cpu")
    assert ok, f"the build record says {info.get('status')!r} but the cpp backend is unavailable: {why}"
    assert info.get("status") == "built" and info.get("torch") == torch.__version__


def test_cuda_part_skipped_with_the_reason():
    """A machine whose torch has CUDA but whose toolkit is incomplete (nvcc
    without the CUDA runtime headers, as here) builds the CPU part and says why."""
    info = _ext.build_info()
    if not info or not info.get("built"):
        pytest.skip("no built extension")
    if info.get("cuda"):
        assert dni.backend_status("cuda", "cuda")[0] or not torch.cuda.is_available()
        return
    assert info.get("cuda_reason"), info
    ok, why = _ext.cuda_available()
    assert not ok and info["cuda_reason"] in why


@pytest.fixture
def fresh_ext(monkeypatch):
    """Reload the extension under a faked build record and import outcome."""
    def load(info, module=None):
        monkeypatch.setattr(_ext, "build_info", lambda: info)
        monkeypatch.setitem(sys.modules, "dni_fast._C", module)  # None: the import fails as if never built
        monkeypatch.delattr(dni, "_C", raising=False)  # else `from dni_fast import _C` finds the loaded one
        _ext._reset()
        return _ext.cpp_available()

    yield load
    _ext._reset()


def test_reason_never_built(fresh_ext):
    ok, why = fresh_ext(None)
    assert not ok and "never built" in why and "no build record" in why and "pip install --no-build-isolation" in why


def test_reason_build_failed(fresh_ext):
    ok, why = fresh_ext({"requested": True, "built": False, "status": "failed", "reason": "g++: error: boom"})
    assert not ok and "never built" in why and "g++: error: boom" in why


def test_reason_skipped_on_purpose(fresh_ext):
    ok, why = fresh_ext({"requested": False, "built": False, "status": "skipped"})
    assert not ok and "DNI_FAST_BUILD_EXT=FALSE" in why and "skipped on purpose" in why


def test_reason_built_against_another_torch(fresh_ext):
    import types

    fake = types.ModuleType("dni_fast._C")
    ok, why = fresh_ext({"requested": True, "built": True, "status": "built", "torch": "1.0.0"}, fake)
    assert not ok and "another torch (1.0.0)" in why and torch.__version__ in why and "rebuild" in why


def test_unavailable_cpp_raises_with_the_reason(fresh_ext):
    fresh_ext({"requested": False, "built": False, "status": "skipped"})
    dni.backends.clear_cache()
    iface = dni.BackwardInterface(dni.BasicSynthesizer(4), backend="cpp")
    with pytest.raises(dni.BackendUnavailableError, match="DNI_FAST_BUILD_EXT=FALSE"):
        iface(torch.randn(2, 4, requires_grad=True))
    dni.backends.clear_cache()


# -- the build itself, on a copy of the sources (never touching this checkout's record) -------
def _copy_sources(tmp_path):
    dst = tmp_path / "src"
    dst.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / f, dst / f)
    shutil.copytree(REPO / "csrc", dst / "csrc")
    (dst / "dni_fast").mkdir()
    return dst


def _setup(dst, *args, **env):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=dst, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_build_opt_out_is_recorded(tmp_path):
    dst = _copy_sources(tmp_path)
    p = _setup(dst, "--version", DNI_FAST_BUILD_EXT="FALSE")
    assert p.returncode == 0, p.stderr
    info = json.loads((dst / "dni_fast" / "_build_info.json").read_text())
    assert info["requested"] is False and info["status"] == "skipped"


def test_failed_build_fails_loudly_with_the_opt_out(tmp_path):
    """A requested build that fails makes the install fail, with the compiler's
    message and how to install without the extension; never a silent success."""
    dst = _copy_sources(tmp_path)
    for f in (dst / "csrc").glob("*.cpp"):  # every file, so that the first compile fails
        f.write_text("#error deliberately broken for this test\n")
    p = _setup(dst, "build_ext", "--inplace", DNI_FAST_FORCE_CUDA="FALSE", MAX_JOBS="1")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "deliberately broken" in out and "DNI_FAST_BUILD_EXT=FALSE" in out
    info = json.loads((dst / "dni_fast" / "_build_info.json").read_text())
    assert info["status"] == "failed" and info["built"] is False


def test_force_cuda_without_a_toolkit_fails_with_the_reason(tmp_path):
    dst = _copy_sources(tmp_path)
    p = _setup(dst, "--version", DNI_FAST_FORCE_CUDA="TRUE", CUDA_HOME=str(tmp_path / "no-cuda"))
    assert p.returncode != 0
    assert "DNI_FAST_FORCE_CUDA=TRUE" in p.stderr and "DNI_FAST_BUILD_EXT=FALSE" in p.stderr


# -- what import dni_fast loads ----------------------------------------------------------------
def test_import_loads_neither_extension_nor_kernels_nor_harness_nor_loaders():
    # (torch itself may import triton, through torch._dynamo: only our modules are checked)
    code = ("import sys, dni_fast; bad = [m for m in ('dni_fast._C', 'dni_fast.kernels.synth_step', "
            "'dni_fast.examples', 'dni_fast.examples.data', 'benchmarks', 'sklearn') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert p.returncode == 0, p.stdout + p.stderr


# -- the README's code runs as written -----------------------------------------------------------
def _readme_python_blocks():
    text = (REPO / "README.md").read_text()
    blocks, inside, cur = [], False, []
    for line in text.splitlines():
        if line.startswith("```python"):
            inside, cur = True, []
        elif line.startswith("```") and inside:
            inside = False
            blocks.append("\n".join(cur))
        elif inside:
            cur.append(line)
    return blocks


def test_readme_equivalence_example_runs():
    """The README's compare_backends / compare_training example, with its exact
    ``step(model, i)`` signature, on the registered test backend."""
    block = next(b for b in _readme_python_blocks() if "compare_training" in b)
    exec(compile(block.replace('backend="cpp"', 'backend="primref"'), "README.md", "exec"), {})


def test_readme_setup_block_has_two_one_line_commands():
    text = (REPO / "README.md").read_text()
    start = text.index("## Set-up")
    block = text[text.index("```bash", start):].split("```")[1].splitlines()[1:]
    i1 = next(i for i, l in enumerate(block) if l.startswith("# 1."))
    i2 = next(i for i, l in enumerate(block) if l.startswith("# 2."))
    assert block[i1 + 1].startswith("pip install") and "pytest" in block[i2 + 1]


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (kernels/ ships as
    dni_fast.kernels): a new subpackage must be added there, or a wheel lacks it."""
    import re

    listed = set(re.search(r"^packages = \[(.*)\]", (REPO / "pyproject.toml").read_text(), re.M).group(1)
                 .replace('"', "").replace(" ", "").split(","))
    found = {"dni_fast." + str(p.parent.relative_to(REPO / "dni_fast")).replace("/", ".")
             for p in (REPO / "dni_fast").rglob("__init__.py")}
    found = {f.replace("dni_fast..", "dni_fast").rstrip(".") for f in found} | {"dni_fast.kernels"}
    assert found == listed, f"pyproject.toml packages differ from the tree: missing {found - listed}, extra {listed - found}"


def test_the_gpu_scripts_parse_and_pass_only_options_that_exist():
    """The GPU jobs run once, unattended, on a borrowed machine: a syntax error or an option a CLI does not
    have would waste the run. Each script parses (bash -n), and every `python -m dni_fast bench` in it
    parses its arguments (shell substitutions replaced by a number)."""
    import re
    import shlex

    from benchmarks import cli

    scripts = sorted((REPO / "benchmarks").glob("gpu_*.sh"))
    assert scripts
    bench_calls = 0
    for sh in scripts:
        p = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
        assert p.returncode == 0, f"{sh.name}: {p.stderr}"
        text = re.sub(r"\\\n\s*", " ", sh.read_text())  # join continued lines
        for line in text.splitlines():
            if line.lstrip().startswith("#") or "-m dni_fast bench" not in line:
                continue
            args = line.split("-m dni_fast bench", 1)[1]
            args = re.split(r"\s(?:2>&1|\||>>?|&&|\|\|)", args)[0]
            args = re.sub(r"\$\([^)]*\)\)?|\$\{?\w+\}?", "60", args.replace('"', ""))
            cli.parser().parse_args(shlex.split(args))  # SystemExit on an unknown option or a bad value
            bench_calls += 1
    assert bench_calls >= 4
