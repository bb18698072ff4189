"""CUDA-graph capture of each stage's step, for static shapes (``enable_cuda_graphs``).

Per stage, after ``warmup`` eager steps (which create the optimizers' state
and let cuBLAS and Triton pick their kernels), the device work of a step is
captured once and replayed:

* the forward step (steps 1-3 of §4: the stage, the synthetic gradient, the
  backward, the optimizer step), one graph per outcome of the
  ``update_prob`` draw (with and without the optimizer step);
* each synthesizer's regression (step 5: the update through the current
  weights and the optimizer step).

What stays in Python, every step: the checks, the ``update_prob`` draw, the
schedule's bookkeeping (the predictions waiting for their targets, the step
count), the statistics and the hooks (``Stage.check_forward``,
``Stage.record_forward``), so the schedule is the eager one. A replay reads
its inputs from static buffers (the batch is copied in) and writes its
outputs to static buffers, which are copied out before the next replay
overwrites them. The complete-unlock synthetic input runs eagerly.

Requirements: every step has the same shapes and the same kinds of inputs
(a context or none, a tensor target), the same ``loss_fn``, and optimizers
that may be captured (``capturable=True`` for Adam and AdamW).

``mode="emulate"`` runs the same plumbing without CUDA: a "replay" calls the
captured function again on the static buffers and copies its results into
the static outputs. The tests use it on the CPU to check the copies in and
out and the bookkeeping against the eager schedule; the CUDA mode itself is
written for GPUs and not run here (no GPU was available).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from dni_fast.decoupled.schedule import Stage, StageOutput, _Record

__all__ = ["StageGraphs", "check_capturable"]


def _map(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """``fn`` on every tensor of ``obj`` (dicts, lists, tuples, dataclasses)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _copy_into(static: Any, new: Any, where: str) -> None:
    """Copy ``new`` into the static buffers ``static`` (the same structure and shapes)."""
    if isinstance(static, Tensor):
        if not isinstance(new, Tensor) or new.shape != static.shape or new.dtype != static.dtype:
            got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(f"CUDA graphs were captured for {where} of shape {tuple(static.shape)} {static.dtype}, "
                             f"this step has {got}: graphs need the same shapes every step")
        static.copy_(new)
    elif isinstance(static, dict):
        if not isinstance(new, dict) or new.keys() != static.keys():
            raise ValueError(f"CUDA graphs: {where} changed structure between steps")
        for k in static:
            _copy_into(static[k], new[k], f"{where}[{k!r}]")
    elif isinstance(static, (list, tuple)):
        if not isinstance(new, (list, tuple)) or len(new) != len(static):
            raise ValueError(f"CUDA graphs: {where} changed structure between steps")
        for i, (a, b) in enumerate(zip(static, new)):
            _copy_into(a, b, f"{where}[{i}]")
    elif dataclasses.is_dataclass(static) and not isinstance(static, type):
        for f in dataclasses.fields(static):
            _copy_into(getattr(static, f.name), getattr(new, f.name), f"{where}.{f.name}")
    elif (static is None) != (new is None):
        raise ValueError(f"CUDA graphs: {where} was {'absent' if static is None else 'given'} when the graph was "
                         "captured and is not now: graphs need the same kinds of inputs every step")


class _Graph:
    """``fn(static_inputs) -> outputs`` captured once; :meth:`run` copies the
    inputs in, replays, and returns copies of the outputs."""

    def __init__(self, fn: Callable[[Any], Any], inputs: Any, mode: str, stream, what: str) -> None:
        self.fn, self.mode, self.what = fn, mode, what
        self.static_in = _map(lambda t: t.detach().clone(), inputs)
        self.static_out = None
        self.graph = None
        if mode == "cuda":
            self.graph = torch.cuda.CUDAGraph()
            # One private memory pool per graph: the graphs of a stage replay in an order
            # that depends on the update_prob draws, and a shared pool needs a fixed order.
            with torch.cuda.graph(self.graph, stream=stream):
                self.static_out = fn(self.static_in)

    def run(self, inputs: Any) -> Any:
        _copy_into(self.static_in, inputs, self.what)
        if self.mode == "cuda":
            self.graph.replay()
        else:
            out = self.fn(self.static_in)
            if self.static_out is None:
                self.static_out = out
            else:
                _copy_into(self.static_out, out, self.what + " (outputs)")
        return _map(lambda t: t.clone(), self.static_out)


