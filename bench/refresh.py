"""Cost of refreshing an unchanged export, relative to embedding it from scratch.

    .venv/bin/python bench/refresh.py [--images 2000] [--arch inception_v4]

Builds the stand-in model, a synthetic GBIF export of N images served from
loopback, runs the full pipeline once, then runs it again on the same export
into the same output (a refresh: every image is reused, nothing is fetched or
embedded). Both runs are timed in this process, launch checks included.
Last line: refresh_cost=<refresh seconds / full-run seconds> (target <= 0.05).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from pipeline.cli import run  # noqa: E402
from pipeline.demo.demo import serve_folder  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402
from pipeline.models.make_model import build_model  # noqa: E402
from pipeline.demo.sample_data import make_sample  # noqa: E402


def _timed_run(export: str, model: str, output: str, images: int) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = run(PipelineOptions([
        "--export", export, "--model", model, "--output", output, "--quiet",
        "--max_images", str(images),
        "--allow_private_networks", "127.0.0.1/32", "--per_host_rate", "1000",
        "--per_host_concurrency", "32"]))
    return time.perf_counter() - start, manifest


def main() -> None:
    logging.getLogger().addFilter(  # Beam repeats this per batch when torch is absent
        lambda record: "Resource module is not available" not in record.getMessage())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="inception_v4", choices=("inception_v4", "tiny"))
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, args.arch)
        images = os.path.join(tmp, "data", "images")
        os.makedirs(images)
        with serve_folder(images) as base_url:
            # 1-3 images per occurrence: enough occurrences for N images.
            sample = make_sample(os.path.join(tmp, "data"), base_url, args.images // 2 + 50,
                                 photo_size=(640, 480), with_problems=False)
            output = os.path.join(tmp, "out")
            export = sample.export
            full_s, full = _timed_run(export, model, output, args.images)
            refresh_s, refresh = _timed_run(export, model, output, args.images)
        counts = refresh["counts"]
        print(f"images              {full['counts']['embedded']} embedded "
              f"(the first {args.images} of the export's {sample.expected_images}, "
              f"{args.arch} stand-in)")
        print(f"full run            {full_s:.1f} s "
              f"({full['counts']['embedded'] / full_s:.2f} images/s)")
        print(f"refresh             {refresh_s:.1f} s: {counts['reused']} reused, "
              f"{counts['new']} new, {refresh['tally'].get('fetch.requests', 0)} fetches, "
              f"{refresh['tally'].get('embed.inferred', 0)} inferences")
        print(f"refresh_cost={refresh_s / full_s:.3f}")


if __name__ == "__main__":
    main()
