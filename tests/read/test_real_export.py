"""A real GBIF download (read in place from ../shared) through the whole pipeline.

Its image URLs point at iNaturalist, BugGuide and BOLD; here a loopback
server stands in for those hosts through `--mirror`, and plays them as
healthy (iNaturalist), gone (BugGuide: 404) and serving web pages (BOLD).
"""
from __future__ import annotations

import collections
import glob
import hashlib
import http.server
import os
import threading

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
from tests.conftest import LOOPBACK, shared_path


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    """/inat/...: a small JPEG per path; /bugguide/...: 404; /bold/...: HTML as image/jpeg."""

    def do_GET(self):
        if self.path.startswith("/inat/"):
            seed = int(hashlib.sha256(self.path.encode()).hexdigest()[:8], 16)
            body, status = jpeg_bytes(synthetic_photo(seed, size=(96, 72))), 200
        elif self.path.startswith("/bold/"):
            body, status = b"<!DOCTYPE html><html><body>BOLD record</body></html>", 200
        else:
            body, status = b"not found", 404
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MirrorHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield ",".join([f"https://static.inaturalist.org/={base}/inat/",
                    f"https://bugguide.net/={base}/bugguide/",
                    f"http://www.boldsystems.org/={base}/bold/"])
    server.shutdown()
    server.server_close()


def test_real_amblyomma_download_end_to_end(tmp_path, tiny_model, mirror):
    export = str(shared_path("gbif-samples", "amblyomma_dl_4gbcs6_2020_RECONSTRUCTED_"
                             "0022697-200613084148143.zip"))
    output = str(tmp_path / "out")
    manifest = run(PipelineOptions([
        "--export", export, "--model", tiny_model, "--output", output, "--quiet",
        "--mirror", mirror, "--per_host_rate", "1000", "--per_host_concurrency", "16",
        *LOOPBACK]))
    counts = manifest["counts"]
    assert manifest["export"]["doi"] == "10.15468/dl.4gbcs6"
    assert counts["embedded"] == 1225
    assert counts["failed_by_reason"] == {"fetch.http_404": 101, "fetch.not_an_image": 36}
    assert counts["accounted"] == counts["export_rows"] == 1362

    folder = os.path.join(output, manifest["snapshot"])
    rows = pq.ParquetDataset(sorted(glob.glob(f"{folder}/embeddings-*.parquet"))).read()
    assert all(u.startswith("https://static.inaturalist.org/")  # original identifiers kept
               for u in rows.column("identifier").to_pylist())
    names = collections.Counter(rows.column("scientificName").to_pylist())
    assert names.most_common(1)[0][0] == "Amblyomma americanum Linnaeus, 1758"
    assert None not in names  # every image found its occurrence
    assert rows.column("taxonKey").null_count == 0
    assert 2803144270 in set(rows.column("gbifID").to_pylist())  # the ID with a stray space
    failures = pq.ParquetDataset(sorted(glob.glob(f"{folder}/failures-*.parquet"))).read()
    assert set(failures.column("http_status").to_pylist()) == {404, 200}
