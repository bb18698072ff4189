"""GradientIsolated, the local losses (AuxClassifier, LocalLoss, InfoNCE as a
module's loss) and the Greedy InfoMax example.

Expected values come from plain autograd written here: each module's loss
backpropagated on a detached input, the synthetic gradient injected by hand.
"""
import math
import weakref

import pytest

from dni_fast.examples._common import compact
import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast import _overlap
from dni_fast.local import AuxClassifier, BoundaryCrossingError, GradientIsolated, InfoNCE, LocalLoss
from dni_fast.testing import assert_close


def mlp_stage(i, o, bn=False):
    layers = [nn.Linear(i, o)] + ([nn.BatchNorm1d(o)] if bn else []) + [nn.Tanh(), nn.Linear(o, o), nn.Tanh()]
    return nn.Sequential(*layers)


def make_net(seed=0, bn=False, width=(6, 8, 8, 5)):
    torch.manual_seed(seed)
    stages = [mlp_stage(width[i], width[i + 1], bn) for i in range(len(width) - 1)]
    heads = [AuxClassifier(w, 3, kind="mlp", conv_layers=0) for w in width[1:]]
    return stages, heads


def data(seed=1, n=16, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(3, (n,), generator=g)


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def params_of(mods):
    return [p.detach().clone() for m in mods for p in m.parameters()]


# ----------------------------------------------------------------------------- the schedule
def test_step_matches_manual_isolated_training():
    """step() = for each module: loss on its detached input, backward, SGD."""
    stages, heads = make_net()
    gi = GradientIsolated(stages, heads, sgd())
    m_stages, m_heads = make_net()
    opts = [torch.optim.SGD(list(s.parameters()) + list(h.parameters()), lr=0.1) for s, h in zip(m_stages, m_heads)]
    for t in range(3):
        x, y = data(seed=t)
        losses = gi.step(x, y)
        h, expected = x, []
        for s, head, opt in zip(m_stages, m_heads, opts):
            opt.zero_grad()
            out = s(h.detach())
            loss = F.cross_entropy(head.logits(out), y)
            loss.backward()
            opt.step()
            expected.append(loss.detach())
            h = out
        assert len(losses) == 3
        for a, e in zip(losses, expected):
            assert a.shape == () and not a.requires_grad
            assert_close(a, e)
    for a, e in zip(params_of(stages + heads), params_of(m_stages + m_heads)):
        assert_close(a, e)


def test_gradients_never_cross_a_module_boundary():
    """Each module's gradient is exactly that of its own loss: adding the
    later modules' losses to the picture changes nothing."""
    stages, heads = make_net()
    gi = GradientIsolated(stages, heads, sgd(lr=0.0))
    x, y = data()
    gi.step(x, y)
    h = x
    for i, (s, head) in enumerate(zip(stages, heads)):
        out = s(h.detach())
        own = torch.autograd.grad(F.cross_entropy(head.logits(out), y), list(s.parameters()))
        for p, g in zip(s.parameters(), own):
            assert_close(p.grad, g, name=f"module {i}")
        h = out
    # and the end-to-end gradient of the last loss would have reached module 0
    e2e = torch.autograd.grad(F.cross_entropy(heads[2].logits(gi(x)), y), list(stages[0].parameters()))
    assert max(g.abs().max().item() for g in e2e) > 1e-4


class Tracked(nn.Module):
    """Records (by weak reference) what its forward saved for the backward,
    and, on entry, how much of the previous module's saved state is alive."""

    def __init__(self, inner, prev=None):
        super().__init__()
        self.inner = inner
        self.prev = [prev]  # a list: not a registered submodule
        self.refs = []
        self.alive_at_entry = None

    def forward(self, x):
        prev = self.prev[0]
        if prev is not None:
            self.alive_at_entry = sum(r() is not None for r in prev.refs)
        refs = []

        class Box:
            def __init__(self, t):
                self.t = t

        def pack(t):
            b = Box(t)
            refs.append(weakref.ref(b))
            return b

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
            out = self.inner(x)
        self.refs = refs
        return out


def test_graph_freed_before_next_module_runs():
    stages, heads = make_net()
    t0 = Tracked(stages[0])
    t1 = Tracked(stages[1], t0)
    t2 = Tracked(stages[2], t1)
    gi = GradientIsolated([t0, t1, t2], heads, sgd())
    x, y = data()
    gi.step(x, y)
    assert len(t0.refs) > 0 and len(t1.refs) > 0  # the modules did save tensors
    assert t1.alive_at_entry == 0 and t2.alive_at_entry == 0
    # GIM's own schedule (detach between modules, one backward of the summed
    # losses) keeps every graph alive: the probe sees it
    h, total = x, 0
    for s, head in zip([t0, t1, t2], heads):
        out = s(h.detach())
        total = total + head(out, y)
        h = out
    assert t1.alive_at_entry > 0 and t2.alive_at_entry > 0
    total.backward()


def test_shared_optimizer_matches_per_module():
    stages, heads = make_net()
    opt = torch.optim.Adam([p for m in stages + heads for p in m.parameters()], lr=0.01)
    shared = GradientIsolated(stages, heads, opt)
    s2, h2 = make_net()
    per = GradientIsolated(s2, h2, lambda p: torch.optim.Adam(p, lr=0.01))
    assert shared.shared_optimizer is opt and per.shared_optimizer is None and len(per.optimizers) == 3
    for t in range(3):
        x, y = data(seed=t)
        for a, e in zip(shared.step(x, y), per.step(x, y)):
            assert_close(a, e)
    for a, e in zip(params_of(stages + heads), params_of(s2 + h2)):
        assert_close(a, e)


def test_module_parameters_include_the_loss_parameters():
    stages, heads = make_net()
    seen = []
    gi = GradientIsolated(stages, heads, lambda p: seen.append(p) or torch.optim.SGD(p, lr=0.1))
    assert len(seen) == 3
    for i in range(3):
        want = {id(p) for p in stages[i].parameters()} | {id(p) for p in heads[i].parameters()}
        assert {id(p) for p in seen[i]} == want == {id(p) for p in gi.module_parameters(i)}
    # nn.Module losses are registered: state_dict and .to() cover them
    assert any(k.startswith("loss_modules.2.") for k in gi.state_dict())


# ----------------------------------------------------------------------------- train_module and caching
def test_train_module_freezes_the_others():
    stages, heads = make_net(bn=True)
    calls = [0, 0, 0]
    for i, s in enumerate(stages):
        s.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    gi = GradientIsolated(stages, heads, sgd(), train_module=1)
    before = {k: v.clone() for k, v in gi.state_dict().items()}
    x, y = data()
    for _ in range(2):
        losses = gi.step(x, y)
    assert losses[0] is None and losses[2] is None and losses[1] is not None
    assert calls == [2, 2, 0]  # module 2 never runs
    after = gi.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        if k.startswith("stages.1.") and k.endswith(("weight", "bias", "running_mean")) or \
                k.startswith("loss_modules.1.") and not k.endswith("num_batches_tracked"):
            assert changed, f"{k} should have trained"
        elif k.startswith(("stages.0.", "stages.2.", "loss_modules.0.", "loss_modules.2.")):
            assert not changed, f"{k} should be frozen (parameters and BatchNorm statistics)"
    assert all(p.grad is None for p in stages[0].parameters())
    assert stages[0].training  # the mode of a frozen module is restored after its forward
    # the same step by hand: module 0 in eval mode under no_grad, then module 1
    s2, h2 = make_net(bn=True)
    opt = torch.optim.SGD(list(s2[1].parameters()) + list(h2[1].parameters()), lr=0.1)
    for _ in range(2):
        s2[0].eval()
        with torch.no_grad():
            h = s2[0](x)
        s2[0].train()
        opt.zero_grad()
        h2[1](s2[1](h), y).backward()
        opt.step()
    for a, e in zip(params_of([stages[1], heads[1]]), params_of([s2[1], h2[1]])):
        assert_close(a, e)


def test_cache_outputs_then_start_matches_full_forward():
    """Module-by-module: train module 0, cache its outputs, train module 1 on
    the cache; the same as stepping with train_module from the raw data."""
    stages, heads = make_net(bn=True)
    s2, h2 = make_net(bn=True)
    a = GradientIsolated(stages, heads, sgd())
    b = GradientIsolated(s2, h2, sgd())
    batches = [data(seed=t) for t in range(3)]
    for gi in (a, b):
        gi.train_module = 0
        for x, y in batches:
            gi.step(x, y)
    a.train_module = 1
    cached = a.cache_outputs(batches)
    assert len(cached) == 3 and cached[0][0].shape == (16, 8) and torch.equal(cached[0][1], batches[0][1])
    assert not cached[0][0].requires_grad
    assert stages[0].training
    for _ in range(2):
        for h, y in cached:
            a.step(h, y, start=1)
    b.train_module = 1
    for _ in range(2):
        for x, y in batches:
            b.step(x, y)
    for p, q in zip(params_of(stages + heads), params_of(s2 + h2)):
        assert_close(p, q)
    # inputs only (no labels), and upto=0 is the identity
    only_x = a.cache_outputs([x for x, _ in batches], upto=2)
    assert only_x[0][1] is None and only_x[0][0].shape == (16, 8)
    assert torch.equal(a.cache_outputs(batches[:1], upto=0)[0][0], batches[0][0])


# ----------------------------------------------------------------------------- DNI next to local losses
def randomized_synth(width, seed=5):
    torch.manual_seed(seed)
    synth = dni.BasicSynthesizer(width, n_hidden=1)
    with torch.no_grad():
        for p in synth.parameters():  # the last layer starts at zero: make S(h) non-trivial
            p.copy_(torch.randn_like(p) * 0.3)
    return synth


def test_none_loss_module_trained_by_next_modules_interface():
    """Module 0 has no loss; module 1 starts with a BackwardInterface. Module 0
    gets exactly the injected synthetic gradient, the synthesizer its
    regression gradient from module 1's loss, module 1 its own gradient."""
    stages, heads = make_net()
    synth = randomized_synth(8)
    iface = dni.BackwardInterface(synth, backend="reference")
    m1 = nn.Sequential(iface, stages[1])
    gi = GradientIsolated([stages[0], m1, stages[2]], [None, heads[1], heads[2]], sgd(lr=0.0))
    x, y = data()
    losses = gi.step(x, y)
    assert losses[0] is None and losses[1] is not None
    # by hand
    h0 = stages[0](x)
    s = synth(h0.detach(), None)
    expect0 = torch.autograd.grad(h0, list(stages[0].parameters()), grad_outputs=s.detach())
    for p, g in zip(stages[0].parameters(), expect0):
        assert_close(p.grad, g, name="module 0 (synthetic gradient only)")
    t = h0.detach().requires_grad_()
    loss1 = heads[1](stages[1](t), y)
    g_true, *expect1 = torch.autograd.grad(loss1, [t] + list(stages[1].parameters()))
    for p, g in zip(stages[1].parameters(), expect1):
        assert_close(p.grad, g, name="module 1")
    reg = ((s - g_true) ** 2).sum() / g_true.shape[0]  # DESIGN §1: sum((S-g)^2) / g.size(0)
    for p, g in zip(synth.parameters(), torch.autograd.grad(reg, list(synth.parameters()))):
        assert_close(p.grad, g, name="synthesizer regression")
    # the synthesizer trains with module 0's optimizer (it is module 1's
    # submodule here, so module 1's)
    assert {id(p) for p in synth.parameters()} <= {id(p) for p in gi.module_parameters(1)}


def test_backward_interface_as_a_modules_loss():
    """losses[0] = BackwardInterface: module 0 trains on its injection; the
    trigger carries module 1's true gradient to the synthesizer only."""
    stages, heads = make_net()
    synth = randomized_synth(8)
    iface = dni.BackwardInterface(synth, backend="reference")
    gi = GradientIsolated(stages, [iface, heads[1], heads[2]], sgd(lr=0.0))
    assert {id(p) for p in synth.parameters()} <= {id(p) for p in gi.module_parameters(0)}
    x, y = data()
    gi.step(x, y)
    h0 = stages[0](x)
    s = synth(h0.detach(), None)
    for p, g in zip(stages[0].parameters(), torch.autograd.grad(h0, list(stages[0].parameters()), s.detach())):
        assert_close(p.grad, g, name="module 0")
    t = h0.detach().requires_grad_()
    g_true = torch.autograd.grad(heads[1](stages[1](t), y), t)[0]
    reg = ((s - g_true) ** 2).sum() / g_true.shape[0]
    for p, g in zip(synth.parameters(), torch.autograd.grad(reg, list(synth.parameters()))):
        assert_close(p.grad, g, name="synthesizer")


def test_none_loss_without_interface_raises():
    stages, heads = make_net()
    gi = GradientIsolated(stages, [None, heads[1], heads[2]], sgd())
    x, y = data()
    with pytest.raises(BoundaryCrossingError, match="module 0's output from outside a BackwardInterface of module 1"):
        gi.step(x, y)
    # an interface that does not take module 0's output itself (a layer before
    # it) lets the synthetic gradient through module 1's layer: also refused
    synth = randomized_synth(8)
    m1 = nn.Sequential(nn.Linear(8, 8), dni.BackwardInterface(synth), stages[1])
    gi = GradientIsolated([stages[0], m1, stages[2]], [None, heads[1], heads[2]], sgd())
    with pytest.raises(BoundaryCrossingError):
        gi.step(x, y)


# ----------------------------------------------------------------------------- losses
def test_infonce_and_local_loss_in_gradient_isolated():
    """GIM on a conv net: InfoNCE (needs_target False) as module 0's loss, a
    LocalLoss wrapping a pooled InfoNCE, and a DGL conv head; y only for the
    head."""
    torch.manual_seed(0)
    s0 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    s1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    s2 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
    nce0 = InfoNCE(8, k_steps=2, negatives=4)
    nce1 = InfoNCE(8, k_steps=1, negatives=3)
    pooled = LocalLoss(lambda h: nce1(F.avg_pool2d(h, 2)), needs_target=False, modules=[nce1])
    head = AuxClassifier(4, 5, kind="conv", hidden=6, conv_layers=1, pool=2)
    gi = GradientIsolated([s0, s1, s2], [nce0, pooled, head], lambda p: torch.optim.Adam(p, 1e-2))
    assert {id(p) for p in nce1.parameters()} <= {id(p) for p in gi.module_parameters(1)}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(5, (4,))
    first = gi.step(x, y)
    assert all(v is not None and torch.isfinite(v) for v in first)
    w_before = nce0.W[0].weight.detach().clone()
    gi.step(x, y)
    assert not torch.equal(w_before, nce0.W[0].weight)  # InfoNCE's W trains with module 0
    with pytest.raises(ValueError, match="module 2's loss needs the targets: call step"):
        gi.step(x)
    # a plain function is a loss too (called as fn(h, y))
    gi2 = GradientIsolated([s0], [lambda h, y: (h.mean() - y.float().mean()) ** 2], sgd())
    assert gi2.step(x, y)[0] is not None


def test_aux_classifier():
    torch.manual_seed(0)
    head = AuxClassifier(6, 4, kind="conv", conv_layers=2, pool=2)
    h, y = torch.randn(3, 6, 5, 5), torch.randint(4, (3,))
    assert head.logits(h).shape == (3, 4)
    assert_close(head(h, y), F.cross_entropy(head.logits(h), y))
    mlp = AuxClassifier(6, 4, kind="mlp", hidden=9, conv_layers=1)
    assert mlp.logits(torch.randn(3, 6)).shape == (3, 4)
    assert mlp.logits(torch.randn(3, 7, 6)).shape == (3, 4)  # extra dims are averaged
    with pytest.raises(ValueError, match="built for 6 input channels, got 5"):
        head.logits(torch.randn(3, 5, 4, 4))
    with pytest.raises(ValueError, match="expects \\(B, C, H, W\\)"):
        head.logits(torch.randn(3, 6))
    with pytest.raises(ValueError, match="kind must be"):
        AuxClassifier(6, 4, kind="linear")
    with pytest.raises(ValueError, match="needs the labels"):
        head(h, None)


def test_construction_errors():
    stages, heads = make_net()
    with pytest.raises(ValueError, match="3 modules but 2 losses"):
        GradientIsolated(stages, heads[:2], sgd())
    with pytest.raises(ValueError, match="losses\\[2\\] is None, but module 2 is the last"):
        GradientIsolated(stages, [heads[0], heads[1], None], sgd())
    with pytest.raises(ValueError, match="is a BackwardInterface, but module 2 is the last"):
        GradientIsolated(stages, [heads[0], heads[1], dni.BackwardInterface(dni.BasicSynthesizer(5))], sgd())
    with pytest.raises(TypeError, match="losses\\[1\\] must be a callable"):
        GradientIsolated(stages, [heads[0], 3, heads[2]], sgd())
    with pytest.raises(TypeError, match="optimizer must be"):
        GradientIsolated(stages, heads, "adam")
    with pytest.raises(ValueError, match="train_module must be None or a module index in \\[0, 3\\)"):
        GradientIsolated(stages, heads, sgd(), train_module=3)
    with pytest.raises(ValueError, match="train_module=0: module 0's loss is None"):
        GradientIsolated(stages, [None, heads[1], heads[2]], sgd(), train_module=0)
    gi = GradientIsolated(stages, heads, sgd(), train_module=1)
    with pytest.raises(ValueError, match="start=2 is past train_module=1"):
        gi.step(*data(), start=2)
    with pytest.raises(ValueError, match="start must be in"):
        gi.step(*data(), start=5)
    gi = GradientIsolated(stages[:1], [lambda h, y: h], sgd())
    with pytest.raises(ValueError, match="must return a scalar"):
        gi.step(*data())


def test_forward_is_the_plain_network():
    stages, heads = make_net()
    gi = GradientIsolated(stages, heads, sgd())
    x, _ = data()
    assert_close(gi(x), stages[2](stages[1](stages[0](x))))
    assert_close(gi(x, upto=1), stages[0](x))


# ----------------------------------------------------------------------------- the example
def test_gim_example_encodes_each_patch_independently():
    """The example runs its encoder on the whole 32x32 image; that must equal
    encoding every 8x8 patch (stride 4) on its own, as GIM does."""
    from dni_fast.examples.gim_mnist import encoder_modules, patch_grid

    torch.manual_seed(0)
    mods = encoder_modules((4, 6, 8))
    x = torch.randn(2, 1, 32, 32)
    patches = x.unfold(2, 8, 4).unfold(3, 8, 4)  # (2, 1, 7, 7, 8, 8)
    assert patches.shape[2:4] == (7, 7)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(2 * 49, 1, 8, 8)
    h, hp = x, flat
    for i, m in enumerate(mods):
        h, hp = m(h), m(hp)
        grid = patch_grid(i, h)  # (2, C, 7, 7)
        per_patch = hp.mean((2, 3)).reshape(2, 7, 7, -1).permute(0, 3, 1, 2)
        assert_close(grid, per_patch, name=f"module {i + 1}")


def test_gim_example_quick(tmp_path):
    import json

    from dni_fast.examples import gim_mnist

    log = tmp_path / "gim.json"
    out = gim_mnist.main(["--quick", "--no-progress", "--data", "digits", "--log", str(log),
                          "--train-images", "64", "--probe-epochs", "2"])
    saved = json.loads(log.read_text())
    assert saved["example"] == "gim_mnist" and compact(out["summary"]) == saved["summary"]  # the log keeps 6 significant digits
    assert [r["variant"] for r in saved["runs"]] == ["gim", "cpc", "random"]
    for r in saved["runs"]:
        assert len(r["probe_acc_per_module"]) == 3
        assert all(0.0 <= a <= 100.0 for a in r["probe_acc_per_module"])
    gim, cpc, rnd = saved["runs"]
    assert gim["steps"] == cpc["steps"] == 2 and rnd["steps"] == 0
    assert len(gim["final_infonce"]) == 3 and len(cpc["final_infonce"]) == 1  # one loss per module
    assert all(math.isfinite(v) and v > 0 for v in gim["final_infonce"] + cpc["final_infonce"])


# ----------------------------------------------------------------------------- review fixes
def test_step_refuses_to_train_where_it_could_not_isolate():
    """Under no_grad, or with an interface it relies on in eval mode (which passes its input through, so the
    next module's gradient would train this one), step() refuses by name."""
    stages, heads = make_net()
    gi = GradientIsolated(stages, [dni.BackwardInterface(randomized_synth(8)), heads[1], heads[2]], sgd())
    x, y = data()
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs autograd"):
        gi.step(x, y)
    gi.eval()
    before = params_of(stages)
    with pytest.raises(RuntimeError, match=r"losses\[0\] is in eval mode"):
        gi.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(stages)))  # nothing trained
    gi.train()
    gi.step(x, y)
    # the interface inside the next module (module 0's loss is None)
    stages, heads = make_net()
    m1 = nn.Sequential(dni.BackwardInterface(randomized_synth(8)), stages[1])
    gi = GradientIsolated([stages[0], m1, stages[2]], [None, heads[1], heads[2]], sgd())
    m1[0].eval()
    with pytest.raises(RuntimeError, match="of module 1 is in eval mode"):
        gi.step(x, y)


