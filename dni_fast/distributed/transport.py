"""Point-to-point messages between decoupled stages, with timeouts and fault reports.

Plain ``isend``/``irecv`` only (batched p2p can hang on gloo). What gloo
does not give, and this adds:

* **Timeouts that do not break the connection.** A gloo ``Work.wait(t)``
  that times out closes the pair, and a gloo receive never reports
  completion before ``wait()``, so it cannot be polled. Each incoming
  channel therefore has a receiver thread that blocks in ``wait()`` and puts
  what arrives in an inbox; the stage's thread waits on the inbox with its
  own deadline.
* **Messages of any shape, one operation each.** Every message is one
  packet on its ``(peer, tag)`` channel: a fixed-size int64 header (kind,
  batch, shape, dtype) and, on the CPU, its payload right behind it. The
  receiver posts each receive into a buffer of the channel's capacity (gloo
  accepts a shorter message); a packet longer than that is preceded by a
  ``GROW`` header that both sides apply, so their capacities never differ.
  Header and payload as two messages cost a round trip each time: the
  payload's ``isend`` waited for the receiver to read the header and post
  the payload's receive (0.3-0.65 ms a call here, docs/decoupled.md).
* **Fault reports that name the culprit.** A stage that raises sends an
  ``ABORT`` header (with its error text) on every channel it sends on; its
  neighbours raise :class:`PeerFailure` naming it and pass the report on, so
  it reaches every stage. A peer that dies closes its connections: the
  receiver thread's ``wait()`` fails at once and the stage raises naming it.
  A peer that hangs is caught by the deadline; so that a stage waiting on a
  stage that is itself waiting names the stage at the end of the chain, a
  stage that has waited longer than ``report_after`` tells its neighbours
  whom it is waiting on (``STATUS``), and the report travels along.
* **A clean end.** ``close`` sends ``CLOSE`` on every outgoing channel and
  waits for ``CLOSE`` on every incoming one, so no operation is left pending.

On NCCL (CUDA tensors) the headers and reports travel on a gloo side group
(the receiver threads block in CPU waits) and the payloads on NCCL groups of
their own, one per channel kind, so that each pair's NCCL stream carries
messages in one direction, in order (a send and a receive queued in opposite
orders on one NCCL stream can deadlock). The NCCL path is written for GPUs
and not run here (no GPU was available): see docs/decoupled.md.
"""
from __future__ import annotations

import collections
import math
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Transport", "PeerFailure", "TAG_ACT", "TAG_GRAD", "TAG_X"]

#: Channel tags: activations go up, gradients come down, the network input goes to unlocked stages.
TAG_ACT, TAG_GRAD, TAG_X = 11, 12, 13
_TAG_NAMES = {TAG_ACT: "activation", TAG_GRAD: "gradient", TAG_X: "network input"}

_HDR = 16
_MAGIC = 0x0D41_0FA5
_DATA, _ABORT, _CLOSE, _STATUS, _GROW = 1, 2, 3, 4, 5
_MAX_DIMS = _HDR - 7  # h[6:15] hold the shape; h[15] says whether the payload is in the packet
_HDR_BYTES = _HDR * 8
_CAP0 = 8192  # every channel's receive capacity at the start, in bytes: a header and a failure report fit
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]


class StepMismatch(RuntimeError):
    """Two neighbouring stages are at different step counts (it names both)."""


class PeerFailure(RuntimeError):
    """Another stage died, hung past the timeout, or raised. ``stage`` is the
    index of the stage at fault; ``kind`` is ``"died"``, ``"timeout"``,
    ``"raised"`` or ``"finished"``."""

    def __init__(self, message: str, stage: int, kind: str) -> None:
        super().__init__(message)
        self.stage, self.kind = stage, kind


#: The transports with their channels open, in this process: a second one on the same group would have its
#: messages taken by the first one's receiver threads (DecoupledStage refuses to build one).
OPEN: "weakref.WeakSet[Transport]" = weakref.WeakSet()


