"""``auto``: pick a backend from the measured table ``dni_fast/_autotable.json``.

The table is written by ``python -m dni_fast bench --write-auto-table`` (or
``--auto-table-from CSV``) from benchmark rows: a list of rules
``{device, dtype, min_rows, max_rows, min_width, max_width, backend}``; the
first rule that matches a call wins. ``resolve`` then checks that the backend
is available and fuses the synthesizer, and falls back to ``reference``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

import torch

__all__ = ["TABLE_PATH", "pick", "reload"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_autotable.json")
_rules: Optional[list] = None


def reload() -> None:
    """Read the table again on next use."""
    global _rules
    _rules = None


def _load() -> list:
    global _rules
    if _rules is None:
        try:
            with open(TABLE_PATH) as f:
                _rules = json.load(f).get("rules", [])
        except (OSError, ValueError):
            _rules = []
    return _rules


def _distance(rule: dict, rows: int, width: int) -> float:
    """How far (rows, width) is from the size the rule was measured at, in log space (the ranges of
    neighbouring rules overlap: the nearest measurement decides, not the first rule listed)."""
    m = rule.get("measured") or {}
    b = m.get("B") or math.sqrt(max(rule.get("min_rows", 1), 1) * max(rule.get("max_rows", 1), 1))
    d = m.get("D") or math.sqrt(max(rule.get("min_width", 1), 1) * max(rule.get("max_width", 1), 1))
    return math.log(max(rows, 1) / b) ** 2 + math.log(max(width, 1) / d) ** 2


def pick(device: torch.device, dtype: torch.dtype, rows: int, width: int, usable: Callable[[str], bool]) -> str:
    """The backend of the matching rule measured nearest to (rows, width) whose
    backend is ``usable``, else ``"reference"``. Never the Triton interpreter
    (a ``triton`` rule applies on CUDA only)."""
    dt = str(dtype).replace("torch.", "")
    matching = []
    for rule in _load():
        if rule.get("device") != device.type or rule.get("dtype") != dt:
            continue
        if not (rule.get("min_rows", 0) <= rows <= rule.get("max_rows", math.inf)):
            continue
        if not (rule.get("min_width", 0) <= width <= rule.get("max_width", math.inf)):
            continue
        matching.append(rule)
    for rule in sorted(matching, key=lambda r: _distance(r, rows, width)):
        name = rule.get("backend", "reference")
        if name == "triton" and device.type != "cuda":
            continue
        if name == "reference" or usable(name):
            return name
    return "reference"
