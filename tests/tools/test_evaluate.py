"""Recall@k on synthetic snapshots whose answers are known by construction."""
from __future__ import annotations

import datetime
import itertools
import json
import math
import os
from typing import Optional, Sequence

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.tools.evaluate import EvaluationError, evaluate, read_evaluation, write_evaluation
from pipeline.tools.query import iter_blocks, normalize, open_snapshot, search, vectors_at
from transforms.common.files import join, write_atomically
from transforms.write.parts import embedding_schema, to_table

DIM = 64
FINGERPRINT = "sha256:" + "ab" * 16
_numbers = itertools.count()


def row(gbif_id: int, name: Optional[str], vector: Sequence[float], *,
        identifier: Optional[str] = None, taxon_key: Optional[int] = None) -> dict:
    """One embeddings row with the project's columns (most left empty)."""
    vector = np.zeros(DIM, np.float32) + np.asarray(
        list(vector) + [0.0] * (DIM - len(vector)), np.float32)
    return {"gbifID": gbif_id, "occurrenceID": f"urn:occ:{gbif_id}",
            "datasetKey": "84d26682-f762-11e1-a439-00145eb45e9a", "taxonKey": taxon_key,
            "scientificName": name,
            "identifier": identifier or f"http://127.0.0.1:9/{gbif_id}-{next(_numbers)}.jpg",
            "license": "CC_BY_4_0", "rightsHolder": "Test", "creator": "Test",
            "image_sha256": "0" * 64, "width": 640, "height": 480, "etag": None,
            "last_modified": None, "model_fingerprint": FINGERPRINT,
            "embedded_at": datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc),
            "embedding": vector}


def write_snapshot(output: str, rows: list[dict], files: int = 2,
                   name: str = "snapshot-20261126T120000.000000Z-test",
                   options: Optional[dict] = None, previous: Optional[str] = None) -> str:
    """A published snapshot: Parquet files, manifest.json and LATEST, like a run writes."""
    folder = join(output, name)
    fs, _, (root,) = fsspec.get_fs_token_paths(folder)
    fs.makedirs(root, exist_ok=True)
    listed = []
    for i, part in enumerate(np.array_split(np.arange(len(rows)), files)):
        path = f"embeddings-{i:04d}.parquet"
        with fsspec.open(join(folder, path), "wb") as handle:
            pq.write_table(to_table([rows[j] for j in part], embedding_schema(DIM))
                           if len(part) else embedding_schema(DIM).empty_table(), handle)
        listed.append({"path": path, "rows": int(len(part))})
    manifest = {
        "snapshot": name, "previous_snapshot": previous,
        "refresh_mode": "refresh" if previous else "first run",
        "launched_at": "2026-11-26T12:00:00+00:00", "finished_at": "2026-11-26T12:01:00+00:00",
        "export": {"path": "export.zip", "download_key": "0000001-261126000000000",
                   "doi": "10.15468/dl.synth1"},
        "model": {"uri": "/nowhere/model", "fingerprint": FINGERPRINT, "embedding_dim": DIM},
        "options": options or {},
        "counts": {"export_rows": len(rows) + 3, "embedded": len(rows), "failed": 2,
                   "skipped": 1, "accounted": len(rows) + 3,
                   "skipped_by_reason": {"not_still_image": 1},
                   "failed_by_reason": {"fetch.http_404": 1, "decode.truncated": 1},
                   "reused": 0, "new": 0, "reembedded": 0, "removed": 0,
                   "retried_failures": 0},
        "files": {"embeddings": listed, "failures": []},
        "fetch": {"fetch.requests": len(rows) + 2, "fetch.ok": len(rows) + 1,
                  "fetch.bytes": 123456, "fetch.retries": 1},
        "timings": {"seconds": 60.0, "images_per_second": len(rows) / 60.0},
    }
    write_atomically(join(folder, "manifest.json"), json.dumps(manifest))
    write_atomically(join(output, "LATEST"), name + "\n")
    return folder