class Transport:
    """The messages of one stage (one rank of ``group``).

    Args:
        group: the process group of the stages (group rank = stage index).
        rank: this stage's rank in ``group``.
        device: where payloads are received (the stage's device).
        timeout: seconds a stage waits for one message before it raises.
        ctrl_group, data_groups: the groups headers and payloads travel on
            (``group`` itself for gloo; see the module docstring for NCCL).
    """

    def __init__(self, group, rank: int, device: torch.device, timeout: float, ctrl_group=None,
                 data_groups: Optional[Dict[int, object]] = None) -> None:
        self.group, self.rank, self.device, self.timeout = group, rank, device, float(timeout)
        self.ctrl = ctrl_group if ctrl_group is not None else group
        self.data = data_groups or {}
        self.report_after = min(1.0, self.timeout / 4)
        self.cv = threading.Condition()
        self.inbox: Dict[Tuple[int, int], Dict[int, Tensor]] = collections.defaultdict(dict)
        self.status: Dict[int, Optional[int]] = {}  # neighbour -> the stage it reported waiting on
        self.closed: set = set()
        self.failure: Optional[PeerFailure] = None
        self.incoming: List[Tuple[int, int]] = []
        self.outgoing: List[Tuple[int, int]] = []
        self.receivers: List[threading.Thread] = []
        self._sends: "collections.deque" = collections.deque()
        self._send_cv = threading.Condition()
        self._reaper: Optional[threading.Thread] = None
        self._in_flight = 0  # sends taken by the reaper and not yet completed
        self._send_cap: Dict[Tuple[int, int], int] = {}  # the receive capacity of each outgoing channel
        self._send_lock = threading.Lock()  # a GROW and its packet leave in order
        self.is_open = False

    # -- setup -----------------------------------------------------------------------
    def open(self, incoming: List[Tuple[int, int]], outgoing: List[Tuple[int, int]]) -> None:
        """Start a receiver thread per ``(peer, tag)`` in ``incoming``;
        ``outgoing`` are the channels this stage sends on (for reports)."""
        self.incoming, self.outgoing = list(incoming), list(outgoing)
        self.closed = set()
        self.status = {}
        # The peers' new receiver threads start at _CAP0 again: a capacity grown before a close must not
        # be assumed (a larger message would overrun their buffer, and gloo aborts the process).
        self._send_cap = {}
        self.receivers = [threading.Thread(target=self._receive, args=(peer, tag), daemon=True,
                                           name=f"dni_fast-stage{self.rank}-recv-{peer}-{tag}")
                          for peer, tag in self.incoming]
        for t in self.receivers:
            t.start()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name=f"dni_fast-stage{self.rank}-send")
        self._reaper.start()
        self.is_open = True
        OPEN.add(self)

    def _data_group(self, tag: int):
        return self.data.get(tag, self.group)

    # -- the receiver threads ------------------------------------------------------------
    def _receive(self, peer: int, tag: int) -> None:
        try:
            if self.device.type == "cuda":  # a new thread starts on device 0: receive on the stage's
                torch.cuda.set_device(self.device)
            cap = _CAP0
            while True:
                packet = torch.empty(cap, dtype=torch.uint8)
                dist.irecv(packet, group=self.ctrl, group_src=peer, tag=tag).wait()
                h = packet[:_HDR_BYTES].view(torch.int64).tolist()
                if h[0] != _MAGIC:
                    raise RuntimeError(f"stage {self.rank}: a malformed message from stage {peer} (tag {tag}): "
                                       "another program is sending on this process group's channels?")
                kind, seq = h[1], h[2]
                if kind == _GROW:
                    cap = h[6]
                    continue
                if kind == _DATA:
                    ndim, dtype = h[5], _DTYPES[h[4]]
                    shape = h[6:6 + ndim]
                    if h[15]:  # the payload is in the packet (the CPU)
                        nbytes = math.prod(shape) * dtype.itemsize
                        buf = packet[_HDR_BYTES:_HDR_BYTES + nbytes].view(dtype).reshape(shape)
                    else:  # NCCL: the payload follows on the channel's data group
                        buf = torch.empty(shape, dtype=dtype, device=self.device)
                        dist.irecv(buf, group=self._data_group(tag), group_src=peer, tag=tag).wait()
                        if buf.is_cuda:  # ready for any stream of the stage's thread
                            torch.cuda.current_stream(buf.device).synchronize()
                    with self.cv:
                        self.inbox[(peer, tag)][seq] = buf
                        self.cv.notify_all()
                elif kind == _STATUS:
                    with self.cv:
                        self.status[peer] = None if h[3] < 0 else h[3]
                        self.cv.notify_all()
                elif kind == _ABORT:
                    msg = bytes(packet[_HDR_BYTES:_HDR_BYTES + h[6]].tolist()).decode("utf-8", "replace")
                    self._fail(PeerFailure(msg, stage=h[3], kind=_kind_name(h[7])))
                    return
                elif kind == _CLOSE:
                    with self.cv:
                        self.closed.add((peer, tag))
                        self.cv.notify_all()
                    return
                else:
                    raise RuntimeError(f"stage {self.rank}: unknown message kind {kind} from stage {peer}")
        except Exception as e:  # the connection broke: the peer died (or its process group went away)
            self._fail(PeerFailure(f"stage {peer} died or closed its connection: stage {self.rank} lost its "
                                   f"{_TAG_NAMES.get(tag, tag)} channel from it ({_first_line(e)})",
                                   stage=peer, kind="died"))

    def _fail(self, failure: PeerFailure) -> None:
        with self.cv:
            if self.failure is None:
                self.failure = failure
            self.cv.notify_all()

    # -- sending -------------------------------------------------------------------------
    def _header(self, kind: int, seq: int = 0, stage: int = -1, t: Optional[Tensor] = None,
                extra: int = 0) -> Tensor:
        h = [0] * _HDR
        h[0], h[1], h[2], h[3] = _MAGIC, kind, seq, stage
        if t is not None:
            if t.dim() > _MAX_DIMS:
                raise ValueError(f"a message may have at most {_MAX_DIMS} dimensions, got shape {tuple(t.shape)}")
            if t.dtype not in _DTYPES:
                raise TypeError(f"cannot send a tensor of dtype {t.dtype}")
            h[4], h[5] = _DTYPES.index(t.dtype), t.dim()
            h[6:6 + t.dim()] = list(t.shape)
        elif extra:
            h[6] = extra
        return torch.tensor(h, dtype=torch.int64)

    @staticmethod
    def _pack(hdr: Tensor, payload: Optional[Tensor] = None) -> Tensor:
        """One packet: the header's bytes, then the (CPU, contiguous) payload's."""
        n = 0 if payload is None else payload.numel() * payload.element_size()
        out = torch.empty(_HDR_BYTES + n, dtype=torch.uint8)
        out[:_HDR_BYTES].copy_(hdr.view(torch.uint8))
        if n:
            out[_HDR_BYTES:].copy_(payload.reshape(-1).view(torch.uint8))
        return out

    def _send_packet(self, peer: int, tag: int, packet: Tensor, what: str) -> None:
        """``packet`` on channel ``(peer, tag)``, preceded by a ``GROW`` when it
        is longer than the receiver's capacity for that channel."""
        key = (peer, tag)
        with self._send_lock:
            cap = self._send_cap.get(key, _CAP0)
            if packet.numel() > cap:
                cap = max(packet.numel(), 2 * cap)
                grow = self._pack(self._header(_GROW, 0, self.rank, extra=cap))
                self._post(self._isend(grow, self.ctrl, peer, tag, what), grow, peer, what)
                self._send_cap[key] = cap
            self._post(self._isend(packet, self.ctrl, peer, tag, what), packet, peer, what)

    def _isend(self, t: Tensor, group, peer: int, tag: int, what: str):
        """``dist.isend``; when it raises at once (gloo: the peer's process is gone), the failure is the
        peer's: the report it sent before it went (its receiver here may still be reading it), else that
        it died, never an error of this stage's."""
        try:
            return dist.isend(t, group=group, group_dst=peer, tag=tag)
        except Exception as e:
            with self.cv:
                self.cv.wait_for(lambda: self.failure is not None, timeout=min(2.0, self.timeout))
                if self.failure is not None:
                    raise self.failure from e
            failure = PeerFailure(f"stage {peer} died or closed its connection: stage {self.rank} could not send "
                                  f"it {what} ({_first_line(e)})", stage=peer, kind="died")
            self._fail(failure)
            raise failure from e

    def _post(self, work, keep, peer: int, what: str) -> None:
        with self._send_cv:
            self._sends.append((work, keep, peer, what))
            self._send_cv.notify()

    def _reap(self) -> None:
        """Wait for every send in order (keeping its tensors alive until then);
        a failed send means the peer is gone."""
        while True:
            with self._send_cv:
                while not self._sends:
                    self._send_cv.wait()
                item = self._sends.popleft()
                if item is not None:
                    self._in_flight += 1
            if item is None:
                return
            work, _keep, peer, what = item
            try:
                work.wait()
            except Exception as e:
                self._fail(PeerFailure(f"stage {peer} died or closed its connection: stage {self.rank} could not "
                                       f"send it {what} ({_first_line(e)})", stage=peer, kind="died"))
            finally:
                with self._send_cv:
                    self._in_flight -= 1
                    self._send_cv.notify_all()

    def send(self, peer: int, tag: int, t: Tensor, seq: int) -> None:
        """Send ``t`` (any shape) on channel ``(peer, tag)`` as message ``seq``."""
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        hdr = self._header(_DATA, seq, self.rank, t)
        what = f"the {_TAG_NAMES.get(tag, tag)} of batch {seq}"
        if t.device.type == "cpu" and tag not in self.data:  # gloo: header and payload in one packet
            hdr[15] = 1
            self._send_packet(peer, tag, self._pack(hdr, t), what)
        else:  # NCCL: the header on the gloo side group, the payload on the channel's NCCL group
            self._send_packet(peer, tag, self._pack(hdr), what)
            self._post(self._isend(t, self._data_group(tag), peer, tag, what), t, peer, what)

    def _send_header(self, peer: int, tag: int, hdr: Tensor, what: str) -> None:
        try:
            self._send_packet(peer, tag, self._pack(hdr), what)
        except Exception:  # the peer is gone already; a report to it is moot
            pass

    def report_waiting(self, root: Optional[int]) -> None:
        """Tell the neighbours whom this stage waits on (``None``: no longer waiting)."""
        for peer, tag in self.outgoing:
            self._send_header(peer, tag, self._header(_STATUS, 0, -1 if root is None else root), "a status report")

    def abort(self, culprit: int, kind: str, text: str, wait: float = 5.0) -> None:
        """Report a failure of stage ``culprit`` on every outgoing channel and
        wait (up to ``wait`` s) for the reports to leave."""
        data = torch.tensor(list(text.encode("utf-8")[:4000]), dtype=torch.uint8)
        for peer, tag in self.outgoing:
            if self.failure is not None and self.failure.stage == peer and self.failure.kind == "died":
                continue
            hdr = self._header(_ABORT, 0, culprit, extra=data.numel())
            hdr[7] = _KINDS.index(kind) if kind in _KINDS else 0
            try:
                self._send_packet(peer, tag, self._pack(hdr, data), "a failure report")
            except Exception:
                pass
        # Linger until every neighbour has answered (each passes the report on, back to
        # this stage too) or is gone: a process that exits with data its peer has not
        # read yet resets the connection, and the peer may then lose the report.
        # A culprit that died or hangs will not answer: only the others are waited for.
        deadline = time.monotonic() + wait
        for (peer, _tag), t in zip(self.incoming, self.receivers):
            if peer == culprit and kind in ("died", "timeout"):
                continue
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.drain_sends(max(0.0, deadline - time.monotonic()))

    def drain_sends(self, wait: float) -> bool:
        """Wait until every send so far has completed (at most ``wait`` s)."""
        deadline = time.monotonic() + wait
        with self._send_cv:
            while (self._sends or self._in_flight) and time.monotonic() < deadline:
                self._send_cv.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            return not (self._sends or self._in_flight)

    # -- receiving -------------------------------------------------------------------------
    def _root(self, peer: int) -> int:
        r = self.status.get(peer)
        return peer if r is None or r == self.rank else r

    def recv(self, peer: int, tag: int, seq: int, what: str) -> Tensor:
        """Message ``seq`` of channel ``(peer, tag)``; raises :class:`PeerFailure`
        on a report, a dead peer, or after ``timeout`` seconds."""
        key = (peer, tag)
        start = time.monotonic()
        deadline = start + self.timeout
        reported: Optional[int] = None
        got = False
        try:
            while True:
                with self.cv:
                    box = self.inbox.get(key)
                    if box is not None and seq in box:
                        got = True
                        return box.pop(seq)
                    if self.failure is not None:
                        raise self.failure
                    if box and (max(box) > seq or min(box) < seq):
                        # A channel's messages leave, and are read, in batch order: a later batch here means this
                        # one was never sent, an earlier one that it will never be read. The two stages are at
                        # different step counts (either one ahead).
                        other = max(box) if max(box) > seq else min(box)
                        raise StepMismatch(f"stage {peer} sent {what.split(' of batch')[0]} of batch {other} "
                                           f"while stage {self.rank} waits for {what}: the stages are at different "
                                           f"step counts (a checkpoint loaded on some ranks only, or taken at "
                                           f"different steps?)")
                    if key in self.closed:
                        raise PeerFailure(f"stage {peer} finished (closed its channels) while stage {self.rank} "
                                          f"waits for {what}: did it call finish() early, or fewer steps?",
                                          stage=peer, kind="finished")
                    now = time.monotonic()
                    root = self._root(peer)
                    if now >= deadline:
                        via = "" if root == peer else f" (stage {peer} reported it was waiting for stage {root})"
                        raise PeerFailure(f"stage {root} sent nothing for {self.timeout:g} s: stage {self.rank} "
                                          f"waited for {what} from stage {peer}{via}; it hangs or is too slow "
                                          f"(raise timeout= if a step can take longer)", stage=root, kind="timeout")
                    long_wait = now - start >= self.report_after
                    if not long_wait or reported == root:
                        # wake at the deadline, at the report time, or when a message or report arrives
                        self.cv.wait(timeout=(deadline if long_wait else start + self.report_after) - now)
                        continue
                # waiting long (or the stage waited on changed): tell the neighbours whom, outside the lock
                self.report_waiting(root)
                reported = root
        finally:
            # Only a wait that ended well is reported as over: after a timeout the report
            # "waiting for <root>" must stand, so that the neighbours name the same root.
            if reported is not None and got:
                self.report_waiting(None)

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """Send ``CLOSE`` on every outgoing channel, wait for every incoming
        channel's ``CLOSE`` (at most ``timeout``) and stop the threads."""
        if not self.is_open:
            return
        for peer, tag in self.outgoing:
            self._send_header(peer, tag, self._header(_CLOSE, 0, self.rank), "the end of its messages")
        deadline = time.monotonic() + self.timeout
        with self.cv:
            while not all(k in self.closed for k in self.incoming):
                if self.failure is not None:
                    raise self.failure
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted({p for p, t in self.incoming if (p, t) not in self.closed})
                    raise PeerFailure(f"stage(s) {', '.join(map(str, missing))} did not finish within "
                                      f"{self.timeout:g} s of stage {self.rank}'s finish()", stage=missing[0],
                                      kind="timeout")
                self.cv.wait(timeout=left)
        for t in self.receivers:
            t.join(timeout=self.timeout)
        self.drain_sends(self.timeout)
        self.stop()

    def stop(self) -> None:
        """Stop the reaper (receiver threads blocked on a dead peer stay, as daemons)."""
        if self._reaper is not None:
            with self._send_cv:
                self._sends.append(None)
                self._send_cv.notify_all()
            self._reaper = None
        self.is_open = False
        OPEN.discard(self)


_KINDS = ["raised", "died", "timeout", "finished"]


def _kind_name(i: int) -> str:
    return _KINDS[i] if 0 <= i < len(_KINDS) else "raised"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]
