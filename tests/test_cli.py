"""The benchmark harness and the command line run end to end (tiny sizes; no timing is asserted)."""
import csv
import json

import pytest
import torch

import dni_fast as dni
from benchmarks import harness as bench
from dni_fast.timing import time_many
from dni_fast.__main__ import main


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "torch" in out


def test_bench_rows_csv_and_auto_table(tmp_path, capsys):
    dev = torch.device("cpu")
    providers = [p for p in bench.available_providers(dev, compile=False)]
    rows = bench.bench_interface([(4, 16, 8)], providers, torch.float32, dev, min_run_time=0.01)
    assert [r.provider for r in rows] == providers
    ref = rows[0]
    assert ref.provider == "reference" and abs(ref.ratio - 1.0) < 1e-9 and ref.ms > 0
    assert all(r.floor_ms > 0 and r.extra["plain_linear_ms"] > 0 for r in rows)
    rows += bench.bench_mlp(8, providers, dev, min_run_time=0.01)
    assert rows[-len(providers) - 1].provider == "backprop"
    mlp = rows[-len(providers) - 1:]
    # the floor is backprop plus the synthesizers' unavoidable parts, all measured
    assert all(r.floor_ms > mlp[0].ms and r.extra["synth_products_ms"] > 0 and r.extra["synth_adam_ms"] > 0
               for r in mlp)
    # the matrix-product work, counted, against a hand count: W weights in the network's linear layers
    # (784-256x6-10), of which the first needs no input gradient; five synthesizers of two 256x256 layers, each
    # run forward and for its weight gradients, only the second for its input gradient
    W = 784 * 256 + 5 * 256 * 256 + 256 * 10
    bp = 2 * W + 2 * W + 2 * (W - 784 * 256)
    dni_flops = bp + 5 * (2 + 2 + 1) * 2 * 256 * 256
    assert {r.provider: r.extra["mflop_per_sample"] * 1e6 for r in mlp} == {
        r.provider: float(bp if r.provider == "backprop" else dni_flops) for r in mlp}
    assert abs(mlp[-1].extra["flops_vs_backprop"] - dni_flops / bp) < 1e-12
    path = tmp_path / "bench.csv"
    env = bench.environment(dev)
    bench.append_csv(rows, str(path), env)
    bench.append_csv(rows, str(path), env)  # appends, one header
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 * len(rows) and {"device", "torch", "date", "provider", "ms", "ratio"} <= set(got[0])
    table = bench.auto_table(rows, "cpu", env)
    assert table["rules"] and all(r["backend"] in providers for r in table["rules"])
    bench.print_rows(rows)
    assert "interface_step" in capsys.readouterr().out


def test_time_many_interleaves_the_callables():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    t = time_many(fns, torch.device("cpu"), min_run_time=0.01)
    assert set(t) == set("abc") and all(0 < v["p20"] <= v["ms"] <= v["p80"] for v in t.values())
    # after the warm-up, blocks of each callable alternate round by round
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches >= 3 * 15 - 1, switches


def test_bench_command_quick(tmp_path):
    path = tmp_path / "b.csv"
    assert main(["bench", "--quick", "--sizes", "4,16,8", "--no-mlp", "--csv", str(path)]) == 0
    assert path.exists()


def test_bench_time_budget_keeps_the_first_size_and_the_csv_then_auto_table_from_it(tmp_path, monkeypatch, capsys):
    from dni_fast import backends as bk
    from dni_fast.backends import auto

    path = tmp_path / "b.csv"
    assert main(["bench", "--quick", "--sizes", "4,16,8", "8,16,8", "--no-mlp", "--threads", "0",
                 "--time-budget", "0", "--csv", str(path)]) == 0
    assert "[budget]" in capsys.readouterr().out
    rows = bench.rows_from_csv(str(path))
    assert {(r.B, r.D) for r in rows} == {(4, 16)}  # the first size always runs; the second was skipped
    assert rows[0].provider == "reference" and rows[0].ratio == 1.0 and rows[0].extra["plain_linear_ms"] > 0
    table_path = tmp_path / "auto.json"
    monkeypatch.setattr(auto, "TABLE_PATH", str(table_path))
    assert main(["bench", "--auto-table-from", str(path)]) == 0
    table = json.loads(table_path.read_text())
    assert [(r["measured"]["B"], r["dtype"]) for r in table["rules"]] == [(4, "float32")]
    bk.clear_cache()


