"""MNIST across processes: decoupled stages beside single-process backprop and torch's GPipe.

The network is the DESIGN MLP without BatchNorm (784-256x6-10, ReLU), split
into one stage per process: with 2 processes, rank 0 holds the first 2
layers and a ``BasicSynthesizer(256, n_hidden=1)`` for its output (the
pre-activation of the third layer), rank 1 the other 5; with more, the 7
layers are split as evenly as they go. Three ways to train it, from the same
initial weights and on the same batches (Adam, cross-entropy):

* ``decoupled``: ``dni_fast.distributed.DecoupledStage`` on every rank
  (delay 1: the gradient a stage sends down trains the synthesizer below one
  step later);
* ``gpipe``: ``torch.distributed.pipelining.ScheduleGPipe`` with ``m``
  microbatches (``--schedules`` adds ``1f1b``);
* ``backprop``: the whole network in rank 0's process, the others waiting.

Rank 0 prints samples/s, the training loss at the end and the MNIST test
accuracy of each. Run it with torchrun, or let it start the processes::

    torchrun --nproc-per-node 2 -m dni_fast.examples.mnist_distributed
    python -m dni_fast.examples.mnist_distributed --spawn 2
    python -m dni_fast.examples.mnist_distributed --spawn 2 --quick --data digits

Every process runs with ``--threads`` intra-op threads (default 1: on a
2-core machine, two processes of one thread each is the honest setting).
``benchmarks/bench_distributed.py`` measures the same runs side by side.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import dni_fast as dni
from dni_fast.examples import _common as C

N_LAYERS = 7  # 784-256x6-10: six hidden layers and the output layer


def mlp_layers(input_dim: int = 784, width: int = 256, n_classes: int = 10) -> List[nn.Module]:
    """The 7 layers; layer i > 0 starts with the ReLU of the layer before, so a
    cut between layers hands on a pre-activation (where DNI's synthesizers sit)."""
    layers = [nn.Sequential(nn.Flatten(), nn.Linear(input_dim, width))]
    for _ in range(5):
        layers.append(nn.Sequential(nn.ReLU(), nn.Linear(width, width)))
    layers.append(nn.Sequential(nn.ReLU(), nn.Linear(width, n_classes)))
    return layers


def split(world: int) -> List[int]:
    """Layers per stage: 2 + 5 for two stages (the benchmark's split), else even."""
    if world == 2:
        return [2, 5]
    base, extra = divmod(N_LAYERS, world)
    if base == 0:
        raise ValueError(f"{world} stages for {N_LAYERS} layers: at most {N_LAYERS}")
    return [base + (1 if k < extra else 0) for k in range(world)]


def build(world: int, seed: int, input_dim: int = 784, width: int = 256, n_classes: int = 10,
          context_dim: Optional[int] = None, zero_init: bool = True):
    """``(stages, synthesizers)``, the same on every rank for one seed
    (``context_dim``: cDNI synthesizers, which also see the one-hot label;
    ``zero_init``: their output starts at exactly zero, else
    ``BasicSynthesizer``'s own init)."""
    torch.manual_seed(seed)
    layers = mlp_layers(input_dim, width, n_classes)
    stages, i = [], 0
    for n in split(world):
        stages.append(nn.Sequential(*layers[i:i + n]))
        i += n
    synths = [dni.BasicSynthesizer(width, n_hidden=1, context_dim=context_dim) for _ in range(world - 1)]
    if zero_init:
        C.zero_synthesizer_output(nn.ModuleList(synths))
    return stages, synths


# The learning-rate multipliers of the decoupled variants (Adam at --lr times these), chosen on a validation
# split (--valid 10000, 3 seeds, docs/decoupled.md "Accuracy"): the synthesizers', and the one of every stage
# but the last, which learn only from synthetic gradients. At 1.0 / 1.0 (dni-pytorch's: --dni-pytorch) a
# small but steady wrong synthetic gradient, turned into full-size steps by Adam, shrank stage 0's output.
RECOMMENDED_LR_MULTS = {"decoupled": (0.1, 0.1), "decoupled-d2": (0.1, 0.1), "decoupled-cdni": (0.1, 0.3),
                        "decoupled-cdni-d2": (0.1, 0.3)}


def lr_mults(name: str, args) -> tuple:
    """``(synthesizer, stage)`` learning-rate multipliers of decoupled variant ``name``."""
    if getattr(args, "dni_pytorch", False):
        return 1.0, 1.0
    synth, stage = RECOMMENDED_LR_MULTS[name]
    if getattr(args, "synth_lr_mult", None) is not None:
        synth = args.synth_lr_mult
    if getattr(args, "stage_lr_mult", None) is not None:
        stage = args.stage_lr_mult
    return synth, stage


# ---------------------------------------------------------------------------
# Memory: the peak resident set of this process (Linux), reset per run
# ---------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def rss_mib() -> Dict[str, float]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return {"peak_rss_mib": out.get("VmHWM", float("nan")), "rss_mib": out.get("VmRSS", float("nan"))}


# ---------------------------------------------------------------------------
# One run per method, on every rank
# ---------------------------------------------------------------------------
def _batches(data, batch_size: int, seed: int, max_steps: Optional[int]):
    g = torch.Generator().manual_seed(seed)
    idx = C.batch_indices(len(data.x_train), batch_size, g)
    while max_steps is not None and len(idx) < max_steps:  # more epochs
        idx += C.batch_indices(len(data.x_train), batch_size, g)
    return idx[:max_steps] if max_steps is not None else idx


def _finish_run(rank: int, world: int, t_start: float, t_end: float, samples: int, losses: List[float],
                modules: nn.Module, mem_before: Dict[str, float]) -> dict:
    """Gather the time, losses, memory and the stage weights on rank 0."""
    mem = rss_mib()
    mine = {"rank": rank, "elapsed": t_end - t_start, "samples": samples, "losses": losses,
            "peak_rss_mib": mem["peak_rss_mib"], "rss_before_mib": mem_before["rss_mib"],
            "state": {k: v.detach().cpu() for k, v in modules.state_dict().items()}}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}


