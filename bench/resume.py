"""Benchmark: how much of a killed run's fetching a rerun keeps.

One loopback host serves N images at `--per_host_rate`, so a run lasts long
enough to matter (N ÷ rate seconds: 1,600 at 8/s is 200 s). `gbif-embed run`
is killed with SIGKILL (its whole process group, as a preemption or an OOM
kill would) once about 60% of the images are fetched, then the same command
runs again. The host logs every request, so both figures come from outside:

    resume_kept = images the second run did not fetch ÷ images fetched before the kill

What a rerun must fetch again is what the first run fetched but had not yet
made durable in the image store: at most about `--checkpoint_seconds` (5 s)
of each host shard's fetching (the fetch stage writes the store as it goes;
rows it had not yet written are then embedded from the store, not fetched).

    .venv/bin/python bench/resume.py [--images 1600] [--rate 8] [--workers 1]

The last line is `resume_kept=<ratio>` (target >= 0.9).
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, log, model, write_export  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402
from tests.image_hosts import Host, ImageHosts  # noqa: E402


def _parts_rows(output: str) -> int:
    import pyarrow.parquet as pq
    rows = 0
    for path in (glob.glob(f"{output}/snapshot-*/parts/embeddings-*.parquet")
                 + glob.glob(f"{output}/snapshot-*/parts/failures-*.parquet")):
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except OSError:
            pass
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--rate", type=float, default=8.0, help="--per_host_rate")
    parser.add_argument("--kill_at", type=float, default=0.6,
                        help="kill once this share of the images is written or fetched")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes")
    parser.add_argument("--arch", default="tiny")
    args = parser.parse_args()

    print(f"cpu                 {describe_cpu()}")
    model_dir = model(args.arch)
    work = tempfile.mkdtemp(prefix="bench-resume-")
    output = os.path.join(work, "out")
    extra = (["--direct_running_mode", "multi_processing", "--direct_num_workers",
              str(args.workers)] if args.workers > 1 else [])
    host = [Host("127.0.0.2", latency=0.05)]

    def command(export: str) -> list[str]:
        return [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                "--export", export, "--model", model_dir, "--output", output, "--quiet",
                "--report_samples", "0", "--allow_private_networks", "127.0.0.0/8",
                "--per_host_rate", str(args.rate), "--per_host_concurrency", "2", *extra]

    with ImageHosts(host, os.path.join(work, "requests.tsv")) as farm:
        urls = [f"{farm.urls[0]}/img-{i}.jpg" for i in range(args.images)]
        export = write_export(os.path.join(work, "export.zip"), urls)
        log(f"first run: {args.images} images at {args.rate:g}/s, killed at about "
            f"{args.kill_at:.0%} ...")
        started = time.time()
        process = subprocess.Popen(command(export), cwd=ROOT, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The host is the limit: the kill comes when about that share is fetched.
        expected = started + args.kill_at * args.images / args.rate + 10
        while time.time() < expected and process.poll() is None:
            time.sleep(0.5)
        if process.poll() is not None:
            sys.exit(f"the first run ended before the kill:\n{process.stderr.read()[-2000:]}")
        written = _parts_rows(output)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_after = time.time() - started
        log("second run: the same command ...")
        second_started = time.time()
        done = subprocess.run(command(export), cwd=ROOT, capture_output=True, text=True)
        second_s = time.time() - second_started
    if done.returncode != 0:
        sys.exit(f"the second run failed:\n{done.stderr[-3000:]}")
    seen = farm.requests()
    first = {path for _, arrived, _, path in seen if arrived < second_started}
    second = {path for _, arrived, _, path in seen if arrived >= second_started}
    not_fetched = args.images - len(second)
    print(f"first run           killed after {killed_after:.1f} s: {len(first)} images "
          f"fetched, {written} rows durable in parts")
    print(f"second run          {second_s:.1f} s: fetched {len(second)} images "
          f"({len(first & second)} of them fetched before the kill too)")
    print(f"resume_kept={not_fetched / max(1, len(first)):.3f}")


if __name__ == "__main__":
    main()
