"""End to end: a DwC-A export → loopback HTTP → tiny TF Hub model → Parquet snapshot."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import main, run
from pipeline.demo.demo import serve_folder
from pipeline.models.make_model import build_model
from pipeline.demo.sample_data import (
    Media,
    Occurrence,
    jpeg_bytes,
    make_sample,
    synthetic_photo,
    write_dwca,
)
from tests.conftest import LOOPBACK
from transforms.embed.model_files import fingerprint
from transforms.embed.spec import ModelError
from transforms.write.snapshot import read_latest, read_manifest
from transforms.write.parts import FAILURE_SCHEMA, embedding_schema


def _tables(output: str):
    folder = os.path.join(output, read_latest(output))
    embeddings = pq.ParquetDataset(sorted(glob.glob(f"{folder}/embeddings-*.parquet"))).read()
    failures = pq.ParquetDataset(sorted(glob.glob(f"{folder}/failures-*.parquet"))).read()
    return embeddings, failures


def test_console_script_runs_the_sample_end_to_end(tmp_path, tiny_model):
    """Every media row ends embedded, failed with the expected reason, or skipped."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(tmp_path / "data"), base_url, 12, photo_size=(320, 240))
        output = str(tmp_path / "out")
        script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
        done = subprocess.run(
            [script, "run", "--export", sample.export, "--model", tiny_model,
             "--output", output, "--batch_size", "4", *LOOPBACK],
            capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "embedded" in done.stdout and read_latest(output) in done.stdout

    manifest = read_manifest(output)
    counts = manifest["counts"]
    assert counts["embedded"] == sample.expected_images
    assert counts["failed"] == len(sample.expected_failures)
    assert counts["skipped_by_reason"] == sample.expected_skips
    assert counts["accounted"] == counts["export_rows"] == len(sample.media)
    assert manifest["export"]["download_key"] == sample.download_key
    assert manifest["export"]["doi"] == sample.doi
    assert manifest["model"]["fingerprint"] == fingerprint(tiny_model)

    embeddings, failures = _tables(output)
    assert embeddings.schema.equals(embedding_schema(), check_metadata=False)
    assert failures.schema.equals(FAILURE_SCHEMA, check_metadata=False)
    assert sorted(embeddings.column("identifier").to_pylist()) == sorted(sample.good_identifiers)
    keys = list(zip(embeddings.column("gbifID").to_pylist(),
                    embeddings.column("identifier").to_pylist()))
    assert len(set(keys)) == len(keys)
    by_id = {o.gbifID: o for o in sample.occurrences}
    for row in embeddings.select(["gbifID", "scientificName", "taxonKey", "datasetKey",
                                  "occurrenceID", "model_fingerprint", "width",
                                  "image_sha256"]).to_pylist():
        occurrence = by_id[row["gbifID"]]
        assert row["scientificName"] == occurrence.scientificName
        assert row["taxonKey"] == occurrence.taxonKey
        assert row["occurrenceID"] == occurrence.occurrenceID
        assert row["model_fingerprint"] == manifest["model"]["fingerprint"]
        assert row["width"] > 0 and len(row["image_sha256"]) == 64
    vectors = np.stack(embeddings.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (sample.expected_images, 256) and np.isfinite(vectors).all()
    reasons = dict(zip(failures.column("identifier").to_pylist(),
                       failures.column("reason").to_pylist()))
    assert reasons == sample.expected_failures


def _tiny_export(tmp_path, base_url: str, names: list[str]) -> str:
    occurrences = [Occurrence(gbifID=100 + i, occurrenceID=f"urn:occ:{i}",
                              datasetKey="84d26682-f762-11e1-a439-00145eb45e9a",
                              taxonKey=5000 + i, scientificName="Amanita muscaria")
                   for i in range(len(names))]
    media = [Media(gbifID=100 + i, identifier=base_url + name) for i, name in enumerate(names)]
    return write_dwca(str(tmp_path / "export.zip"), occurrences, media)


def test_same_picture_at_two_urls_gives_the_same_embedding(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    same = jpeg_bytes(synthetic_photo(1, species=0, size=(400, 300)))
    (images / "a.jpg").write_bytes(same)
    (images / "b.jpg").write_bytes(same)
    (images / "c.jpg").write_bytes(jpeg_bytes(synthetic_photo(2, species=3, size=(400, 300))))
    output = str(tmp_path / "out")
    with serve_folder(str(images)) as base_url:
        export = _tiny_export(tmp_path, base_url, ["a.jpg", "b.jpg", "c.jpg"])
        run(PipelineOptions(["--export", export, "--model", tiny_model, "--output", output,
                             "--quiet", *LOOPBACK]))
    embeddings, _ = _tables(output)
    by_url = {row["identifier"].rsplit("/", 1)[1]: np.asarray(row["embedding"])
              for row in embeddings.to_pylist()}
    assert np.allclose(by_url["a.jpg"], by_url["b.jpg"], atol=1e-6)
    assert not np.allclose(by_url["a.jpg"], by_url["c.jpg"], atol=1e-3)


def test_loopback_is_refused_unless_allowed(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(synthetic_photo(1, size=(200, 150))))
    output = str(tmp_path / "out")
    with serve_folder(str(images)) as base_url:
        export = _tiny_export(tmp_path, base_url, ["a.jpg"])
        manifest = run(PipelineOptions(["--export", export, "--model", tiny_model,
                                        "--output", output, "--quiet"]))
    assert manifest["counts"]["embedded"] == 0
    assert manifest["counts"]["failed_by_reason"] == {"fetch.blocked_address": 1}


def test_a_model_that_does_not_fit_fails_at_launch(tmp_path, tiny_model):
    wide = str(tmp_path / "wide")
    build_model(wide, "tiny", embedding_dim=128)
    export = _tiny_export(tmp_path, "http://127.0.0.1:9/", ["a.jpg"])
    with pytest.raises(ModelError, match=r"expected output 'default' float32 \[None, 256\].*"
                                         r"found float32 \[None, 128\]"):
        run(PipelineOptions(["--export", export, "--model", wide, "--output",
                             str(tmp_path / "out"), "--embedding_dim", "256"]))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ModelError, match="withdrawn from TF Hub on 2024-03-18"):
        run(PipelineOptions(["--export", export, "--output", str(tmp_path / "out"), "--model",
                             "https://tfhub.dev/svampeatlas/vision/embedder/fungi_V2/1"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"expected a TF1 Hub module \(tfhub_module.pb\), a "
                                         r"TF2 SavedModel \(saved_model.pb\) or one .onnx file"):
        run(PipelineOptions(["--export", export, "--model", str(empty), "--output",
                             str(tmp_path / "out")]))


def test_cli_reports_bad_exports_and_flags(tmp_path, tiny_model, capsys):
    assert main(["run", "--model", tiny_model, "--output", str(tmp_path)]) == 2
    assert "--export is required" in capsys.readouterr().err
    assert main(["run", "--export", str(tmp_path / "nope.zip"), "--model", tiny_model,
                 "--output", str(tmp_path / "out")]) == 2
    assert "found nothing there" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