def test_step_detaches_its_input():
    """Module 0's loss must not reach whatever computed x (docs/local.md: each module runs on a detached input)."""
    stages, heads = make_net()
    gi = GradientIsolated(stages, heads, sgd())
    up = nn.Linear(6, 6)
    x, y = data()
    h = up(x)
    gi.step(h, y)
    assert up.weight.grad is None
    h.sum().backward()  # the upstream graph is intact
    assert up.weight.grad is not None


def test_a_parameter_in_two_modules_turns_or_missing_from_a_shared_optimizer_is_refused():
    stages, heads = make_net()
    with pytest.raises(ValueError, match="belongs to module 0's turn and module 1's"):
        GradientIsolated(stages[:2], [heads[1], heads[1]], sgd())  # one head, two modules: stepped twice
    stages, heads = make_net()
    opt = torch.optim.SGD([p for s in stages for p in s.parameters()], lr=0.1)  # the heads left out
    with pytest.raises(ValueError, match="does not hold .* parameter"):
        GradientIsolated(stages, heads, opt)
    shared = torch.optim.SGD([p for m in stages + heads for p in m.parameters()], lr=0.1)
    GradientIsolated(stages, heads, shared)  # every parameter held: fine
    GradientIsolated(stages[:2], [heads[1], heads[1]], torch.optim.SGD(  # shared optimizer: steps each once
        [p for m in stages[:2] + [heads[1]] for p in m.parameters()], lr=0.1))


