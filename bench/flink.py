"""Benchmark: the same export on a real Flink cluster (2 TaskManagers) and on
the local runner with 2 processes, on this one machine, in one run.

The export: `--images` distinct URLs of the real photographs of
../shared/data/fungi-images (read in place), from one loopback host with
its politeness limit opened (`--per_host_rate 0`), embedded by the
Inception-v4 stand-in at `--precision float32`. Each runner runs the export
twice: once with only its first batch (`--batch_size` images: that run's
wall time is the runner's fixed cost, for Flink the submission, Beam's job
server, the SDK workers' start and the model's load) and once whole. The
figure compares what comes after the first batch:

    flink_efficiency = (local wall - local first batch) / (Flink wall - Flink first batch)

The cluster is `gbif-embed flink start`'s (started if it is not up, on its
default ports); the run needs Beam's Flink job server jar, which the
benchmark checks first: without it, it says why and stops before measuring.

    .venv/bin/python bench/flink.py [--images 256] [--batch_size 16]

The first line is the CPU; the last is `flink_efficiency=<ratio>`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--arch", default="inception_v4")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}", flush=True)

    from pipeline.flink import cluster, distribution
    try:
        jar = str(distribution.job_server_jar())
        spec = cluster.default_spec()
        state = cluster.start(spec, say=log)
    except distribution.FlinkSetupError as err:
        sys.exit(f"flink: cannot run: {err}")
    flink = ["--runner", "FlinkRunner", "--flink_master", spec.master,
             "--flink_version", distribution.FLINK_MINOR, "--flink_job_server_jar", jar,
             "--environment_type", "EXTERNAL", "--environment_config", spec.environment_config,
             "--parallelism", str(len(state["taskmanagers"]))]
    local = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]

    model_dir = common.model(args.arch)
    work = tempfile.mkdtemp(prefix="bench-flink-")
    try:
        folder, names = common.photo_links(work)
        with common.serve(folder, distinct=True) as base_url:
            walls = {}
            for runner, flags in (("local", local), ("flink", flink)):
                for label, count in (("first batch", args.batch_size), ("all", args.images)):
                    urls = [f"{base_url}{names[i % len(names)]}?{runner}-{label[0]}={i}"
                            for i in range(count)]
                    export = common.write_export(
                        os.path.join(work, f"{runner}-{label[0]}.zip"), urls)
                    walls[runner, label] = _run(export, model_dir,
                                                os.path.join(work, f"out-{runner}-{label[0]}"),
                                                args.batch_size, count, flags)
                    log(f"{runner} {label}: {count} images in {walls[runner, label]:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = {runner: walls[runner, "all"] - walls[runner, "first batch"]
             for runner in ("local", "flink")}
    rest = args.images - args.batch_size
    print(f"images={args.images} batch_size={args.batch_size} model={args.arch} "
          f"flink={state['flink_version']} taskmanagers={len(state['taskmanagers'])} "
          f"local=2 processes (multi_processing)")
    for runner in ("local", "flink"):
        print(f"{runner}: first batch {walls[runner, 'first batch']:.1f} s (fixed cost), "
              f"all {walls[runner, 'all']:.1f} s, after the first batch {after[runner]:.1f} s "
              f"= {rest / after[runner]:.2f} images/s")
    print(f"flink_submission_fixed_cost_s={walls['flink', 'first batch']:.1f}")
    print(f"flink_efficiency={after['local'] / after['flink']:.3f}")


def _run(export: str, model_dir: str, output: str, batch_size: int, count: int,
         flags: list[str]) -> float:
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import launch
    start = time.perf_counter()
    manifest = launch.run(PipelineOptions(common.pipeline_args(
        export, model_dir, output, batch_size,
        ["--per_host_rate", "0", "--precision", "float32", *flags])))
    wall = time.perf_counter() - start
    if manifest["counts"]["embedded"] != count:
        sys.exit(f"expected {count} embeddings, got {manifest['counts']}")
    return wall


if __name__ == "__main__":
    main()
