"""Benchmark: does a run's memory stay flat as the number of images grows?

Runs the whole pipeline (`python -m pipeline run`, in-process runner, the
`tiny` stand-in model) on exports of N and 10×N images served from a
loopback server in another process, each run in a fresh process, and
compares the runs' peak resident memory (ru_maxrss of the finished child).
The pictures are small synthetic JPEGs (--size, default 320x240), each
served under many distinct URLs; the loopback host's politeness limit is
opened (one host serves everything; 20 requests/s would make the run take
minutes without changing what is measured).

    .venv/bin/python bench/memory.py [--small 1000] [--large 10000]

The last line is `memory_growth=<peak RSS large ÷ peak RSS small>`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def _pictures(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
    names = []
    for i in range(count):
        name = f"photo_{i:03d}.jpg"
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(jpeg_bytes(synthetic_photo(i, i % 5, size)))
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--pictures", type=int, default=20, help="distinct JPEG files")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--beam_arg", action="append", default=[],
                        help="extra pipeline flag, e.g. --beam_arg=--decode_threads=1")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    size = tuple(int(v) for v in args.size.split("x"))
    model_dir = common.model("tiny")
    work = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        images = os.path.join(work, "images")
        os.makedirs(images)
        names = _pictures(images, args.pictures, size)
        results = {}
        with common.serve(images, distinct=True) as base_url:
            for n in (args.small, args.large):
                urls = [f"{base_url}{names[i % len(names)]}?copy={i}" for i in range(n)]
                export = common.write_export(os.path.join(work, f"export-{n}.zip"), urls)
                output = os.path.join(work, f"out-{n}")
                argv = [sys.executable, "-m", "pipeline", "run",
                        *common.pipeline_args(export, model_dir, output, args.batch_size,
                                              ["--per_host_rate", "0", *args.beam_arg])]
                log(f"running {n} images ...")
                peak, seconds, _ = common.peak_rss_mb_of_child(
                    argv, env=dict(os.environ, PYTHONPATH=common.ROOT))
                manifest = _manifest(output)
                embedded = manifest["counts"]["embedded"]
                if embedded != n:
                    sys.exit(f"expected {n} embeddings, got {manifest['counts']}")
                results[n] = peak
                print(f"{n:>6} images: peak RSS {peak:7.1f} MB, {seconds:6.1f} s "
                      f"({n / seconds:.0f} images/s end to end)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"memory_growth={results[args.large] / results[args.small]:.3f}")


def _manifest(output: str) -> dict:
    with open(os.path.join(output, "LATEST")) as handle:
        snapshot = handle.read().strip()
    with open(os.path.join(output, snapshot, "manifest.json")) as handle:
        return json.load(handle)


if __name__ == "__main__":
    main()