def _timed_run(rank: int, world: int, data, args, steps: Optional[int], warmup: int,
               step: Callable[[Tensor], Optional[float]], end: Callable[[], object], modules: nn.Module) -> dict:
    """Every rank: ``step(batch indices)`` over the run's batches after a
    barrier, the clock started after ``warmup`` of them and stopped after
    ``end()`` (the method's drain); the losses ``step`` returns, the peak
    memory and the weights gathered on rank 0 (``_finish_run``)."""
    batches = _batches(data, args.batch_size, args.seed, steps)
    mem_before = rss_mib()
    reset_peak_rss()
    dist.barrier()
    losses, t_start = [], time.perf_counter()
    for j, idx in enumerate(batches):
        if j == warmup:
            t_start = time.perf_counter()
        loss = step(idx)
        if loss is not None:
            losses.append(loss)
    end()
    t_end = time.perf_counter()
    timed = sum(len(idx) for idx in batches[min(warmup, len(batches)):])  # (a batch may be the whole, smaller set)
    return _finish_run(rank, world, t_start, t_end, timed, losses, modules, mem_before)


def run_decoupled(rank: int, world: int, data, args, steps: Optional[int], warmup: int = 5,
                  cdni: bool = False, delay: Optional[int] = None, name: str = "decoupled") -> dict:
    """DecoupledStage on every rank; ``cdni``: each rank's synthesizer also
    sees the batch's one-hot label (every rank has the batch's labels, as
    every rank iterates the same batches). Adam at ``--lr`` times the
    variant's multipliers (``lr_mults``)."""
    from dni_fast.distributed import DecoupledStage

    stages, synths = build(world, args.seed, data.input_dim, context_dim=data.n_classes if cdni else None,
                           zero_init=getattr(args, "synth_init", "zero") == "zero")
    last = rank == world - 1
    synth_mult, stage_mult = lr_mults(name, args)
    synth_ids = set() if last else {id(q) for q in synths[rank].parameters()}

    def adam(params):
        params = list(params)
        own = 1.0 if last else stage_mult  # the last stage learns from the true loss
        return torch.optim.Adam(params, lr=args.lr * (synth_mult if id(params[0]) in synth_ids else own))

    st = DecoupledStage(stages[rank], rank, world, None if last else synths[rank], adam, timeout=args.timeout,
                        delay=args.delay if delay is None else delay, regression=getattr(args, "regression", "current"))

    def step(idx) -> Optional[float]:
        ctx = F.one_hot(data.y_train[idx], data.n_classes).float() if cdni and not last else None
        loss = st.step(x=data.x_train[idx] if rank == 0 else None, target=data.y_train[idx] if last else None,
                       loss_fn=F.cross_entropy if last else None, context=ctx)
        return None if loss is None else float(loss)

    return _timed_run(rank, world, data, args, steps, warmup, step, st.finish, st.modules())


def run_pipeline(rank: int, world: int, data, args, steps: Optional[int], schedule: str, m: int,
                 warmup: int = 5) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stages, _ = build(world, args.seed, data.input_dim)
    module = stages[rank]
    last = rank == world - 1
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = cls(stage, n_microbatches=m, loss_fn=F.cross_entropy)
    opt = torch.optim.Adam(module.parameters(), lr=args.lr)

    def step(idx) -> Optional[float]:
        opt.zero_grad(set_to_none=True)
        loss = None
        if rank == 0:
            sched.step(data.x_train[idx])
        elif last:
            mb: List[torch.Tensor] = []
            sched.step(target=data.y_train[idx], losses=mb)
            loss = float(torch.stack(mb).detach().mean())
        else:
            sched.step()
        opt.step()
        return loss

    return _timed_run(rank, world, data, args, steps, warmup, step, dist.barrier, module)


