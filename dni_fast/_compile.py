"""``compiler_disable``: hide host-side bookkeeping from ``torch.compile``
without importing ``torch._dynamo`` at ``import dni_fast``."""
from __future__ import annotations

import functools
import sys

import torch

__all__ = ["compiler_disable"]


def compiler_disable(fn):
    """``torch.compiler.disable(fn)``, made on first use once ``torch._dynamo``
    is loaded: applying it at import would import ``torch._dynamo``, which
    doubled ``import dni_fast``'s cost (2.1 s on top of torch's 3.5 s on the
    2-core CPU VM) for users who never compile. Without ``torch._dynamo`` in
    the process nothing can be compiling, so ``fn`` runs as it is."""
    disabled: list = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not disabled:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper
