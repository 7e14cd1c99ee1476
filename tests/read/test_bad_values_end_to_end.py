"""End to end: values that once killed a run (a gbifID beyond int64) now end
as a counted skip, and a line beyond the cap as a failure row in Parquet."""
from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq

from pipeline.cli import main
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
from tests.conftest import LOOPBACK
from tests.read.archives import gbif_files, media_row, occurrence_row, write
from transforms.read.rows import LINE_CAP
from transforms.write.snapshot import read_latest, read_manifest

BEYOND_INT64 = "99999999999999999999999"


def test_out_of_range_ids_and_a_huge_line_do_not_fail_the_run(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(jpeg_bytes(synthetic_photo(len(name), size=(96, 72))))
    with serve_folder(str(images)) as base:
        huge = media_row("2", base + "huge.jpg")
        huge[6] = "d" * (LINE_CAP + 10)
        media = [media_row("1", base + "a.jpg"), media_row(BEYOND_INT64, base + "b.jpg"),
                 media_row("2", base + "c.jpg"), huge, media_row("1", "javascript:alert(1)")]
        occurrences = [occurrence_row("1", taxon_key=BEYOND_INT64), occurrence_row("2"),
                       occurrence_row(BEYOND_INT64)]
        export = write(str(tmp_path / "export.zip"), gbif_files(media, occurrences))
        output = str(tmp_path / "out")
        code = main(["run", "--export", export, "--model", tiny_model, "--output", output,
                     "--quiet", *LOOPBACK])
    assert code == 0
    counts = read_manifest(output)["counts"]
    assert counts["accounted"] == counts["export_rows"] == 5
    assert counts["embedded"] == 2
    assert counts["skipped_by_reason"] == {"bad_gbif_id": 1}
    assert counts["failed_by_reason"]["read.row_too_long"] == 1
    folder = os.path.join(output, read_latest(output))
    failures = pq.ParquetDataset(sorted(glob.glob(f"{folder}/failures-*.parquet"))).read()
    read = [f for f in failures.to_pylist() if f["stage"] == "read"]
    assert [(f["gbifID"], f["identifier"]) for f in read] == [(2, base + "huge.jpg")]
    embeddings = pq.ParquetDataset(sorted(glob.glob(f"{folder}/embeddings-*.parquet"))).read()
    taxon = dict(zip(embeddings.column("gbifID").to_pylist(),
                     embeddings.column("taxonKey").to_pylist()))
    assert taxon == {1: None, 2: 5248454}
