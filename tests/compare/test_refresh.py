"""Refreshing a snapshot: reuse, add, drop, retry, revalidate, switch models, survive kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.models.make_model import build_model
from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo, write_dwca
from tests.conftest import LOOPBACK
from transforms.compare import planning
from tests.http_server import FaultServer
from transforms.write.snapshot import read_latest, read_manifest


def _photo(i: int) -> bytes:
    return jpeg_bytes(synthetic_photo(i, species=i % 3, size=(160, 120)))


def _export(path, server: FaultServer, ids: list[int], taxon_offset: int = 0) -> str:
    """An export whose occurrence i has one image /img/<i>.jpg."""
    occurrences = [Occurrence(gbifID=1000 + i, occurrenceID=f"urn:occ:{i}",
                              datasetKey="84d26682-f762-11e1-a439-00145eb45e9a",
                              taxonKey=5000 + i + taxon_offset,
                              scientificName=f"Species {i + taxon_offset}") for i in ids]
    media = [Media(gbifID=1000 + i, identifier=server.url(f"/img/{i}.jpg")) for i in ids]
    return write_dwca(str(path), occurrences, media)


def _run(export: str, model: str, output: str, *extra: str) -> dict:
    """No thumbnails in report.html: these tests count every request the host sees."""
    return run(PipelineOptions(["--export", export, "--model", model, "--output", output,
                                "--quiet", "--batch_size", "4", "--report_samples", "0",
                                *LOOPBACK, *extra]))


def _rows(output: str, snapshot: str = None) -> dict:
    fs, _, (root,) = fsspec.get_fs_token_paths(output)
    snapshot = snapshot or read_latest(output)
    fs.invalidate_cache()
    paths = sorted(fs.glob(f"{root}/{snapshot}/embeddings-*.parquet"))
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    rows = {}
    for table in tables:
        for row in table.to_pylist():
            rows[row["gbifID"] - 1000] = row
    return rows


@pytest.fixture
def server():
    with FaultServer() as srv:
        for i in range(12):
            srv.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg",
                                                         "ETag": f'"v1-{i}"'})
        yield srv


def _hits(server: FaultServer, ids) -> dict:
    return {i: server.hits(f"/img/{i}.jpg") for i in ids}


def test_refresh_fetches_only_new_images_and_reuses_the_rest(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    first = _run(_export(tmp_path / "a.zip", server, [0, 1, 2, 3, 4, 5]), tiny_model, output)
    assert first["counts"]["embedded"] == 6 and first["counts"]["new"] == 6
    before = _rows(output)
    hits = _hits(server, range(12))

    # Drop 0 and 1, keep 2-5 (with a re-identified taxon), add 6 and 7.
    second = _run(_export(tmp_path / "b.zip", server, [2, 3, 4, 5, 6, 7], taxon_offset=100),
                  tiny_model, output)
    counts = second["counts"]
    assert (counts["reused"], counts["new"], counts["removed"]) == (4, 2, 2)
    assert counts["embedded"] == 6 and counts["failed"] == 0
    assert second["previous_snapshot"] == first["snapshot"]
    assert second["tally"]["embed.inferred"] == 2
    after = _hits(server, range(12))
    assert {i: after[i] - hits[i] for i in range(12) if after[i] != hits[i]} == {6: 1, 7: 1}

    rows = _rows(output)
    assert sorted(rows) == [2, 3, 4, 5, 6, 7]
    for i in (2, 3, 4, 5):  # embedding bytes copied, occurrence fields taken fresh
        assert rows[i]["embedding"] == before[i]["embedding"]
        assert np.asarray(rows[i]["embedding"], np.float32).tobytes() == \
            np.asarray(before[i]["embedding"], np.float32).tobytes()
        assert rows[i]["embedded_at"] == before[i]["embedded_at"]
        assert rows[i]["image_sha256"] == before[i]["image_sha256"]
        assert rows[i]["taxonKey"] == 5000 + i + 100
    # The previous snapshot is kept and still readable.
    assert sorted(_rows(output, first["snapshot"])) == [0, 1, 2, 3, 4, 5]


def test_unchanged_export_refresh_fetches_and_infers_nothing(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1, 2])
    _run(export, tiny_model, output)
    hits = _hits(server, range(3))
    again = _run(export, tiny_model, output)
    assert _hits(server, range(3)) == hits
    assert again["counts"]["reused"] == 3 and again["counts"]["embedded"] == 3
    assert again["tally"].get("embed.inferred", 0) == 0
    assert again["tally"].get("fetch.requests", 0) == 0
    full = _run(export, tiny_model, output, "--full")
    assert full["refresh_mode"] == "full" and full["counts"]["new"] == 3
    assert full["tally"]["embed.inferred"] == 3


def test_failures_are_retried_on_the_next_run(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    server.add("/img/9.jpg", b"gone", status=404)
    export = _export(tmp_path / "a.zip", server, [0, 9])
    first = _run(export, tiny_model, output)
    assert first["counts"]["failed_by_reason"] == {"fetch.http_404": 1}
    server.add("/img/9.jpg", _photo(9), headers={"Content-Type": "image/jpeg"})
    # A 404 is remembered for --retry_failed_after days (tests/store/test_maintenance.py);
    # 0 asks again every run.
    second = _run(export, tiny_model, output, "--retry_failed_after", "0")
    assert second["counts"]["retried_failures"] == 1 and second["counts"]["reused"] == 1
    assert sorted(_rows(output)) == [0, 9]


@pytest.mark.parametrize("rows_per_part", [None, 1])
def test_revalidate_reembeds_only_changed_images(tmp_path, tiny_model, server, monkeypatch,
                                                 rows_per_part):
    """Also with the revalidated rows planned one per part: a whole dataset's
    are streamed to the plan in parts, never held at once."""
    parts = []
    if rows_per_part:
        monkeypatch.setattr(planning, "ROWS_PER_PART", rows_per_part)
        write_revalidate = planning._write_revalidate

        def counted(*args):
            parts.extend(write_revalidate(*args))
            return parts

        monkeypatch.setattr(planning, "_write_revalidate", counted)
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1, 2])
    _run(export, tiny_model, output)
    before = _rows(output)
    # 1: the host has new bytes under a new ETag; 2: new ETag, same bytes.
    server.add("/img/1.jpg", _photo(11), headers={"Content-Type": "image/jpeg",
                                                  "ETag": '"v2-1"'})
    server.add("/img/2.jpg", _photo(2), headers={"Content-Type": "image/jpeg",
                                                 "ETag": '"v2-2"'})
    second = _run(export, tiny_model, output, "--revalidate")
    counts = second["counts"]
    assert (counts["reused"], counts["reembedded"]) == (2, 1)
    assert second["tally"]["embed.inferred"] == 1
    sent = server.request_headers("/img/0.jpg")[-1]
    assert sent.get("If-None-Match") == '"v1-0"'
    rows = _rows(output)
    assert rows[0]["embedding"] == before[0]["embedding"]
    assert rows[2]["embedding"] == before[2]["embedding"]
    assert rows[1]["image_sha256"] != before[1]["image_sha256"]
    assert rows[1]["etag"] == '"v2-1"'
    assert len(parts) == (3 if rows_per_part else 0)


def test_another_model_reembeds_everything(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1])
    first = _run(export, tiny_model, output)
    other = str(tmp_path / "other-model")
    build_model(other, "tiny", seed=7)
    second = _run(export, other, output)
    assert second["counts"]["reembedded"] == 2 and second["counts"]["reused"] == 0
    fingerprints = {r["model_fingerprint"] for r in _rows(output).values()}
    assert fingerprints == {second["model"]["fingerprint"]} != {first["model"]["fingerprint"]}


def test_keep_snapshots_prunes_older_ones(tmp_path, tiny_model, server):
    output = tmp_path / "out"
    export = _export(tmp_path / "a.zip", server, [0])
    names = [_run(export, tiny_model, str(output))["snapshot"] for _ in range(3)]
    (output / "snapshot-00000000T000000.000000Z-dead").mkdir()  # a run that died long ago
    last = _run(export, tiny_model, str(output), "--keep_snapshots", "2")["snapshot"]
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("snapshot-")) == \
        [names[-1], last]


def test_kill_9_during_embedding_leaves_latest_readable(tmp_path, tiny_model):
    """A run killed at any point leaves LATEST and the previous snapshot as they were."""
    output = str(tmp_path / "out")
    with FaultServer() as slow:
        for i in range(40):
            slow.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg"},
                     delay=0.15 if i >= 2 else 0.0)
        first = _run(_export(tmp_path / "a.zip", slow, [0, 1]), tiny_model, output)
        export = _export(tmp_path / "b.zip", slow, list(range(40)))
        script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
        process = subprocess.Popen(
            [script, "run", "--export", export, "--model", tiny_model, "--output", output,
             "--batch_size", "2", "--fetch_concurrency", "2", *LOOPBACK],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while sum(slow.hits(f"/img/{i}.jpg") for i in range(2, 40)) < 8:
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert read_latest(output) == first["snapshot"]
        assert read_manifest(output)["counts"]["embedded"] == 2
        assert sorted(_rows(output)) == [0, 1]
        rerun = _run(export, tiny_model, output)
    assert read_latest(output) == rerun["snapshot"]
    # What the killed run had closed into parts is resumed (0 and 1 included, which
    # it had reused), the rest reused or new.
    counts = rerun["counts"]
    assert counts["reused"] + counts["resumed"] + counts["new"] == 40 == counts["embedded"]
    assert sorted(_rows(output)) == list(range(40))


def test_refresh_with_output_on_gcs(tmp_path, tiny_model, server, gcs_bucket):
    output = f"{gcs_bucket}/refresh-out"
    export = _export(tmp_path / "a.zip", server, [0, 1, 2])
    first = _run(export, tiny_model, output)
    hits = _hits(server, range(3))
    second = _run(_export(tmp_path / "b.zip", server, [1, 2, 3]), tiny_model, output)
    assert (second["counts"]["reused"], second["counts"]["new"],
            second["counts"]["removed"]) == (2, 1, 1)
    assert _hits(server, range(3)) == hits
    assert read_latest(output) == second["snapshot"] != first["snapshot"]
    assert sorted(_rows(output)) == [1, 2, 3]


def test_a_refresh_and_its_report_ask_no_host_for_an_unchanged_image(tmp_path, tiny_model,
                                                                     server):
    """report.html shows thumbnails the runs kept: the refresh's report sends no request
    for the 9 unchanged images (it carries their thumbnails from the first snapshot),
    and the 3 new images are fetched once, by the run."""
    output = str(tmp_path / "out")
    options = ["--model", tiny_model, "--output", output, "--quiet", "--batch_size", "4",
               *LOOPBACK]
    first = run(PipelineOptions(["--export", _export(tmp_path / "a.zip", server, range(9)),
                                 *options]))
    hits = _hits(server, range(12))
    assert all(hits[i] == 1 for i in range(9))  # the report fetched nothing either
    second = run(PipelineOptions(["--export", _export(tmp_path / "b.zip", server, range(12)),
                                  *options]))
    assert second["counts"]["reused"] == 9 and second["counts"]["new"] == 3
    assert _hits(server, range(12)) == {i: 1 for i in range(12)}
    for manifest in (first, second):
        with fsspec.open(f"{output}/{manifest['snapshot']}/report.html", "r") as handle:
            page = handle.read()
        assert page.count('<img src="data:image/jpeg') >= 30  # 6 images, 5 neighbours each
        assert "image unavailable" not in page
    carried = f"{output}/{second['snapshot']}/thumbnails-carried.parquet"
    assert pq.read_table(carried).num_rows == 9
