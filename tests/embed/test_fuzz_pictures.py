"""Every picture ends as a row: random, truncated and damaged JPEG, PNG, WebP
and GIF bytes served by a loopback host, through the whole run (fetch, the
store's copy, decode, thumbnail, inference, writing, publishing)."""
from __future__ import annotations

import glob
import io
import os

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from pipeline.cli import run
from pipeline.demo.sample_data import Media, Occurrence, synthetic_photo, write_dwca
from tests.conftest import LOOPBACK
from tests.http_server import FaultServer
from transforms.write.parts import read_rows
from transforms.common.files import join
from transforms.write.snapshot import read_latest

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def _bodies(seed: int) -> list[tuple[str, bytes]]:
    """(content type, body) pairs: for each format a whole picture, cuts at
    random points, flipped bytes, the format's header followed by noise, and
    noise alone."""
    rng = np.random.default_rng(seed)
    bodies = []
    for k, (fmt, mime) in enumerate(FORMATS.items()):
        buffer = io.BytesIO()
        synthetic_photo(seed + k, size=(int(rng.integers(40, 700)),
                                        int(rng.integers(40, 500)))).save(buffer, fmt)
        whole = buffer.getvalue()
        bodies.append((mime, whole))
        for cut in sorted(rng.integers(1, len(whole), 4)):
            bodies.append((mime, whole[:int(cut)]))
        for _ in range(3):
            damaged = bytearray(whole)
            for at in rng.integers(0, len(whole), int(rng.integers(1, 40))):
                damaged[int(at)] = int(rng.integers(0, 256))
            bodies.append((mime, bytes(damaged)))
        bodies.append((mime, whole[:32] + rng.bytes(int(rng.integers(1, 5000)))))
        bodies.append((mime, rng.bytes(int(rng.integers(1, 3000)))))
    return bodies


def test_every_fuzzed_picture_ends_as_an_embedding_or_a_failure_row(tmp_path, tiny_model):
    bodies = _bodies(seed=2024)
    with FaultServer() as server:
        media, occurrences = [], []
        for i, (mime, body) in enumerate(bodies):
            url = server.add(f"/fuzz/{i}", body, headers={"Content-Type": mime})
            occurrences.append(Occurrence(gbifID=1000 + i, occurrenceID=f"o{i}",
                                          datasetKey="d", taxonKey=1, scientificName="S"))
            media.append(Media(1000 + i, url))
        export = write_dwca(str(tmp_path / "fuzz.zip"), occurrences, media)
        output = str(tmp_path / "out")
        manifest = run(PipelineOptions([
            "--export", export, "--model", tiny_model, "--output", output, "--quiet",
            "--batch_size", "4", *LOOPBACK]))
    counts = manifest["counts"]
    assert counts["export_rows"] == len(bodies)
    assert counts["accounted"] == len(bodies) and counts["skipped"] == 0, counts
    folder = join(output, read_latest(output))
    embedded = read_rows(sorted(glob.glob(os.path.join(folder, "embeddings-*.parquet"))),
                         ["gbifID"]).column("gbifID").to_pylist()
    failures = read_rows(sorted(glob.glob(os.path.join(folder, "failures-*.parquet"))),
                         ["gbifID", "stage", "reason"]).to_pylist()
    ids = sorted(embedded + [f["gbifID"] for f in failures])
    assert ids == [1000 + i for i in range(len(bodies))]  # each row once, none lost
    assert all(f["reason"] for f in failures)
    assert len(embedded) >= len(FORMATS)  # the whole pictures at least
    reasons = {f["reason"] for f in failures}
    assert reasons <= {"not_an_image", "truncated", "corrupt", "empty_body",
                       "decompression_bomb", "internal_error", "inference_error"}, reasons
