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


def pick(device: torch.device, dtype: torch.dtype, rows: int, width: int, usable: Callable[[str], bool]) -> str:
    """The backend name of the first matching rule whose backend is ``usable``,
    else ``"reference"``. Never the Triton interpreter (a ``triton`` rule
    applies on CUDA only)."""
    dt = str(dtype).replace("torch.", "")
    for rule in _load():
        if rule.get("device") != device.type or rule.get("dtype") != dt:
            continue
        if not (rule.get("min_rows", 0) <= rows <= rule.get("max_rows", math.inf)):
            continue
        if not (rule.get("min_width", 0) <= width <= rule.get("max_width", math.inf)):
            continue
        name = rule.get("backend", "reference")
        if name == "triton" and device.type != "cuda":
            continue
        if name == "reference" or usable(name):
            return name
    return "reference"