def run_backprop(rank: int, world: int, data, args, steps: Optional[int], warmup: int = 5) -> dict:
    """The whole network on rank 0 (the others wait at the barrier)."""
    stages, _ = build(world, args.seed, data.input_dim)
    model = nn.Sequential(*stages)
    mem_before = rss_mib()
    reset_peak_rss()
    losses, t_start, t_end, timed = [], 0.0, 0.0, 0
    if rank == 0:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        batches = _batches(data, args.batch_size, args.seed, steps)
        t_start = time.perf_counter()
        for j, idx in enumerate(batches):
            if j == warmup:
                t_start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t_end = time.perf_counter()
        timed = sum(len(idx) for idx in batches[min(warmup, len(batches)):])
    dist.barrier()
    return _finish_run(rank, world, t_start, t_end, timed, losses, model, mem_before)


def summarise(name: str, run: dict, data, world: int, args) -> dict:
    """On rank 0: samples/s (the slowest rank's time), peak memory per rank, the
    mean training loss of the last 20 steps and the test accuracy of the
    reassembled network."""
    ranks = run["ranks"]
    if name == "backprop":
        model = nn.Sequential(*build(world, args.seed, data.input_dim)[0])
        model.load_state_dict(ranks[0]["state"])
        elapsed, samples, losses = ranks[0]["elapsed"], ranks[0]["samples"], ranks[0]["losses"]
    else:
        stages = build(world, args.seed, data.input_dim)[0]
        for k, st in enumerate(stages):
            own = {key[len("module."):]: v for key, v in ranks[k]["state"].items() if key.startswith("module.")}
            st.load_state_dict(own or ranks[k]["state"])
        model = nn.Sequential(*stages)
        elapsed = max(r["elapsed"] for r in ranks)
        samples, losses = ranks[0]["samples"], ranks[-1]["losses"]
    acc, test_loss = C.evaluate(model, data.x_test, data.y_test)
    tail = losses[-20:]
    ev = getattr(data, "eval_split", "test")  # "valid" under --valid: named so, never passed off as test
    return {"method": name, "samples_per_s": samples / max(elapsed, 1e-9), f"{ev}_acc": acc, f"{ev}_loss": test_loss,
            "train_loss": sum(tail) / len(tail) if tail else None, "steps": len(losses),
            "peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in ranks],
            "peak_delta_mib": [round(r["peak_rss_mib"] - r["rss_before_mib"], 1) for r in ranks]}


# decoupled: --delay (default 1); *-d2: delay 2, one more step of slack before a synthesizer waits for
# its target (at delay 1 stage 0's regression waits for stage 1's whole step and two messages every step)
METHODS = ("decoupled", "decoupled-d2", "decoupled-cdni", "decoupled-cdni-d2", "gpipe", "1f1b", "backprop")


