"""Embedding decoded pictures on each worker, in batches, with RunInference.

The handler loads the model of any accepted format (`transforms/embed/models.py`)
from its path on the worker, never pickled from the launcher, once per worker
process, on the first batch: RunInference loads its model when the step
starts, even in a refresh with nothing to embed, and loading TensorFlow and a
model then would be most of such a run's time.
"""
from __future__ import annotations

import threading
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.pvalue import TaggedOutput

from transforms.common.heap import freeze_long_lived
from transforms.common.records import FAILURES, failures_of
from transforms.common.tally import TALLY
from transforms.embed import dedup as content_dedup
from transforms.embed import models
from transforms.embed.models import load
from transforms.embed.precision import configure_tensorflow
from transforms.embed.spec import ModelSpec


def stacked(batch: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The batch as one uint8 [n, size, size, 3] array, checked before the call:
    TensorFlow 2.21 leaves a tf.function's lock held when an input does not
    match its input signature, so one bad call would hang every later call
    from other threads."""
    pictures = np.stack(batch)
    if pictures.dtype != np.uint8 or pictures.shape[1:] != (size, size, 3):
        raise ValueError(f"expected uint8 pictures of shape {(size, size, 3)}; found "
                         f"{pictures.dtype} {list(pictures.shape[1:])}")
    return pictures


class _Loaded:
    """The process's model, switched to the job's precision."""

    def __init__(self, embed, precision: str):
        self.embed, self.precision = embed, precision


class _OnFirstBatch:
    """The process's model at the job's precision, loaded (once, thread-safely)
    when first needed; both embed steps of a process share it."""

    def __init__(self, model_uri: str, spec: ModelSpec, threads: int, precision: str):
        self._args = (model_uri, spec, threads, precision)

    def loaded(self) -> _Loaded:
        with _LOADED_LOCK:
            loaded = _LOADED.get(self._args)
            if loaded is None:
                loaded = _LOADED[self._args] = _load(*self._args)
        return loaded


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def _load(model_uri: str, spec: ModelSpec, threads: int, precision: str) -> _Loaded:
    """The precision was decided for the whole job by the launcher
    (`pipeline/precision_choice.py`): a worker never checks it again, so the
    same export gives the same precision on every row however many processes
    or workers run it."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"the embed stage runs float32 or bfloat16, decided at launch; "
                         f"found precision {precision!r}")
    if spec.format == "onnx" and precision != "float32":
        raise ValueError(f"precision {precision} cannot run {spec.format} models")
    if spec.format != "onnx":
        configure_tensorflow(threads, precision)
    image_size = spec.image_size if spec.size_from != "model" else 0
    before = models.LOADS[0]
    model = load(model_uri, spec.normalize, image_size, threads)
    freeze_long_lived()  # a full collection would walk TensorFlow's objects, GIL held
    # RunInference counts a load per step; this counts the process's real ones.
    Metrics.counter("embed", "models_loaded").inc(models.LOADS[0] - before)
    return _Loaded(model.embed, precision)


class ImageEmbedder(ModelHandler[np.ndarray, tuple, "_OnFirstBatch"]):
    """uint8 pictures of the model's size → (float32 embedding, precision),
    in fixed-size batches.

    `spec` is what the launcher's contract check found (or the previous
    snapshot's manifest recorded): the worker loads the model with the same
    input options, so it makes the same vectors. `precision` is the job's,
    decided at launch (float32 or bfloat16)."""

    def __init__(self, model_uri: str, spec: ModelSpec, batch_size: int = 16,
                 threads: int = 0, precision: str = "float32"):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_uri = model_uri
        self._spec = spec
        self._threads = threads
        self._precision = precision

    def load_model(self) -> "_OnFirstBatch":
        return _OnFirstBatch(self._model_uri, self._spec, self._threads, self._precision)

    def run_inference(self, batch: Sequence[np.ndarray], model: "_OnFirstBatch",
                      inference_args: Optional[dict] = None) -> Iterable[tuple]:
        # Bare vectors: a PredictionResult would keep the input picture alive.
        loaded = model.loaded()  # a model that cannot load fails the batch (every row)
        try:
            vectors = loaded.embed(stacked(batch, self._spec.image_size))
        except Exception as err:
            if len(batch) == 1:
                return [(None, f"{type(err).__name__}: {err}")]
            # One picture the model cannot take must not fail its batch-mates:
            # each is tried alone, and only those that fail alone fail.
            return [self.run_inference([picture], model, inference_args)[0]
                    for picture in batch]
        return [(vector, loaded.precision) for vector in vectors]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(image.nbytes for image in batch)

    def get_metrics_namespace(self) -> str:
        return "embed"


CACHE = "cache"  # tag of the embedding cache's rows: one per content


class _ToRows(beam.DoFn):
    """Model output → one row per row of the image, and one row for the
    store's embedding cache; the input image is dropped right here, and the
    embedding is remembered for later copies of the content in this process."""

    def __init__(self, model_fingerprint: str, run: str):
        self._fingerprint = model_fingerprint
        self._run = run

    def process(self, keyed):
        image, (vector, precision) = keyed  # not PredictionResults: see run_inference
        if vector is None:  # this picture alone failed inference; `precision` says why
            yield TaggedOutput(TALLY, {"embed.item_failed": 1})
            for row in failures_of(image, "embed", "inference_error", precision):
                yield TaggedOutput(FAILURES, row)
            return
        vector = np.asarray(vector, dtype=np.float32)
        image = dict(image, precision=precision)
        content_dedup.remember(self._run, image, vector)
        yield TaggedOutput(TALLY, {"embed.inferred": 1, f"embed.precision.{precision}": 1})
        yield TaggedOutput(CACHE, {"image_sha256": image.get("image_sha256"),
                                   "width": image.get("width"), "height": image.get("height"),
                                   "precision": precision, "embedding": vector})
        yield from content_dedup.rows_of(image, vector, self._fingerprint)


def _failed_batch(failed) -> Iterable[dict]:
    batch, error = failed
    for image, _ in batch:
        yield from failures_of(image, "embed", "inference_error",
                               f"{type(error).__name__}: {error}")


class Embed(beam.PTransform):
    """Decoded images → (embedding rows, failure rows, tally, cache rows)."""

    def __init__(self, handler: ImageEmbedder, model_fingerprint: str, run: str = ""):
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
            TALLY, CACHE, FAILURES, main="rows")
        failed_batches = dead.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)
        failures = (failed_batches, rows[FAILURES]) | "InferenceFailures" >> beam.Flatten()
        return rows.rows, failures, rows[TALLY], rows[CACHE]
