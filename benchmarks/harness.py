"""The benchmark harness: the interface step and the docs/design.md §5 MLP, per provider.

Providers (one per line of output):

* ``reference``: the reference backend (plain autograd);
* ``torch.compile``: ``torch.compile`` (default mode) of the reference module;
* ``triton`` / ``cuda`` / ``cpp``: the fused backends, where available;
* ``backprop`` (MLP only): the same network trained by plain backprop.

Ratios are always to ``reference`` measured in the same run, in the same math
mode. Rows are appended to a CSV with the device, versions and date. On the
CPU and on CUDA every provider of one size (and the floor's parts) runs
interleaved, block by block (each block ended by a device sync on CUDA), and
reports the median block with the 20/80 % quantiles (``time_many``); only the
GPU floor's parts (``gpu_floor_ms``) use ``triton.testing.do_bench``.

Definitions (docs/design.md §5):

* the **interface step** is ``Linear(D, D)`` then
  ``BackwardInterface(BasicSynthesizer(D, n_hidden=1, hidden_dim=H))`` and the
  true gradient arriving, timed as a whole; the **DNI part** is that minus the
  same Linear's plain forward and backward;
* the **CPU floor** is the synthesizer step's five matrix products plus the
  plain Linear's forward and backward, each timed alone;
* the **MLP floor** is plain backprop plus the synthesizers' 25 matrix
  products and Adam's update of their parameters, each timed alone;
* the **GPU floor** is two launch latencies (an empty kernel) plus the larger
  of FLOPs (10·B·D·H) over the measured matmul peak and bytes over the
  measured copy bandwidth.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni
from dni_fast.timing import time_many, time_ms  # noqa: F401  (the harness times with them; re-exported)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_csv import append_rows  # noqa: E402  (the header-checked append every benchmark uses)


def cpu_name() -> str:
    """The CPU's model and the cores this process may use, e.g. ``AMD EPYC 7B13 (2 cores)``: the CSV's
    device column (``platform.processor()`` says only ``x86_64``, so rows of different machines, which
    ``--auto-table-from`` must keep apart, looked alike)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from dni_fast._overlap import available_cores

    return f"{model or platform.processor() or platform.machine()} ({available_cores()} cores)"


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": dev, "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "dni_fast": dni.__version__}


@dataclass
class Row:
    bench: str
    provider: str
    B: int
    D: int
    H: int
    dtype: str
    threads: int
    tf32: bool
    ms: float
    p20: float
    p80: float
    ratio: float = float("nan")  # reference_ms / ms: > 1 means faster than the reference
    dni_ms: float = float("nan")  # interface step: ms minus the plain Linear's fwd+bwd
    dni_ratio: float = float("nan")  # reference's DNI part / this DNI part
    floor_ms: float = float("nan")
    extra: Dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------
def interface_step(provider: str, B: int, D: int, H: int, dtype: torch.dtype, device: torch.device,
                   n_hidden: int = 1, pipelined: bool = False) -> Callable[[], None]:
    """One interface step: ``Linear(D, D)`` -> ``BackwardInterface`` -> true gradient.

    bf16/fp16 run the model in that dtype (weights included), as a user of
    ``model.to(dtype)`` would. ``pipelined``: ``BackwardInterface(pipelined=True)``
    (from the second call on, a call's forward also applies the previous call's
    update). The step's ``interface`` attribute is the interface."""
    torch.manual_seed(0)
    lin = nn.Linear(D, D).to(device, dtype)
    backend = "reference" if provider in ("reference", "torch.compile") else provider
    iface = dni.BackwardInterface(dni.BasicSynthesizer(D, n_hidden=n_hidden, hidden_dim=H), backend=backend,
                                  track_stats=False, pipelined=pipelined).to(device, dtype)
    with torch.no_grad():
        iface.synthesizer.layers[-1].weight.normal_(0, 0.01)
    x = torch.randn(B, D, device=device, dtype=dtype)
    g = torch.randn(B, D, device=device, dtype=dtype)
    model = nn.Sequential(lin, iface)
    params = list(model.parameters())
    if provider == "torch.compile":
        model = torch.compile(model)

    def step():
        for p in params:
            p.grad = None
        model(x).backward(g)

    step.interface = iface
    return step


