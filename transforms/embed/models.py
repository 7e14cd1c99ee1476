"""Loading an embedder of any accepted format, once per process, and checking it.

A worker process loads its model once (RunInference's shared handle calls
`load` on the first batch) and the launcher's contract check loads the same
one: with the in-process runner both share this process, so the model and
its traced function are kept here, keyed by the local files' state and the
input options, instead of being loaded twice. The contract check runs at
launch, before anything is fetched, and says what was expected and what was
found: wrong rank, wrong channel count, non-float input or output, NaNs.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Protocol

import numpy as np

from transforms.embed.model_files import file_state, localize, model_format
from transforms.embed.spec import ModelError, ModelSpec


class LoadedModel(Protocol):
    spec: ModelSpec

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] RGB → float32 [n, width]."""


_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()
LOADS = [0]  # models this process loaded from their files (a cache hit is not one)


def load(model_uri: str, normalize: str = "unit", image_size: int = 0,
         threads: int = 0) -> LoadedModel:
    """The model, loaded once per process and options (files changed on disk
    load again); its spec is complete, output width included."""
    local = localize(model_uri)
    key = (os.path.abspath(local), file_state(local), normalize, image_size)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _load(local, model_uri, normalize, image_size, threads)
            LOADS[0] += 1
            for old in [k for k in _MODELS if k[0] == key[0] and k[1] != key[1]]:
                del _MODELS[old]  # an older version of the same folder
            _MODELS[key] = model
    return model


def forget_models() -> None:
    """Drops the models loaded in this process: a launcher that submits to a
    remote runner keeps no model state after checking the contract."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _load(local: str, model_uri: str, normalize: str, image_size: int,
          threads: int) -> LoadedModel:
    fmt = model_format(local, model_uri)
    if fmt == "onnx":
        from transforms.embed.onnx_model import load_onnx
        model = load_onnx(local, model_uri, normalize, image_size, threads)
    else:
        from transforms.embed.tf_model import load_tf
        model = load_tf(local, model_uri, fmt, normalize, image_size)
    # One picture through the model: the output width (not every model
    # declares it), and the first call's tracing done before real batches.
    out = _run(model, _test_batch(model.spec.image_size, 1), model_uri)
    model.spec = dataclasses.replace(model.spec, width=int(out.shape[1]))
    return model


def _test_batch(size: int, n: int) -> np.ndarray:
    """Mid-grey and seeded noise: plain inputs any working model embeds to finite values."""
    pictures = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pictures[0] = 128
    return pictures


def _run(model: LoadedModel, pixels: np.ndarray, model_uri: str) -> np.ndarray:
    try:
        out = np.asarray(model.embed(pixels))
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"expected {model_uri} to embed a test batch of "
                         f"{pixels.shape[0]} {pixels.shape[1]}x{pixels.shape[2]} pictures; "
                         f"it failed: {type(err).__name__}: {str(err)[:300]}") from err
    if out.ndim != 2 or out.shape[0] != pixels.shape[0]:
        raise ModelError(f"expected an embedding output [batch, width] from {model_uri}; "
                         f"found shape {list(out.shape)} for a batch of {pixels.shape[0]}")
    if not np.issubdtype(out.dtype, np.floating):
        raise ModelError(f"expected a float embedding output from {model_uri}; found "
                         f"{out.dtype}")
    return out


def check_contract(model_uri: str, embedding_dim: int = 0, normalize: str = "unit",
                   image_size: int = 0) -> ModelSpec:
    """Fails at launch, before any image is fetched, if the model does not fit;
    returns its spec (format, input size and layout, output width)."""
    model = load(model_uri, normalize, image_size)
    out = _run(model, _test_batch(model.spec.image_size, 2), model_uri)
    spec = model.spec
    if embedding_dim and out.shape[1] != embedding_dim:
        raise ModelError(f"expected output '{spec.output_name}' float32 [None, {embedding_dim}] "
                         f"(--embedding_dim {embedding_dim}); found {out.dtype} "
                         f"[None, {out.shape[1]}] in {model_uri}")
    if not np.isfinite(out).all():
        raise ModelError(f"expected finite embeddings from {model_uri}; found NaN or infinite "
                         f"values on a test batch (a mid-grey and a noise picture, "
                         f"{spec.image_size}x{spec.image_size}, --normalize {spec.normalize})")
    return spec
