"""`gbif-embed demo`: the whole pipeline on a self-made GBIF export, offline.

The pictures are served from a real HTTP server on loopback, so the demo
runs exactly the code path of a real download (fetch, decode, embed,
write), including rows that must fail or be skipped. Loopback is refused
by default, so the demo opens 127.0.0.1/32 explicitly.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import socket
import threading
from typing import Iterator, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

DEFAULT_PORT = 8765


@contextlib.contextmanager
def serve_folder(folder: str, port: int = 0) -> Iterator[str]:
    """Serves `folder` on 127.0.0.1 in a background thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _free_port(preferred: int) -> int:
    """The preferred port keeps image URLs stable between demo runs, so a
    second run refreshes instead of redoing everything."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]


def demo(argv: Sequence[str]) -> int:
    from pipeline.cli import run
    from pipeline.demo.sample_data import make_sample
    parser = argparse.ArgumentParser(prog="gbif-embed demo", description=__doc__)
    parser.add_argument("--model", required=True, help="Embedder folder (make-model)")
    parser.add_argument("--workdir", default="demo", help="Where data and output go")
    parser.add_argument("--occurrences", type=int, default=40)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args, beam_args = parser.parse_known_args(argv)

    data = os.path.join(args.workdir, "data")
    output = os.path.join(args.workdir, "output")
    port = _free_port(args.port)
    sample = make_sample(data, f"http://127.0.0.1:{port}/", args.occurrences)
    print(f"demo export: {sample.export} ({len(sample.media)} media rows, "
          f"{sample.expected_images} good pictures, "
          f"{len(sample.expected_failures)} broken on purpose, "
          f"{sum(sample.expected_skips.values())} to skip)")
    with serve_folder(sample.images_dir, port) as base_url:
        print(f"serving its pictures at {base_url}")
        manifest = run(PipelineOptions([
            "--export", sample.export, "--model", args.model, "--output", output,
            "--allow_private_networks", "127.0.0.1/32", *beam_args]))
    folder = os.path.join(output, manifest["snapshot"])
    print(f"\nParquet: {folder}/embeddings-*.parquet (failures in failures-*.parquet)")
    print("read it:  .venv/bin/python -c \"import glob, pyarrow.parquet as pq; "
          f"print(pq.ParquetDataset(glob.glob('{folder}/embeddings-*.parquet')).read()"
          ".select(['gbifID', 'scientificName', 'identifier']).slice(0, 5))\"")
    return 0
