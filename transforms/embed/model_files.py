"""A model's files: where they are, what format they hold, and their fingerprint.

`--model` is a folder (a TF1 Hub module or a TF2 SavedModel, or a folder
holding one `.onnx` file with its external data) or an `.onnx` file, local or
gs://. Runtimes load from local files, so remote models are copied once per
machine into a folder keyed by the remote files' identity. The fingerprint
is a content hash of the files: rows of different models never mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading

import fsspec

from transforms.embed.spec import ModelError

HUB_MODULE_FILE = "tfhub_module.pb"
SAVED_MODEL_FILE = "saved_model.pb"
ONNX_SUFFIX = ".onnx"
WITHDRAWN_HOSTS = ("tfhub.dev", "kaggle.com/models", "storage.googleapis.com/tfhub-modules")

_LOCALIZE_LOCK = threading.Lock()


def fingerprint(model_path: str) -> str:
    """A content hash of the model's files (a folder's, or one file's)."""
    fs, _, (root,) = fsspec.get_fs_token_paths(model_path)
    digest = hashlib.sha256()
    for path in sorted(fs.find(root)):
        rel = posixpath.relpath(path, root)
        digest.update(rel.encode() + b"\0")
        file_digest = hashlib.sha256()
        with fs.open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return "sha256:" + digest.hexdigest()[:32]


def localize(model_uri: str) -> str:
    """A local path holding the model: remote copies (gs://) are fetched once
    per machine into a temporary folder, because the runtimes load from files."""
    if _is_withdrawn_address(model_uri):
        raise ModelError(_withdrawn_message(model_uri))
    fs, _, (root,) = fsspec.get_fs_token_paths(model_uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return root
    # Keyed by the remote files' names, sizes and checksums: a replaced model
    # at the same address is fetched again.
    listing = fs.find(root, detail=True)
    if not listing:
        raise ModelError(f"expected a model at {model_uri}; found nothing there")
    identity = json.dumps(sorted((name, info.get("size"), info.get("md5Hash") or
                                  info.get("etag") or info.get("ETag") or info.get("mtime"))
                                 for name, info in listing.items()), default=str)
    single_file = list(listing) == [root] or (len(listing) == 1 and not fs.isdir(root))
    with _LOCALIZE_LOCK:
        target = os.path.join(tempfile.gettempdir(), "gbif-embed-models",
                              hashlib.sha256(identity.encode()).hexdigest()[:16])
        done = target + ".complete"  # outside the folder: not part of the fingerprint
        if single_file:
            target = os.path.join(target, posixpath.basename(root))
        if not os.path.exists(done):
            shutil.rmtree(os.path.dirname(target) if single_file else target,
                          ignore_errors=True)
            if single_file:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get(root, target)
            else:
                fs.get(root.rstrip("/") + "/", target, recursive=True)
            open(done, "w").close()
    return target


def model_format(local: str, model_uri: str = "") -> str:
    """tf1hub, tf2 or onnx, from the files; says what it found otherwise."""
    shown = model_uri or local
    if os.path.isfile(local):
        if local.endswith(ONNX_SUFFIX):
            return "onnx"
        raise ModelError(f"expected a model folder (TF1 Hub module or TF2 SavedModel) or an "
                         f"{ONNX_SUFFIX} file at {shown}; found a file of another kind")
    if not os.path.isdir(local):
        raise ModelError(f"expected a model at {shown} (a TF1 Hub module or TF2 SavedModel "
                         f"folder, or an {ONNX_SUFFIX} file); found nothing there")
    names = sorted(os.listdir(local))
    if HUB_MODULE_FILE in names:
        return "tf1hub"
    if SAVED_MODEL_FILE in names:
        return "tf2"
    if len(onnx_files(local)) == 1:
        return "onnx"
    raise ModelError(f"expected a TF1 Hub module ({HUB_MODULE_FILE}), a TF2 SavedModel "
                     f"({SAVED_MODEL_FILE}) or one {ONNX_SUFFIX} file in {shown}; found "
                     f"{', '.join(names[:8]) or 'an empty folder'}")


def onnx_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(ONNX_SUFFIX))


def onnx_path(local: str) -> str:
    """The .onnx file itself, for a file or a folder holding exactly one."""
    return local if os.path.isfile(local) else onnx_files(local)[0]


def file_state(local: str) -> tuple:
    """Names, sizes and modification times of a local model's files: a model
    changed on disk is loaded again."""
    paths = [local] if os.path.isfile(local) else [
        os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names]
    state = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        state.append((os.path.relpath(path, local), info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


def _is_withdrawn_address(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and any(h in uri for h in WITHDRAWN_HOSTS)


def _withdrawn_message(uri: str) -> str:
    return (f"cannot load {uri}: the fungi embedder svampeatlas/vision/embedder/fungi_V2/1 "
            "was withdrawn from TF Hub on 2024-03-18 and is not on Kaggle Models, so no "
            "address can serve it. Pass the folder of your own copy (tfhub_module.pb, "
            "saved_model.pb, variables/) with --model PATH (local or gs://), or build the "
            "stand-in with `gbif-embed make-model --out DIR`.")
