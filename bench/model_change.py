"""Benchmark: a new model over a stored export asks no host and costs only compute.

A first run with the `tiny` stand-in fetches `--images` distinct URLs from a
loopback host into the image store. Then the same export runs with a second
model, the `inception_v4` stand-in (the real model's cost), on the same
output: its pictures come from the store. The host's own request counter is
read before and after that second run, and its whole wall time (`run()` from
start to the summary: graph, workers, store lookup, reading pictures,
decoding, inference, writing, publishing, report) is compared with the
compute-only ideal: the images ÷ the second model's images/s in a tight loop
on pre-decoded batches, measured in this process before and after the run.

    model_change_efficiency = compute-only ideal ÷ wall time   (target ≥ 0.8)

    .venv/bin/python bench/model_change.py [--images 400] [--batch_size 16]
        [--beam_arg=--direct_num_workers=2 --beam_arg=--direct_running_mode=multi_processing]

`--beam_arg` options go to the second run only (its worker processes, say).

Prints `model_change_requests=<requests the host saw during the second run>`
(must be 0); the last line is `model_change_efficiency=<ratio>`.
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


def _batches(folder: str, names: list[str], batch_size: int, size: int):
    import numpy as np

    from transforms.embed.decode import decode_image
    from transforms.store.copies import make_copy
    pixels = [decode_image(make_copy(open(os.path.join(folder, n), "rb").read()).data,
                           size=size)[0] for n in names]
    while len(pixels) < 2 * batch_size:
        pixels = pixels + pixels
    return [np.stack(pixels[i:i + batch_size])
            for i in range(0, len(pixels) - batch_size + 1, batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tight_seconds", type=float, default=12.0)
    parser.add_argument("--beam_arg", action="append", default=[],
                        help="a pipeline option for the second run (repeatable)")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import launch
    from transforms.embed.models import load
    first_model, second_model = common.model("tiny"), common.model("inception_v4")
    work = tempfile.mkdtemp(prefix="bench-model-change-")
    try:
        images, names = common.photo_links(work)
        output = os.path.join(work, "out")
        with common.serve(images, distinct=True) as base_url:
            urls = [f"{base_url}{names[i % len(names)]}?copy={i}" for i in range(args.images)]
            export = common.write_export(os.path.join(work, "export.zip"), urls)
            opened = ["--per_host_rate", "0", "--per_host_concurrency", "16",
                      "--report_samples", "0"]
            first = launch.run(PipelineOptions(common.pipeline_args(
                export, first_model, output, args.batch_size, opened)))
            log(f"first run (tiny): {first['counts']['embedded']} embedded, "
                f"{base_url.requests()} requests")
            model = load(second_model)
            batches = _batches(images, names, args.batch_size, model.spec.image_size)
            tight = []
            with common.Meter() as meter:
                tight.append(common.tight_loop(model.embed, batches, args.tight_seconds))
            log(f"tight loop: {tight[-1]:.2f} images/s ({meter.describe()})")
            before = base_url.requests()
            with common.Meter() as run_meter:
                second = launch.run(PipelineOptions(common.pipeline_args(
                    export, second_model, output, args.batch_size,
                    ["--report_samples", "0", *args.beam_arg])))
            requests = base_url.requests() - before
            with common.Meter() as meter:
                tight.append(common.tight_loop(model.embed, batches, args.tight_seconds))
            log(f"tight loop: {tight[-1]:.2f} images/s ({meter.describe()})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = second["counts"]
    if counts["embedded"] != args.images:
        sys.exit(f"expected {args.images} embeddings, got {counts}")
    rate = sum(tight) / len(tight)
    ideal = args.images / rate
    phases = second["timings"]["phases"]
    print(f"{args.images} distinct URLs on one loopback host; first run with the tiny stand-in "
          f"filled the image store; second run with the inception_v4 stand-in, batch "
          f"{args.batch_size}, "
          + (" ".join(args.beam_arg) if args.beam_arg else "in-process runner"))
    print(f"second run: {counts['from_store']} rows from stored pictures, "
          f"{counts['inferences']} inferences, {requests} requests to the host; wall "
          f"{run_meter.wall:.1f} s ({run_meter.describe()}): start {phases['start_s']:.1f} s, "
          f"pipeline {phases['pipeline_s']:.1f} s, report {phases['report_s']:.1f} s")
    print("tight loop of the same model: " + ", ".join(f"{r:.2f}" for r in tight)
          + f" images/s; compute-only ideal {ideal:.1f} s")
    print(f"model_change_requests={requests}")
    print(f"model_change_efficiency={ideal / run_meter.wall:.3f}")


if __name__ == "__main__":
    main()
