"""The embed handler and transform: batching, failures, rows, fingerprints and
precision. Behaviour, not speed. (Formats and the contract check: test_models.py.)"""
from __future__ import annotations

import os
import shutil

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

import transforms.embed.precision as precision
from pipeline.models.make_model import build_model
from transforms.embed.inference import Embed, ImageEmbedder
from transforms.embed.model_files import fingerprint
from transforms.embed.models import load
from transforms.embed.precision import configure_tensorflow
from transforms.embed.spec import ModelSpec
from transforms.write.parts import WriteParquet, embedding_schema

tf1 = tf.compat.v1
OPTION = "auto_mixed_precision_onednn_bfloat16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("models") / "tiny"), "tiny")


def _pictures(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 299, 299, 3), np.uint8)


SPEC = ModelSpec(format="tf1hub", image_size=299, layout="NHWC", width=256)


def _handler(path: str, batch_size: int) -> ImageEmbedder:
    return ImageEmbedder(path, SPEC, batch_size=batch_size)


# ------------------------------------------------------------------ loading and calling

def test_load_scales_uint8_inside_the_graph(tiny):
    """The handler's function on uint8 equals the signature on float32 in [0, 1]."""
    model = load(tiny)
    pictures = _pictures(3)
    direct = model.module.signatures["image_feature_vector"](
        images=tf.constant(pictures.astype(np.float32) / 255.0))["default"].numpy()
    assert np.allclose(model.embed(pictures), direct, atol=1e-5)


def test_one_trace_for_every_batch_size(tiny):
    model = load(tiny)
    for n in (1, 3, 16, 5):
        assert model.embed(_pictures(n)).shape == (n, 256)
    assert model._embed.experimental_get_tracing_count() == 1


def test_a_model_is_loaded_once_per_process_until_its_files_change(tiny, tmp_path):
    assert load(tiny) is load(tiny)
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny, copy)
    first = load(copy)
    assert first is not load(tiny)
    index = os.path.join(copy, "variables", "variables.index")
    stat = os.stat(index)
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load(copy) is not first


def test_batches_give_the_rows_one_by_one_gives(tiny):
    handler = _handler(tiny, 4)
    model = handler.load_model()
    pictures = list(_pictures(5, seed=1))
    together = handler.run_inference(pictures, model)
    alone = [handler.run_inference([p], model)[0] for p in pictures]
    assert len(together) == 5
    # Each result: the vector and the precision it was computed in (the job's,
    # decided at launch; the handler's default is float32).
    assert all(v.shape == (256,) and v.dtype == np.float32 and p == "float32"
               for v, p in together)
    assert np.allclose(np.stack([v for v, _ in together]),
                       np.stack([v for v, _ in alone]), atol=1e-5)
    assert handler.get_num_bytes(pictures) == 5 * 299 * 299 * 3
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}


def _image(i: int, pixels: np.ndarray) -> dict:
    """A decoded image as the decode stage emits it: its rows in `tasks`."""
    return {"tasks": [{"gbifID": i, "identifier": f"u{i}"}], "image_sha256": f"sha{i}",
            "pixels": pixels}


def test_embed_transform_batches_and_drops_the_pixels(tiny):
    handler = _handler(tiny, 4)
    pictures = _pictures(10, seed=2)
    expected = load(tiny).embed(pictures)
    decoded = [_image(i, pictures[i]) for i in range(10)]
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        rows, failures, _, _ = (p | beam.Create(decoded)
                             | Embed(handler, "sha256:test"))
        assert_that(rows | beam.Map(lambda r: (
            r["gbifID"], "pixels" in r, r["model_fingerprint"],
            bool(np.allclose(r["embedding"], expected[r["gbifID"]], atol=1e-4)))),
            equal_to([(i, False, "sha256:test", True) for i in range(10)]), label="rows")
        assert_that(failures, equal_to([]), label="no failures")


def test_a_failed_batch_becomes_failure_rows(tiny):
    """A batch the model cannot take ends as inference_error rows, not a crash
    (nor a hang: the model still answers from another thread afterwards)."""
    handler = _handler(tiny, 2)
    bad = [dict(_image(i, np.zeros((10, 10, 3), np.uint8)), http_status=200, attempts=1)
           for i in range(2)]
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        rows, failures, _, _ = p | beam.Create(bad) | Embed(handler, "sha256:test")
        assert_that(rows, equal_to([]), label="rows")
        assert_that(failures | beam.Map(lambda f: (f["gbifID"], f["stage"], f["reason"])),
                    equal_to([(0, "embed", "inference_error"), (1, "embed", "inference_error")]),
                    label="failures")
    [(vector, detail)] = handler.run_inference([np.zeros((299, 299, 3), np.float32)],
                                               handler.load_model())
    assert vector is None and detail == ("ValueError: expected uint8 pictures of shape "
                                         "(299, 299, 3); found float32 [299, 299, 3]")
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(lambda: load(tiny).embed(_pictures(1)))
        assert call.result(timeout=60).shape == (1, 256)


