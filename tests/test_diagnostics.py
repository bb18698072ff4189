"""dni_fast.diagnostics: parameter groups, the recorded numbers, and the plot
of a run log's curves; the examples' validation split."""
import json
import math

import pytest
import torch
from torch import nn

import dni_fast as dni
import dni_fast.diagnostics as dd


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.iface = dni.BackwardInterface(dni.BasicSynthesizer(6, n_hidden=1), backend="reference")
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.iface(self.a(x)))


def test_param_groups_split_the_synthesizers():
    net = Net()
    groups = dd.param_groups(net, lr=1e-3, synth_lr=0.0)
    synth = {id(p) for p in net.iface.parameters()}
    assert [g["name"] for g in groups] == ["model", "synthesizers"]
    assert {id(p) for p in groups[1]["params"]} == synth and groups[1]["lr"] == 0.0
    assert not synth & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    # synth_lr=0: Adam leaves the synthesizer alone and trains the rest
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(groups)
    torch.manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    for n, p in net.named_parameters():
        same = torch.equal(p, before[n])
        assert same == n.startswith("iface."), n
    # default synth_lr: the model's
    assert [g["lr"] for g in dd.param_groups(net, lr=0.5)] == [0.5, 0.5]
    assert [g["name"] for g in dd.param_groups(nn.Linear(2, 2), lr=0.1)] == ["model"]


def test_grad_rms_by_hand():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    assert math.isclose(dd.grad_rms([a, b]), math.sqrt(25 / 4))
    assert dd.grad_rms([torch.zeros(2, requires_grad=True)]) is None


def test_adam_summary_step_ratio_tells_signal_from_noise():
    w_const, w_flip = torch.zeros(50, requires_grad=True), torch.zeros(50, requires_grad=True)
    opt = torch.optim.Adam([w_const, w_flip], lr=1e-3)
    assert dd.adam_summary(opt, [w_const]) is None  # no step yet
    for t in range(40):
        w_const.grad = torch.full((50,), 1e-3)
        w_flip.grad = torch.full((50,), 1e-3 * (-1) ** t)
        opt.step()
    c, f = dd.adam_summary(opt, [w_const]), dd.adam_summary(opt, [w_flip])
    assert abs(c["step_ratio"] - 1.0) < 1e-3  # a constant gradient: a full-size step
    assert f["step_ratio"] < 0.2  # alternating signs: m_hat ~ 0
    assert math.isclose(c["sqrt_v_min"], 1e-3, rel_tol=1e-4) and c["eps"] == 1e-8


def test_interface_records_have_the_norms():
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(8, 4)).sum().backward()
    rec = dd.interface_records(net)
    assert set(rec) == {"iface"}
    r = rec["iface"]
    assert r["count"] == 1 and r["g_norm"] > 0 and r["s_norm"] > 0 and r["rel_err"] > 0
    assert -1.0 <= r["cos"] <= 1.0
    assert dd.interface_records(net) == {}  # reset by the first read


def _quick_log(tmp_path, *extra):
    from dni_fast.examples import mnist_mlp

    path = tmp_path / "run.json"
    mnist_mlp.main(["--quick", "--data", "digits", "--no-progress", "--threads", "1", "--n-evals", "3",
                    "--log", str(path), *extra])
    return path


@pytest.mark.parametrize("synth", ["mlp", "ridge"])
def test_plot_run_from_an_example_log(tmp_path, synth):
    pytest.importorskip("matplotlib")
    path = _quick_log(tmp_path, "--mode", "backprop", "dni", "--synth", synth)
    log = json.loads(path.read_text())
    dni_run = next(r for r in log["runs"] if r["variant"] == "dni")
    curves = dni_run["history"]["interfaces"]
    assert set(curves) == {"dnis.0", "dnis.1"}
    for c in curves.values():
        n = len(dni_run["history"]["step"])
        assert all(len(c[k]) == n for k in ("cos", "rel_err", "s_norm", "g_norm", "synth_grad_rms", "sqrt_v_min"))
        assert all(v is not None and v >= 0 for v in c["g_norm"])
        if synth == "mlp":  # the BasicSynthesizer's Adam, against its eps
            assert c["adam_eps"] == 1e-8 and all(v is not None and v >= 0 for v in c["sqrt_v_min"] + c["sqrt_v_median"])
        else:  # the RidgeSynthesizer has no optimizer: its Adam columns are empty, not made up
            assert "adam_eps" not in c and all(v is None for v in c["sqrt_v_min"] + c["synth_grad_rms"])
    assert all(v > 0 for v in curves["dnis.1"]["g_norm"])  # the top one regresses on the true gradient
    assert set(dni_run["history"]["adam_step_ratio"]) == {"linears.0.weight", "linears.1.weight", "output.weight"}
    out = tmp_path / "curves.png"
    fig = dd.plot_run(str(path), out)
    assert out.stat().st_size > 10_000
    assert len(fig.axes) == len(dd.CURVES)  # one column: the backprop run has no interfaces
    with pytest.raises(ValueError, match="per-interface"):
        dd.plot_run({"runs": [r for r in log["runs"] if r["variant"] == "backprop"]})


def test_validation_split_is_fixed_and_disjoint():
    from dni_fast.examples._common import holdout
    from dni_fast.examples.data import load_images

    full = load_images("digits")
    a, b = holdout(load_images("digits"), 100), holdout(load_images("digits"), 100)
    assert a.eval_split == "valid" and holdout(load_images("digits"), 0).eval_split == "test"
    assert torch.equal(a.x_test, b.x_test) and len(a.x_test) == 100
    assert len(a.x_train) + len(a.x_test) == len(full.x_train)
    rows = lambda x: {tuple(r.flatten()[::7].tolist()) for r in x}  # noqa: E731
    assert not rows(a.x_train) & rows(a.x_test)
    with pytest.raises(ValueError):
        holdout(load_images("digits"), len(full.x_train))