# -- review, this stop ------------------------------------------------------------------------------------------
def test_a_copy_with_interface_guards_trains_like_the_original_and_pickles():
    """The guard's hooks on the interfaces were closures over the original model: a deepcopy's step raised a
    false BoundaryCrossingError, and torch.save failed."""
    import copy
    import io

    def build():
        stages, heads = make_net()
        iface = dni.BackwardInterface(randomized_synth(8), backend="reference")
        return GradientIsolated([stages[0], nn.Sequential(iface, stages[1]), stages[2]], [None, heads[1], heads[2]],
                                sgd())

    x, y = data()
    a = build()
    a.step(x, y)
    b = copy.deepcopy(a)
    la, lb = a.step(x, y), b.step(x, y)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(la, lb))
    buf = io.BytesIO()
    torch.save(b, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    c.step(x, y)


def test_a_module_returning_a_tuple_is_named():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x):
            h = self.lin(x)
            return h, h.tanh()

    _, heads = make_net()
    gi = GradientIsolated([Two(), nn.Linear(8, 5)], [lambda out, y: out[0].pow(2).mean(), heads[2]], sgd())
    with pytest.raises(TypeError, match="module 0 returned a tuple"):
        gi.step(*data())


def test_a_module_without_parameters_under_a_loss_without_any_is_skipped():
    stages, heads = make_net()
    gi = GradientIsolated([nn.Tanh(), nn.Linear(6, 5)], [lambda h, y: h.pow(2).mean(), heads[2]], sgd())
    losses = gi.step(*data())
    assert losses[0] is not None and losses[1] is not None