def test_one_bad_picture_fails_alone_not_its_batch(tiny):
    """Inference of one item fails: its rows become failure rows with the
    reason, and its batch-mates are still embedded (each is tried alone)."""
    handler = _handler(tiny, 4)
    pictures = _pictures(3, seed=5)
    images = [dict(_image(i, pictures[i]), http_status=200, attempts=1) for i in range(3)]
    images.append(dict(_image(3, np.zeros((10, 10, 3), np.uint8)), http_status=200, attempts=1))
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        rows, failures, _, _ = p | beam.Create(images) | Embed(handler, "sha256:test")
        assert_that(rows | beam.Map(lambda r: r["gbifID"]), equal_to([0, 1, 2]), label="rows")
        assert_that(failures | beam.Map(lambda f: (f["gbifID"], f["stage"], f["reason"],
                                                   f["detail"].split(":")[0])),
                    equal_to([(3, "embed", "inference_error", "ValueError")]),
                    label="failures")


def test_rows_are_written_where_they_are_made(tiny, tmp_path):
    """WriteParquet takes several PCollections and writes each without a Flatten."""
    handler = _handler(tiny, 4)
    pictures = _pictures(6, seed=3)
    decoded = [_image(i, pictures[i]) for i in range(6)]
    reused = [{"gbifID": 100, "identifier": "old", "embedding": np.ones(256, np.float32)}]
    folder = str(tmp_path / "snapshot")
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        rows, _, _, _ = p | "Decoded" >> beam.Create(decoded) | Embed(handler, "sha256:test")
        old = p | "Reused" >> beam.Create(reused)
        written = (rows, old) | WriteParquet(folder, "embeddings", embedding_schema())
        assert_that(written | beam.Map(lambda w: w[1]) | beam.combiners.ToList()
                    | beam.Map(sum), equal_to([7]))
    parts = os.path.join(folder, "parts")  # durable parts, as the run leaves them
    table = pq.ParquetDataset(sorted(os.path.join(parts, f) for f in os.listdir(parts))).read()
    assert sorted(table.column("gbifID").to_pylist()) == [0, 1, 2, 3, 4, 5, 100]


# ------------------------------------------------------------------ fingerprints

def test_fingerprint_is_a_content_hash(tiny, tmp_path):
    assert fingerprint(tiny) == fingerprint(tiny)
    assert fingerprint(tiny).startswith("sha256:")
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny, copy)
    os.utime(os.path.join(copy, "saved_model.pb"), (1, 1))
    assert fingerprint(copy) == fingerprint(tiny)  # the bytes, not the times or the place
    other = build_model(str(tmp_path / "other"), "tiny", seed=1)
    assert fingerprint(other) != fingerprint(tiny)


# ------------------------------------------------------------------ precision and threads

def test_precision_is_a_process_option_that_can_be_switched_back():
    try:
        configure_tensorflow(0, "bfloat16")
        assert tf.config.optimizer.get_experimental_options().get(OPTION) is True
        configure_tensorflow(0, "float32")
        assert not tf.config.optimizer.get_experimental_options().get(OPTION)
    finally:
        configure_tensorflow(0, "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        configure_tensorflow(0, "float16")


def test_threads_cannot_change_once_tensorflow_runs(tiny, caplog):
    load(tiny).embed(_pictures(1))  # TensorFlow's runtime is up
    configure_tensorflow(1, "float32")
    assert "keep their sizes" in caplog.text


@pytest.mark.skipif(not precision.cpu_supports_bfloat16(), reason="needs AVX512-BF16 or AMX")
def test_bfloat16_embeddings_stay_close_to_float32(tiny):
    model = load(tiny)
    pictures = _pictures(4, seed=4)
    full = model.embed(pictures)
    try:
        configure_tensorflow(0, "bfloat16")
        half = model.embed(pictures)
    finally:
        configure_tensorflow(0, "float32")
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() > 0.999
    assert not np.array_equal(full, half)  # it did run in bfloat16
    assert np.array_equal(model.embed(pictures), full)  # and float32 is back


def test_bfloat16_is_refused_on_a_cpu_without_it(tmp_path, tiny, monkeypatch):
    from pipeline.cli import UsageError, run
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: False)
    with pytest.raises(UsageError, match=r"--precision bfloat16 needs a CPU with AVX512-BF16 "
                                         r"or AMX .*use --precision float32"):
        run(PipelineOptions(["--export", str(tmp_path / "e.zip"), "--model", tiny,
                             "--output", str(tmp_path / "out"), "--precision", "bfloat16"]))


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open
    for flags, expected in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu avx512f avx2", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
            cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert precision.cpu_supports_bfloat16() is expected
        monkeypatch.setattr(builtins, "open", real_open)
