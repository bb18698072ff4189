"""Optional dependencies of the examples (the ``examples`` extra)."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "EXTRA_HINT"]

EXTRA_HINT = 'pip install -e ".[examples]" in the dni_fast checkout'


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pkg = {"sklearn": "scikit-learn"}.get(top, top)
        raise ImportError(f"{purpose} needs {pkg}, which is not installed: {EXTRA_HINT} "
                          f"(or `pip install {pkg}`)") from e