# -- review, stop 23 ----------------------------------------------------------------------------------------------
def test_a_loss_that_does_not_require_grad_is_refused_for_a_module_with_parameters():
    """It was skipped silently: a loss value came back and the module never trained."""
    stages, heads = make_net()
    gi = GradientIsolated(stages[:2], [lambda h, y: F.cross_entropy(h.detach()[:, :3], y), heads[1]], sgd())
    before = params_of(stages[:1])
    with pytest.raises(RuntimeError, match="module 0's loss does not require grad"):
        gi.step(*data())
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(stages[:1])))


class _Residual(nn.Module):
    """Feeds its input into a BackwardInterface and also around it: module 1's loss reaches module 0."""

    def __init__(self, iface):
        super().__init__()
        self.iface, self.lin = iface, nn.Linear(8, 8)

    def forward(self, h):
        return torch.tanh(self.lin(self.iface(h))) + h


@pytest.mark.parametrize("overlap", [None, "injection"])
def test_the_guard_refuses_a_crossing_gradient_when_the_injection_runs_on_the_worker(overlap):
    """Under overlap="injection" the guard accepted any gradient into an interface's input until the step's
    end (the input was kept as a legitimate sender while its injection waited for the worker)."""
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    iface = dni.BackwardInterface(randomized_synth(8), backend="reference", overlap=overlap)
    gi = GradientIsolated([m0, _Residual(iface)], [None, AuxClassifier(8, 3, kind="mlp", conv_layers=0)], sgd())
    try:
        with pytest.raises(BoundaryCrossingError, match="module 0's output from outside a BackwardInterface"):
            gi.step(*data())
    finally:
        _overlap.discard()  # the injection still queued on the worker


