"""Paths and whole-file writes on any fsspec storage (local paths, gs://).

One place for both, used by every stage and by the launcher: snapshots,
the image store and the leases all name files by joining onto a folder that
may be a URL, and all publish small files (pointers, manifests, leases)
that a reader must see whole or not at all.
"""
from __future__ import annotations

import os
import posixpath
import uuid

import fsspec


def join(output: str, *parts: str) -> str:
    """`output/part/...` for a local folder or a URL alike."""
    return posixpath.join(output.rstrip("/"), *parts)


def write_atomically(path: str, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, local)
        return
    with fs.open(local, "w") as handle:  # object stores publish on close
        handle.write(text)
