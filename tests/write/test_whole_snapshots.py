"""Whole snapshots only: LATEST moves only when every row of the export is
accounted for and every file counted reads back."""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pytest

from transforms.write.parts import (
    FAILURE_SCHEMA,
    THUMBNAIL_SCHEMA,
    PartWriter,
    embedding_schema,
    parts_folder,
)
from transforms.common.files import join, write_atomically
from transforms.write.snapshot import (
    INCOMPLETE,
    LATEST,
    MANIFEST,
    publish,
    read_incomplete,
    read_latest,
)

SCHEMAS = {"embeddings": embedding_schema(8), "failures": FAILURE_SCHEMA,
           "thumbnails": THUMBNAIL_SCHEMA}


def _prepared(output: str, snapshot: str, embedded: int, failed: int) -> list[str]:
    """A run's folder as the writers leave it before publishing: one part per row."""
    folder = join(output, snapshot)
    paths = []
    writer = PartWriter(parts_folder(folder), "embeddings", SCHEMAS["embeddings"])
    for i in range(embedded):
        writer.add({"coreID": str(i), "gbifID": i, "identifier": f"http://h/{i}.jpg",
                    "embedding": np.full(8, i, np.float32), "model_fingerprint": "sha256:x",
                    "embedded_at": datetime.datetime.now(datetime.timezone.utc)})
        paths.append(writer.flush()[0])
    writer = PartWriter(parts_folder(folder), "failures", SCHEMAS["failures"])
    for i in range(embedded, embedded + failed):
        writer.add({"coreID": str(i), "gbifID": i, "identifier": f"http://h/{i}.jpg",
                    "stage": "fetch", "reason": "http_404", "attempts": 1, "detail": ""})
        paths.append(writer.flush()[0])
    return paths


def _manifest(snapshot: str) -> dict:
    return {"snapshot": snapshot,
            "launched_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def _tally(rows: int, skipped: int = 0) -> dict:
    return {"export.rows": rows + skipped, **({"skipped.not_still_image": skipped}
                                             if skipped else {})}


def test_a_whole_snapshot_is_published(tmp_path):
    output = str(tmp_path / "out")
    _prepared(output, "snapshot-a", embedded=4, failed=2)
    result = publish(output, "snapshot-a", _manifest("snapshot-a"), SCHEMAS, _tally(6, 1))
    assert "incomplete" not in result
    assert result["counts"]["accounted"] == result["counts"]["export_rows"] == 7
    assert read_latest(output) == "snapshot-a"
    assert read_incomplete(output, "snapshot-a") is None


def test_a_part_deleted_before_publishing_keeps_the_previous_latest(tmp_path):
    """A part lost between writing and publishing (a bug, a hand, a lifecycle
    rule): the snapshot is left unpublished and says which counts differ."""
    output = str(tmp_path / "out")
    write_atomically(join(output, LATEST), "snapshot-previous\n")
    parts = _prepared(output, "snapshot-b", embedded=5, failed=3)
    os.remove(parts[1])  # an embeddings part
    os.remove(parts[6])  # a failures part
    result = publish(output, "snapshot-b", _manifest("snapshot-b"), SCHEMAS, _tally(8))
    assert read_latest(output) == "snapshot-previous"  # LATEST did not move
    message = result["incomplete"]
    assert ("embedded 4 + failed 2 + skipped 0 = 6, but the export has 8 image rows "
            "(2 unaccounted)") in message
    assert "LATEST still names snapshot-previous" in message
    folder = tmp_path / "out" / "snapshot-b"
    assert not (folder / MANIFEST).exists()
    marked = json.loads((folder / INCOMPLETE).read_text())
    assert marked["differences"]["rows"] == {"export_rows": 8, "embedded": 4, "failed": 2,
                                             "skipped": 0, "accounted": 6, "unaccounted": 2}
    # The parts stay for a rerun to resume from; no half-snapshot files are left.
    assert len(os.listdir(folder / "parts")) == 6
    assert not [n for n in os.listdir(folder) if n.endswith(".parquet")]


def test_a_part_that_cannot_be_read_is_named(tmp_path):
    output = str(tmp_path / "out")
    parts = _prepared(output, "snapshot-c", embedded=3, failed=0)
    with open(parts[0], "wb") as handle:
        handle.write(b"not parquet")
    result = publish(output, "snapshot-c", _manifest("snapshot-c"), SCHEMAS, _tally(3))
    assert "a part cannot be read" in result["incomplete"]
    assert read_latest(output) is None


def test_the_command_exits_non_zero_naming_the_counts(tmp_path, tiny_model, monkeypatch):
    """End to end: a run whose publishing finds rows missing exits 4 with the
    message, and LATEST stays where it was."""
    import subprocess
    import sys

    from pipeline.demo.demo import serve_folder
    from pipeline.demo.sample_data import make_sample
    from tests.conftest import LOOPBACK, ROOT
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    with serve_folder(str(images)) as base_url:
        sample = make_sample(str(tmp_path / "data"), base_url, 4, photo_size=(120, 90),
                             with_problems=False)
        output = str(tmp_path / "out")
        env = dict(os.environ, GBIF_EMBED_TEST_DROP_PART_BEFORE_PUBLISH="embeddings")
        done = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
             "--export", sample.export, "--model", tiny_model, "--output", output, "--quiet",
             "--checkpoint_rows", "1", *LOOPBACK],
            cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr
    assert "is incomplete and was not published" in done.stderr
    assert "unaccounted" in done.stderr and "Traceback" not in done.stderr
    assert read_latest(output) is None