def test_a_discarded_gradient_isolated_is_collected_and_takes_its_hooks_off():
    """The guard's hooks held their GradientIsolated strongly: a discarded one stayed alive (its optimizers
    too) through the user's modules, and each new one over the same modules added two more hooks."""
    import gc

    stages, heads = make_net()
    iface = dni.BackwardInterface(randomized_synth(8), backend="reference")
    mods = [stages[0], nn.Sequential(iface, stages[1])]
    gi = GradientIsolated(mods, [None, heads[1]], sgd())
    gi.step(*data())
    ref = weakref.ref(gi)
    del gi
    gc.collect()
    assert ref() is None
    assert not iface._forward_pre_hooks and not iface._forward_hooks
    gi = GradientIsolated(mods, [None, heads[1]], sgd())
    assert len(iface._forward_pre_hooks) == 1 and len(iface._forward_hooks) == 1
    for _ in range(20):  # forward() outside step(): nothing is kept
        gi(data()[0])
    assert gi._iface_inputs == [[], []]
    gi.step(*data())


def test_forward_checks_upto():
    stages, heads = make_net()
    gi = GradientIsolated(stages, heads, sgd())
    with pytest.raises(ValueError, match=r"upto must be None or in \[0, 3\], got -1"):
        gi(data()[0], upto=-1)
    assert gi(data()[0], upto=0) is not None