def at(degrees: float, plane: int) -> list[float]:
    """A unit vector at an angle in its own plane: planes are orthogonal, so
    images of different groups have cosine 0 and never outrank their own group."""
    vector = [0.0] * DIM
    vector[2 * plane] = math.cos(math.radians(degrees))
    vector[2 * plane + 1] = math.sin(math.radians(degrees))
    return vector


def ranked_groups() -> list[dict]:
    """Four groups; in group g a query Q and its only match H (label "Species g",
    another occurrence) at 40°, with d distractors of single-occurrence labels
    closer to Q (at -2°, -4°, ...) but farther from H than Q is. So H always finds
    Q first, and Q finds H at rank d + 1: d = 0, 2, 6, 10 → ranks 1, 3, 7, 11."""
    rows, gbif_id = [], 1000
    for plane, distractors in enumerate((0, 2, 6, 10)):
        rows.append(row(gbif_id, f"Species {plane}", at(0, plane)))
        rows.append(row(gbif_id + 1, f"Species {plane}", at(40, plane)))
        for i in range(distractors):
            rows.append(row(gbif_id + 2 + i, f"Single {plane}-{i}", at(-2 * (i + 1), plane)))
        gbif_id += 100
    return rows


def test_recall_matches_the_construction(tmp_path):
    """8 queries: the 4 H find Q at rank 1; the 4 Q find H at ranks 1, 3, 7, 11."""
    output = str(tmp_path / "out")
    write_snapshot(output, ranked_groups())
    result = evaluate(output)
    assert result["recall"] == {"1": 5 / 8, "5": 6 / 8, "10": 7 / 8}
    assert result["queries"] == result["eligible_queries"] == 8
    assert result["singleton_labels"] == 18 and result["singleton_label_images"] == 18
    assert result["gallery_images"] == 26 and not result["sampled"]
    assert result["published"] == {"1": 0.399, "5": 0.6}


def test_rows_without_a_label_are_left_out_of_queries_and_gallery(tmp_path):
    """An unlabelled image right beside Q of group 0 would push H to rank 2."""
    rows = ranked_groups()
    rows.append(row(9001, None, at(0.5, 0)))
    rows.append(row(9002, "", at(0.5, 0)))  # an empty name is no name
    output = str(tmp_path / "out")
    write_snapshot(output, rows)
    result = evaluate(output)
    assert result["recall"]["1"] == 5 / 8
    assert result["rows_without_label"] == 2 and result["queries"] == 8


def test_images_of_the_same_occurrence_are_not_neighbours(tmp_path):
    """Occurrence 1 has two near-identical images; its species' other occurrence is
    beyond a distractor. Counting the twin would give Recall@1 = 2/3; the rule gives 0."""
    rows = [row(1, "Amanita muscaria", at(0, 0)), row(1, "Amanita muscaria", at(1, 0)),
            row(3, "Boletus edulis", at(10, 0)),
            row(2, "Amanita muscaria", at(30, 0))]
    output = str(tmp_path / "out")
    write_snapshot(output, rows, files=1)
    result = evaluate(output)
    assert result["recall"] == {"1": 0.0, "5": 1.0, "10": 1.0}
    assert result["queries"] == 3  # the Boletus is a single occurrence

    snapshot = open_snapshot(output)
    queries = vectors_at(snapshot.files, [0])
    found = search(queries, iter_blocks(snapshot.files), 2)
    assert found.rows[0].tolist() == [0, 1]  # without the rule the twin would come first
    from pipeline.tools.query import occurrence_number  # occurrences are numbered by core id
    found = search(queries, iter_blocks(snapshot.files), 2,
                   query_ids=np.array([occurrence_number("1")]))
    assert found.rows[0].tolist() == [2, 3]


def test_a_label_with_one_occurrence_is_no_query_even_with_several_images(tmp_path):
    rows = ranked_groups()
    rows += [row(7000, "Only once", at(0, 20)), row(7000, "Only once", at(5, 20))]
    output = str(tmp_path / "out")
    write_snapshot(output, rows)
    result = evaluate(output)
    assert result["queries"] == 8 and result["singleton_labels"] == 19
    assert result["singleton_label_images"] == 20