def run_method(name: str, rank: int, world: int, data, args, steps: int, m: int = 4) -> dict:
    """``name`` trained for ``steps`` steps; the first ``min(5, steps // 5)`` are not timed."""
    warmup = min(5, steps // 5)
    if name.startswith("decoupled"):
        return run_decoupled(rank, world, data, args, steps, warmup, cdni=name.startswith("decoupled-cdni"),
                             delay=2 if name.endswith("-d2") else None, name=name)
    if name == "backprop":
        return run_backprop(rank, world, data, args, steps, warmup)
    return run_pipeline(rank, world, data, args, steps, name, m, warmup)


# ---------------------------------------------------------------------------
# The processes
# ---------------------------------------------------------------------------
def build_parser():
    p = C.base_parser(__doc__.split("\n")[0], epochs=1, batch_size=256, lr=1e-3)
    p.add_argument("--spawn", type=int, default=None, metavar="N",
                   help="start N processes here (gloo on 127.0.0.1) instead of running under torchrun")
    p.add_argument("--schedules", nargs="+", default=["decoupled", "gpipe", "backprop"], choices=METHODS,
                   help="what to train")
    p.add_argument("--microbatches", type=int, default=4, help="m for GPipe and 1F1B")
    p.add_argument("--delay", type=int, default=1, help="the decoupled stages' delay")
    p.add_argument("--timeout", type=float, default=60.0, help="DecoupledStage timeout, seconds")
    p.add_argument("--regression", choices=("current", "stored"), default="current",
                   help="DecoupledStage(regression=...): regress the synthesizer's current prediction (learns at "
                        "delay >= 1) or the one stored when the stage ran (docs/design.md §4 as written)")
    p.add_argument("--stage-lr-mult", type=float, default=None,
                   help="the Adam learning rate of every stage but the last (they learn only from synthetic "
                        "gradients) is --lr times this; default per variant, RECOMMENDED_LR_MULTS")
    p.set_defaults(threads=1, synth_lr_mult=None)
    return p


def worker(rank: int, world: int, args, init_method: Optional[str] = None) -> Optional[dict]:
    """One process: join the group, train every method, print (rank 0)."""
    torch.set_num_threads(args.threads or 1)
    if init_method is not None:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=max(120, args.timeout * 2)))
    else:  # torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=max(120, args.timeout * 2)))
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(args.seed)
        data = C.load_image_data(args)
        epochs = C.default_epochs(args, data, mnist=1, digits=10)
        steps = max(len(data.x_train) // args.batch_size, 1) * epochs
        if args.quick:
            steps = max(steps, 10)  # a few steps past the pipeline's fill
        if rank == 0:
            print(f"mnist_distributed: {data.name} ({len(data.x_train)} train / {len(data.x_test)} test), "
                  f"{world} processes x {torch.get_num_threads()} thread(s), layers per stage {split(world)}, "
                  f"batch {args.batch_size}, {steps} steps, Adam lr {args.lr}, seed {args.seed}", flush=True)
        rows = []
        ev = getattr(data, "eval_split", "test")
        for name in args.schedules:
            run = run_method(name, rank, world, data, args, steps, args.microbatches)
            if rank == 0:
                row = summarise(name if name.startswith("decoupled") or name == "backprop"
                                else f"{name} m={args.microbatches}",
                                run, data, world, args)
                rows.append(row)
                print(f"  {row['method']:<12s} {row['samples_per_s']:8.0f} samples/s  "
                      f"{ev} acc {row[ev + '_acc']:6.2f}%  train loss {row['train_loss']:.3f}", flush=True)
        if rank == 0:
            base = next((r["samples_per_s"] for r in rows if r["method"] == "backprop"), None)
            for r in rows:
                r["vs_backprop"] = r["samples_per_s"] / base if base else None
            print()
            C.print_table(rows, [("method", "method", "{}"), ("samples_per_s", "samples/s", "{:.0f}"),
                                 ("vs_backprop", "vs backprop", "{:.2f}x"), (ev + "_acc", ev + " acc %", "{:.2f}"),
                                 ("train_loss", "train loss", "{:.3f}"), ("peak_delta_mib", "peak MiB/rank", "{}")])
            log = C.RunLog("mnist_distributed", args)
            log.data["config"].update({"world": world, "data_name": data.name, "steps": steps, "eval_split": ev})
            for r in rows:
                log.add(r)
            return log.finish({"results": {r["method"]: r for r in rows}})
        return None
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, init_method: str, q, args) -> None:
    try:
        out = worker(rank, world, args, init_method)
        q.put((rank, "ok", out))
    except BaseException as e:
        import traceback

        q.put((rank, "error", "".join(traceback.format_exception(e))))


def spawn_local(target, world: int, *args, what: str = "mnist_distributed", join_s: float = 30.0):
    """Start ``world`` processes on this machine (gloo on 127.0.0.1), each
    running ``target(rank, world, init_method, q, *args)``, which must put one
    ``(rank, "ok" | "error", payload)`` on ``q``; return rank 0's payload, or
    raise with every rank's error text. Processes still alive after ``join_s``
    are killed: nothing is left behind."""
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=target, args=(r, world, init, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out, errors = None, []
    try:
        reported: set = set()
        while len(reported) < world:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue.Empty:
                # A rank that died without reporting (killed, out of memory, a crash in C++) never will:
                # poll the processes instead of waiting on the queue for good.
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if dead and q.empty():
                    time.sleep(1.0)  # its report may still be in the pipe
                    if q.empty():
                        for r in dead:
                            errors.append(f"rank {r}: the process exited with code {procs[r].exitcode} "
                                          f"without reporting")
                            reported.add(r)
                continue
            reported.add(rank)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            elif rank == 0:
                out = payload
    finally:
        for p in procs:
            p.join(timeout=join_s)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))
    return out


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    parser = build_parser()
    args = C.parse(parser, argv)
    C.refuse_unused(parser, args, used=("valid", "synth_lr_mult", "dni_pytorch", "synth_init"))
    C.apply_presets(args)
    if args.spawn is None:
        if "RANK" not in os.environ:
            raise SystemExit("mnist_distributed: run it under torchrun (torchrun --nproc-per-node 2 -m "
                             "dni_fast.examples.mnist_distributed) or with --spawn N")
        return worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    world = args.spawn
    if world < 2:
        raise SystemExit("--spawn needs at least 2 processes")
    return spawn_local(_spawned, world, args)


if __name__ == "__main__":
    main(sys.argv[1:])
