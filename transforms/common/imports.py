"""Keeping an optional package out of one import.

Some packages import heavy optional ones only because they are installed:
Keras imports scikit-learn for its wrappers, umap-learn imports TensorFlow
for ParametricUMAP. Each goes without them when their import fails, which a
None in `sys.modules` makes it do (Python's documented way to block an import).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def without_modules(*names: str) -> Iterator[None]:
    """`import name` raises ImportError meanwhile, for each name not yet
    imported; afterwards each imports as usual. `sys.modules` is the
    process's: use it where no other thread may import those names meanwhile
    (a process's set-up, before its threads start using them)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