def test_auto_table_compares_ratios_across_runs():
    def row(provider, ratio, ms):
        return bench.Row("interface_step", provider, 16, 128, 128, "float32", 2, False, ms, ms, ms, ratio=ratio)

    # run 1 on a fast phase of the machine, run 2 on a slow one: the fastest raw
    # time is run 1's reference, but over both runs cpp is 1.26x faster
    rows = [row("reference", 1.0, 0.20), row("cpp", 0.8, 0.25), row("reference", 1.0, 0.60), row("cpp", 2.0, 0.30)]
    (rule,) = bench.auto_table(rows, "cpu", {})["rules"]
    assert rule["backend"] == "cpp" and abs(rule["speedup"] - (0.8 * 2.0) ** 0.5) < 1e-3
    (rule,) = bench.auto_table([row("reference", 1.0, 0.2), row("cpp", 0.9, 0.22)], "cpu", {})["rules"]
    assert rule["backend"] == "reference"


def test_auto_picks_from_the_table_and_never_the_interpreter(monkeypatch, tmp_path):
    from dni_fast import backends as bk
    from dni_fast.backends import auto

    synth = dni.BasicSynthesizer(32, n_hidden=1)
    trig = torch.randn(8, 32)

    def table(*rules):
        path = tmp_path / "t.json"
        path.write_text(json.dumps({"rules": list(rules)}))
        monkeypatch.setattr(auto, "TABLE_PATH", str(path))
        bk.clear_cache()

    table({"device": "cpu", "dtype": "float32", "backend": "triton"})
    assert bk.resolve("auto", synth, trig).name == "reference"  # triton on the CPU would be the interpreter
    table({"device": "cpu", "dtype": "float32", "max_rows": 4, "backend": "primref"})
    assert bk.resolve("auto", synth, trig).name == "reference"  # 8 rows: outside the rule
    table({"device": "cpu", "dtype": "float32", "min_rows": 8, "backend": "primref"})
    assert bk.resolve("auto", synth, trig).name == "primref"
    iface = dni.BackwardInterface(synth, backend="auto")
    assert iface.resolved_backend(trig) == "primref"
    assert iface.resolved_backend(trig[:4]) == "reference"
    table({"device": "cpu", "dtype": "float32", "backend": "no-such-backend"},
          {"device": "cpu", "dtype": "float32", "backend": "primref"})
    assert bk.resolve("auto", synth, trig).name == "primref"  # the first usable rule wins
    bk.clear_cache()


def test_bench_sizes_are_parsed_or_refused_by_name(capsys):
    from benchmarks import cli

    args = cli.parser().parse_args(["--sizes", "64,256", "8,16,32"])
    assert args.sizes == [(64, 256, 256), (8, 16, 32)]
    for bad in ("64", "64,x", "0,256", "1,2,3,4"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["--sizes", bad])
        assert "a size is B,D or B,D,H" in capsys.readouterr().err


SCRIPTS = ["bench_decoupled", "bench_distributed", "bench_infonce", "bench_local_memory", "bench_synthesizers",
           "compare_revisions", "profile_launches", "throughput_model"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_starts_from_anywhere(script, tmp_path):
    """`python benchmarks/<script>.py` (as benchmarks/gpu_run.sh calls them) from another directory: each
    finds its imports (profile_launches did not: `benchmarks` was not importable) and parses --help."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / f"{script}.py"), "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage" in p.stdout


# -- review, this stop ------------------------------------------------------------------------------------------
def test_an_auto_table_from_rows_that_give_no_rule_leaves_the_table_alone(tmp_path, monkeypatch):
    from dni_fast.backends import auto

    table_path = tmp_path / "auto.json"
    table_path.write_text(json.dumps({"rules": [{"device": "cpu", "keep": True}]}))
    monkeypatch.setattr(auto, "TABLE_PATH", str(table_path))
    junk = tmp_path / "junk.csv"
    junk.write_text("B,D\n1,2\n")
    with pytest.raises(SystemExit, match="unchanged"):
        main(["bench", "--auto-table-from", str(junk)])
    assert json.loads(table_path.read_text())["rules"] == [{"device": "cpu", "keep": True}]


def test_bench_refuses_to_append_under_another_header(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(SystemExit, match="header differs from these rows"):
        main(["bench", "--quick", "--sizes", "4,16,8", "--no-mlp", "--providers", "reference", "--csv", str(path)])
    assert path.read_text() == "a,b,c\n1,2,3\n"


@pytest.mark.parametrize("argv", [["--min-run-time", "nan"], ["--min-run-time", "-5"], ["--threads", "-1"],
                                  ["--mlp-batch", "1"]])
def test_bench_numbers_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", *argv])
    assert e.value.code == 2


def test_info_names_a_bad_backend_variable(monkeypatch, capsys):
    monkeypatch.setenv("DNI_FAST_BACKEND", "bogus")
    assert main(["info"]) == 0
    assert "invalid" in capsys.readouterr().out