def test_a_shallow_copy_going_away_leaves_the_originals_guard_on():
    """copy.copy shares the hook objects and handles: the copy's finalizer took the original's hooks off, and
    every legitimate step then raised a false BoundaryCrossingError."""
    import copy
    import gc

    stages, heads = make_net()
    iface = dni.BackwardInterface(randomized_synth(8), backend="reference")
    gi = GradientIsolated([stages[0], nn.Sequential(iface, stages[1])], [None, heads[1]], sgd())
    c = copy.copy(gi)
    del c
    gc.collect()
    assert len(iface._forward_pre_hooks) == 1 and len(iface._forward_hooks) == 1
    gi.step(*data())


def test_guard_hooks_pickled_by_an_earlier_version_hold_their_owner_weakly():
    """An earlier dni_fast pickled the hook with its owner held strongly: unpickled, owner() called the model."""
    from dni_fast.local.isolated import _EnterInterface

    stages, heads = make_net()
    gi = GradientIsolated(stages[:2], heads[:2], sgd())
    hook = _EnterInterface.__new__(_EnterInterface)
    hook.__setstate__({"owner": gi, "j": 1})  # what unpickling an old hook does
    assert hook.owner() is gi
    hook(None, (torch.zeros(1),))
    assert len(gi._iface_inputs[1]) == 1
