"""Benchmark: a run's fixed cost, the time beyond its images' own work.

`gbif-embed run` (the whole command, as a user starts it: start-up, imports,
the checks, the pipeline, publishing, report.html) on n and 3n distinct
images of the 12 real photographs, served from a loopback server, with the
Inception-v4 stand-in. Runs take T(n) = F + n × c, so the fixed cost is
F = (3 × T(n) − T(3n)) ÷ 2. Then the same command again on the 3n export,
where nothing changed: a refresh with nothing to fetch or embed.

    .venv/bin/python bench/fixed_cost.py [--images 160]

The last line is `fixed_cost_s=<seconds>` (target < 8 s on a 2-core machine).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def _timed_run(export: str, model_dir: str, output: str) -> tuple[float, str]:
    argv = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
            "--export", export, "--model", model_dir, "--output", output,
            "--allow_private_networks", "127.0.0.1/32", "--per_host_rate", "0"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=common.ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the run failed:\n{done.stderr[-3000:]}")
    timeline = next((line for line in done.stdout.splitlines() if line.startswith("time ")), "")
    return seconds, timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--arch", default="inception_v4")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    model_dir = common.model(args.arch)
    work = tempfile.mkdtemp(prefix="bench-fixed-")
    try:
        images, names = common.photo_links(work)
        with common.serve(images, distinct=True) as base_url:
            results = {}
            for n in (args.images, 3 * args.images):
                urls = [f"{base_url}{names[i % len(names)]}?copy={i}" for i in range(n)]
                export = common.write_export(os.path.join(work, f"export-{n}.zip"), urls)
                common.log(f"a first run of {n} images ...")
                results[n] = _timed_run(export, model_dir, os.path.join(work, f"out-{n}"))
            common.log("the same command again: a refresh with nothing to do ...")
            refresh = _timed_run(export, model_dir, os.path.join(work, f"out-{3 * args.images}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t1, t3 = results[args.images][0], results[3 * args.images][0]
    for n, (seconds, timeline) in results.items():
        print(f"first run, {n:>4} images  {seconds:6.1f} s   {timeline}")
    print(f"refresh, nothing to do  {refresh[0]:6.1f} s   {refresh[1]}")
    print(f"per image           {(t3 - t1) / (2 * args.images):.3f} s")
    print(f"fixed_cost_s={(3 * t1 - t3) / 2:.1f}")


if __name__ == "__main__":
    main()
