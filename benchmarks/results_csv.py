"""The one way the benchmark scripts append rows to a results CSV: the header is checked first.

``csv.DictWriter`` appends rows in the order of the fields it is given and
never reads the file's header, so rows of another shape (another script's, or
this script's after a column was added) appended to an existing file come back
shifted under the wrong names. ``append_rows`` refuses instead, naming both
headers. (``harness.append_csv`` writes its ``Row`` objects through it.)

Not named ``_csv``: scripts put ``benchmarks/`` first on ``sys.path``, where a
``_csv.py`` would shadow the standard library's C module that ``csv`` imports.
"""
from __future__ import annotations

import csv
import os
from typing import Iterable, List, Mapping, Sequence


def read_header(path: str) -> List[str]:
    """The first row of ``path`` (``[]`` when the file is missing or empty)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def check_header(path: str, fields: Sequence[str]) -> None:
    """Raise ``SystemExit`` naming both headers unless ``path`` is missing, empty or has exactly ``fields``
    as its header. Scripts that know their columns before measuring call it first, so that a run of
    minutes is not lost at the end."""
    header = read_header(path)
    if header and header != list(fields):
        only_file = [h for h in header if h not in fields]
        only_rows = [h for h in fields if h not in header]
        diff = (f" (only in the file: {', '.join(only_file) or '-'}; only in the rows: {', '.join(only_rows) or '-'}"
                f"{'; same names, other order' if not only_file and not only_rows else ''})")
        raise SystemExit(f"{path}: not appending, the file's header differs from these rows'{diff}.\n"
                         f"  file header: {','.join(header)}\n"
                         f"  rows' header: {','.join(fields)}\n"
                         f"Write to another file (the script's --csv/--out option).")


def append_rows(path: str, fields: Sequence[str], rows: Iterable[Mapping], extrasaction: str = "raise") -> int:
    """Append ``rows`` (dicts) to the CSV at ``path`` under the header ``fields``: the header is written
    when the file is new or empty, checked (``check_header``) when it is not. Keys missing from a row are
    written empty; keys not in ``fields`` raise, or are dropped with ``extrasaction="ignore"``. Returns the
    number of rows written."""
    fields = list(fields)
    check_header(path, fields)
    new = not read_header(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction=extrasaction)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)
            n += 1
    return n
