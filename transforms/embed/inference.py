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

from transforms.common.records import FAILURES, failures_of
from transforms.common.tally import TALLY
from transforms.embed import dedup as content_dedup
from transforms.embed import models
from transforms.embed.auto_precision import PrecisionChooser, candidates
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


class _OnFirstBatch:
    """The process's model and its precision, loaded (once, thread-safely)
    when first needed; both embed steps of a process share them."""

    def __init__(self, model_uri: str, spec: ModelSpec, threads: int, precision: str,
                 key: str):
        self._args = (model_uri, spec, threads, precision, key)

    def loaded(self) -> PrecisionChooser:
        model_uri, spec, threads, precision, key = self._args
        with _CHOOSERS_LOCK:
            chooser = _CHOOSERS.get((key, precision, threads))
            if chooser is None:
                chooser = _CHOOSERS[(key, precision, threads)] = _chooser(*self._args)
        return chooser


_CHOOSERS: dict = {}
_CHOOSERS_LOCK = threading.Lock()


def _chooser(model_uri: str, spec: ModelSpec, threads: int, precision: str,
             key: str) -> PrecisionChooser:
    if spec.format != "onnx":
        configure_tensorflow(threads, "float32")
    image_size = spec.image_size if spec.size_from != "model" else 0
    before = models.LOADS[0]
    model = load(model_uri, spec.normalize, image_size, threads)
    # RunInference counts a load per step; this counts the process's real ones.
    Metrics.counter("embed", "models_loaded").inc(models.LOADS[0] - before)

    def runner(name: str):
        if name in ("float32", "bfloat16"):
            configure_tensorflow(threads, name)
            return model.embed
        raise ValueError(f"precision {name} cannot run {spec.format} models here")

    tried = candidates(spec.format, precision)
    if precision not in ("auto", "float32"):  # asked for by name: no check, no fallback
        return PrecisionChooser(key, [], runner(precision), runner, fixed=precision)
    return PrecisionChooser(key, tried, model.embed, runner)


class ImageEmbedder(ModelHandler[np.ndarray, tuple, "_OnFirstBatch"]):
    """uint8 pictures of the model's size → (float32 embedding, precision,
    the precision check's figures or None), in fixed-size batches.

    `spec` is what the launcher's contract check found (or the previous
    snapshot's manifest recorded): the worker loads the model with the same
    input options, so it makes the same vectors. `key` (the embedder's
    fingerprint) keys the precision verdict kept on the machine."""

    def __init__(self, model_uri: str, spec: ModelSpec, batch_size: int = 16,
                 threads: int = 0, precision: str = "auto", key: str = ""):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_uri = model_uri
        self._spec = spec
        self._threads = threads
        self._precision = precision
        self._key = key or model_uri

    def load_model(self) -> "_OnFirstBatch":
        return _OnFirstBatch(self._model_uri, self._spec, self._threads, self._precision,
                             self._key)

    def run_inference(self, batch: Sequence[np.ndarray], model: "_OnFirstBatch",
                      inference_args: Optional[dict] = None) -> Iterable[tuple]:
        # Bare vectors: a PredictionResult would keep the input picture alive.
        chooser = model.loaded()  # a model that cannot load fails the batch (every row)
        try:
            vectors, precision, check = chooser.embed(stacked(batch, self._spec.image_size))
        except Exception as err:
            if len(batch) == 1:
                return [(None, f"{type(err).__name__}: {err}", None)]
            # One picture the model cannot take must not fail its batch-mates:
            # each is tried alone, and only those that fail alone fail.
            return [self.run_inference([picture], model, inference_args)[0]
                    for picture in batch]
        return [(vector, precision, check if i == 0 else None)
                for i, vector in enumerate(vectors)]

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
        image, (vector, precision, check) = keyed  # not PredictionResults: see run_inference
        if vector is None:  # this picture alone failed inference; `precision` says why
            yield TaggedOutput(TALLY, {"embed.item_failed": 1})
            for row in failures_of(image, "embed", "inference_error", precision):
                yield TaggedOutput(FAILURES, row)
            return
        vector = np.asarray(vector, dtype=np.float32)
        image = dict(image, precision=precision)
        content_dedup.remember(self._run, image, vector)
        yield TaggedOutput(TALLY, {"embed.inferred": 1, f"embed.precision.{precision}": 1,
                                   **(check_tally(check) if check else {})})
        yield TaggedOutput(CACHE, {"image_sha256": image.get("image_sha256"),
                                   "width": image.get("width"), "height": image.get("height"),
                                   "precision": precision, "embedding": vector})
        yield from content_dedup.rows_of(image, vector, self._fingerprint)


def check_tally(check: dict) -> dict:
    """A process's precision verdict as tally counts; `min:` keys merge by their
    minimum (tally.MergeTallies), so the manifest shows the worst process's."""
    counts = {f"precision.chose.{check['precision']}": 1}
    for name, figures in (check.get("checks") or {}).items():
        counts[f"precision.{name}.checks"] = 1
        counts[f"precision.{name}.passed"] = int(bool(figures.get("passed")))
        for figure in ("cosine_min", "cosine_mean", "neighbour_agreement"):
            if figure in figures:
                counts[f"min:precision.{name}.{figure}"] = float(figures[figure])
    if check.get("cached"):
        counts["precision.verdicts_reused"] = 1
    return counts


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
