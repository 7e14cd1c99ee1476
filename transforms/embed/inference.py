"""Embedding images with the fungi embedder on each worker, in batches.

Beam's own TensorFlow handler loads models through Keras, which cannot load
TF1 Hub-format modules under Keras 3, so this handler goes through
`tensorflow_hub.load` and calls the module's `image_feature_vector`
signature. The model is loaded from its path on the worker (never pickled
from the launcher), once per worker process, by RunInference's shared handle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.pvalue import TaggedOutput

from transforms.embed import dedup as content_dedup
from transforms.common.records import failures_of
from transforms.common.tally import TALLY

INPUT_KEY = "images"
OUTPUT_KEY = "default"
SIGNATURES = ("image_feature_vector", "default")
INPUT_SHAPE = (299, 299, 3)
PRECISIONS = ("float32", "bfloat16")
WITHDRAWN_HOSTS = ("tfhub.dev", "kaggle.com/models", "storage.googleapis.com/tfhub-modules")

_LOG = logging.getLogger(__name__)
_LOCALIZE_LOCK = threading.Lock()


class ModelError(ValueError):
    """The model cannot be used; says what was expected and what was found."""


def fingerprint(model_dir: str) -> str:
    """A content hash of the model's files: rows of different models never mix."""
    fs, _, (root,) = fsspec.get_fs_token_paths(model_dir)
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
    """A local folder holding the model: remote copies (gs://) are fetched once
    per process into a temporary folder, because TF Hub loads from files."""
    if _is_withdrawn_address(model_uri):
        raise ModelError(_withdrawn_message(model_uri))
    fs, _, (root,) = fsspec.get_fs_token_paths(model_uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return root
    # Keyed by the remote files' names, sizes and checksums: a replaced model
    # at the same address is fetched again.
    listing = fs.find(root, detail=True)
    identity = json.dumps(sorted((name, info.get("size"), info.get("md5Hash") or
                                  info.get("etag") or info.get("ETag") or info.get("mtime"))
                                 for name, info in listing.items()), default=str)
    with _LOCALIZE_LOCK:
        target = os.path.join(tempfile.gettempdir(), "gbif-embed-models",
                              hashlib.sha256(identity.encode()).hexdigest()[:16])
        done = target + ".complete"  # outside the folder: not part of the fingerprint
        if not os.path.exists(done):
            shutil.rmtree(target, ignore_errors=True)
            fs.get(root.rstrip("/") + "/", target, recursive=True)
            open(done, "w").close()
    return target


def _is_withdrawn_address(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and any(h in uri for h in WITHDRAWN_HOSTS)


def _withdrawn_message(uri: str) -> str:
    return (f"cannot load {uri}: the fungi embedder svampeatlas/vision/embedder/fungi_V2/1 "
            "was withdrawn from TF Hub on 2024-03-18 and is not on Kaggle Models, so no "
            "address can serve it. Pass the folder of your own copy (tfhub_module.pb, "
            "saved_model.pb, variables/) with --model PATH (local or gs://), or build the "
            "stand-in with `gbif-embed make-model --out DIR`.")


def configure_tensorflow(threads: int = 0, precision: str = "float32") -> None:
    """TensorFlow's thread pools and precision, for this whole process.

    Thread pools can be sized only before TensorFlow starts its runtime; a
    process where it already runs (the in-process runner, after the
    launcher's contract check) keeps its pools, which by default use all
    the cores. The precision is a Grappler option of the process: it applies
    to every function called after it is set, including functions that ran
    before (TensorFlow instantiates them again under the new options), and
    also to the functions `hub.load` wraps from TF1 graphs (checked: oneDNN
    then runs `avx512_core_bf16` convolutions). float32 switches it back off.
    """
    import tensorflow as tf
    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError:
            _LOG.warning("TensorFlow already runs in this process; its thread pools keep "
                         "their sizes (intra-op %s, inter-op %s) instead of %s threads",
                         tf.config.threading.get_intra_op_parallelism_threads() or "all cores",
                         tf.config.threading.get_inter_op_parallelism_threads() or "all cores",
                         threads)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    wanted = precision == "bfloat16"
    option = "auto_mixed_precision_onednn_bfloat16"
    if bool(tf.config.optimizer.get_experimental_options().get(option)) != wanted:
        # Only on a change: new options make TensorFlow optimize functions again.
        tf.config.optimizer.set_experimental_options({option: wanted})


def cpu_supports_bfloat16() -> bool:
    """oneDNN runs bfloat16 fast only with AVX512-BF16 or AMX."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class LoadedModel:
    """The hub module (kept alive) and its uint8 → embedding function."""
    module: Any
    embed: Any


# Models loaded in this process, by local folder and the state of its files.
# With the in-process runner the launcher's contract check and the worker
# share one process: the worker reuses the checked model (and its traced
# function) instead of loading a second copy.
_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def load(model_uri: str):
    """hub.load plus a function that scales uint8 pixels inside the graph;
    loaded once per process and model (files changed on disk load again)."""
    local = localize(model_uri)
    key = (os.path.abspath(local), _file_state(local))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _load(local, model_uri)
            for old in [k for k in _MODELS if k[0] == key[0]]:
                del _MODELS[old]  # an older version of the same folder
            _MODELS[key] = model
    return model


def forget_models() -> None:
    """Drops the models loaded in this process: a launcher that submits to a
    remote runner keeps no TensorFlow state after checking the contract."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _file_state(local: str) -> tuple:
    """Names, sizes and modification times of a local model's files."""
    state = []
    for folder, _, names in os.walk(local):
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            state.append((os.path.relpath(os.path.join(folder, name), local),
                          info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


def _load(local: str, model_uri: str) -> LoadedModel:
    import tensorflow as tf
    import tensorflow_hub as hub
    try:
        module = hub.load(local)
    except Exception as err:
        raise ModelError(f"expected a TF1 Hub-format module or SavedModel folder at "
                         f"{model_uri}; loading it failed: {err}") from err
    signature = _signature(module, model_uri)

    # One trace for every batch size. Call it only with uint8 [n, 299, 299, 3]
    # (see _stacked): a mismatching input leaves the function locked.
    @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.uint8)])
    def embed(images):
        return signature(**{INPUT_KEY: tf.cast(images, tf.float32) / 255.0})[OUTPUT_KEY]

    return LoadedModel(module, embed)


def _signature(module, model_uri: str):
    signatures = getattr(module, "signatures", {}) or {}
    for name in SIGNATURES:
        if name in signatures:
            return signatures[name]
    raise ModelError(f"expected a signature named {' or '.join(SIGNATURES)} in {model_uri}; "
                     f"found {sorted(signatures) or 'none'}")


def check_contract(model_uri: str, embedding_dim: int) -> None:
    """Fails at launch, before any image is fetched, if the model does not fit."""
    import tensorflow as tf
    model = load(model_uri)
    signature = _signature(model.module, model_uri)
    args, kwargs = signature.structured_input_signature
    if INPUT_KEY not in kwargs:
        raise ModelError(f"expected the input key '{INPUT_KEY}' in {model_uri}; found "
                         f"{sorted(kwargs) or list(args)}")
    spec = kwargs[INPUT_KEY]
    shape = tuple(spec.shape.as_list())
    if spec.dtype != tf.float32 or len(shape) != 4 or tuple(shape[1:]) != INPUT_SHAPE:
        raise ModelError(f"expected input '{INPUT_KEY}' float32 [None, 299, 299, 3]; found "
                         f"{spec.dtype.name} {list(shape)} in {model_uri}")
    outputs = signature.structured_outputs
    if OUTPUT_KEY not in outputs:
        raise ModelError(f"expected the output key '{OUTPUT_KEY}' in {model_uri}; found "
                         f"{sorted(outputs)}")
    result = model.embed(np.zeros((1, *INPUT_SHAPE), np.uint8)).numpy()
    if result.shape != (1, embedding_dim) or result.dtype != np.float32:
        raise ModelError(f"expected output '{OUTPUT_KEY}' float32 [None, {embedding_dim}] "
                         f"(--embedding_dim {embedding_dim}); found {result.dtype} "
                         f"[None, {', '.join(map(str, result.shape[1:]))}] in {model_uri}")


def _stacked(batch: Sequence[np.ndarray]) -> np.ndarray:
    """The batch as one uint8 [n, 299, 299, 3] array, checked before the call:
    TensorFlow 2.21 leaves a tf.function's lock held when an input does not
    match its input signature, so one bad call would hang every later call
    from other threads."""
    stacked = np.stack(batch)
    if stacked.dtype != np.uint8 or stacked.shape[1:] != INPUT_SHAPE:
        raise ValueError(f"expected uint8 pictures of shape {INPUT_SHAPE}; found "
                         f"{stacked.dtype} {list(stacked.shape[1:])}")
    return stacked


class _OnFirstBatch:
    """The process's model, loaded (once, thread-safely) when first needed."""

    def __init__(self, model_uri: str, threads: int, precision: str):
        self._args = (model_uri, threads, precision)
        self._lock = threading.Lock()
        self._model: Optional[LoadedModel] = None

    def loaded(self) -> LoadedModel:
        with self._lock:
            if self._model is None:
                model_uri, threads, precision = self._args
                configure_tensorflow(threads, precision)
                self._model = load(model_uri)
            return self._model


class HubImageEmbedder(ModelHandler[np.ndarray, np.ndarray, "_OnFirstBatch"]):
    """uint8 299×299×3 images → float32 embeddings, in fixed-size batches."""

    def __init__(self, model_uri: str, batch_size: int = 16, threads: int = 0,
                 precision: str = "float32", resource_hints: Optional[dict] = None):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_uri = model_uri
        self._threads = threads
        self._precision = precision
        self._resource_hints = {k: v for k, v in (resource_hints or {}).items() if v}

    def load_model(self) -> "_OnFirstBatch":
        # RunInference loads its model when the step starts, even with nothing
        # to embed (a refresh where nothing changed): TensorFlow and the model
        # are loaded on the first batch instead.
        return _OnFirstBatch(self._model_uri, self._threads, self._precision)

    def run_inference(self, batch: Sequence[np.ndarray], model: "_OnFirstBatch",
                      inference_args: Optional[dict] = None) -> Iterable[np.ndarray]:
        # Bare vectors: a PredictionResult would keep the 268 kB input image alive.
        return list(model.loaded().embed(_stacked(batch)).numpy())

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(image.nbytes for image in batch)

    def get_metrics_namespace(self) -> str:
        return "embed"

    def get_resource_hints(self) -> dict:
        return self._resource_hints


class _ToRows(beam.DoFn):
    """Model output → one row per row of the image; the input image is dropped
    right here, and the embedding is remembered for later copies of the content."""

    def __init__(self, model_fingerprint: str, run: str):
        self._fingerprint = model_fingerprint
        self._run = run

    def process(self, keyed):
        image, vector = keyed  # run_inference returns bare vectors, not PredictionResults
        vector = np.asarray(vector, dtype=np.float32)
        content_dedup.remember(self._run, image, vector)
        yield TaggedOutput(TALLY, {"embed.inferred": 1})
        yield from content_dedup.rows_of(image, vector, self._fingerprint)


def _failed_batch(failed) -> Iterable[dict]:
    batch, error = failed
    for image, _ in batch:
        yield from failures_of(image, "embed", "inference_error",
                               f"{type(error).__name__}: {error}")


class Embed(beam.PTransform):
    """Decoded images → (embedding rows, failure rows, tally)."""

    def __init__(self, handler: HubImageEmbedder, model_fingerprint: str, run: str = ""):
        super().__init__()
        self._handler = handler
        self._fingerprint = model_fingerprint
        self._run = run or model_fingerprint

    def expand(self, decoded):
        keyed = decoded | "SplitPixels" >> beam.Map(
            lambda d: ({k: v for k, v in d.items() if k != "pixels"}, d["pixels"]))
        results, dead = (keyed | "RunInference" >> RunInference(
            KeyedModelHandler(self._handler)).with_exception_handling())
        rows = results | "ToRows" >> beam.ParDo(_ToRows(self._fingerprint, self._run)).with_outputs(
            TALLY, main="rows")
        failures = dead.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)
        return rows.rows, failures, rows[TALLY]