def test_valid_flag_reports_the_validation_split(tmp_path):
    log = json.loads(_quick_log(tmp_path, "--mode", "dni", "--valid", "50").read_text())
    res = log["summary"]["results"]["dni"]
    assert log["summary"]["eval_split"] == "valid" and "valid_acc" in res and "test_acc" not in res
    assert log["config"]["n_valid"] == 50


def test_plot_compare_and_summarize(tmp_path):
    pytest.importorskip("matplotlib")
    path = _quick_log(tmp_path, "--mode", "dni", "cdni")
    out = tmp_path / "cmp.png"
    fig = dd.plot_compare([("DNI", str(path), "dni"), ("cDNI", str(path), "cdni")],
                          keys=("acc", "cos", "s_over_g", "step_ratio:linears.0.weight"), out=out)
    assert out.stat().st_size > 5_000 and len(fig.axes) == 4
    n = len(json.loads(path.read_text())["runs"][0]["history"]["step"])
    assert [len(line.get_xdata()) for line in fig.axes[1].lines if line.get_label() in ("DNI", "cDNI")] == [n, n]
    with pytest.raises(ValueError, match="no run 'backprop'"):
        dd.plot_compare([("x", str(path), "backprop")])
    text = dd.summarize(str(path))
    assert "dnis.0 @100%: cos" in text and "adam step ratio linears.0.weight" in text


# -- the offline ceiling and dead units (docs/synthetic_gradients.md, "The ceiling") --

def test_flat_cos_matches_the_formula_and_checks_shapes():
    torch.manual_seed(0)
    s, g = torch.randn(37, 5), torch.randn(37, 5)
    want = float((s * g).sum() / (s.norm() * g.norm()))
    assert dd.flat_cos(s, g) == pytest.approx(want, rel=1e-6)
    assert dd.flat_cos(g, g) == pytest.approx(1.0)
    assert dd.flat_cos(torch.zeros(3, 2), g[:3, :2]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dd.flat_cos(s, g[:, :4])


def test_predictability_finds_a_linear_map_and_nothing_in_noise():
    torch.manual_seed(0)
    x = torch.randn(1000, 12)
    a = torch.randn(12, 7)
    g = x @ a + 0.5 * torch.randn(1000, 7)
    r = dd.predictability(x, g, mlp_steps=300, batch_size=128)
    assert r["n_train"] == 700 and r["n_test"] == 300
    # signal variance 12 per output against noise 0.25: the ceiling is ~0.99
    assert r["ridge"] > 0.95, r
    assert r["mlp"] > 0.8, r
    # a baseline is scored on the same held-out rows: g itself scores 1; ridge_fit alone reproduces the ridge fit
    assert dd.predictability(x, g, mlp_steps=1, baseline=g)["baseline"] == pytest.approx(1.0)
    assert dd.flat_cos(dd.ridge_fit(x, g, 1e-4)(x), g) > 0.97
    noise = dd.predictability(x, torch.randn(1000, 7), mlp_steps=300, batch_size=128)
    assert abs(noise["ridge"]) < 0.15 and abs(noise["mlp"]) < 0.15, noise
    # a nonlinear target only the MLP can fit: g = |x_0| has no linear part
    gn = x[:, :1].abs() - x[:, :1].abs().mean()
    nl = dd.predictability(x, gn, mlp_steps=600, batch_size=128)
    assert nl["mlp"] > nl["ridge"] + 0.3, nl


def test_predictability_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same N"):
        dd.predictability(torch.randn(10, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="train_frac"):
        dd.predictability(torch.randn(100, 3), torch.randn(100, 3), train_frac=1.0)
    with pytest.raises(ValueError, match="baseline"):
        dd.predictability(torch.randn(100, 3), torch.randn(100, 2), baseline=torch.randn(100, 3))
    with pytest.raises(ValueError, match="same N"):
        dd.ridge_fit(torch.randn(10, 3), torch.randn(9, 2), 1e-3)
    with pytest.raises(ValueError, match="3 features"):
        dd.ridge_fit(torch.randn(10, 3), torch.randn(10, 2), 1e-3)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="too few"):
        dd.predictability(torch.randn(8, 3), torch.randn(8, 3))


def test_dead_units_counts_units_off_for_every_row():
    torch.manual_seed(0)
    syn = dni.BasicSynthesizer(6, n_hidden=2, hidden_dim=10, trigger_dim=4)
    x = torch.randn(64, 4)
    fresh = dd.dead_units(syn, x)
    assert len(fresh) == 2 and fresh[0] < 0.5
    with torch.no_grad():
        syn.layers[0].bias[:5] = -1e3  # half the second layer's units: off for any input
        syn.layers[0].bias[5:] = 1e3   # the other half: on for any input
    dead = dd.dead_units(syn, x)
    assert dead[0] == fresh[0] and dead[1] == pytest.approx(0.5)
    with torch.no_grad():
        syn.layers[0].bias[:] = -1e3
    assert dd.dead_units(syn, x)[1] == 1.0
    # with every unit of a layer dead the synthesizer is a constant
    with torch.no_grad():
        syn.layers[1].weight.normal_()
    out = syn(x)
    assert torch.allclose(out, out[:1].expand_as(out))
    ctx = dni.BasicSynthesizer(6, n_hidden=1, trigger_dim=4, context_dim=3)
    with pytest.raises(ValueError, match="context"):
        dd.dead_units(ctx, x)
    assert len(dd.dead_units(ctx, x, torch.randn(64, 3))) == 1
    with pytest.raises(TypeError, match="BasicSynthesizer"):
        dd.dead_units(nn.Linear(4, 6), x)