def random_rows(n: int = 400, labels: int = 25, seed: int = 3) -> list[dict]:
    """Clustered random vectors, some occurrences with several images."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((labels, DIM))
    rows, gbif_id = [], 0
    while len(rows) < n:
        label = int(rng.integers(labels))
        gbif_id += 1
        for _ in range(int(rng.integers(1, 4))):
            rows.append(row(gbif_id, f"Species {label}", centres[label] + rng.standard_normal(DIM),
                            taxon_key=5000 + label))
    return rows[:n]


def test_chunked_search_gives_the_unchunked_answer(tmp_path):
    output = str(tmp_path / "out")
    write_snapshot(output, random_rows(), files=3)
    whole = evaluate(output, query_block=10_000, gallery_block=10_000)
    tiny = evaluate(output, query_block=7, gallery_block=13)
    for key in ("evaluated_at", "seconds"):
        whole.pop(key), tiny.pop(key)
    assert whole == tiny
    assert 0 < whole["recall"]["1"] <= whole["recall"]["5"] <= whole["recall"]["10"] <= 1

    snapshot = open_snapshot(output)
    rows = list(range(0, 400, 9))
    vectors = vectors_at(snapshot.files, rows)
    a = search(vectors, iter_blocks(snapshot.files, 10_000), 10, query_block=10_000)
    b = search(vectors, iter_blocks(snapshot.files, 13), 10, query_block=7)
    assert (a.rows == b.rows).all() and np.allclose(a.scores, b.scores)
    # and both are the brute-force answer
    everything = normalize(np.stack([r["embedding"] for r in random_rows()]))
    scores = vectors @ everything.T
    assert (np.argsort(-scores, axis=1, kind="stable")[:, :10] == a.rows).all()


def test_sampled_queries_are_reproducible_and_reported(tmp_path):
    output = str(tmp_path / "out")
    write_snapshot(output, random_rows())
    first = evaluate(output, queries=50, seed=7)
    again = evaluate(output, queries=50, seed=7)
    assert first["queries"] == 50 and first["sampled"] and first["eligible_queries"] > 50
    assert first["recall"] == again["recall"]
    by_taxon = evaluate(output, label="taxonKey", queries=0)
    by_name = evaluate(output, label="scientificName", queries=0)
    assert by_taxon["recall"] == by_name["recall"]  # one taxonKey per name here
    assert not by_name["sampled"]


def test_nothing_to_evaluate_says_why(tmp_path):
    output = str(tmp_path / "out")
    write_snapshot(output, [row(1, "A", at(0, 0)), row(2, "B", at(5, 0))])
    with pytest.raises(EvaluationError, match="at least two occurrences"):
        evaluate(output)


def test_cli_prints_the_table_and_writes_evaluation_json(tmp_path, capsys):
    output = str(tmp_path / "out")
    folder = write_snapshot(output, ranked_groups())
    assert main(["evaluate", "--output", output]) == 0
    printed = capsys.readouterr().out
    assert "Recall@k" in printed and "0.625" in printed and "0.399" in printed
    assert "8 queries" in printed
    saved = json.loads((tmp_path / "out" / os.path.basename(folder) / "evaluation.json")
                       .read_text())
    assert saved["recall"]["5"] == 0.75 and saved["label"] == "scientificName"
    report = (tmp_path / "out" / os.path.basename(folder) / "report.html").read_text()
    assert "Recall@5" in report and "0.750" in report  # evaluate rewrites the report

    assert main(["evaluate", "--output", str(tmp_path / "empty")]) == 2
    assert "no snapshot" in capsys.readouterr().err


def test_evaluation_on_gcs(gcs_bucket):
    output = f"{gcs_bucket}/evaluate-test"
    write_snapshot(output, ranked_groups())
    result = evaluate(output)
    path = write_evaluation(output, result)
    assert path.startswith("gs://")
    assert read_evaluation(join(output, result["snapshot"]))["recall"]["1"] == 5 / 8