def check_capturable(stage: Stage) -> None:
    """Refuse optimizers that cannot be captured (Adam/AdamW without ``capturable=True``)."""
    opts = [("stage", stage.optimizer), ("synthesizer", None if stage.synth is None else stage.synth.optimizer),
            ("forward synthesizer", None if stage.fsynth is None else stage.fsynth.optimizer)]
    for what, opt in opts:
        if opt is not None and any(g.get("capturable") is False for g in opt.param_groups):
            raise ValueError(f"CUDA graphs: the {what} optimizer of stage {stage.index} ({type(opt).__name__}) was "
                             "built with capturable=False; build it with capturable=True (e.g. "
                             "torch.optim.Adam(params, lr, capturable=True))")


class StageGraphs:
    """Runs one :class:`Stage`'s steps through captured graphs after ``warmup`` eager steps."""

    def __init__(self, stage: Stage, mode: str = "cuda", warmup: int = 3, stream=None) -> None:
        if mode not in ("cuda", "emulate"):
            raise ValueError(f"mode must be 'cuda' or 'emulate', got {mode!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup_steps must be an int >= 1 (the optimizers' state must exist before a capture), "
                             f"got {warmup!r}")
        self.stage, self.mode, self.warmup, self.stream = stage, mode, warmup, stream
        self.graphs: Dict[Any, _Graph] = {}
        self.loss_fn: Optional[Callable] = None
        self.meta: Dict[str, tuple] = {}

    def forward(self, batch: int, h: Tensor, context: Any, target: Any, loss_fn: Optional[Callable],
                backend: Optional[str]) -> StageOutput:
        st = self.stage
        if st.steps < self.warmup:
            return st.forward(batch, h, context, target, loss_fn, backend)
        st.check_forward(batch, h)
        if st.last:
            if self.loss_fn is None:
                self.loss_fn = loss_fn
            elif loss_fn is not self.loss_fn:
                raise ValueError("CUDA graphs replay the loss_fn of the step they were captured in: pass the same "
                                 "loss_fn every step")
            if target is not None and not isinstance(target, Tensor):
                raise TypeError(f"CUDA graphs need a tensor target, got {type(target).__name__}")
        if context is not None and not isinstance(context, Tensor):
            raise TypeError(f"CUDA graphs need a tensor context (or none), got {type(context).__name__}")
        updated = st.draw_update()
        inputs = {"h": h, "context": context, "target": target}
        key = ("forward", updated)
        g = self.graphs.get(key)
        if g is None:
            def fn(s, updated=updated):
                return st.compute_forward(s["h"], s["context"], s["target"], loss_fn, backend, updated)

            g = self.graphs[key] = _Graph(fn, inputs, self.mode, self.stream, f"stage {st.index}'s input")
        return st.record_forward(batch, g.run(inputs), updated)

    def regress(self, batch: int, step: Optional[int] = None) -> None:
        st = self.stage
        if st.steps <= self.warmup:
            return st.regress(batch, step)
        return st.regress(batch, step, runner=self._run_regress)

    def _run_regress(self, kind: str, synth, rec: _Record) -> Tensor:
        inputs = {"x": rec.x, "c": rec.c, "zs": list(rec.zs), "s": rec.s, "target": rec.target}
        meta = (rec.backend, rec.scale, tuple(rec.shape))
        key = ("regress", kind)
        g = self.graphs.get(key)
        if g is None:
            self.meta[kind] = meta

            def fn(s):
                return synth.regress_compute(_Record(meta[0], s["x"], s["c"], tuple(s["zs"]), s["s"], meta[1],
                                                     torch.Size(meta[2]), s["target"]))

            g = self.graphs[key] = _Graph(fn, inputs, self.mode, self.stream,
                                          f"the regression of synthesizer {self.stage.index}")
        elif self.meta[kind] != meta:
            raise ValueError(f"CUDA graphs: the regression of synthesizer {self.stage.index} was captured for "
                             f"{self.meta[kind]}, this step has {meta}")
        return g.run(inputs)
