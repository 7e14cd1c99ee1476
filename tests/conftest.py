"""Shared fixtures: the real GBIF samples and photographs in ../shared, read in place."""
from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
GBIF_SAMPLES = SHARED / "gbif-samples"
FUNGI_IMAGES = SHARED / "fungi-images"

# gcsfs otherwise waits 60 s per bucket for a gRPC call the emulator cannot answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def shared_path(*parts: str) -> pathlib.Path:
    """A file of ../shared/data, or a skip that says why (third-party data is never
    copied into the repository, so without ../shared these tests cannot run)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}: real third-party data read in place from ../shared, "
                    "absent on this machine")
    return path