def plain_linear_step(B: int, D: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    lin = nn.Linear(D, D).to(device, dtype)
    x = torch.randn(B, D, device=device, dtype=dtype)
    g = torch.randn(B, D, device=device, dtype=dtype)

    def step():
        lin.weight.grad = lin.bias.grad = None
        lin(x).backward(g)

    return step


def five_products(B: int, D: int, H: int, dtype: torch.dtype, device: torch.device) -> List[Callable[[], object]]:
    """The synthesizer step's five matrix products (n_hidden=1), each alone."""
    h = torch.randn(B, D, device=device, dtype=dtype)
    w1 = torch.randn(H, D, device=device, dtype=dtype)
    w2 = torch.randn(D, H, device=device, dtype=dtype)
    a1 = torch.randn(B, H, device=device, dtype=dtype)
    delta = torch.randn(B, D, device=device, dtype=dtype)
    d1 = torch.randn(B, H, device=device, dtype=dtype)
    return [lambda: h @ w1.t(), lambda: a1 @ w2.t(), lambda: delta.t() @ a1, lambda: delta @ w2,
            lambda: d1.t() @ h]


class MLP(nn.Module):
    """784-256x6-10 with BatchNorm and ReLU; a BackwardInterface after each of
    the first five hidden layers when ``backend`` is not None (docs/design.md §5)."""

    def __init__(self, backend: Optional[str], width: int = 256, depth: int = 6, n_dni: int = 5,
                 overlap: bool = False):
        super().__init__()
        layers: List[nn.Module] = []
        d = 784
        for i in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            if backend is not None and i < n_dni:
                layers.append(dni.BackwardInterface(dni.BasicSynthesizer(width, n_hidden=1), backend=backend,
                                                    track_stats=False, overlap=overlap))
            d = width
        layers.append(nn.Linear(d, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


OVERLAP = "+overlap"  # provider suffix: the same backend with drop-in overlap (dni.overlap)
INJECTION = "+injection"  # provider suffix: drop-in overlap with the injection on the worker too


GRAPH = "+graph"  # provider suffix (CUDA): the whole training step captured in one CUDA graph


def split_provider(provider: str):
    """``(backend, overlap mode)`` of an MLP provider name (without ``+graph``)."""
    if provider.endswith(GRAPH):
        provider = provider[: -len(GRAPH)]
    if provider.endswith(OVERLAP):
        return provider[: -len(OVERLAP)], True
    if provider.endswith(INJECTION):
        return provider[: -len(INJECTION)], "injection"
    return provider, False


# Adam's implementation for the MLP benchmark, every provider alike ("loop": torch's default on the CPU, a
# for-loop over the parameters; "fused": one kernel). The synthesizers add 20 parameter tensors (655k values)
# to backprop's 14, so the choice moves the DNI/backprop ratio; the rows record it.
MLP_ADAM = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def mlp_step(provider: str, B: int, device: torch.device, adam: str = "loop",
             autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One training step of the MLP; ``provider`` is ``backprop``, a backend
    name, or a backend name + ``+overlap`` or ``+injection``, any of them
    + ``+graph`` on CUDA (the whole step, forward, injections, backward and
    Adam with ``capturable=True``, captured once in a CUDA graph after three
    warm-up steps on a side stream, and replayed); ``adam`` a key of
    ``MLP_ADAM``; ``autocast`` a dtype to run the forward under autocast."""
    torch.manual_seed(0)
    graph = provider.endswith(GRAPH)
    if graph and device.type != "cuda":
        raise ValueError(f"{provider}: CUDA graphs need a CUDA device")
    backend, overlap = split_provider(provider)
    model = MLP(None if backend == "backprop" else backend, overlap=overlap).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **MLP_ADAM[adam], **({"capturable": True} if graph else {}))
    x = torch.randn(B, 784, device=device)
    y = torch.randint(0, 10, (B,), device=device)

    def body():
        # the autocast cache must be off under graph capture (its casts would be captured once and go stale)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None,
                            cache_enabled=not graph):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def step():
        opt.zero_grad(set_to_none=True)
        body()

    if not graph:
        return step
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward allocates .grad in the graph's pool
    with torch.cuda.graph(g):
        body()
    return g.replay


# ---------------------------------------------------------------------------
# GPU floor
# ---------------------------------------------------------------------------
def gpu_floor_ms(B: int, D: int, H: int, dtype: torch.dtype, device: torch.device) -> Dict[str, float]:
    """Two empty-kernel launch latencies + max(FLOPs / measured matmul peak,
    bytes / measured copy bandwidth) for the DNI part of one step."""
    from triton.testing import do_bench

    one = torch.zeros(1, device=device)  # one element: an empty tensor launches no kernel at all
    launch = do_bench(lambda: one.add_(1), quantiles=[0.5], warmup=50, rep=200)
    if isinstance(launch, (list, tuple)):
        launch = launch[0]
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = do_bench(lambda: a @ a, warmup=10, rep=200)
    peak = 2 * n ** 3 / (t_mm * 1e-3)  # FLOP/s in this math mode
    big = torch.empty(256 * 2 ** 20, device=device, dtype=torch.uint8)
    big2 = torch.empty_like(big)
    t_cp = do_bench(lambda: big2.copy_(big), warmup=10, rep=200)
    bw = 2 * big.numel() / (t_cp * 1e-3)  # bytes/s, read + write
    es = torch.tensor([], dtype=dtype).element_size()
    flops = 10 * B * D * H
    # weights read twice (forward, update) and their grads written once; activations h, S, z, g, delta
    nbytes = es * (3 * (D * H + H * D) + B * (4 * D + 2 * H))
    compute_ms = flops / peak * 1e3
    mem_ms = nbytes / bw * 1e3
    return {"floor_ms": 2 * launch + max(compute_ms, mem_ms), "launch_ms": launch, "peak_tflops": peak / 1e12,
            "copy_gbps": bw / 1e9, "flops": flops, "bytes": nbytes}


# ---------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _tf32(enabled: bool):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def available_providers(device: torch.device, compile: bool = True) -> List[str]:
    """``reference`` (and ``torch.compile`` of it), then every registered fused
    backend that runs on ``device``, never the Triton interpreter."""
    from dni_fast import backends

    out = ["reference"] + (["torch.compile"] if compile else [])
    for b in backends.registered():
        if not b.fused or b.interpreted(device):
            continue  # never benchmark the Triton interpreter
        if b.status(device)[0]:
            out.append(b.name)
    return out


def bench_interface(sizes: Iterable[tuple], providers: Sequence[str], dtype: torch.dtype, device: torch.device,
                    tf32: bool = False, min_run_time: float = 0.5, floor: bool = True) -> List[Row]:
    rows: List[Row] = []
    dt = str(dtype).replace("torch.", "")
    with _tf32(tf32):
        for B, D, H in sizes:
            fns: Dict[str, Callable[[], object]] = {"plain": plain_linear_step(B, D, dtype, device)}
            if floor and device.type != "cuda":
                fns.update({f"product{i}": f for i, f in enumerate(five_products(B, D, H, dtype, device))})
            for p in providers:
                try:
                    fn = interface_step(p, B, D, H, dtype, device)
                    fn()  # a provider that cannot run this size/dtype fails here: say so, keep going
                except Exception as e:
                    print(f"  [skip] {p} B={B} D={D} {dt}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                fns[p] = fn
            t = time_many(fns, device, min_run_time)
            plain = t["plain"]["ms"]
            floor_info: Dict[str, float] = {}
            if floor and device.type == "cuda":
                floor_info = gpu_floor_ms(B, D, H, dtype, device)
            elif floor:
                prods = sum(t[f"product{i}"]["ms"] for i in range(5))
                floor_info = {"floor_ms": prods + plain, "products_ms": prods}
            ref_ms = t["reference"]["ms"] if "reference" in t else float("nan")
            ref_dni = ref_ms - plain
            for p in providers:
                if p not in t:
                    continue
                tp = t[p]
                dni_ms = tp["ms"] - plain
                rows.append(Row("interface_step", p, B, D, H, dt, torch.get_num_threads(), tf32, tp["ms"], tp["p20"],
                                tp["p80"], ratio=ref_ms / tp["ms"], dni_ms=dni_ms, dni_ratio=ref_dni / dni_ms,
                                floor_ms=floor_info.get("floor_ms", float("nan")),
                                extra={"plain_linear_ms": plain, **{k: v for k, v in floor_info.items()
                                                                     if k != "floor_ms"}}))
    return rows


def mlp_synth_floor(B: int, device: torch.device, n_dni: int = 5, width: int = 256,
                    adam: str = "loop", autocast: Optional[torch.dtype] = None) -> Dict[str, Callable[[], None]]:
    """What the MLP's synthesizers cannot avoid, each part timed alone: their
    ``5 * n_dni`` matrix products (in the step's precision: under ``autocast``,
    in that dtype, as the step's products run), and Adam's update of their
    (fp32) parameters."""
    prods = five_products(B, width, width, autocast or torch.float32, device)

    def products():
        for _ in range(n_dni):
            for f in prods:
                f()

    def forward_products():  # what stays on the main path with drop-in overlap
        for _ in range(n_dni):
            prods[0]()
            prods[1]()

    synths = [dni.BasicSynthesizer(width, n_hidden=1).to(device) for _ in range(n_dni)]
    params = [p for s in synths for p in s.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, **MLP_ADAM[adam])
    return {"synth_products": products, "synth_forward_products": forward_products, "synth_adam": opt.step}


def mlp_flops(provider: str, B: int, device: torch.device) -> float:
    """Matrix-product FLOPs per sample of one ``mlp_step`` (forward, backward,
    the synthesizers' regression; ``torch.utils.flop_counter``). Every DNI
    provider does the same products, so they are counted once, on
    ``reference`` without overlap: the counter sees neither a fused kernel's
    products nor another thread's. The DNI step's count against backprop's is
    the floor of its time ratio on a device the step fills (docs/decoupled.md)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = mlp_step("backprop" if split_provider(provider)[0] == "backprop" else "reference", B, device)
    step()  # Adam's state and the lazy initialisations outside the count
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / B


def bench_mlp(B: int, providers: Sequence[str], device: torch.device, min_run_time: float = 1.0,
              overlap: bool = False, adam: str = "loop", graphs: bool = False,
              autocast: Optional[torch.dtype] = None) -> List[Row]:
    """The docs/design.md §5 MLP per provider, against plain backprop, measured
    side by side. ``floor_ms`` is backprop plus what the synthesizers cannot
    avoid (``mlp_synth_floor``), each timed alone in the same run. With
    ``overlap``, every backend also runs with drop-in overlap (``<b>+overlap``),
    whose floor is backprop plus what stays on the main path: the synthesizers'
    forward products and Adam over their parameters; and with the injection
    on the worker too (``<b>+injection``), whose floor is reported as
    backprop itself (what stays on the main path is less than backprop's
    work, but Adam over the synthesizers' parameters adds to it). Each row's
    ``flops_vs_backprop`` is its matrix-product work against backprop's
    (``mlp_flops``)."""
    names = ["backprop"] + [p for p in providers if p != "torch.compile"]
    if overlap:
        # the injection moves to the worker on CPU tensors only (inline on CUDA: the same as +overlap)
        suffixes = (OVERLAP, INJECTION) if device.type == "cpu" else (OVERLAP,)
        names += [p + suffix for suffix in suffixes for p in providers if p != "torch.compile"]
    if graphs and device.type == "cuda":
        names += [p + GRAPH for p in list(names)]
    fns: Dict[str, Callable[[], object]] = {p: mlp_step(p, B, device, adam, autocast) for p in names}
    fns.update(mlp_synth_floor(B, device, adam=adam, autocast=autocast))
    counted = {k: mlp_flops(k, B, device) for k in ("backprop", "reference")}
    flops = {p: counted["backprop" if split_provider(p)[0] == "backprop" else "reference"] for p in names}
    t = time_many(fns, device, min_run_time)
    base = t["backprop"]["ms"]
    floor = base + t["synth_products"]["ms"] + t["synth_adam"]["ms"]
    overlap_floor = base + t["synth_forward_products"]["ms"] + t["synth_adam"]["ms"]
    ref = t["reference"]["ms"] if "reference" in t else None
    rows: List[Row] = []
    for p in names:
        tp = t[p]
        mode = p.removesuffix(GRAPH)  # <backend>+overlap+graph: the floor of its mode
        fl = overlap_floor if mode.endswith(OVERLAP) else base if mode.endswith(INJECTION) else floor
        dtype = "float32" if autocast is None else str(autocast).replace("torch.", "") + "-autocast"
        rows.append(Row("mlp", p, B, 256, 256, dtype, torch.get_num_threads(), False, tp["ms"], tp["p20"],
                        tp["p80"], ratio=(ref / tp["ms"]) if ref else float("nan"), floor_ms=fl,
                        extra={"vs_backprop": tp["ms"] / base, "floor_vs_backprop": fl / base, "adam": adam,
                               "mflop_per_sample": flops[p] / 1e6,
                               "flops_vs_backprop": flops[p] / flops["backprop"],
                               "synth_products_ms": t["synth_products"]["ms"],
                               "synth_forward_products_ms": t["synth_forward_products"]["ms"],
                               "synth_adam_ms": t["synth_adam"]["ms"]}))
    return rows


def print_rows(rows: Sequence[Row], header: bool = True) -> None:
    if not rows:
        return
    hdr = f"{'bench':15} {'provider':14} {'B':>5} {'D':>5} {'H':>5} {'dtype':9} {'thr':>3} {'tf32':>4} " \
          f"{'ms':>9} {'x ref':>6} {'dni ms':>8} {'dni x':>6} {'floor':>8} {'note'}"
    if header:
        print(hdr)
        print("-" * len(hdr))
    for r in rows:
        note = ""
        if r.bench == "mlp":
            note = f"{r.extra['vs_backprop']:.2f}x backprop (floor {r.extra['floor_vs_backprop']:.2f}x)"
        elif r.floor_ms == r.floor_ms and r.dni_ms == r.dni_ms:
            note = f"{r.ms / r.floor_ms:.2f}x floor (step)" if r.provider != "reference" else ""
        print(f"{r.bench:15} {r.provider:14} {r.B:5d} {r.D:5d} {r.H:5d} {r.dtype:9} {r.threads:3d} "
              f"{str(r.tf32)[0]:>4} {r.ms:9.4f} {r.ratio:6.2f} {r.dni_ms:8.4f} {r.dni_ratio:6.2f} "
              f"{r.floor_ms:8.4f} {note}")


def append_csv(rows: Sequence[Row], path: str, env: Dict[str, str]) -> None:
    """Append ``rows`` under the columns ``env``'s keys, then ``Row``'s (``extra`` as JSON, last); a file with
    another header is refused (``results_csv.append_rows``)."""
    fields = list(env) + [k for k in asdict(rows[0]) if k != "extra"] + ["extra"]

    def as_dict(r: Row) -> dict:
        d = asdict(r)
        d["extra"] = json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in d["extra"].items()})
        return {**env, **d}

    append_rows(path, fields, [as_dict(r) for r in rows])


def rows_from_csv(path: str, device: Optional[str] = None) -> List[Row]:
    """The rows ``append_csv`` wrote (every run in the file; only those measured on ``device``, the
    ``environment()`` device string, when given: a CPU table must not average in GPU rows, nor the reverse)."""
    ints, floats = ("B", "D", "H", "threads"), ("ms", "p20", "p80", "ratio", "dni_ms", "dni_ratio", "floor_ms")
    out: List[Row] = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            if device is not None and d.get("device") != device:
                continue
            out.append(Row(bench=d["bench"], provider=d["provider"], dtype=d["dtype"], tf32=d["tf32"] == "True",
                           extra=json.loads(d.get("extra") or "{}"), **{k: int(d[k]) for k in ints},
                           **{k: float(d[k]) for k in floats}))
    return out


def auto_table(rows: Sequence[Row], device_type: str, env: Dict[str, str]) -> dict:
    """The rules ``auto`` reads: per dtype and size, the backend (never
    torch.compile, which is not a backend) with the best geometric-mean speed-up
    over ``reference``. Ratios, not times, are compared: each ratio comes from
    one run, so rows from several runs (and both fp32 math modes) combine
    without mixing one run's drift into another's."""
    import math

    logs: Dict[tuple, Dict[str, List[float]]] = {}
    for r in rows:
        if r.bench != "interface_step" or r.provider == "torch.compile" or not r.ratio > 0:
            continue
        logs.setdefault((r.dtype, r.B, r.D), {}).setdefault(r.provider, []).append(math.log(r.ratio))
    rules = []
    for (dtype, B, D), per in sorted(logs.items()):
        speedup = {p: math.exp(sum(v) / len(v)) for p, v in per.items()}
        best = max(speedup, key=lambda p: (speedup[p], p == "reference"))
        rules.append({"device": device_type, "dtype": dtype, "max_rows": B * 4, "min_rows": max(1, B // 4),
                      "min_width": max(1, D // 2), "max_width": D * 2, "backend": best,
                      "speedup": round(speedup[best], 3), "measured": {"B": B, "D": D, "runs": len(per[best])}})
    return {"source": env, "rules": rules}
