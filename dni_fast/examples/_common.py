"""What the examples share: the command line, seeding, the progress bar,
timing, DNI statistics, JSON logs and the classifier training loop."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import dni_fast as dni

try:  # tqdm is an optional dependency (the `examples` extra)
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


# ---------------------------------------------------------------------------
# Command line and setup
# ---------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An argparse type: an integer > 0 (a bad value is an argparse error naming the option)."""
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return v


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return v


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    v = float(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number")
    return v


def given(args: argparse.Namespace, *flags: str) -> bool:
    """Whether the command line gave any of ``flags`` (``--bptt 4`` and ``--bptt=4`` alike): ``--quick``
    shrinks only what the user left at its default."""
    seen = {a.split("=")[0] for a in getattr(args, "argv", None) or []}
    return any(f in seen for f in flags)


def quick_defaults(args: argparse.Namespace, **values) -> None:
    """``--quick``: set each option (``bptt=[2]``, ``hidden=32``...) the command line did not give."""
    for name, v in values.items():
        if not given(args, "--" + name.replace("_", "-")):
            setattr(args, name, v)


def base_parser(description: str, *, epochs: int, batch_size: int, lr: float,
                data_choices: Iterable[str] = ("auto", "digits", "mnist"), seed: int = 1,
                lr_schedule: str = "constant") -> argparse.ArgumentParser:
    """The options every example has."""
    # allow_abbrev=False: the presets read the command line for the flags given (--normalize-targets, the
    # BasicSynthesizer-only options), and an abbreviation would slip past them
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    choices = list(data_choices)
    p.add_argument("--data", choices=choices, default=choices[0],
                   help="data set; 'auto' uses the real one when the data folder has it "
                        "(see dni_fast.examples.data), else the embedded default")
    p.add_argument("--data-dir", default=None, help="data folder (default: $DNI_FAST_DATA, else ../shared/data)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=seed, help="random seed")
    p.add_argument("--backend", default=None, choices=list(dni.BACKENDS),
                   help="dni_fast backend for every interface (default: the global choice, 'auto')")
    p.add_argument("--synth-init", choices=("zero", "default"), default="zero",
                   help="'zero': synthesizers start at exactly zero (output bias zeroed too); "
                        "'default': BasicSynthesizer's (dni-pytorch's) init, output weight zero, bias nn.Linear's")
    p.add_argument("--loss", choices=("mean", "sum"), default="mean",
                   help="backpropagate the loss averaged over the batch (and time), as dni-pytorch's examples, or "
                        "summed. Adam's steps hardly depend on the scale, but the synthesizers' regression targets "
                        "scale with it (see docs/results.md)")
    p.add_argument("--normalize-targets", nargs="?", const="all", default="none", choices=("none", "cdni", "all"),
                   help="BackwardInterface(normalize_targets=True): the synthesizers regress on the true gradient "
                        "over its running RMS and inject sigma * S; for every DNI variant ('all', the flag alone), "
                        "for cDNI only ('cdni') or none (docs/synthetic_gradients.md)")
    p.add_argument("--no-normalize-targets", dest="normalize_targets", action="store_const", const="none",
                   help="same as --normalize-targets none")
    p.add_argument("--synth-lr-mult", type=non_negative_float, default=1.0,
                   help="the synthesizers' Adam learning rate is --lr times this (dni_fast.diagnostics.param_groups)")
    p.add_argument("--dni-pytorch", action="store_true",
                   help="dni-pytorch's behaviour: no target normalisation, the synthesizers at the model's learning "
                        "rate, a constant learning rate, Adam's default eps, BasicSynthesizer's own init "
                        "(--synth-init default), mean loss, and (RNNs) --sg-factor 0.1; overrides those flags")
    p.add_argument("--valid", type=non_negative_int, default=0,
                   help="hold out this many training images as a validation split and evaluate on it instead of the "
                        "test split (for choosing settings)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=lr_schedule,
                   help="the learning rate of every parameter group over training: constant, or cosine decay to 0")
    p.add_argument("--synth-lr-schedule", choices=("same", "constant"), default="same",
                   help="the synthesizers' learning rate follows --lr-schedule ('same') or stays constant")
    p.add_argument("--adam-eps", type=non_negative_float, default=1e-8, help="Adam's eps for every parameter group")
    p.add_argument("--n-evals", type=positive_int, default=20, help="evaluation points per run (learning curve)")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch.set_num_threads (default, or 0: torch's choice)")
    p.add_argument("--log", default=None, help="write a JSON log of the run here (e.g. runs/name.json)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (for CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_synth_options(p: argparse.ArgumentParser, default: str = "mlp") -> None:
    """``--synth {mlp,ridge}`` and the ridge synthesizer's settings (the RNN examples; see ridge_synthesizer)."""
    p.add_argument("--synth", choices=("mlp", "ridge"), default=default,
                   help="'mlp': BasicSynthesizer trained by its regression loss (dni-pytorch's); 'ridge': "
                        "RidgeSynthesizer, a linear map refitted in closed form on the recent true gradients, which "
                        "keeps up with a moving target (docs/synthetic_gradients.md)")
    p.add_argument("--synth-forget", type=float, default=0.98,
                   help="--synth ridge: weight of the past per step (memory about 1/(1-forget) steps)")
    p.add_argument("--synth-ridge", type=float, default=1e-3,
                   help="--synth ridge: penalty relative to each feature's energy")


def ridge_synthesizer(args: argparse.Namespace, dim: int, context_dim: Optional[int] = None) -> Optional[nn.Module]:
    """``--synth ridge``: the ``RidgeSynthesizer`` for a state of width ``dim`` (and a context of width
    ``context_dim``, cDNI); ``--synth mlp``: ``None`` (the model builds its ``BasicSynthesizer`` itself, so the
    random stream, and the numbers, are unchanged)."""
    if getattr(args, "synth", "mlp") != "ridge":
        return None
    # Options that mean nothing for a synthesizer without parameters or hidden layers: refused, not ignored.
    given = [a.split("=")[0] for a in getattr(args, "argv", [])]
    for flag in ("--synth-hidden", "--synth-width", "--synth-lr-mult", "--synth-init"):
        if flag in given:
            raise SystemExit(f"{flag} applies to --synth mlp (the BasicSynthesizer); the RidgeSynthesizer has no "
                             "hidden layers or learning rate: drop it, or add --synth mlp")
    try:
        return dni.RidgeSynthesizer(dim, context_dim=context_dim, forget=args.synth_forget, ridge=args.synth_ridge)
    except ValueError as e:
        raise SystemExit(f"--synth-forget / --synth-ridge: {e}") from None


def synthesizer_factory(args: argparse.Namespace) -> Optional[Callable[[int, Optional[int]], nn.Module]]:
    """``--synth ridge``: ``(width, context_dim) -> RidgeSynthesizer`` for a model that builds one synthesizer per
    interface (the options are checked now, before any data is loaded); ``--synth mlp``: ``None`` (the model's own
    ``BasicSynthesizer``)."""
    if ridge_synthesizer(args, 1) is None:
        return None
    return lambda dim, context_dim=None: ridge_synthesizer(args, dim, context_dim)


DNI_PYTORCH = {"synth": "mlp", "normalize_targets": "none", "synth_lr_mult": 1.0, "synth_init": "default", "loss": "mean",
               "lr_schedule": "constant", "synth_lr_schedule": "same", "adam_eps": 1e-8}


def apply_presets(args: argparse.Namespace) -> None:
    """``--dni-pytorch``: set the options it names to dni-pytorch's behaviour. ``--synth ridge``: no target
    normalisation unless the command line asks for it (the example's default is for the BasicSynthesizer)."""
    if getattr(args, "dni_pytorch", False):
        for k, v in DNI_PYTORCH.items():
            if hasattr(args, k):
                setattr(args, k, v)
        if hasattr(args, "sg_factor"):
            args.sg_factor = 0.1
    # An --sg-factor left unset (the RNN examples' default): 0.5 with the ridge synthesizer, chosen on a held-out
    # seed (copy_task) and on the validation split (ptb_lm; docs/synthetic_gradients.md); dni-pytorch's 0.1
    # with the BasicSynthesizer.
    if hasattr(args, "sg_factor") and args.sg_factor is None:
        args.sg_factor = 0.5 if getattr(args, "synth", "mlp") == "ridge" else 0.1
    # Normalised targets answer the gradient-trained synthesizer's optimiser (docs/synthetic_gradients.md, cause
    # 1); the ridge fit does not depend on the targets' scale, so they are off for it. (With them the 6-layer
    # cDNI FCN once diverged: that was the first target reaching the fit unnormalised, fixed since; the fixed
    # run ends where the one without them does, fcn_e10_ridge_fixed.json.)
    given = {a.split("=")[0] for a in getattr(args, "argv", [])}
    if getattr(args, "synth", "mlp") == "ridge" and hasattr(args, "normalize_targets") and not (
            given & {"--normalize-targets", "--no-normalize-targets"}):
        args.normalize_targets = "none"


def interface_kwargs(args: argparse.Namespace, mode: Optional[str] = None) -> dict:
    """The BackwardInterface options the command line asks for, for the variant ``mode`` (``dni``, ``cdni``)."""
    norm = getattr(args, "normalize_targets", "none")
    norm = {True: "all", False: "none", None: "none"}.get(norm, norm)
    return {"normalize_targets": True} if norm == "all" or (norm == "cdni" and mode == "cdni") else {}


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam over ``model`` at ``--lr``, its synthesizers at ``--lr * --synth-lr-mult``."""
    from dni_fast.diagnostics import param_groups

    return torch.optim.Adam(param_groups(model, args.lr, args.lr * getattr(args, "synth_lr_mult", 1.0)), lr=args.lr,
                            eps=getattr(args, "adam_eps", 1e-8))


def make_schedule(opt: torch.optim.Optimizer, args: argparse.Namespace, total_steps: int):
    """``--lr-schedule``: ``None`` (constant), or a LambdaLR decaying every group's rate to 0 over ``total_steps``
    along a half cosine (call ``step()`` after each optimizer step)."""
    if getattr(args, "lr_schedule", "constant") == "constant":
        return None
    import math

    def cosine(t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))

    keep = getattr(args, "synth_lr_schedule", "same") == "constant"
    return torch.optim.lr_scheduler.LambdaLR(
        opt, [(lambda t: 1.0) if keep and g.get("name") == "synthesizers" else cosine for g in opt.param_groups])


# The options of base_parser that set how the synthesizers train (docs/synthetic_gradients.md). An
# example that does not implement one refuses it (refuse_unused) instead of silently ignoring it.
TUNING_OPTIONS = ("synth_init", "loss", "normalize_targets", "synth_lr_mult", "dni_pytorch", "valid", "lr_schedule",
                  "synth_lr_schedule", "adam_eps", "n_evals")


def refuse_unused(parser: argparse.ArgumentParser, args: argparse.Namespace, used: Iterable[str] = ()) -> None:
    """``parser.error`` (exit 2, naming the option) for every option of
    ``TUNING_OPTIONS`` not in ``used`` that the command line set to something
    other than its default: this example would ignore it."""
    used = set(used)
    for name in TUNING_OPTIONS:
        if name not in used and hasattr(args, name) and getattr(args, name) != parser.get_default(name):
            parser.error(f"--{name.replace('_', '-')} is not implemented by this example (it would be ignored); "
                         f"the examples that implement it are listed in docs/synthetic_gradients.md")


def parse(parser: argparse.ArgumentParser, argv: Optional[Iterable[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, remembering the arguments (``argv``, else
    the command line's) for the run log."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def setup(args: argparse.Namespace) -> None:
    """Presets, seed, threads and backend from the command line."""
    apply_presets(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.backend is not None:
        dni.set_backend(args.backend)


def progress(iterable=None, *, total: Optional[int] = None, desc: str = "", disable: bool = False, **kw):
    """A tqdm bar on stderr (a plain iterator when tqdm is missing or disabled)."""
    if _tqdm is None or disable:
        return iterable if iterable is not None else _NullBar()
    return _tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, **kw)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dni_fast": dni.__version__,
        "backend": dni.get_backend(),
        "available_backends": dni.available_backends("cpu"),
    }


class RunLog:
    """One example run: its configuration, one record per variant and a
    summary, written as JSON (``runs/*.json``, read by scripts/make_results.py)."""

    def __init__(self, example: str, args: argparse.Namespace) -> None:
        self.data = {
            "example": example,
            "argv": list(getattr(args, "argv", sys.argv[1:])),
            "config": {k: v for k, v in vars(args).items() if k not in ("log", "no_progress", "argv")},
            "machine": machine_info(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": [],
            "summary": {},
        }
        self.path = args.log
        self.save()  # now: a path that cannot be written fails before any training, not after the first variant

    def add(self, record: dict) -> None:
        self.data["runs"].append(record)
        self.save()

    def save(self) -> None:
        save_json(self.path, self.data)

    def finish(self, summary: dict) -> dict:
        self.data["summary"] = summary
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        return self.data


def save_json(path: Optional[str], data: dict) -> None:
    """Write ``data`` to ``path`` atomically (nothing when ``path`` is empty)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        # allow_nan=False: the logs are JSON that every reader takes (a NaN or inf is written as null)
        json.dump(compact(data), f, separators=(",", ":"), default=_json_default, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def compact(o, digits: int = 6):
    """``o`` with every float rounded to ``digits`` significant digits (the logs are committed: they stay small),
    and a NaN or inf as ``None`` (JSON has neither: the readers take null as missing)."""
    if isinstance(o, float):
        return None if not math.isfinite(o) else float(f"{o:.{digits}g}")
    if isinstance(o, dict):
        return {k: compact(v, digits) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [compact(v, digits) for v in o]
    return o


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return compact(o.tolist())
    return str(o)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def one_hot(y: torch.Tensor, n: int) -> torch.Tensor:
    return F.one_hot(y, n).to(torch.get_default_dtype())


def batch_indices(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> List[torch.Tensor]:
    """Index batches over ``n`` items; the last partial batch is dropped
    (BatchNorm needs more than one row; the paper's schedule is in steps)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    k = max(n // batch_size, 1)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(k)]


def own_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of ``model`` outside its DNI interfaces (what gradient
    clipping applies to: the synthesizers' regression gradients are not on the
    same scale)."""
    skip = {id(p) for m in interfaces(model).values() for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def interfaces(model: nn.Module) -> Dict[str, dni.UnidirectionalInterface]:
    """Every uni-directional interface in ``model`` (the halves of a
    BidirectionalInterface included), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, dni.UnidirectionalInterface)}


def read_stats(model: nn.Module, reset: bool = True) -> Dict[str, dict]:
    """``{name: stats}`` for the interfaces of ``model`` that recorded anything
    since the last reset (syncs)."""
    out = {}
    for name, iface in interfaces(model).items():
        s = iface.stats()
        if s.get("count"):
            out[name] = {k: s[k] for k in ("loss_mean", "cos_mean", "count")}
            if out[name]["cos_mean"] != out[name]["cos_mean"]:  # NaN: every true gradient was 0 (undefined)
                out[name]["cos_mean"] = None
        if reset:
            iface.reset_stats()
    return out


def zero_synthesizer_output(model: nn.Module) -> nn.Module:
    """Zero the bias of every ``BasicSynthesizer``'s output layer in ``model``
    (its weight is zero already), so that the first synthetic gradients are
    exactly zero, as with the paper's zero-initialised output layer.

    ``BasicSynthesizer`` follows dni-pytorch and keeps ``nn.Linear``'s default
    bias, which makes the first synthetic gradients of an MNIST MLP about 100
    times the norm of the true ones; the examples zero it (``--synth-init
    zero``, the default) unless asked for dni-pytorch's init (``default``).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dni.BasicSynthesizer):
                last = [m.layers[-1]] if m.n_hidden > 0 else [m.input_trigger] + (
                    [m.input_context] if m.input_context is not None else [])
                for lin in last:
                    lin.bias.zero_()
    return model


def mean_cos(stats: Dict[str, dict]) -> Optional[float]:
    vals = [s["cos_mean"] for s in stats.values() if s.get("cos_mean") is not None]
    return sum(vals) / len(vals) if vals else None


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    t0 = time.perf_counter()
    yield lambda: time.perf_counter() - t0


def fmt_time(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def print_table(rows: List[dict], columns: List[tuple], file=None) -> None:
    """``columns``: ``(key, header, format)``."""
    file = file or sys.stdout
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else f.format(r[k])) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


# ---------------------------------------------------------------------------
# Classifier training (the MNIST examples and the quickstart)
# ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple:
    """(accuracy in %, mean cross-entropy) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return 100.0 * correct / len(x), loss / len(x)


class CurveRecorder:
    """Per-interface curves over training, for ``history["interfaces"]``: at
    each evaluation point the means since the last one of cos(S, g),
    ``|S-g|/|g|``, ``|S|`` and ``|g|`` (``interface.stats()``), and, at the
    step before, the RMS of each synthesizer's gradient against Adam's
    ``sqrt(v)`` and ``eps``; plus Adam's step ratio ``|m|/sqrt(v)`` of the
    model's own weight matrices (``history["adam_step_ratio"]``).
    See dni_fast.diagnostics and docs/synthetic_gradients.md."""

    KEYS = ("cos", "rel_err", "s_norm", "g_norm", "synth_grad_rms", "sqrt_v_min", "sqrt_v_median")

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt
        self.ifaces = interfaces(model)
        self.synth = {n: list(m.parameters()) for n, m in self.ifaces.items()}
        skip = {id(p) for ps in self.synth.values() for p in ps}
        self.weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in skip}
        self.curves = {n: {k: [] for k in self.KEYS} for n in self.ifaces}
        self.ratio = {n: [] for n in self.weights}
        self.weight_sqrt_v = {n: [] for n in self.weights}
        # the model's own vectors (BatchNorm's scale and shift, biases): their RMS, to see them drift
        self.vectors = {n: p for n, p in model.named_parameters() if p.dim() == 1 and id(p) not in skip}
        self.vector_rms = {n: [] for n in self.vectors}
        self._grad: Dict[str, Optional[float]] = {}

    def before_step(self) -> None:
        """Call between backward and ``opt.step()`` on the steps that end with an evaluation."""
        from dni_fast.diagnostics import grad_rms

        self._grad = {n: grad_rms(ps) for n, ps in self.synth.items()}

    def record(self) -> Optional[float]:
        """Read (and reset) the interfaces' statistics; returns their mean cos."""
        from dni_fast.diagnostics import adam_summary, interface_records

        recs = interface_records(self.model)
        for n, c in self.curves.items():
            r = recs.get(n, {})
            for k in ("cos", "rel_err", "s_norm", "g_norm"):
                c[k].append(r.get(k))
            c["synth_grad_rms"].append(self._grad.get(n))
            a = adam_summary(self.opt, self.synth[n])
            c["sqrt_v_min"].append(a and a["sqrt_v_min"])
            c["sqrt_v_median"].append(a and a["sqrt_v_median"])
            if a:
                c["adam_eps"] = a["eps"]
        for n, p in self.weights.items():
            a = adam_summary(self.opt, [p])
            self.ratio[n].append(a and a["step_ratio"])
            self.weight_sqrt_v[n].append(a and a["sqrt_v_median"])
        for n, p in self.vectors.items():
            self.vector_rms[n].append(float(p.detach().float().pow(2).mean().sqrt()))
        self._grad = {}
        vals = [recs[n]["cos"] for n in recs if recs[n].get("cos") is not None]
        return sum(vals) / len(vals) if vals else None


class BoundaryProbe:
    """The synthetic gradient against the true gradient at a truncation boundary.

    An RNN interface's statistics (``stats()``) compare ``S(h)`` at a chunk's
    first state with what the synthesizer regresses on, ``g``: the gradient of
    the chunk's own loss, ``g_own``, plus the synthetic gradient injected at
    the chunk's end carried back through the chunk, ``c`` (the bootstrapped
    target). The probe separates the two: ``g_own`` is the true gradient, what
    the previous chunk's truncation cut off over the next ``T`` steps. Per
    step, over the whole batch, it records cos(S, g_own) (``cos``), |g_own|,
    |c| and cos(g_own, c) (the two parts of the target against each other).

    It costs one more backward through the chunk (``torch.autograd.grad``,
    which writes no ``.grad`` and reaches neither the interface nor its
    statistics) and a tensor hook that reads ``g``: the run trains exactly as
    without it. The examples leave its time out of their training time.
    docs/synthetic_gradients.md, "The true gradient at the boundary".

    Use: the model calls :meth:`take` with the interface's output (the
    trigger, ``(B, D)``) and ``interface.receive`` of it; the loop calls
    :meth:`measure` with the chunk's loss before its backward, and
    :meth:`read` at each evaluation point."""

    KEYS = ("cos", "g_norm", "carried_norm", "cos_own_carried")

    def __init__(self) -> None:
        self._rows: Optional[tuple] = None
        self._own: Optional[tuple] = None
        self._sums: Dict[str, List[float]] = {k: [] for k in self.KEYS}

    def take(self, trigger: torch.Tensor, s: torch.Tensor) -> None:
        self._rows = (trigger, s.detach())
        self._own = None
        trigger.register_hook(self._on_target)  # reads g; returns None, so g passes on unchanged

    @staticmethod
    def _cos(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
        aa, bb, ab = float((a * a).sum()), float((b * b).sum()), float((a * b).sum())
        if not (math.isfinite(aa) and math.isfinite(bb)) or bb == 0:
            return None  # as stats(): an undefined step is left out
        return ab / math.sqrt(aa * bb) if aa > 0 else 0.0

    def measure(self, loss: torch.Tensor) -> None:
        """One step: ``g_own = d loss / d trigger``, and cos(S, g_own)."""
        if self._rows is None:
            raise RuntimeError("BoundaryProbe.measure: no trigger taken in this step's forward")
        trigger, s = self._rows
        self._rows = None
        (g,) = torch.autograd.grad(loss, trigger, retain_graph=True)
        g = g.detach().double()
        norm = float(g.norm())
        if not math.isfinite(norm):
            return  # as stats(): a non-finite step is left out of every mean
        self._sums["g_norm"].append(norm)  # a chunk with no loss (g_own = 0) counts, as in stats()' g_norm
        c = self._cos(s.double(), g)
        if c is not None:
            self._sums["cos"].append(c)
        self._own = (g,)

    def _on_target(self, target: torch.Tensor) -> None:
        if self._own is None:
            return
        (g,) = self._own
        self._own = None
        carried = target.detach().double() - g
        self._sums["carried_norm"].append(float(carried.norm()))
        c = self._cos(carried, g) if float(g.norm()) > 0 else None
        if c is not None:
            self._sums["cos_own_carried"].append(c)

    def read(self) -> Dict[str, Optional[float]]:
        """Means since the last read of each of :attr:`KEYS` (None where no step counted); resets."""
        out = {k: (sum(v) / len(v) if v else None) for k, v in self._sums.items()}
        self._sums = {k: [] for k in self.KEYS}
        return out


def fit_classifier(model: nn.Module, data, *, epochs: int, batch_size: int, lr: float, seed: int,
                   desc: str = "", n_evals: int = 20, show_progress: bool = True,
                   max_steps: Optional[int] = None, loss_sum: bool = True,
                   opt: Optional[torch.optim.Optimizer] = None, split: str = "test",
                   schedule: Optional[Callable[[torch.optim.Optimizer, int], object]] = None) -> dict:
    """Train ``model`` (``forward(x, y)``: ``y`` is the label, used as DNI
    context by cDNI models) with Adam (``opt``, default Adam at ``lr``) and
    cross-entropy, summed over the batch (``loss_sum``) or averaged. Evaluates
    on ``data.x_test`` (the test split, or a validation split held out of the
    training set: ``split`` names it in the record's keys) about ``n_evals``
    times, reading the DNI statistics each time.

    Returns a record: final accuracy and loss on ``split``, training time, ms
    per step, and the history (step, epoch, train loss, accuracy, mean cosine
    between synthetic and true gradients, and the per-interface curves of
    ``CurveRecorder``).
    """
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(len(data.x_train) // batch_size, 1)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    eval_every = max(total // max(n_evals, 1), 1)
    sched = schedule(opt, total) if schedule is not None else None
    acc_k, loss_k = f"{split}_acc", f"{split}_loss"
    hist = {"step": [], "epoch": [], "train_loss": [], acc_k: [], loss_k: [], "cos": [], "time": []}
    rec = CurveRecorder(model, opt)
    step, train_time, run_loss, run_n = 0, 0.0, 0.0, 0
    bar = progress(total=total, desc=desc, disable=not show_progress)
    model.train()
    read_stats(model)  # start from clean statistics
    done = False
    for epoch in range(epochs):
        for idx in batch_indices(len(data.x_train), batch_size, g):
            x, y = data.x_train[idx], data.y_train[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x, y), y)
            (loss * len(y) if loss_sum else loss).backward()
            evaluating = (step + 1) % eval_every == 0 or step + 1 == total
            if evaluating:
                t1 = time.perf_counter()
                rec.before_step()
                t0 += time.perf_counter() - t1  # not training time
            opt.step()
            if sched is not None:
                sched.step()
            train_time += time.perf_counter() - t0
            step += 1
            run_loss += loss.item()
            run_n += 1
            bar.update(1)
            if evaluating:
                acc, tl = evaluate(model, data.x_test, data.y_test)
                cos = rec.record()
                hist["step"].append(step)
                hist["epoch"].append(step / steps_per_epoch)
                hist["train_loss"].append(run_loss / run_n)
                hist[acc_k].append(acc)
                hist[loss_k].append(tl)
                hist["cos"].append(cos)
                hist["time"].append(train_time)
                run_loss, run_n = 0.0, 0
                bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", acc=f"{acc:.1f}%")
            if step >= total:
                done = True
                break
        if done:
            break
    bar.close()
    if rec.curves:
        hist["interfaces"] = rec.curves
    hist["adam_step_ratio"] = rec.ratio
    hist["adam_sqrt_v"] = rec.weight_sqrt_v
    hist["param_rms"] = rec.vector_rms
    return {
        acc_k: hist[acc_k][-1],
        f"{split}_error": 100.0 - hist[acc_k][-1],
        loss_k: hist[loss_k][-1],
        f"best_{split}_acc": max(hist[acc_k]),
        "train_time_s": train_time,
        "ms_per_step": 1000.0 * train_time / max(step, 1),
        "steps": step,
        "epochs": step / steps_per_epoch,
        "history": hist,
    }


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3) -> Callable[[], None]:
    """One training step (forward, backward, Adam) of ``model`` on a fixed batch, as a callable to time."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, y), y).backward()
        opt.step()

    return step


def load_image_data(args: argparse.Namespace):
    """The image data set the command line asks for (``--quick``: a slice of it)."""
    from dni_fast.examples.data import load_images

    if args.quick:
        data = load_images(args.data, args.data_dir, limit_train=256, limit_test=200)
    else:
        data = load_images(args.data, args.data_dir)
    return holdout(data, getattr(args, "valid", 0))


#: The seed of the fixed permutation that picks the validation split (the same for every run seed).
VALID_SEED = 20160816


def holdout(data, n_valid: int):
    """``data`` with ``n_valid`` training images (a fixed random subset) moved
    to ``x_test``/``y_test`` as a validation split, and ``eval_split`` set to
    ``"valid"``; the test split is dropped. ``n_valid == 0``: ``data`` as it is
    (``eval_split`` ``"test"``)."""
    import dataclasses

    if not n_valid:
        data.eval_split = "test"
        return data
    n = len(data.x_train)
    if not 0 < n_valid < n:
        raise ValueError(f"--valid must be between 1 and {n - 1}, got {n_valid}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VALID_SEED))
    va, tr = perm[:n_valid], perm[n_valid:].sort().values
    out = dataclasses.replace(data, x_train=data.x_train[tr], y_train=data.y_train[tr],
                              x_test=data.x_train[va], y_test=data.y_train[va])
    out.eval_split = "valid"
    return out


def default_epochs(args: argparse.Namespace, data, *, mnist: int, digits: int) -> int:
    if args.epochs is not None:
        return args.epochs
    if args.quick:
        return 1
    return mnist if data.name == "mnist" else digits


def run_classifier_variants(example: str, args: argparse.Namespace, data, variants: Dict[str, Callable[[], nn.Module]],
                            extra: Optional[dict] = None) -> dict:
    """Train each ``variants[name]()`` from the same seed, print a summary table
    and write the log. Returns the log's content."""
    log = RunLog(example, args)
    split = getattr(data, "eval_split", "test")
    log.data["config"].update({"data_name": data.name, "n_train": len(data.x_train), f"n_{split}": len(data.x_test),
                               "eval_split": split, "epochs": args.epochs, **(extra or {})})
    print(f"{example}: {data.name} ({len(data.x_train)} train / {len(data.x_test)} {split}), {args.epochs} epochs, "
          f"batch {args.batch_size}, Adam lr {args.lr}, {args.loss} loss, seed {args.seed}, "
          f"backend {dni.get_backend()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    with timed() as elapsed:
        for name, make in variants.items():
            torch.manual_seed(args.seed)
            model = make()
            if getattr(args, "synth_init", "zero") == "zero":
                zero_synthesizer_output(model)
            rec = fit_classifier(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, desc=name, show_progress=not args.no_progress,
                                 loss_sum=args.loss == "sum", opt=make_optimizer(model, args),
                                 n_evals=getattr(args, "n_evals", 20), split=split,
                                 schedule=lambda o, n: make_schedule(o, args, n))
            rec["variant"] = name
            rec["n_interfaces"] = len(interfaces(model))
            rec["final_cos"] = next((c for c in reversed(rec["history"]["cos"]) if c is not None), None)
            rows.append(rec)
            log.add(rec)
            print(f"  {name:<24s} {split} acc {rec[split + '_acc']:6.2f}%  ({fmt_time(rec['train_time_s'])}, "
                  f"{rec['ms_per_step']:.2f} ms/step)", flush=True)
        total = elapsed()
    print()
    print_table(rows, [("variant", "variant", "{}"), (f"{split}_acc", f"{split} acc %", "{:.2f}"),
                       (f"{split}_error", f"{split} error %", "{:.2f}"), ("final_cos", "cos(SG, g)", "{:.3f}"),
                       ("ms_per_step", "ms/step", "{:.2f}"), ("train_time_s", "train time s", "{:.1f}")])
    print(f"\ntotal time {fmt_time(total)}")
    keys = (f"{split}_acc", f"{split}_error", "ms_per_step", "train_time_s", "final_cos")
    return log.finish({"results": {r["variant"]: {k: r[k] for k in keys} for r in rows},
                       "eval_split": split, "total_time_s": total})


def truncation_sweep(args: argparse.Namespace, log: "RunLog", train: Callable[[int, bool, str], dict],
                     result: Callable[[dict], str]) -> tuple:
    """Train BPTT and DNI (``args.mode`` picks) at every truncation length in
    ``args.bptt``; ``train(T, use_dni, label)`` returns a record, ``result(rec)``
    the line printed for it. Returns ``(rows, total_seconds)``."""
    variants = [("bptt", False), ("dni", True)]
    if args.mode != "all":
        variants = [v for v in variants if v[0] == args.mode]
    rows = []
    with timed() as elapsed:
        for T in args.bptt:
            for name, use_dni in variants:
                rec = train(T, use_dni, f"{name} T={T}")
                rec["method"] = name
                rows.append(rec)
                log.add(rec)
                print(f"  {rec['variant']:<12s} {result(rec)}  "
                      f"({fmt_time(rec['train_time_s'])}, {rec['ms_per_step']:.2f} ms/step)", flush=True)
        total = elapsed()
    return rows, total
