"""Every example's --quick configuration, end to end, on the embedded data
(no data files needed), plus the results page built from their logs."""
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dni_fast.examples._common import compact
from dni_fast.testing import assert_close

REPO = Path(__file__).resolve().parent.parent

QUICK = {
    "quickstart": ["--data", "digits"],
    "mnist_mlp": ["--data", "digits"],
    "mnist_fcn": ["--data", "digits"],
    "mnist_cnn": ["--data", "digits"],
    "mnist_full_unlock": ["--data", "digits"],
    "ptb_lm": ["--data", "synthetic"],
    "copy_task": [],
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(name, tmp_path, extra=()):
    mod = importlib.import_module(f"dni_fast.examples.{name}")
    log = tmp_path / f"{name}.json"
    out = mod.main(["--quick", "--no-progress", "--log", str(log), *QUICK[name], *extra])
    assert log.is_file()
    saved = json.loads(log.read_text())
    assert saved["example"] == name and saved["runs"] and saved["summary"]
    # the log rounds floats to 6 significant digits (committed logs stay small); the return value does not
    assert compact(out["summary"]) == saved["summary"]
    return saved


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_fcn", "mnist_cnn", "mnist_full_unlock"])
def test_image_examples_quick(name, tmp_path):
    saved = _run(name, tmp_path)
    variants = [r["variant"] for r in saved["runs"]]
    assert [v.split()[0] for v in variants] == ["backprop", "dni", "cdni"]
    for r in saved["runs"]:
        assert 0.0 <= r["test_acc"] <= 100.0 and r["steps"] > 0 and r["ms_per_step"] > 0
        assert r["history"]["test_acc"]
        if r["variant"].startswith("backprop"):
            assert r["n_interfaces"] == 0
        else:  # the synthesizers were trained: the interfaces recorded statistics
            assert r["n_interfaces"] > 0 and r["final_cos"] is not None
    assert saved["config"]["data_name"] == "digits"


def test_quickstart_quick_has_speed_table(tmp_path):
    saved = _run("quickstart", tmp_path)
    speed = saved["summary"]["speed"]
    names = [r["backend"] for r in speed]
    assert names[:2] == ["(plain backprop)", "reference"]
    ref = next(r for r in speed if r["backend"] == "reference")
    assert ref["ms_per_step"] > 0 and math.isclose(ref["speedup_vs_reference"], 1.0)


def test_ptb_lm_quick_char_and_word(tmp_path):
    saved = _run("ptb_lm", tmp_path)
    assert saved["summary"]["unit"] == "bpc"
    assert [(r["method"], r["bptt"]) for r in saved["runs"]] == [("bptt", 2), ("dni", 2)]
    for r in saved["runs"]:
        assert 0 < r["test_metric"] < 10  # bits per character
    dni_run = saved["runs"][1]
    assert dni_run["final_cos"] is not None  # the synthesizer saw true gradients
    saved = _run("ptb_lm", tmp_path, ["--level", "word", "--mode", "dni", "--loss", "mean"])
    assert saved["summary"]["unit"] == "ppl" and saved["runs"][0]["test_metric"] > 1
    assert saved["config"]["loss"] == "mean"


def test_loss_sum_scales_the_gradient_by_the_batch_size(monkeypatch):
    """``--loss sum`` backpropagates the batch-summed loss: the gradient of every
    parameter is exactly B times the batch mean's (checked on the first step,
    before any update; training runs then differ only through Adam's epsilon,
    which is why their accuracies are not compared)."""
    from dni_fast.examples import _common as C
    from dni_fast.examples.data import load_images
    from dni_fast.examples.mnist_mlp import MLP

    grads = []

    class Recorder(torch.optim.SGD):  # stands in for Adam: records the gradients, changes nothing
        def __init__(self, params, lr):
            super().__init__(params, lr=0.0)

        def step(self, closure=None):
            grads.append([p.grad.clone() for p in self.param_groups[0]["params"]])

    monkeypatch.setattr(C.torch.optim, "Adam", Recorder)
    data = load_images("digits", limit_train=64, limit_test=16)
    B = 16
    for loss_sum in (True, False):
        torch.manual_seed(0)
        model = MLP(data.input_dim, hidden=(8, 8), mode="backprop")
        C.fit_classifier(model, data, epochs=1, batch_size=B, lr=1e-3, seed=0, max_steps=1, show_progress=False,
                         loss_sum=loss_sum)
    (summed, mean) = grads
    assert len(summed) == len(mean) > 0
    for a, b in zip(summed, mean):
        assert_close(a, B * b, rtol=1e-5, atol=1e-6)


def test_copy_task_quick(tmp_path):
    saved = _run("copy_task", tmp_path)
    assert [r["method"] for r in saved["runs"]] == ["bptt", "dni"]
    for r in saved["runs"]:
        assert r["max_length"] >= 0 and r["timesteps"] > 0


def test_copy_task_synth_options(tmp_path):
    """--synth ridge (the default) trains a RidgeSynthesizer; --synth mlp and --dni-pytorch a BasicSynthesizer;
    options that mean nothing for the ridge synthesizer, and out-of-range settings, are refused by name."""
    import dni_fast as dni
    from dni_fast.examples import copy_task as CT

    built = []
    orig = CT.CopyRNN.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        built.append(None if self.dni is None else (type(self.dni.synthesizer), self.sg_factor))

    CT.CopyRNN.__init__ = spy
    try:
        # the injection's scale: 0.5 with the ridge synthesizer (chosen on a held-out seed), dni-pytorch's 0.1
        # with the BasicSynthesizer, and whatever --sg-factor says
        for extra, want in (([], (dni.RidgeSynthesizer, 0.5)), (["--synth", "mlp"], (dni.BasicSynthesizer, 0.1)),
                            (["--dni-pytorch"], (dni.BasicSynthesizer, 0.1)),
                            (["--sg-factor", "0.2"], (dni.RidgeSynthesizer, 0.2)),
                            (["--synth", "mlp", "--sg-factor", "0.3"], (dni.BasicSynthesizer, 0.3))):
            built.clear()
            CT.main(["--quick", "--no-progress", "--mode", "dni"] + extra)
            assert built == [want], (extra, built)
    finally:
        CT.CopyRNN.__init__ = orig
    for extra, match in ((["--synth-lr-mult", "2"], "--synth-lr-mult applies to --synth mlp"),
                         (["--synth-hidden=1"], "--synth-hidden applies to --synth mlp"),
                         (["--synth-forget", "0"], "forget must be in")):
        with pytest.raises(SystemExit, match=match):
            CT.main(["--quick", "--no-progress", "--mode", "dni"] + extra)


@pytest.mark.parametrize("name, default", [("mnist_mlp", "ridge"), ("mnist_fcn", "ridge")])
def test_feed_forward_synth_options(name, default, monkeypatch):
    """mnist_mlp and mnist_fcn default to the RidgeSynthesizer (cDNI's sees the label); --synth picks either, --dni-pytorch restores the BasicSynthesizer, and the BasicSynthesizer's options are
    refused by name with --synth ridge."""
    import dni_fast as dni
    from dni_fast.examples.mnist_mlp import MLP

    mod = importlib.import_module(f"dni_fast.examples.{name}")
    built = []
    init = MLP.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        if self.dnis is not None:
            built.append([(type(i.synthesizer), getattr(i.synthesizer, "context_dim", None)) for i in self.dnis])

    monkeypatch.setattr(MLP, "__init__", spy)
    kind = {"ridge": dni.RidgeSynthesizer, "mlp": dni.BasicSynthesizer}
    for extra, want in (([], default), (["--synth", "ridge"], "ridge"), (["--synth", "mlp"], "mlp"),
                        (["--synth", "ridge", "--dni-pytorch"], "mlp")):
        built.clear()
        mod.main(["--quick", "--no-progress", "--data", "digits", "--mode", "dni", "cdni"] + extra)
        assert [{t for t, _ in b} for b in built] == [{kind[want]}] * 2, (extra, built)
        if want == "ridge":  # the synthesizers of cDNI are conditioned on the one-hot label, DNI's on nothing
            assert [{c for _, c in b} for b in built] == [{None}, {10}], built
    # normalised targets are the BasicSynthesizer's (mnist_fcn: for cDNI); --synth ridge drops them unless asked
    for extra, want in (([], [False, False]), (["--synth", "mlp"], [False, name == "mnist_fcn"]),
                        (["--synth", "ridge"], [False, False]),
                        (["--synth", "ridge", "--normalize-targets", "cdni"], [False, True])):
        seen = []
        monkeypatch.setattr(MLP, "__init__", lambda self, *a, **k: (init(self, *a, **k), seen.append(
            {i.normalize_targets for i in self.dnis} if self.dnis is not None else None))[0])
        mod.main(["--quick", "--no-progress", "--data", "digits", "--mode", "dni", "cdni"] + extra)
        assert seen == [{w} for w in want], (extra, seen)
    for flag in ("--synth-hidden=1", "--synth-lr-mult=2", "--synth-init=default") + (
            ("--synth-width=8",) if name == "mnist_fcn" else ()):
        with pytest.raises(SystemExit, match=f"{flag.split('=')[0]} applies to --synth mlp"):
            mod.main(["--quick", "--no-progress", "--data", "digits", "--synth", "ridge", flag])


def test_lstm_dni_trigger_round_trip():
    """The LSTM state packs into one trigger per batch row and back exactly."""
    from dni_fast.examples.ptb_lm import LSTMLM

    m = LSTMLM(11, 4, 5, layers=2, use_dni=True)
    h, c = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = m.pack((h, c))
    assert flat.shape == (3, 2 * 2 * 5)
    h2, c2 = m.unpack(flat)
    assert torch.equal(h, h2) and torch.equal(c, c2)


def _probe_run(probe: bool, steps: int = 3):
    import torch.nn.functional as F

    import dni_fast as dni
    from dni_fast.examples import _common as C
    from dni_fast.examples.ptb_lm import LSTMLM

    torch.manual_seed(0)
    m = LSTMLM(7, 4, 5, use_dni=True, sg_factor=0.5)
    with torch.no_grad():  # dni-pytorch zero-initialises the output layer: S would be 0
        for p in m.dni.synthesizer.parameters():
            p.normal_(0, 0.3)
    m.probe = C.BoundaryProbe() if probe else None
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    state = (torch.randn(1, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g))
    for _ in range(steps):
        x = torch.randint(0, 7, (3, 4), generator=g)
        state = tuple(s.detach() for s in state)
        opt.zero_grad()
        with dni.defer_backward():
            logits, state = m(x, state)
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
            if probe:
                m.probe.measure(loss)
            dni.backward(loss)
        opt.step()
    return m, state


def test_boundary_probe_leaves_training_unchanged():
    """The probe's extra backward and its hook change nothing: same parameters, bit for bit."""
    with_probe, _ = _probe_run(True)
    without, _ = _probe_run(False)
    a, b = with_probe.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_boundary_probe_separates_the_bootstrapped_target():
    """cos(S, g_own), |g_own|, |c| and cos(g_own, c), with the chunk's own
    gradient and the carried synthetic one computed by hand."""
    import copy

    import torch.nn.functional as F

    m, state = _probe_run(True, steps=2)
    m.probe.read()
    ref = copy.deepcopy(m)
    ref.probe = None
    m, _ = _probe_step(m, state)
    got = m.probe.read()
    # by hand, on the model as it was before that step
    x = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(5))
    flat0 = ref.pack(tuple(s.detach() for s in state)).requires_grad_()
    out, end = ref.rnn(ref.encoder(x), ref.unpack(flat0))
    loss = F.cross_entropy(ref.decoder(out).flatten(0, 1), x.flatten())
    s0 = ref.dni.receive(flat0.detach()).double()
    s_end = ref.dni.receive(ref.pack(end).detach())
    (own,) = torch.autograd.grad(loss, flat0, retain_graph=True)
    (total,) = torch.autograd.grad(loss + (ref.pack(end) * (0.5 * s_end)).sum(), flat0)
    own, carried = own.double(), (total - own).double()

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert carried.norm() > 0 and abs(cos(s0, own)) > 1e-3  # the check means something
    assert math.isclose(got["cos"], cos(s0, own), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(got["g_norm"], float(own.norm()), rel_tol=1e-4)
    assert math.isclose(got["carried_norm"], float(carried.norm()), rel_tol=1e-4)
    assert math.isclose(got["cos_own_carried"], cos(own, carried), rel_tol=1e-4, abs_tol=1e-6)
    assert m.probe.read() == {k: None for k in m.probe.KEYS}  # read() resets


def _probe_step(m, state):
    import torch.nn.functional as F

    import dni_fast as dni

    x = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(5))
    with dni.defer_backward():
        logits, state = m(x, tuple(s.detach() for s in state))
        loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        m.probe.measure(loss)
        dni.backward(loss)
    return m, state


