"""Decoupled execution of a chain of stages (docs/design.md §4).

* :class:`DecoupledSequential`: the stages and their synthesizers as one
  ``nn.Module`` trained on §4's schedule by an executor (``sequential``,
  ``threads``, ``streams``, ``auto``);
* :class:`Stage`: the schedule for one stage, for people who write their own
  loops (and for ``dni_fast.distributed``), with :class:`StageOutput` and the
  hooks' :class:`StageEvent`.

The layout: ``schedule.py`` (the schedule, shared by every executor and by
the distributed stages), ``executors.py`` (how the stages run),
``module.py`` (``DecoupledSequential``). See docs/decoupled.md.
"""
from dni_fast.decoupled.executors import EXECUTORS, ExecutorUnavailableError
from dni_fast.decoupled.module import DecoupledSequential
from dni_fast.decoupled.schedule import MIN_DELAY, Stage, StageEvent, StageOutput

__all__ = ["DecoupledSequential", "Stage", "StageOutput", "StageEvent", "EXECUTORS", "MIN_DELAY",
           "ExecutorUnavailableError"]
