"""``DecoupledStage``: one stage of §4's schedule per rank (docs/design.md §8)."""
from __future__ import annotations

import copy
import math
import threading
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dni_fast._manager import require_grad_mode
from dni_fast.backends import get_backend
from dni_fast.decoupled.schedule import Stage, check_delay
from dni_fast.distributed import transport as _transport
from dni_fast.distributed.transport import TAG_ACT, TAG_GRAD, TAG_X, PeerFailure, Transport

__all__ = ["DecoupledStage", "PeerFailure"]

_FORMAT = "dni_fast.distributed.DecoupledStage/1"
_MSG = 512  # bytes of a configuration error each rank can report in the handshake


def _default_optimizer(params):
    return torch.optim.Adam(params)


class DecoupledStage:
    """One stage of a decoupled network on one rank of a process group.

    Rank ``k`` of ``group`` holds stage ``k``: it runs §4's schedule (the
    ``sequential`` executor's numbers, with ``delay >= 1``) and exchanges
    activations (up) and gradients (down) with plain ``isend``/``irecv``.
    Every stage updates as soon as its synthetic gradient exists; the
    gradient it sends down trains the synthesizer below ``delay`` of that
    stage's steps later (waited for if late).

    Args:
        module: this stage's ``S_k``.
        stage_index: ``k``; must equal this process's rank in ``group``.
        num_stages: must equal ``group``'s size.
        synthesizer: the synthesizer for this stage's output (``None`` on the
            last stage): a synthesizer module, a ``BackwardInterface``, or a
            ``BidirectionalInterface`` for complete unlock (its forward
            synthesizer predicts stage ``k+1``'s input from stage 0's ``x``,
            which stage 0 sends to this rank; stage ``k+1`` trains on that
            prediction and never waits for ``S_k``).
        optimizer: ``optimizer(params) -> Optimizer`` for the module and each
            synthesizer (default ``torch.optim.Adam`` with its defaults).
        group: an initialised process group (default: the default group). The
            stage never initialises one and never reads torchrun's variables.
        device: where the stage runs (``None``: the CPU, with gloo); CUDA
            devices need an NCCL group.
        timeout: seconds to wait for any one message before raising
            :class:`PeerFailure` naming the stage at fault.
        delay, update_prob, seed: as ``DecoupledSequential`` (``delay >= 1``,
            default 1).
        regression: as ``DecoupledSequential`` (``"stored"``, docs/design.md
            §4, or ``"current"``: at ``delay >= 1`` only the latter kept the
            synthesizers learning in our measurements).

    The constructor is collective: every rank builds its stage, and the ranks
    check the configuration together (a mismatch raises on every rank).
    """

    def __init__(self, module: nn.Module, stage_index: int, num_stages: int, synthesizer: Optional[nn.Module] = None,
                 optimizer: Optional[Callable] = None, group=None, device=None, timeout: float = 30.0,
                 delay: Optional[int] = None, update_prob: float = 1.0, seed: int = 0, *,
                 regression: str = "stored") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DecoupledStage needs an initialised process group: call "
                               "torch.distributed.init_process_group first (torchrun sets up its variables for it); "
                               "DecoupledStage never initialises one")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group)).lower()
        if self.backend == "undefined":  # init_process_group() without a backend: one per device type
            try:
                self.backend = str(dist.get_backend_config(self.group)).lower()  # e.g. "cpu:gloo,cuda:nccl"
            except Exception:  # pragma: no cover - older torch
                pass
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current device, by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout = float(timeout)
        self.index, self.num_stages = stage_index, num_stages
        self._failed: Optional[BaseException] = None

        # Local checks first; their verdict goes through the handshake, so that a rank
        # with a bad configuration makes every rank raise instead of leaving them waiting.
        error, stage = "", None
        try:
            self._check_local(stage_index, num_stages)
            if module is not None:
                module.to(self.device)
            if synthesizer is not None:
                synthesizer.to(self.device)
            stage = Stage(stage_index, num_stages, module, synthesizer, optimizer or _default_optimizer,
                          delay=check_delay(delay, "distributed"), update_prob=update_prob, seed=seed,
                          regression=regression)
        except Exception as e:  # reported to every rank below
            error = f"{type(e).__name__}: {e}"
        self.stage = stage
        self._handshake(error, stage)
        self.delay = stage.delay
        self._ctrl, self._data = self._groups()
        self.transport = Transport(self.group, self.rank, self.device, self.timeout, self._ctrl, self._data)

    # -- construction ---------------------------------------------------------------------
    def _check_local(self, stage_index: int, num_stages: int) -> None:
        if any(t.group is self.group and t.is_open for t in list(_transport.OPEN)):
            raise RuntimeError("another DecoupledStage in this process still has its channels open on this "
                               "process group: its receiver threads would take this stage's messages. Call "
                               "finish() on it first")
        if self.world != num_stages:
            raise ValueError(f"num_stages={num_stages} but the process group has {self.world} ranks: one stage per "
                             "rank")
        if stage_index != self.rank:
            raise ValueError(f"stage_index={stage_index} on rank {self.rank}: stage k must run on rank k of the group")
        if self.device.type == "cpu" and self.backend not in ("gloo",) and "gloo" not in self.backend:
            raise ValueError(f"a CPU stage needs a gloo process group, this one is {self.backend!r}")
        if self.device.type == "cuda" and "nccl" not in self.backend:
            raise ValueError(f"a CUDA stage needs an NCCL process group, this one is {self.backend!r}; use "
                             "device=None (the CPU) with gloo")

    def _run_with_deadline(self, fn: Callable[[], None], what: str) -> None:
        """Run a collective on a helper thread, waiting at most ``timeout``
        (a gloo collective cannot time out without breaking the group)."""
        box: Dict[str, BaseException] = {}

        def target():
            try:
                fn()
            except BaseException as e:
                box["e"] = e

        t = threading.Thread(target=target, daemon=True, name=f"dni_fast-stage{self.rank}-{what}")
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            raise PeerFailure(f"stage {self.rank}: not every rank reached {what} within {self.timeout:g} s (a rank "
                              "did not build its DecoupledStage, or died)", stage=-1, kind="timeout")
        if "e" in box:
            raise PeerFailure(f"stage {self.rank}: {what} failed: {box['e']}", stage=-1, kind="died") from box["e"]

    def _handshake(self, error: str, stage: Optional[Stage]) -> None:
        """Every rank shares its configuration and its local error, if any; each
        then raises the same error, naming the stage, or goes on."""
        unlocked = int(stage is not None and stage.unlocked)
        info = torch.tensor([self.rank, self.index if isinstance(self.index, int) else -1,
                             self.num_stages if isinstance(self.num_stages, int) else -1,
                             -1 if stage is None else stage.delay, unlocked, int(bool(error))], dtype=torch.int64)
        msg = torch.zeros(_MSG, dtype=torch.uint8)
        b = error.encode("utf-8")[:_MSG]
        msg[:len(b)] = torch.tensor(list(b), dtype=torch.uint8)
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")  # NCCL gathers CUDA tensors
        infos = [torch.zeros_like(info, device=dev) for _ in range(self.world)]
        msgs = [torch.zeros_like(msg, device=dev) for _ in range(self.world)]
        grp = self.group

        def gather():
            dist.all_gather(infos, info.to(dev), group=grp)
            dist.all_gather(msgs, msg.to(dev), group=grp)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        self._run_with_deadline(gather, "the DecoupledStage handshake")
        infos = torch.stack([t.cpu() for t in infos])
        msgs = torch.stack([t.cpu() for t in msgs])
        rows = infos.tolist()
        errors = []
        for r, row in enumerate(rows):
            if row[5]:
                text = bytes(msgs[r][msgs[r] != 0].tolist()).decode("utf-8", "replace")
                errors.append(f"rank {r} (stage {row[1]}): {text}")
        if not errors:
            if sorted(row[1] for row in rows) != list(range(self.world)):
                errors.append(f"the ranks hold stages {[row[1] for row in rows]}, not 0..{self.world - 1}")
            delays = {row[3] for row in rows}
            if len(delays) > 1:
                errors.append(f"the stages have different delays {[row[3] for row in rows]}: give every stage the "
                              "same delay")
        if errors:
            self._failed = ValueError("DecoupledStage configuration: " + "; ".join(errors))
            raise self._failed
        self._unlocked_ranks = [row[0] for row in rows if row[4]]

    def _groups(self):
        """The groups headers and payloads travel on (module docstring of transport.py)."""
        if "nccl" not in self.backend or self.device.type != "cuda":  # a CPU stage sends everything over gloo
            return self.group, {}
        ranks = dist.get_process_group_ranks(self.group)
        ctrl = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        data = {tag: dist.new_group(ranks, backend="nccl", use_local_synchronization=True)
                for tag in (TAG_ACT, TAG_GRAD, TAG_X)}
        return ctrl, data

    # -- the channels -----------------------------------------------------------------------
    def _channels(self):
        k, n = self.index, self.num_stages
        incoming, outgoing = [], []
        if k > 0:
            incoming.append((k - 1, TAG_ACT))
            outgoing.append((k - 1, TAG_GRAD))
        if k < n - 1:
            outgoing.append((k + 1, TAG_ACT))
            incoming.append((k + 1, TAG_GRAD))
        if k > 0 and self.stage.unlocked:
            incoming.append((0, TAG_X))
        if k == 0:
            outgoing += [(r, TAG_X) for r in self._unlocked_ranks if r != 0]
        return incoming, outgoing

    def _ensure_open(self) -> None:
        if not self.transport.is_open:
            self.transport.open(*self._channels())
            self._finished = False

    # -- the schedule ----------------------------------------------------------------------------
    def step(self, x: Optional[Tensor] = None, target: Any = None,
             loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None, *, context: Any = None) -> Optional[Tensor]:
        """One step of this stage on the next batch: stage 0 takes ``x``, the
        last stage ``target`` and ``loss_fn`` and returns the loss of the
        batch it processed (detached, 0-dim; ``None`` on the other stages).

        ``context`` (beyond docs/design.md §8, optional): this batch's context
        for this stage's synthesizer (cDNI, e.g. the one-hot label ``(B, C)``),
        given by each rank for itself; it stays on this rank.

        Stage ``k``'s call ``j`` processes batch ``j``: it waits for batch
        ``j``'s activation from stage ``k-1`` (not for a stage ``k+1``), so the
        ranks' calls run staggered, ``k`` batches apart, by themselves."""
        return self._guard(self._step, x, target, loss_fn, context)

    def _step(self, x, target, loss_fn, context=None):
        st, k, last = self.stage, self.index, self.index == self.num_stages - 1
        j = st.steps
        self._ensure_open()  # first: a bad argument below is then reported to the other stages
        if k == 0:
            if not isinstance(x, Tensor):
                raise ValueError(f"stage 0 takes the batch: step(x=...) needs a tensor, got {type(x).__name__}")
            if x.device != self.device:
                raise ValueError(f"x is on {x.device} but stage 0 runs on {self.device}")
        elif x is not None:
            raise ValueError(f"only stage 0 takes x; stage {k} receives its input from stage {k - 1}")
        require_grad_mode(f"DecoupledStage.step (stage {k})", "call it with autograd on")
        if last:
            if target is None or loss_fn is None:
                raise ValueError(f"stage {k} is the last stage: step needs target= and loss_fn= (the batch's "
                                 "target and the loss), as in torch.distributed.pipelining")
        elif target is not None or loss_fn is not None:
            raise ValueError(f"only the last stage (stage {self.num_stages - 1}) takes target and loss_fn")
        tr = self.transport
        backend = get_backend()
        if k == 0:
            x = x.detach()
            for r in self._unlocked_ranks:
                if r != 0:
                    tr.send(r, TAG_X, x, j)
        if st.unlocked:
            xin = x if k == 0 else tr.recv(0, TAG_X, j, f"the network input of batch {j}")
            hhat = st.synthetic_input(j, xin, context, backend)
            tr.send(k + 1, TAG_ACT, hhat, j)  # stage k+1 goes on without waiting for S_k
        h = x if k == 0 else tr.recv(k - 1, TAG_ACT, j, f"the activation of batch {j}")
        out = st.forward(j, h, context, target, loss_fn, backend)
        if out.out is not None:
            tr.send(k + 1, TAG_ACT, out.out, j)
        if k > 0:
            tr.send(k - 1, TAG_GRAD, out.grad_in, j)
        for due in st.due(j):
            self._receive_target(due)
            st.regress(due, j)
        return out.loss

    def _receive_target(self, batch: int) -> None:
        if not self.stage.has_target(batch):
            g = self.transport.recv(self.index + 1, TAG_GRAD, batch, f"the gradient of batch {batch}")
            self.stage.deliver(batch, g)

    def finish(self) -> None:
        """Apply the regressions still pending (their targets are waited for),
        then close the channels with the neighbours once they finish too. Call
        it on every rank after the last step; ``step`` may go on afterwards."""
        def run():
            if self.__dict__.get("_finished") and not self.stage.pending():
                return  # finished already, nothing since (a second finish() in a finally: block)
            self._ensure_open()
            for b in self.stage.pending():
                self._receive_target(b)
                self.stage.regress(b)
            self.transport.close()
            self._finished = True

        self._guard(run)

    def _guard(self, fn, *args):
        """Run ``fn``; on a failure, report it to the other stages and refuse to go on."""
        if self._failed is not None:
            raise RuntimeError(f"stage {self.index} cannot go on after a failure (above); the process group may no "
                               "longer be usable: exit, and restart from a checkpoint") from self._failed
        try:
            return fn(*args)
        except PeerFailure as e:
            self._failed = e
            # pass the report on to the stages on the other side
            if self.transport.is_open:
                self.transport.abort(e.stage, e.kind, str(e), wait=2.0)
                self.transport.stop()
            self.stage.zero_grad()
            raise
        except BaseException as e:
            self._failed = e
            e.add_note(f"dni_fast.distributed: raised on stage {self.index} (rank {self.rank}); the other stages "
                       f"were told")
            if self.transport.is_open:
                self.transport.abort(self.index, "raised",
                                     f"stage {self.index} raised {type(e).__name__}: {e}", wait=5.0)
                self.transport.stop()
            self.stage.zero_grad()
            raise

    # -- state ----------------------------------------------------------------------------------
    def modules(self) -> nn.ModuleDict:
        out = {"module": self.stage.module}
        if self.stage.synth is not None:
            # a BackwardInterface(normalize_targets=True) holds the running target scale in its buffers
            out["synthesizer"] = self.stage.synth.normalizer or self.stage.synth.module
        if self.stage.fsynth is not None:
            out["forward_synthesizer"] = self.stage.fsynth.module
        return nn.ModuleDict(out)

    def state_dict(self) -> Dict[str, Any]:
        """This stage's module and synthesizer weights, optimizers, generator,
        step count and predictions with their targets (it waits for targets
        still on their way, so that take the state of every rank after the
        same number of steps and nothing in flight is lost). Deep copies."""
        def run():
            pending = self.stage.pending()
            if pending:  # (after finish() nothing is: the channels stay closed)
                self._ensure_open()
            for b in pending:
                self._receive_target(b)
            return {"format": _FORMAT, "stage_index": self.index, "num_stages": self.num_stages,
                    "weights": copy.deepcopy(self.modules().state_dict()), "schedule": self.stage.state()}

        return self._guard(run)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (of this stage index)."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a DecoupledStage state (expected the dict state_dict() returns)")
        if state["stage_index"] != self.index or state["num_stages"] != self.num_stages:
            raise ValueError(f"state of stage {state['stage_index']}/{state['num_stages']} loaded into stage "
                             f"{self.index}/{self.num_stages}")
        if self.transport.is_open:
            # Messages of the run being left (activations, gradients of later batches) may be in the inbox or
            # still on their way: they would be taken for the resumed run's (a false StepMismatch at best).
            raise RuntimeError(f"DecoupledStage.load_state_dict (stage {self.index}): the channels to the other "
                               f"stages are open; call finish() on every rank first, then load on every rank")
        # All or nothing: a checkpoint refused half-way (another delay, other optimizers) leaves the stage as
        # it was.
        weights, schedule = copy.deepcopy(self.modules().state_dict()), copy.deepcopy(self.stage.state())
        try:
            self.modules().load_state_dict(state["weights"])
            self.stage.load_state(state["schedule"])
        except BaseException:
            self.modules().load_state_dict(weights)
            self.stage.load_state(schedule)
            raise

    @property
    def steps(self) -> int:
        """Batches this stage has processed."""
        return self.stage.steps

    def stats(self) -> dict:
        """This stage's synthesizer statistics (``Stage.synth_stats``)."""
        return self.stage.synth_stats()

    def __repr__(self) -> str:
        return (f"DecoupledStage(stage {self.index}/{self.num_stages}, rank {self.rank}, {self.backend}, "
                f"device {self.device}, delay {self.delay}, step {self.stage.steps})")