def test_zero_synthesizer_output():
    import dni_fast as dni
    from dni_fast.examples import _common as C
    from dni_fast.examples.mnist_mlp import MLP

    m = C.zero_synthesizer_output(MLP(64, hidden=(8, 8), mode="cdni"))
    x = torch.randn(4, 8)
    for iface in m.dnis:
        assert isinstance(iface.synthesizer, dni.BasicSynthesizer)
        assert torch.count_nonzero(iface.synthesizer(x, torch.zeros(4, 10))) == 0


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "q.json"
    p = subprocess.run([sys.executable, "-m", "dni_fast.examples.quickstart", "--quick", "--no-progress",
                        "--no-speed", "--data", "digits", "--log", str(log)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "cdni" in p.stdout and "test acc" in p.stdout
    assert json.loads(log.read_text())["example"] == "quickstart"


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", REPO / "scripts" / "make_results.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    return mr


def test_make_results_from_quick_logs(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, group in (("quickstart", "quickstart"), ("mnist_mlp", "mnist_mlp"), ("ptb_lm", "ptb_char"),
                        ("copy_task", "copy_task")):
        mod = importlib.import_module(f"dni_fast.examples.{name}")
        for seed in (1, 2):
            mod.main(["--quick", "--no-progress", "--seed", str(seed), "--log", str(runs / f"{group}_s{seed}.json"),
                      *QUICK[name]])
    (runs / "stray.json").write_text("{}")  # not <group>_s<seed>.json: skipped
    mr = _make_results()
    out = tmp_path / "docs"
    mr.main(["--runs", str(runs), "--out", str(out), "--diag", ""])
    page = (out / "results.md").read_text()
    assert "backprop" in page and "cDNI" in page and "bits per character" in page.lower()
    assert "2 seeds (1, 2)" in page and " ± " in page and "--seed S" in page
    assert "mnist_mlp_s1.json" in page and "stray" not in page
    targets = page.split("## Issue 11's targets")[1]
    assert "MNIST MLP, 1 epochs: DNI gap to backprop" in targets and "PTB char, T=2" in targets
    assert {p.name for p in out.glob("*.png")} >= {"mnist_mlp_curves.png", "ptb_char_bpc.png", "copy_task.png"}


def test_make_results_shows_the_flag_a_renamed_log_predates():
    """A log in a ``_dnipytorch`` or ``_basic`` group that ran before the flag existed (its argv lacks it) is
    shown with the flag, and the schedule says which seeds; a log that has the flag is shown as it ran."""
    mr = _make_results()

    def log(group, seed, *argv):
        return {"example": "mnist_fcn", "argv": ["--log", f"docs/logs/results/mnist_fcn_s{seed}.json", *argv],
                "_group": group, "_seed": seed, "_path": f"runs/{group}_s{seed}.json", "config": {}, "machine": {}}

    old, new = log("mnist_fcn_basic", 1), log("mnist_fcn_basic", 2, "--synth", "mlp")
    assert mr.command(old).endswith("--log docs/logs/results/mnist_fcn_basic_s1.json --synth mlp")
    assert mr.command(new).count("--synth mlp") == 1
    assert "(seed 1 ran while the `BasicSynthesizer`" in mr.schedule([old, new])
    assert mr.command(log("mnist_mlp_dnipytorch", 3)).endswith("--dni-pytorch")
    assert "ran before" not in mr.schedule([new]) and "(seed" not in mr.schedule([log("mnist_fcn", 1)])


def test_make_results_compare_needs_both_stds():
    mr = _make_results()
    assert mr.compare([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], True, "BPTT", "DNI").startswith("DNI better (beyond 2 std")
    assert mr.compare([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], False, "BPTT", "DNI").startswith("BPTT better")
    assert mr.compare([2.0, 2.1, 2.2], [1.85, 1.95, 2.05], True, "BPTT", "DNI").startswith("DNI better (beyond 1 std")
    assert mr.compare([2.0, 2.5, 3.0], [1.9, 2.0, 2.1], True, "BPTT", "DNI").startswith("within noise")
    assert mr.compare([2.0], [1.0], True, "BPTT", "DNI") == "one seed: no claim"
    assert mr.pm([1.0, 2.0, 3.0]) == "2.00 ± 1.00" and mr.pm([]) == "-"


def test_make_results_fills_the_diagnosis_tables(tmp_path):
    diag = tmp_path / "diag"
    diag.mkdir()
    from dni_fast.examples import mnist_mlp

    mnist_mlp.main(["--quick", "--data", "digits", "--no-progress", "--mode", "dni", "cdni", "--valid", "50",
                    "--log", str(diag / "mlp_base.json")])
    out = tmp_path / "docs"
    out.mkdir()
    doc = out / "synthetic_gradients.md"
    # (a block whose logs are all missing, such as ptb here, is refused: test_make_results_refuses_an_empty_block)
    doc.write_text("intro\n<!-- diag:mlp_dni -->\nstale\n<!-- /diag -->\nmiddle\n<!-- diag:mlp_cdni -->\n"
                   "<!-- /diag -->\nend\n")
    _make_results().diagnosis(str(diag), str(doc), str(out))
    text = doc.read_text()
    assert "stale" not in text and "intro" in text and "middle" in text and text.endswith("<!-- /diag -->\nend\n")
    assert "| mean loss, constant lr (before) |" in text.split("middle")[0]
    assert "| mean loss, constant lr (before) |" in text.split("middle")[1]
    assert (out / "diag_mlp_dni.png").is_file() and (out / "diag_mlp_base_interfaces.png").is_file()


def test_dni_pytorch_flag_restores_its_settings():
    from dni_fast.examples import _common as C
    from dni_fast.examples import mnist_mlp, ptb_lm

    args = mnist_mlp.build_parser().parse_args(["--dni-pytorch", "--normalize-targets", "--synth-lr-mult", "3",
                                                "--loss", "sum"])
    C.apply_presets(args)
    assert (args.normalize_targets, args.synth_lr_mult, args.synth_init, args.loss) == ("none", 1.0, "default", "mean")
    assert C.interface_kwargs(args) == {} and C.interface_kwargs(args, "cdni") == {}
    for flag, dni_kw, cdni_kw in ((["--normalize-targets"], True, True), (["--normalize-targets", "all"], True, True),
                                  (["--normalize-targets", "cdni"], False, True), (["--no-normalize-targets"], False,
                                                                                   False), ([], False, False)):
        a = mnist_mlp.build_parser().parse_args(flag)
        assert C.interface_kwargs(a, "dni").get("normalize_targets", False) == dni_kw, flag
        assert C.interface_kwargs(a, "cdni").get("normalize_targets", False) == cdni_kw, flag
    args = ptb_lm.build_parser().parse_args(["--dni-pytorch", "--sg-factor", "1"])
    C.apply_presets(args)
    assert args.sg_factor == 0.1


@pytest.mark.parametrize("flags,want", [
    ([], ("ridge", 0.5, "none")),  # the recommended default (docs/synthetic_gradients.md)
    (["--synth", "mlp"], ("mlp", 0.1, "all")),  # the BasicSynthesizer's recommended setting before
    (["--dni-pytorch"], ("mlp", 0.1, "none")),
    (["--sg-factor", "0.3"], ("ridge", 0.3, "none")),
    (["--normalize-targets"], ("ridge", 0.5, "all")),
])
def test_ptb_lm_recommended_settings(flags, want):
    from dni_fast.examples import _common as C
    from dni_fast.examples import ptb_lm

    args = C.parse(ptb_lm.build_parser(), flags)
    C.apply_presets(args)
    norm = {True: "all", False: "none"}.get(args.normalize_targets, args.normalize_targets)
    assert (args.synth, args.sg_factor, norm) == want


def test_cosine_schedule_and_synth_lr_groups():
    from dni_fast.examples import _common as C
    from dni_fast.examples import mnist_mlp
    from dni_fast.examples.mnist_mlp import MLP

    args = mnist_mlp.build_parser().parse_args(["--lr", "0.01", "--synth-lr-mult", "0.5", "--lr-schedule", "cosine",
                                                "--synth-lr-schedule", "constant", "--adam-eps", "1e-6"])
    model = MLP(16, hidden=(8, 8), mode="dni")
    opt = C.make_optimizer(model, args)
    assert [(g["name"], g["lr"], g["eps"]) for g in opt.param_groups] == [("model", 0.01, 1e-6),
                                                                          ("synthesizers", 0.005, 1e-6)]
    sched = C.make_schedule(opt, args, 10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    assert lrs[4][0] == pytest.approx(0.005) and lrs[-1][0] == pytest.approx(0.0, abs=1e-12)
    assert all(l[1] == 0.005 for l in lrs)  # the synthesizers' rate stays constant
    args.lr_schedule = "constant"
    assert C.make_schedule(opt, args, 10) is None


def test_normalize_targets_flag_reaches_every_interface(tmp_path, monkeypatch):
    import dni_fast as dni
    from dni_fast.examples import copy_task, mnist_cnn, mnist_mlp, ptb_lm

    made = []
    init = dni.BackwardInterface.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self.normalize_targets)

    monkeypatch.setattr(dni.BackwardInterface, "__init__", spy)
    for mod, extra in ((mnist_mlp, ["--data", "digits", "--mode", "cdni"]),
                       (mnist_cnn, ["--data", "digits", "--mode", "dni"]),
                       (ptb_lm, ["--data", "synthetic", "--mode", "dni"]), (copy_task, ["--mode", "dni"])):
        for flag in ("--normalize-targets", "--no-normalize-targets"):
            made.clear()
            log = tmp_path / f"{mod.__name__}.json"
            mod.main(["--quick", "--no-progress", "--log", str(log), flag, *extra])
            assert made and all(m == (flag == "--normalize-targets") for m in made), (mod.__name__, flag)
            r = json.loads(log.read_text())["runs"][-1]
            assert r["final_cos"] is not None and r["history"]["interfaces"]


@pytest.mark.parametrize("name", ["decoupled", "gim_mnist", "mnist_distributed"])
def test_examples_refuse_synthesizer_options_they_do_not_implement(name, capsys):
    mod = importlib.import_module(f"dni_fast.examples.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--lr-schedule", "cosine"])
    assert e.value.code == 2
    assert "--lr-schedule is not implemented by this example" in capsys.readouterr().err


def test_mnist_distributed_learning_rates_per_variant():
    """The decoupled variants' recommended multipliers (chosen on a validation
    split), the flags that override them, and --dni-pytorch's 1.0 / 1.0."""
    from dni_fast.examples import _common as C
    from dni_fast.examples import mnist_distributed as E

    def mults(name, *argv):
        args = E.build_parser().parse_args(list(argv))
        C.apply_presets(args)
        return E.lr_mults(name, args)

    assert mults("decoupled") == E.RECOMMENDED_LR_MULTS["decoupled"] == (0.1, 0.1)
    assert mults("decoupled-cdni") == (0.1, 0.3)
    assert mults("decoupled-cdni", "--synth-lr-mult", "0.5") == (0.5, 0.3)
    assert mults("decoupled", "--stage-lr-mult", "2") == (0.1, 2.0)
    assert mults("decoupled-cdni", "--dni-pytorch") == (1.0, 1.0)
    with pytest.raises(SystemExit):  # still refused: not implemented here
        E.main(["--quick", "--normalize-targets"])


@pytest.mark.parametrize("example,extra", [("copy", ["--lags", "0", "5", "--freeze-at", "100", "--", "--quick",
                                                     "--synth", "mlp"]),
                                           ("copy", ["--lags", "0", "5", "--", "--quick"]),  # RidgeSynthesizer
                                           ("ptb", ["--lags", "0", "--", "--quick", "--data", "synthetic"]),
                                           ("ptb", ["--lags", "0", "--", "--quick", "--data", "synthetic",
                                                    "--synth", "mlp"]),
                                           ("mlp", ["--", "--quick", "--data", "digits"]),  # RidgeSynthesizer
                                           ("mlp", ["--", "--quick", "--data", "digits", "--synth", "mlp"])])
def test_sg_ceiling_script(tmp_path, example, extra):
    """scripts/sg_ceiling.py end to end at toy sizes: every number it reports is there and in range."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "c.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "sg_ceiling.py"), example, "--rows", "12",
                        "--mlp-steps", "24", "--log", str(log)] + extra,
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(log.read_text())["report"]
    blocks = [rep] if example in ("copy", "ptb") else [i for v in rep.values() for i in v["interfaces"].values()]
    ridge = "mlp" not in extra  # every example here defaults to --synth ridge
    for b in blocks:
        if ridge:  # no ReLU units to die
            assert b["dead"] is None
        else:
            assert all(0.0 <= d <= 1.0 for d in b["dead"]) and b["dead"]
        for g in b["gradients"].values():
            for k in ("online", "ridge", "mlp"):
                assert -1.0 <= g[k] <= 1.0
            assert g["g_rms"] > 0
    if example == "ptb":
        assert set(rep["lags"]) == {"0"} and rep["test_bpc"] > 0
    if example == "copy":
        assert set(rep["gradients"]) == {"chunk", "target", "beyond"}
        assert set(rep["lags"]) == {"0", "5"}
        # the snapshot at lag 0 is the final model: its fit transfers to itself exactly
        assert rep["lags"]["0"]["own"] == pytest.approx(rep["lags"]["0"]["final"])
    if example == "mlp":
        assert set(rep) == {"dni", "cdni"}
        assert "ridge_label" in blocks[0]["gradients"]["true"]


def test_sg_ceiling_names_a_lag_the_run_never_reached(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "sg_ceiling.py"), "copy", "--rows", "12",
                        "--mlp-steps", "2", "--lags", "0", "99999", "--", "--quick"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "no snapshot for --lags [99999]" in p.stderr and "150 optimizer steps" in p.stderr, p.stderr[-2000:]


# -- found by review -------------------------------------------------------------------------------------------
def test_logs_are_strict_json(tmp_path):
    """A NaN or inf in a run log is written as null: JSON has neither (other tools refused the logs)."""
    from dni_fast.examples._common import save_json

    p = tmp_path / "log.json"
    save_json(str(p), {"a": math.nan, "b": [1.0, math.inf], "t": torch.tensor([math.nan, 2.0])})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"a": None, "b": [1.0, None], "t": [None, 2.0]}


@pytest.mark.parametrize("name,argv,match", [
    ("ptb_lm", ["--bptt", "0"], "positive"),
    ("ptb_lm", ["--eval-batch-size", "0"], "positive"),
    ("ptb_lm", ["--train-tokens", "-100"], "positive"),
    ("copy_task", ["--window", "0"], "positive"),
    ("copy_task", ["--n-symbols", "0"], "positive"),
    ("mnist_fcn", ["--layers", "1"], "at least 2"),
    ("mnist_mlp", ["--lr", "-1"], "positive"),
    ("mnist_mlp", ["--adam-eps", "-1"], "non-negative"),
])
def test_bad_command_line_values_are_argparse_errors(name, argv, match, capsys):
    mod = importlib.import_module(f"dni_fast.examples.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_ptb_refuses_an_evaluation_split_too_small_to_score(tmp_path):
    """Fewer than 2 tokens per evaluation stream used to score 0 bits per character."""
    mod = importlib.import_module("dni_fast.examples.ptb_lm")
    with pytest.raises(ValueError, match="validation split"):
        mod.main(["--no-progress", "--data", "synthetic", "--mode", "bptt", "--bptt", "4", "--hidden", "16",
                  "--train-tokens", "3000", "--n-evals", "2", "--eval-tokens", "20"])


def test_quick_keeps_the_options_given_in_either_form():
    from dni_fast.examples import _common as C

    args = C.parse(importlib.import_module("dni_fast.examples.ptb_lm").build_parser(), ["--quick", "--bptt=4",
                                                                                        "--hidden", "8"])
    C.quick_defaults(args, bptt=[2], hidden=32, train_tokens=3000)
    assert args.bptt == [4] and args.hidden == 8 and args.train_tokens == 3000


def test_diagnostics_reads_logs_with_missing_or_empty_curves(tmp_path):
    from dni_fast import diagnostics

    log = {"runs": [{"variant": "dni", "test_acc": None, "history": {"interfaces": {
        "a": {"cos": [], "rel_err": []}, "b": {"cos": [0.1, 0.2], "rel_err": [1.0, None]}}}}]}
    text = diagnostics.summarize(log)
    assert "test_acc -" in text and "b @100%: cos 0.2 rel_err -" in text and "a @" not in text


def test_make_results_marks_a_diverged_seed_and_claims_nothing_on_it(tmp_path):
    """A diverged seed (its metric null in the log) is shown as such, left out of the mean, and blocks the
    claims on its row: it used to be dropped silently, and a null in a per-seed column crashed the page."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for p in (REPO / "docs" / "logs" / "results").glob("ptb_char*_s*.json"):
        d = json.loads(p.read_text())
        if p.name in ("ptb_char_s2.json", "ptb_char_dnipytorch_s2.json"):
            for r in d["runs"]:
                if r["variant"] == "dni T=2":
                    r["test_metric"] = None
        (runs / p.name).write_text(json.dumps(d))
    mr = _make_results()
    out = tmp_path / "docs"
    mr.main(["--runs", str(runs), "--out", str(out), "--diag", ""])
    page = (out / "results.md").read_text()
    assert "(1 of 3 seeds diverged, left out)" in page and "no claim: 1 seed diverged" in page
    t2 = [line for line in page.split("## Issue 11's targets")[1].splitlines() if "T=2: DNI test bpc" in line]
    assert t2 and all("missed" in line for line in t2)


# ---------------------------------------------------------------------------
# scripts/make_results.py: versions, the diagnosis page's blocks, pairing by seed, diverged runs
# ---------------------------------------------------------------------------
LOGS = REPO / "docs" / "logs"


def _copy_logs(tmp_path, pattern, edit=None, src=LOGS / "results", sub="runs"):
    """Copies of the committed logs matching ``pattern`` in ``tmp_path/sub``, each passed through ``edit(name,
    log)`` first; returns the folder."""
    dst = tmp_path / sub
    dst.mkdir(exist_ok=True)
    for p in sorted(src.glob(pattern)):
        d = json.loads(p.read_text())
        if edit:
            edit(p.name, d)
        (dst / p.name).write_text(json.dumps(d))
    return dst


def test_make_results_names_the_torch_version_of_each_group(tmp_path):
    """The logs ran on two torch builds: the machine line says which groups ran on which, each schedule names its
    own, and a table whose ms/step cells mix them says so (it used to print the newest log's torch only)."""
    mr = _make_results()

    def edit(name, d):
        if name == "mnist_mlp_dnipytorch_s3.json":
            d["machine"]["torch"] = "2.14.1+cu130"

    g = mr.groups(mr.load_logs(str(_copy_logs(tmp_path, "mnist_mlp*_s*.json", edit))))
    line = mr.machine_line([d for ds in g.values() for d in ds])
    assert "torch 2.13.0+cpu (2 logs: `mnist_mlp_dnipytorch` (seeds 1, 2))" in line
    assert "torch 2.14.1+cu130 (4 logs: `mnist_mlp`, `mnist_mlp_dnipytorch` (seed 3))" in line
    assert "torch 2.14.1+cu130;" in mr.schedule(g["mnist_mlp"])
    assert "torch 2.13.0+cpu (seeds 1, 2), 2.14.1+cu130 (seed 3);" in mr.schedule(g["mnist_mlp_dnipytorch"])
    page = mr.classifier_section(g["mnist_mlp"], str(tmp_path), "MLP", None, "what", g["mnist_mlp_dnipytorch"])
    assert "**ms/step mixes torch versions:** the unmarked rows ran on torch 2.14.1+cu130, the rows marked " \
           "*dni-pytorch settings* on torch 2.13.0+cpu (seeds 1, 2), 2.14.1+cu130 (seed 3)" in page
    assert "not comparable" in mr.classifier_section(g["mnist_mlp_dnipytorch"], str(tmp_path), "MLP", None, "w")
    assert "mixes torch" not in mr.classifier_section(g["mnist_mlp"], str(tmp_path), "MLP", None, "what")
    one = mr.machine_line(g["mnist_mlp"])
    assert "torch 2.14.1+cu130, dni_fast" in one and "2.13" not in one


def test_make_results_skips_none_accuracies_of_a_diverged_run(tmp_path):
    """A diverged run logs None for its accuracies: the drop is over the evaluations that have one, the run is
    marked as diverged, the curves skip it (max() over the Nones raised TypeError)."""
    mr = _make_results()

    def edit(name, d):
        for r in d["runs"]:
            if name == "mnist_mlp_s2.json" and r["variant"] == "dni":
                r["test_acc"] = None
                r["history"]["test_acc"] = r["history"]["test_acc"][:1] + [None] * (len(r["history"]["test_acc"]) - 1)
            if name == "mnist_mlp_s3.json" and r["variant"] == "cdni":
                r["history"]["test_acc"][1] = None

    g = mr.groups(mr.load_logs(str(_copy_logs(tmp_path, "mnist_mlp_s*.json", edit))))
    page = mr.classifier_section(g["mnist_mlp"], str(tmp_path), "MLP", "mlp.png", "what")
    dni = next(line for line in page.splitlines() if line.startswith("| DNI |"))
    assert dni.count("(1 of 3 seeds diverged, left out)") == 3  # test acc, gap, drop
    cdni = next(line for line in page.splitlines() if line.startswith("| cDNI |"))
    assert "diverged" not in cdni and (tmp_path / "mlp.png").is_file()


def test_make_results_pairs_fcn_runs_by_seed(tmp_path, capsys):
    """Seed 1's log lacks the DNI run of the 3-layer net: each gap still pairs a seed's DNI with the same seed's
    backprop (it paired them by position: seed 2's DNI against seed 1's backprop), and the missing run is warned
    about."""
    mr = _make_results()

    def edit(name, d):
        if name == "mnist_fcn_s1.json":
            d["runs"] = [r for r in d["runs"] if r["variant"] != "dni 3-layer"]

    g = mr.groups(mr.load_logs(str(_copy_logs(tmp_path, "mnist_fcn_s*.json", edit))))
    err = {d["_seed"]: {r["variant"]: r["test_error"] for r in d["runs"]} for d in g["mnist_fcn"]}
    gd = [err[s]["dni 3-layer"] - err[s]["backprop 3-layer"] for s in (2, 3)]
    gc = [err[s]["cdni 3-layer"] - err[s]["backprop 3-layer"] for s in (1, 2, 3)]
    row = next(r for r in mr._fcn_rows(g["mnist_fcn"])[1] if r[0] == "3-layer")
    assert row[4] == mr.pm(gd) and row[5] == mr.pm(gc)
    assert "mnist_fcn 3-layer: seed 1 has backprop but no dni" in capsys.readouterr().err
    target = next(line for line in mr.targets_section(g).splitlines() if line.startswith("| MNIST FCN 3-layer"))
    assert f"cDNI {mr.pm(gc)} vs DNI {mr.pm(gd)}" in target
    assert "## MNIST FCN" in mr.fcn_section(g["mnist_fcn"], str(tmp_path))  # the gap figure pairs by seed too


def test_make_results_copy_sg_table_with_different_T(tmp_path):
    """The injection-scale logs need not have the same T: a column per T any of them has, "-" where a log lacks
    it (the header came from the first log, and a log with other T shifted its cells under the wrong T)."""
    mr = _make_results()

    def edit(name, d):
        if name == "copy_sg0.5.json":
            d["runs"] = [r for r in d["runs"] if r["bptt"] != 2]
            d["runs"][-1]["bptt"] = 16  # T 4 and 16

    diag = _copy_logs(tmp_path, "copy_sg0.[15].json", edit, src=LOGS / "diag", sub="diag")
    lines = mr.copy_sg_table(str(diag)).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][1:5] == ["longest L, T=2", "longest L, T=4", "longest L, T=8", "longest L, T=16"]
    assert cells[0][5] == "cos(S, g) at the boundary, end (T=2, 4, 8, 16)"
    assert all(len(c) == len(cells[0]) for c in cells)
    row01, row05 = cells[2], cells[3]
    assert row01[0] == "0.1" and row01[4] == "-" and row01[5].endswith("/ -")
    assert row05[0] == "0.5" and row05[1] == "-" and row05[3] == "-" and row05[2] != "-" and row05[4] != "-"


def test_make_results_refuses_a_block_without_its_end_marker(tmp_path):
    """A block without its <!-- /diag --> raises and leaves the page as it was (find returned -1 and the rest of
    the page after the block was deleted)."""
    mr = _make_results()
    diag = _copy_logs(tmp_path, "copy_sg*.json", src=LOGS / "diag", sub="diag")
    doc = tmp_path / "synthetic_gradients.md"
    text = "head\n<!-- diag:copy_sg -->\nold table\n\nthe rest of the page\n"
    doc.write_text(text)
    with pytest.raises(mr.DiagError, match="has no <!-- /diag -->"):
        mr.diagnosis(str(diag), str(doc), str(tmp_path))
    assert doc.read_text() == text
    # the committed page with one end marker gone: the block would swallow the next one
    real = (REPO / "docs" / "synthetic_gradients.md").read_text()
    i = real.index("<!-- diag:mlp_dni -->")
    j = real.index("<!-- /diag -->", i)
    broken = real[:j] + real[j + len("<!-- /diag -->"):]
    with pytest.raises(mr.DiagError, match="not closed by <!-- /diag --> before the next block"):
        mr.replace_blocks(broken, {"mlp_dni": "| a |\n|---|\n| 1 |\n"})


def test_make_results_refuses_an_empty_block(tmp_path, capsys):
    """--diag on an empty folder: every missing log is warned about on stderr, and no block is replaced with a
    header-only table (every block was rewritten to a bare header, without a word)."""
    mr = _make_results()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "docs"
    out.mkdir()
    doc = out / "synthetic_gradients.md"
    text = (REPO / "docs" / "synthetic_gradients.md").read_text()
    doc.write_text(text)
    with pytest.raises(SystemExit, match="has no rows"):
        mr.main(["--runs", str(LOGS / "results"), "--out", str(out), "--diag", str(empty)])
    assert doc.read_text() == text and not (out / "results.md").exists()
    err = capsys.readouterr().err
    for name in ("mlp_base", "mlp_ridge", "ptb_base", "cnn_cos", "fcn_norm", "fcn_e10", "copy_ridge",
                 "copy_sg0.1", "copy_sg1.0", "ptb_ridge_sg05", "copy_probe_s100", "ptb_ridge_shuffle_s3"):
        assert f"missing log {empty / name}.json" in err, name
    # some logs present: the rows they give, a warning for each one missing
    diag = _copy_logs(tmp_path, "copy_sg0.[15].json", src=LOGS / "diag", sub="diag")
    doc.write_text("<!-- diag:copy_sg -->\n<!-- /diag -->\n")
    mr.diagnosis(str(diag), str(doc), str(out))
    assert mr._n_rows(doc.read_text()) == 2
    err = capsys.readouterr().err
    assert all(f"missing log {diag / f'copy_sg{f}.json'}" in err for f in ("0.2", "0.3", "0.7", "1.0"))
    with pytest.raises(mr.DiagError, match="no rows"):
        mr.replace_blocks("<!-- diag:ptb -->\nold\n<!-- /diag -->\n", {"ptb": ""})
