"""Parquet files: schema, compression, and publishing a snapshot."""
from __future__ import annotations

import datetime
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.common.files import write_atomically
from transforms.write.snapshot import (
    LATEST,
    PublishSnapshot,
    read_latest,
    read_manifest,
)
from transforms.common.tally import MergeTallies
from transforms.write.parts import FAILURE_SCHEMA, WriteParquet, embedding_schema, to_table


def _row(i: int) -> dict:
    return {"gbifID": i, "identifier": f"http://h/{i}.jpg", "taxonKey": None,
            "scientificName": "Amanita muscaria", "width": 10, "height": 20,
            "embedding": np.full(256, i, np.float32), "model_fingerprint": "sha256:x",
            "embedded_at": datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc),
            "pixels": np.zeros(3)}  # extra keys are ignored


def test_to_table_schema_and_values():
    table = to_table([_row(1), _row(2)], embedding_schema())
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 256)
    assert table.column("gbifID").to_pylist() == [1, 2]
    assert table.column("taxonKey").null_count == 2
    assert np.asarray(table.column("embedding")[1].values).tolist() == [2.0] * 256


def test_pipeline_writes_files_and_publishes_last(tmp_path):
    out = str(tmp_path / "out")
    snapshot = "snapshot-test"
    folder = f"{out}/{snapshot}"
    manifest = {"snapshot": snapshot, "launched_at": "2026-11-26T00:00:00+00:00"}
    schemas = {"embeddings": embedding_schema(), "failures": FAILURE_SCHEMA}
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        rows = p | "Rows" >> beam.Create([_row(i) for i in range(50)])
        written = rows | "W" >> WriteParquet(folder, "embeddings", schemas["embeddings"])
        failed = (p | "NoFailures" >> beam.Create([])
                  | "F" >> WriteParquet(folder, "failures", FAILURE_SCHEMA))
        tally = (p | "T" >> beam.Create([{"skipped.not_still_image": 2, "export.rows": 52}])
                 | beam.CombineGlobally(MergeTallies()))
        _ = (written, failed, tally) | PublishSnapshot(out, snapshot, manifest, schemas)
    assert read_latest(out) == snapshot
    result = read_manifest(out)
    assert result["counts"]["embedded"] == 50
    assert result["counts"]["accounted"] == 52 == result["counts"]["export_rows"]
    files = sorted(p.name for p in (tmp_path / "out" / snapshot).iterdir())
    assert files[-1] == "manifest.json" and "failures-empty.parquet" in files
    emb = [f for f in files if f.startswith("embeddings-")]
    table = pq.read_table([str(tmp_path / "out" / snapshot / f) for f in emb])
    assert table.num_rows == 50
    assert pq.ParquetFile(str(tmp_path / "out" / snapshot / emb[0])).metadata.row_group(0) \
        .column(0).compression == "ZSTD"
    assert pq.read_table(str(tmp_path / "out" / snapshot / "failures-empty.parquet")).schema \
        .equals(FAILURE_SCHEMA)


def test_latest_is_replaced_atomically(tmp_path):
    path = str(tmp_path / LATEST)
    write_atomically(path, "a\n")
    write_atomically(path, "b\n")
    assert open(path).read() == "b\n"
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]
    assert json.dumps(read_latest(str(tmp_path))) == '"b"'


def test_parts_are_closed_as_rows_come_and_a_writer_merges_its_small_ones(tmp_path,
                                                                          monkeypatch):
    """Durable progress: a part every `rows_per_part` rows (nothing waits for the
    bundle's end), and every MERGE_PARTS parts one merged part instead."""
    import os

    import transforms.write.parts as write
    monkeypatch.setattr(write, "MERGE_PARTS", 4)
    folder = str(tmp_path / "snap")
    with beam.Pipeline(runner="BundleBasedDirectRunner") as p:
        _ = (p | beam.Create([_row(i) for i in range(10)])
             | WriteParquet(folder, "embeddings", embedding_schema(), rows_per_part=1))
    parts = sorted(os.listdir(write.parts_folder(folder)))
    assert len(parts) == 10 - 8 + 2  # two merges of four parts, two parts left
    table = pq.read_table([os.path.join(write.parts_folder(folder), p) for p in parts])
    assert sorted(table.column("gbifID").to_pylist()) == list(range(10))
