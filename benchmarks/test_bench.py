"""pytest-benchmark versions of the microbenchmarks.

    pytest benchmarks/ --benchmark-only                     # every available provider
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:size

Not part of the test suite (``testpaths`` is ``tests``). On CUDA the steps are
followed by a synchronize so that each round times finished work.
"""
import pytest
import torch

from benchmarks import harness as B

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = [p for p in B.available_providers(DEVICE, compile=False)]
if DEVICE.type == "cuda":
    SIZES = [(64, 256, 256), (256, 1024, 1024), (1024, 4096, 4096)]
else:
    SIZES = [(16, 128, 128), (64, 256, 256)]


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-D{}-H{}".format(*s))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_interface_step(benchmark, provider, size):
    b, d, h = size
    benchmark.group = f"interface_step B={b} D={d} H={h}"
    step = _synced(B.interface_step(provider, b, d, h, torch.float32, DEVICE))
    step()
    benchmark(step)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-D{}-H{}".format(*s))
def test_plain_linear(benchmark, size):
    b, d, _ = size
    benchmark.group = f"interface_step B={b} D={d} H={size[2]}"
    step = _synced(B.plain_linear_step(b, d, torch.float32, DEVICE))
    step()
    benchmark(step)


MLP_PROVIDERS = ["backprop"] + PROVIDERS + [p + B.OVERLAP for p in PROVIDERS]
if DEVICE.type == "cpu":
    MLP_PROVIDERS += [p + B.INJECTION for p in PROVIDERS]
else:
    MLP_PROVIDERS += [p + B.GRAPH for p in MLP_PROVIDERS]


@pytest.mark.parametrize("provider", MLP_PROVIDERS)
def test_mlp(benchmark, provider):
    batch = 256 if DEVICE.type == "cuda" else 64
    benchmark.group = f"mlp B={batch}"
    step = _synced(B.mlp_step(provider, batch, DEVICE))
    step()
    benchmark(step)


@pytest.mark.parametrize("size", ["copy", "ptb"])
@pytest.mark.parametrize("provider", ["mlp/reference", "mlp/auto", "ridge"])
def test_synthesizer_step(benchmark, provider, size):
    """One RNN-boundary synthesizer step, BasicSynthesizer vs RidgeSynthesizer (bench_synthesizers.py)."""
    from benchmarks import bench_synthesizers as S

    b, d = S.SIZES[size]
    benchmark.group = f"synthesizer_step {size} B={b} D={d}"
    step = _synced(S.make_step(provider, b, d, DEVICE))
    step()
    benchmark(step)
