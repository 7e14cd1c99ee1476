"""`without_modules`: an import blocked for a while, and only that while."""
from __future__ import annotations

import importlib
import json
import sys

import pytest

from transforms.common.imports import without_modules


def test_blocks_a_module_not_yet_imported_then_lets_it_import():
    sys.modules.pop("wave", None)
    with without_modules("wave"):
        with pytest.raises(ImportError):
            importlib.import_module("wave")
    assert importlib.import_module("wave").__name__ == "wave"


def test_leaves_an_imported_module_alone():
    with without_modules("json"):
        assert importlib.import_module("json") is json
    assert sys.modules["json"] is json
