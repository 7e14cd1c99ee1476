"""Benchmark: does the whole pipeline run as fast as the model allows?

End-to-end images/s of the real pipeline (`pipeline.cli.run`: read the
export, fetch every picture over HTTP from a loopback server in another
process, decode, embed with the `inception_v4` stand-in, write Parquet,
publish the snapshot) divided by the images/s of the same model
(`transforms.embed.models.load`, the function the pipeline calls) at the same batch
size in a tight loop on pre-decoded uint8 batches, measured in this same
process just before and just after the pipeline run (their mean is the
reference, so machine noise hits both sides alike; each phase also prints
how many cores other processes of the machine took meanwhile).

The images: the 12 real photographs of ../shared/data/fungi-images (300×300
to 4288×2848, read in place) served under `--images` distinct URLs, each with
a few distinct bytes after the picture (so the pipeline's content dedup does
not skip the model), plus `--synthetic` synthetic 1600×1200 camera-like JPEGs
among the files served.

What is timed: the wall time of `run()` minus two one-off steps that do not
depend on the number of images: the launcher's model contract check (it
loads the model and runs it once, to fail fast before fetching anything)
and, after the pipeline has finished, the launcher's report.html (a sample
of thumbnails); both are printed. Everything else is in: building the
graph, reading the export, starting the workers, fetching, decoding,
inference (its first call included), writing and publishing. So the figure
is honest for a run of this size and gets better with larger runs. With the
in-process runner the worker reuses the model that the contract check (here:
the reference loop) loaded in the same process; with `--workers 2` (Beam's
multi_processing mode) each worker process starts, imports TensorFlow and
loads its own model within the timed part, and uses its share of the cores.

The pictures come from one loopback host, so its politeness limit is opened
(`--per_host_rate 0`, like bench/fetch.py): 20 requests/s per host is a
limit production runs are meant to respect, not a cost of this code; pass
`--beam_arg=--per_host_rate=20` to measure with it.

    .venv/bin/python bench/pipeline.py [--workers 1|2] [--images 504] [--batch_size 16]

The last line is `pipeline_efficiency=<ratio>`.
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


def _files(folder: str, synthetic: int) -> list[str]:
    """Names in `folder`: links to the real photos and synthetic 1600×1200 JPEGs."""
    names = []
    for path in common.real_photos():
        name = os.path.basename(path)
        os.symlink(path, os.path.join(folder, name))
        names.append(name)
    if synthetic:
        from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
        for i in range(synthetic):
            name = f"synthetic_{i:03d}.jpg"
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(jpeg_bytes(synthetic_photo(i, i % 5, (1600, 1200))))
            names.append(name)
    return names


def _batches(folder: str, names: list[str], batch_size: int):
    """Pre-decoded uint8 batches of the same pictures, for the tight loop."""
    import numpy as np
    from transforms.embed.decode import decode_image
    pixels = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as handle:
            pixels.append(decode_image(handle.read())[0])
    while len(pixels) < 2 * batch_size:
        pixels = pixels + pixels
    return [np.stack(pixels[i:i + batch_size])
            for i in range(0, len(pixels) - batch_size + 1, batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=504, help="distinct URLs (>= 500)")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="synthetic 1600x1200 JPEGs added to the files served")
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tight_seconds", type=float, default=12.0,
                        help="length of each tight-loop measurement")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pipeline runs, each followed by a tight-loop measurement")
    parser.add_argument("--arch", default="inception_v4")
    parser.add_argument("--beam_arg", action="append", default=[],
                        help="extra pipeline flag, e.g. --beam_arg=--decode_threads=1")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}")

    model_dir = common.model(args.arch)
    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        images = os.path.join(work, "images")
        os.makedirs(images)
        names = _files(images, args.synthetic)
        with common.serve(images, distinct=True) as base_url:
            urls = [f"{base_url}{names[i % len(names)]}?copy={i}" for i in range(args.images)]
            export = common.write_export(os.path.join(work, "export.zip"), urls)
            figure = _measure(args, model_dir, export, os.path.join(work, "out"),
                              _batches(images, names, args.batch_size))
            print(f"the loopback image server (another process, counted in 'this "
                  f"benchmark') used {base_url.cpu_seconds():.1f} CPU-s in all")
            print(figure)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, model_dir: str, export: str, output: str, batches) -> str:
    from transforms.embed.models import load

    # The reference: the pipeline's own model function, in this process.
    model = load(model_dir)
    tight, runs = [], []

    def reference() -> None:
        with common.Meter() as meter:
            rate = common.tight_loop(model.embed, batches, args.tight_seconds)
        tight.append((rate, meter))
        log(f"tight loop: {rate:.2f} images/s ({meter.describe()})")

    reference()
    for repeat in range(args.repeats):
        runs.append(_run_pipeline(args, model_dir, export, f"{output}-{repeat}"))
        reference()

    seconds = sum(r["seconds"] for r in runs)
    images = args.images * len(runs)
    pipeline_ips = images / seconds
    reference_ips = sum(rate for rate, _ in tight) / len(tight)
    wall_ips = images / sum(r["wall"] for r in runs)
    print(f"images={args.images} batch_size={args.batch_size} workers={args.workers} "
          f"model={args.arch} repeats={args.repeats}")
    for r in runs:
        print(f"pipeline: run() wall {r['wall']:.1f} s - "
              + " - ".join(f"{label} {t:.1f} s" for label, t in r["excluded"].items())
              + f" = {r['seconds']:.1f} s -> {args.images / r['seconds']:.2f} images/s "
              f"(timed: graph, export, workers, fetch, decode, inference, write, publish; "
              f"{r['meter'].describe()})")
    print("tight loop (same process, same model function, pre-decoded uint8 batches): "
          + ", ".join(f"{rate:.2f}" for rate, _ in tight)
          + f" images/s, mean {reference_ips:.2f} ("
          + "; ".join(meter.describe() for _, meter in tight) + ")")
    print(f"whole run() wall, nothing excluded: {wall_ips:.2f} images/s "
          f"= {wall_ips / reference_ips:.3f} of the tight loop")
    pipeline_cpu = images / sum(r["seconds"] * r["meter"].ours / r["meter"].wall for r in runs)
    tight_cpu = sum(rate * meter.wall / meter.ours for rate, meter in tight) / len(tight)
    print(f"per CPU-second of this benchmark's processes (a check that is less sensitive "
          f"to other processes): pipeline {pipeline_cpu:.2f}, tight loop {tight_cpu:.2f} "
          f"images/CPU-s = {pipeline_cpu / tight_cpu:.3f}")
    busiest = max(m.others / m.wall for m in [r["meter"] for r in runs] + [m for _, m in tight])
    if busiest > 0.2:
        print(f"WARNING: other processes took up to {busiest:.2f} cores during a phase of this "
              f"benchmark; the figure is unreliable, run it again on a quieter machine")
    return f"pipeline_efficiency={pipeline_ips / reference_ips:.3f}"


def _run_pipeline(args, model_dir: str, export: str, output: str) -> dict:
    from apache_beam.options.pipeline_options import PipelineOptions

    import transforms.embed.models as models
    from pipeline import launch

    one_off = {"contract check": [], "report.html": []}
    patches = [(models, "check_contract", "contract check"),
               (launch, "_write_report", "report.html")]
    originals = {}
    for module, name, label in patches:
        if hasattr(module, name):
            originals[(module, name)] = getattr(module, name)
            setattr(module, name, _timed(getattr(module, name), one_off[label]))
    extra = ["--per_host_rate", "0", *args.beam_arg]
    if args.workers > 1:
        extra += ["--direct_num_workers", str(args.workers),
                  "--direct_running_mode", "multi_processing"]
    try:
        with common.Meter() as meter:
            manifest = launch.run(PipelineOptions(common.pipeline_args(
                export, model_dir, output, args.batch_size, extra)))
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
    counts = manifest["counts"]
    inferred = manifest["tally"].get("embed.inferred", 0)
    if counts["embedded"] != args.images or inferred != args.images:
        sys.exit(f"expected {args.images} embeddings, got {counts}")
    excluded = {label: sum(times) for label, times in one_off.items()}
    seconds = meter.wall - sum(excluded.values())
    log(f"pipeline: {args.images / seconds:.2f} images/s ({meter.describe()})")
    return {"wall": meter.wall, "seconds": seconds, "excluded": excluded, "meter": meter}


def _timed(function, times: list):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)
    return timed


if __name__ == "__main__":
    main()
