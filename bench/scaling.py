"""Benchmark: does embedding spread over every local worker process, for one host?

A one-host export used to be embedded only by the processes that held the
host's few fetch shards. This runs `gbif-embed run` on `--images` distinct
URLs of one loopback host with its politeness limits opened (so the host is
not the bound), with the `inception_v4` stand-in, first with 1 worker
process and then with 2 (Beam's multi_processing mode), each process
running TensorFlow on ONE thread, so that the second process has a core of
its own to embed on. Throughput is images ÷ the pipeline's own time (the
manifest's `phases.pipeline_s`: building the graph, starting the workers,
reading, fetching, embedding, writing, publishing). The two runs alternate
`--rounds` times; the figure is the median of the per-round ratios

    embed_scaling = throughput with 2 processes ÷ (2 × throughput with 1)

1.0 means the second process doubled the rate; the target is 0.85. Each run
pays fixed costs (the workers start, import TensorFlow and load the model at
once on the same cores; Beam ends its worker processes one after another),
so the figure grows with `--images`; at 160 it was 0.77.

    .venv/bin/python bench/scaling.py [--images 480] [--rounds 2]

The last line is `embed_scaling=<ratio>`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def _run(export: str, model: str, output: str, processes: int, batch_size: int) -> float:
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import launch
    extra = ["--per_host_rate", "0", "--per_host_concurrency", "16", "--inference_threads", "1",
             "--report_samples", "0", "--direct_running_mode", "multi_processing",
             "--direct_num_workers", str(processes)]
    with common.Meter() as meter:
        manifest = launch.run(PipelineOptions(common.pipeline_args(
            export, model, output, batch_size, extra)))
    seconds = manifest["timings"]["phases"]["pipeline_s"]
    images = manifest["counts"]["embedded"]
    log(f"{processes} process(es): {images} images in {seconds:.1f} s = "
        f"{images / seconds:.2f} images/s ({meter.describe()})")
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--arch", default="inception_v4")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    model = common.model(args.arch)
    work = tempfile.mkdtemp(prefix="bench-scaling-")
    ratios, rates = [], {1: [], 2: []}
    try:
        images, names = common.photo_links(work)
        with common.serve(images, distinct=True) as base_url:
            for round_no in range(args.rounds):
                # New URLs each round: every run fetches and embeds them all.
                urls = [f"{base_url}{names[i % len(names)]}?r={round_no}&copy={i}"
                        for i in range(args.images)]
                export = common.write_export(os.path.join(work, f"export-{round_no}.zip"), urls)
                for processes in ((1, 2) if round_no % 2 == 0 else (2, 1)):
                    output = os.path.join(work, f"out-{round_no}-{processes}")
                    rates[processes].append(_run(export, model, output, processes,
                                                 args.batch_size))
                ratios.append(rates[2][-1] / (2 * rates[1][-1]))
                log(f"round {round_no + 1}: embed_scaling {ratios[-1]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.images} distinct URLs on one loopback host (limits opened), {args.arch} "
          f"stand-in, batch {args.batch_size}, one TensorFlow thread per process, "
          f"{args.rounds} alternating rounds")
    for processes in (1, 2):
        print(f"{processes} process(es): " + ", ".join(f"{r:.2f}" for r in rates[processes])
              + " images/s")
    print("per-round ratios: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"embed_scaling={common.median(ratios):.3f}")


if __name__ == "__main__":
    main()
