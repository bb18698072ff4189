"""The benchmark scripts' bookkeeping, without timing anything: quantiles, the ideal of
bench_distributed measured in every round, header-checked CSV appends, labels.

Every CSV written here is under ``tmp_path``; nothing is measured (the scripts' timing and
process spawning are replaced by stand-ins), so the file runs in seconds.
"""
import csv
import json
import statistics

import pytest
import torch

from benchmarks import bench_decoupled as BDec
from benchmarks import bench_distributed as BD
from benchmarks import bench_infonce as BI
from benchmarks import bench_local_memory as BLM
from benchmarks import bench_synthesizers as BS
from benchmarks import compare_revisions as CR
from benchmarks import profile_launches as PL
from benchmarks import results_csv as RC


def _write(path, header, rows=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- 1. quantiles ------------------------------------------------------------------------------------------------
def test_quantiles_interpolate_between_rounds():
    # int(q * (n - 1)) indexing gave p20 = min = 1 and p80 = median = 2 for three rounds
    assert BD.quantile([3, 1, 2], 0.2) == pytest.approx(1.4)
    assert BD.quantile([3, 1, 2], 0.8) == pytest.approx(2.6)
    assert BD.quantile([5.0], 0.2) == BD.quantile([5.0], 0.8) == 5.0
    xs = [7.0, 1.5, 3.25, 9.0, 4.0, 2.0]
    assert [BD.quantile(xs, q) for q in (0.2, 0.4, 0.6, 0.8)] == pytest.approx(
        statistics.quantiles(xs, n=5, method="inclusive"))
    with pytest.raises(ValueError):
        BD.quantile([], 0.5)


# -- 2. the ideal, per round ------------------------------------------------------------------------------------
def _alone(r, ms0, ms1):
    return {"round": r, "rank 0": ms0, "rank 1": ms1, "single": 20.0}


def test_fraction_of_ideal_is_the_median_of_each_rounds_own_ratio():
    B = 100
    # the machine drifts: round 1 is twice as slow for both the ideal and the method
    alone = [_alone(0, 10.0, 5.0), _alone(1, 20.0, 5.0), _alone(2, 10.0, 8.0)]  # ideals 10000, 5000, 10000
    timed = [{"round": 0, "method": "decoupled", "m": 0, "samples_per_s": 9000.0},
             {"round": 1, "method": "decoupled", "m": 0, "samples_per_s": 4500.0},
             {"round": 2, "method": "decoupled", "m": 0, "samples_per_s": 8000.0},
             {"round": 0, "method": "gpipe", "m": 4, "samples_per_s": 1.0}]
    st = BD.summarise_rounds(B, timed, alone)
    d = st["decoupled"]
    assert d["median"] == 8000.0
    assert d["fraction_of_ideal"] == pytest.approx(0.9)  # 0.9, 0.9, 0.8; median / median ideal would be 0.8
    assert d["p20"] == pytest.approx(4500 + 0.4 * 3500) and d["p80"] == pytest.approx(8000 + 0.6 * 1000)
    assert st["gpipe m=4"]["median"] == 1.0
    assert BD.summarise_rounds(B, timed, [])["decoupled"]["fraction_of_ideal"] is None


class _Q:
    def __init__(self):
        self.items = []

    def put(self, x):
        self.items.append(x)


def test_worker_times_compute_alone_in_every_round_between_the_methods(monkeypatch):
    """Rank 0's worker, processes and training replaced: every round has one compute-alone block, first in
    even rounds and last in odd ones, between barriers (rank 1 idle), and every timed row names its round."""
    calls = []
    monkeypatch.setattr(BD.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(BD.dist, "destroy_process_group", lambda *a, **k: None)
    monkeypatch.setattr(BD.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(BD.C, "load_image_data", lambda a: type("D", (), {"input_dim": 64})())
    monkeypatch.setattr(BD, "ping_pong", lambda rank, B: {"header": 0.1, "activation": 0.2})
    monkeypatch.setattr(BD, "alone_fns", lambda B, regression, input_dim: {"made": (B, regression, input_dim)})

    def compute_alone(B, min_run_time, fns=None, **kw):
        calls.append("alone")
        assert fns == {"made": (32, "current", 64)} and min_run_time == 0.25
        return {"rank 0": 2.0, "rank 1": 1.0, "single": 3.0}

    monkeypatch.setattr(BD, "compute_alone", compute_alone)
    monkeypatch.setattr(BD.E, "run_method", lambda name, *a: calls.append(name) or {})
    monkeypatch.setattr(BD.E, "summarise", lambda name, run, data, world, args: {
        "samples_per_s": 1.0, "peak_rss_mib": [1, 1], "peak_delta_mib": [0, 0], "steps": 1})
    cfg = {"args": {"batch_size": 32, "regression": "current"}, "rounds": 3, "steps": 5, "budget_steps": 1,
           "min_run_time": 0.25}
    q = _Q()
    BD.worker(0, 2, "tcp://x", q, cfg)
    assert q.items[0][1] == "ok", q.items
    res = q.items[0][2]
    assert [a["round"] for a in res["alone"]] == [0, 1, 2]
    assert sorted({t["round"] for t in res["timed"]}) == [0, 1, 2]
    n = len(BD.TIMED)
    rounds = [calls[i * (n + 3):(i + 1) * (n + 3)] for i in range(3)]
    assert rounds[0][:3] == ["barrier", "alone", "barrier"] and rounds[2][:3] == ["barrier", "alone", "barrier"]
    assert rounds[1][-3:] == ["barrier", "alone", "barrier"]
    assert rounds[0][3] == BD.TIMED[0][0] and rounds[1][0] == BD.TIMED[-1][0]


def _fake_spawn(B):
    def spawn(world, cfg):
        timed = []
        for r, ideal_ms in enumerate((10.0, 20.0, 10.0)):
            for name, m in BD.TIMED:
                v = {0: 900.0, 1: 450.0, 2: 800.0}[r] * (B / 100) * 10
                timed.append({"round": r, "method": name, "m": m, "samples_per_s": v, "peak_rss_mib": [1, 1],
                              "peak_delta_mib": [0.1, 0.2]})
        alone = [_alone(0, 10.0, 5.0), _alone(1, 20.0, 5.0), _alone(2, 10.0, 8.0)]
        budget = [{"method": name, "m": m, "steps": 1, "train_loss": 2.0, "test_loss": 2.0, "test_acc": 10.0,
                   "peak_rss_mib": [1, 1], "peak_delta_mib": [0, 0]} for name, m in BD.TIMED]
        return {"timed": timed, "alone": alone, "budget": budget, "messages": {"header": 0.1, "activation": 0.2}}
    return spawn


def test_bench_distributed_rows_carry_the_per_round_fraction_and_interpolated_quantiles(monkeypatch, tmp_path):
    B = 100
    monkeypatch.setattr(BD, "spawn", _fake_spawn(B))
    out = tmp_path / "d.csv"
    assert BD.main(["--batch-size", str(B), "--rounds", "3", "--out", str(out)]) == 0
    rows = {(r["method"], r["m"]): r for r in _rows(out)}
    d = rows[("decoupled", "")]
    assert float(d["samples_per_s"]) == 8000.0
    assert float(d["p20"]) == pytest.approx(5900.0) and float(d["p80"]) == pytest.approx(8600.0)
    assert float(d["p80"]) != float(d["samples_per_s"])
    assert float(d["fraction_of_ideal"]) == pytest.approx(0.9)
    assert float(d["ideal_samples_per_s"]) == 10000.0
    assert rows[("gpipe", "4")]["fraction_of_ideal"] == ""
    extra = json.loads(d["extra"])
    assert extra["compute_alone_ms"] == {"rank 0": 10.0, "rank 1": 5.0, "single": 20.0}
    assert len(extra["compute_alone_ms_rounds"]) == 3
    # a second run appends under the same header
    assert BD.main(["--batch-size", str(B), "--rounds", "3", "--out", str(out)]) == 0
    assert len(_rows(out)) == 2 * len(rows)


def test_bench_distributed_refuses_another_header_before_running(monkeypatch, tmp_path):
    monkeypatch.setattr(BD, "spawn", lambda *a: pytest.fail("ran before checking the CSV"))
    out = tmp_path / "other.csv"
    _write(out, ["date", "bench", "provider"], [["x", "y", "z"]])
    with pytest.raises(SystemExit, match="date,bench,provider"):
        BD.main(["--out", str(out)])


# -- 3. header-checked appends -----------------------------------------------------------------------------------
def test_append_rows_refuses_another_header_and_names_both(tmp_path):
    path = tmp_path / "r.csv"
    _write(path, ["a", "b", "c"], [[1, 2, 3]])
    before = path.read_text()
    with pytest.raises(SystemExit) as e:
        RC.append_rows(str(path), ["a", "c", "d"], [{"a": 1, "c": 2, "d": 3}])
    msg = str(e.value)
    assert "file header: a,b,c" in msg and "rows' header: a,c,d" in msg
    assert "only in the file: b" in msg and "only in the rows: d" in msg
    assert path.read_text() == before
    with pytest.raises(SystemExit, match="other order"):
        RC.append_rows(str(path), ["c", "b", "a"], [])


def test_append_rows_writes_the_header_once(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert RC.append_rows(str(path), ["a", "b"], [{"a": 1}]) == 1
    RC.append_rows(str(path), ["a", "b"], [{"a": 2, "b": 3, "zz": 4}], extrasaction="ignore")
    assert _rows(path) == [{"a": "1", "b": ""}, {"a": "2", "b": "3"}]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    RC.append_rows(str(empty), ["a"], [{"a": 5}])
    assert _rows(empty) == [{"a": "5"}]
    with pytest.raises(ValueError):
        RC.append_rows(str(path), ["a", "b"], [{"a": 1, "zz": 2}])


def test_infonce_and_local_memory_appends_refuse_another_scripts_csv(tmp_path):
    """The reproducer: bench_synthesizers' rows appended to a local_memory CSV read back as garbage."""
    env = {"date": "d", "device": "cpu"}
    lm = tmp_path / "local_memory_cpu.csv"
    BLM.append_csv([{"bench": "local_memory", "B": 1, "schedule": "x", "peak_mb": 1.5}], str(lm), env)
    BLM.append_csv([{"bench": "local_memory", "B": 2, "schedule": "y", "peak_mb": 2.5}], str(lm), env)
    assert [r["schedule"] for r in _rows(lm)] == ["x", "y"]
    with pytest.raises(SystemExit, match="date,device,bench,B,schedule,peak_mb"):
        BI.append_csv([{"size": "copy", "B": 32, "provider": "ridge", "ms": 0.1}], str(lm), env)
    assert len(_rows(lm)) == 2


def test_synthesizers_appends_refuse_another_header(monkeypatch, tmp_path):
    class AnyRow(dict):  # the print reads keys that another change may rename: any missing key reads 1
        def __missing__(self, k):
            return 1

    monkeypatch.setattr(BS, "run", lambda *a, **k: [AnyRow(size="copy", provider="ridge")])
    ok = tmp_path / "s.csv"
    BS.main(["--csv", str(ok)])
    BS.main(["--csv", str(ok)])
    assert len(_rows(ok)) == 2
    bad = tmp_path / "bad.csv"
    _write(bad, ["date", "bench", "B", "widths"])
    with pytest.raises(SystemExit, match="date,bench,B,widths"):
        BS.main(["--csv", str(bad)])


def test_decoupled_and_revisions_appends_refuse_another_header(tmp_path):
    bad = tmp_path / "bad.csv"
    _write(bad, ["workload", "revision"])
    with pytest.raises(SystemExit, match="workload,revision"):
        BDec.write_rows([{"provider": "threads"}], str(bad))
    ok = tmp_path / "dec.csv"
    BDec.write_rows([{"provider": "threads", "triton": "3.8"}], str(ok))  # keys beyond FIELDS are dropped
    assert list(_rows(ok)[0]) == BDec.FIELDS
    _write(bad, BDec.FIELDS)
    with pytest.raises(SystemExit, match="workload"):
        CR.write_csv([dict.fromkeys(CR.FIELDS, 1)], str(bad))
    rev = tmp_path / "rev.csv"
    CR.write_csv([dict.fromkeys(CR.FIELDS, 1)], str(rev))
    CR.write_csv([dict.fromkeys(CR.FIELDS, 2)], str(rev))
    assert [r["ms"] for r in _rows(rev)] == ["1", "2"]


def test_results_csv_headers_still_match_what_the_scripts_write():
    """The header check must not lock the scripts out of their own committed results."""
    import os

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    for name, fields in (("bench_decoupled_cpu.csv", BDec.FIELDS), ("bench_distributed_cpu.csv", BD.FIELDS),
                         ("revisions_cpu.csv", CR.FIELDS)):
        path = os.path.join(here, name)
        if os.path.exists(path):
            RC.check_header(path, fields)


def test_compare_revisions_fields_are_the_rows_keys(monkeypatch):
    row = {"workload": "w", "revision": "base", "threads": 1, "ms": 1.0, "p20": 1.0, "p80": 1.0,
           "base_over_this": 1.0, "rounds": 10}
    row.update({"date": "d", "device": "x", "torch": "t"}, commit="c")  # as main() adds them
    assert list(row) == CR.FIELDS


# -- 4. labels ---------------------------------------------------------------------------------------------------
def test_decoupled_gpu_rows_leave_the_one_thread_ratio_empty_and_honour_min_run_time(monkeypatch, capsys):
    seen = {}

    def time_many(fns, dev, min_run_time=None, **kw):
        seen["min_run_time"] = min_run_time
        return {"sequential": {"ms": 8.0, "p20": 7.0, "p80": 9.0}, "streams": {"ms": 4.0, "p20": 3.0, "p80": 5.0},
                "backprop": {"ms": 2.0, "p20": 2.0, "p80": 2.0}}

    monkeypatch.setattr(BDec, "time_many", time_many)
    monkeypatch.setattr(BDec, "decoupled", lambda *a, **k: (lambda: None))
    monkeypatch.setattr(BDec, "backprop", lambda *a, **k: (lambda: None))
    rows = BDec.bench_gpu(64, 8, 2, 1.5, {"date": "d"})
    assert seen["min_run_time"] == 1.5
    by = {r["provider"]: r for r in rows}
    assert all(r["speedup_vs_sequential_1t"] == "" for r in rows)
    assert by["streams"]["speedup_vs_sequential_default"] == 2.0
    assert json.loads(by["streams"]["extra"])["time_vs_sequential"] == 0.5
    BDec.print_rows(rows)
    assert "-" in capsys.readouterr().out


def test_decoupled_main_passes_min_run_time_to_the_gpu(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(BDec.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(BDec, "environment", lambda dev: {"date": "d", "device": "gpu", "torch": "t"})
    monkeypatch.setattr(BDec, "bench_gpu", lambda W, B, K, mrt, env: seen.setdefault("mrt", mrt) and [])
    monkeypatch.setattr(BDec, "print_rows", lambda rows: None)
    monkeypatch.setattr(BDec, "write_rows", lambda rows, path: None)
    assert BDec.main(["--device", "cuda", "--min-run-time", "2.5", "--out", str(tmp_path / "x.csv")]) == 0
    assert seen["mrt"] == 2.5


def test_peak_memory_is_labelled_mib(capsys):
    BI.print_rows([{"size": "gim", "provider": "chunked", "positions": 1, "ms": 1.0, "speedup": 1.0,
                    "peak_mb": 1.0, "peak_vs_ref": 1.0}], header=True)
    out = capsys.readouterr().out
    assert "peak MiB" in out and "peak MB" not in out
    assert "MiB" in BI.__doc__ and "MiB" in BLM.__doc__


def test_local_memory_prints_mib(capsys):
    BLM.main(["--batch", "2", "--widths", "4", "4", "4", "--extra-layers", "0", "--no-time", "--no-csv"])
    out = capsys.readouterr().out
    assert "peak MiB" in out and "peak MB" not in out


def test_profile_launches_pipelined_step_and_cpu_message(capsys):
    import os

    step = PL.pipelined_step("reference", 4, 8, 8, torch.float32, torch.device("cpu"))
    step()
    assert step.interface._pending is not None
    step()  # the second call's forward runs the first call's update
    assert step.interface.synthesizer.layers[-1].weight.grad is not None
    assert "one pipelined step" not in PL.__doc__ and "pipelined=True" in PL.__doc__
    PL.main(["--device", "cpu"])
    out = capsys.readouterr().out
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    named = [w for w in out.replace("(", " ").split() if w.startswith("tests/")]
    assert named and all(os.path.exists(os.path.join(repo, w)) for w in named)
