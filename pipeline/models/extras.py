"""Optional dependencies, and the one-line message when one is missing.

The trained weights and the `onnx` package are not needed to run the
pipeline, so they live in the `models` extra. A user who asks for them without
it should read what to install, not a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "gbif-embed[models]"


class MissingExtra(ImportError, ValueError):
    """An optional package is not installed.

    Also a ValueError: the command line turns ValueErrors into a one-line
    `error:` and exit status 2, which is right for a request this environment
    cannot serve.
    """


def require(module: str, package: str, purpose: str) -> ModuleType:
    """`module`, imported, or `MissingExtra` saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{purpose} needs the {package} package, which is not installed: "
                           f"pip install '{EXTRA}'") from err
