"""Runs that died, and which of their finished rows a new run may take.

Every run writes `run.json` (its model fingerprint, whether it was `--full`)
into its folder at launch and `manifest.json` only when it publishes, so a
folder with the first and not the second is a run that died (or one still
going). Its closed parts are rows finished with its model. A new run takes
them when they are made with its own model, unless a snapshot of that model
was published after the dead run (then that snapshot is newer and is what a
refresh starts from). `--full` runs take only the rows of `--full` runs,
since a refresh's rows may be copies of older ones.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import fsspec

from transforms.write.compact import part_files

RUN = "run.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class _Folder:
    name: str
    fingerprint: str
    full: bool
    complete: bool


def _folders(output: str) -> list[_Folder]:
    fs, _, (root,) = fsspec.get_fs_token_paths(output)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    found = []
    for path in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(path.rstrip("/"))
        if not name.startswith("snapshot-"):
            continue
        complete = fs.exists(posixpath.join(path, MANIFEST))
        described = posixpath.join(path, MANIFEST if complete else RUN)
        if not fs.exists(described):
            continue
        with fs.open(described, "r") as handle:
            info = json.load(handle)
        fingerprint = (info.get("model") or {}).get("fingerprint") if complete \
            else info.get("model_fingerprint")
        found.append(_Folder(name, fingerprint or "", bool(info.get("full")), complete))
    return found


def _resumable(folders: list[_Folder], fingerprint: str, full: bool) -> list[str]:
    names = []
    for i, folder in enumerate(folders):
        if folder.complete or folder.fingerprint != fingerprint or (full and not folder.full):
            continue
        superseded = any(later.complete and later.fingerprint == fingerprint
                         for later in folders[i + 1:])
        if not superseded:
            names.append(folder.name)
    return names


def resumable_runs(output: str, fingerprint: str, full: bool = False) -> list[str]:
    """Dead runs whose closed parts a run with this model may take, oldest first."""
    folders = _folders(output)
    return [name for name in _resumable(folders, fingerprint, full)
            if part_files(posixpath.join(output.rstrip("/"), name), "embeddings")]


def still_resumable(output: str) -> set[str]:
    """Dead runs that some later run (with their own model) could still resume."""
    folders = _folders(output)
    names: set[str] = set()
    for fingerprint in {f.fingerprint for f in folders if not f.complete}:
        names.update(_resumable(folders, fingerprint, False))
    return names
