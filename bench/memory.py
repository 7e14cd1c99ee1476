"""Benchmark: does a refresh's memory stay flat as the export grows?

For each size N (image rows, default 1k, 10k, 100k) it measures the peak
resident memory and the wall time of three runs of `python -m pipeline run`
(in-process runner, the `tiny` stand-in so that the pipeline, not the model,
is timed), each in a fresh process:

- first run: every URL fetched from a loopback host (another process) that
  appends the URL's query to the file's bytes, so every URL is a distinct
  content, then embedded;
- unchanged refresh: the same export again (0 requests, 0 inferences);
- model change: the same export with another model (the `tiny` stand-in
  with other weights): every picture is embedded again from the store.

Sizes above --first_run_max (default 10,000) are too long to fetch here
(2 shared cores): their previous snapshot and store are *built* with pyarrow
from the first run at the smallest size (its rows, its copies and its URL
entries repeated under new URLs and contents), then the refresh and the
model change are measured as above. The output says which sizes were built.

It prints the growth of peak RSS per 10× step for each kind of run, and with
--svampeatlas a Svampeatlas-sized unchanged refresh (1.3 M occurrences,
546 k image rows, the previous snapshot and store index built directly).

    .venv/bin/python bench/memory.py [--sizes 1000,10000,100000] [--svampeatlas]

Lines: `memory_growth_<kind>_<N>=<peak at N ÷ peak at N/10>` for every step,
`memory_growth=` (the largest step of refresh and model change),
`model_change_efficiency=` (pictures/s of the model change at the largest
size ÷ the raw rate of the model on the same pictures' sizes),
`model_change_ceiling=` (the most that ratio can be on this machine's cores,
for the CPU the model and the decoding of each stored copy take), and
`svampeatlas_refresh_peak_mb=`, `svampeatlas_refresh_s=`.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402

KINDS = ("first_run", "refresh", "model_change")
BASE_ID = 5_000_000_000  # bench/common.write_export's gbifIDs


def _pictures(folder: str, count: int, size: tuple[int, int]) -> list[str]:
    from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
    names = []
    for i in range(count):
        name = f"photo_{i:03d}.jpg"
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(jpeg_bytes(synthetic_photo(i, i % 5, size)))
        names.append(name)
    return names


def _manifest(output: str) -> dict:
    with open(os.path.join(output, "LATEST")) as handle:
        snapshot = handle.read().strip()
    with open(os.path.join(output, snapshot, "manifest.json")) as handle:
        return json.load(handle)


def _measure(label: str, export: str, model: str, output: str, batch_size: int,
             extra: list[str], expect: int) -> tuple[float, float, dict]:
    argv = [sys.executable, "-m", "pipeline", "run",
            *common.pipeline_args(export, model, output, batch_size,
                                  ["--per_host_rate", "0", "--report_samples", "0", *extra])]
    log(f"{label} ...")
    peak, seconds, _ = common.peak_rss_mb_of_child(
        argv, env=dict(os.environ, PYTHONPATH=common.ROOT))
    manifest = _manifest(output)
    counts = manifest["counts"]
    if counts["embedded"] != expect:
        sys.exit(f"{label}: expected {expect} embeddings, got {counts}")
    tally = manifest.get("tally", {})
    print(f"{label:<34} peak RSS {peak:7.1f} MB  {seconds:7.1f} s  "
          f"requests {tally.get('fetch.requests', 0):>6}  "
          f"inferences {tally.get('embed.inferred', 0):>6}  reused {counts['reused']:>6}  "
          f"from store {counts['from_store']:>6}", flush=True)
    return peak, seconds, manifest


def _urls(base_url: str, names: list[str], n: int) -> list[str]:
    return [f"{base_url}{names[i % len(names)]}?copy={i}" for i in range(n)]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_previous(template: tuple[str, dict], output: str, urls: list[str], *,
                   pictures: bool, first_gbif_id: int = BASE_ID) -> None:
    """A previous snapshot and a store for `urls` (rows i ↔ gbifID
    first_gbif_id + i), built with pyarrow from a real run's output
    (`template`): its embeddings, copies and URL entries repeated under the
    new URLs, each with a content hash of its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transforms.write.snapshot import new_snapshot_name

    n = len(urls)
    template, manifest = template  # a run's output folder, and its snapshot's manifest
    snapshot = new_snapshot_name()
    folder = os.path.join(output, snapshot)
    os.makedirs(folder)
    source = pq.read_table(sorted(glob.glob(os.path.join(
        template, manifest["snapshot"], "embeddings-*.parquet"))))
    shas = [_sha(url) for url in urls]
    step = 100_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        take = pa.array([i % source.num_rows for i in range(start, stop)])
        rows = source.take(take)
        ids = list(range(first_gbif_id + start, first_gbif_id + stop))
        rows = rows.set_column(rows.schema.get_field_index("coreID"), "coreID",
                               pa.array([str(i) for i in ids]))
        rows = rows.set_column(rows.schema.get_field_index("gbifID"), "gbifID",
                               pa.array(ids, pa.int64()))
        rows = rows.set_column(rows.schema.get_field_index("identifier"), "identifier",
                               pa.array(urls[start:stop]))
        rows = rows.set_column(rows.schema.get_field_index("image_sha256"), "image_sha256",
                               pa.array(shas[start:stop]))
        pq.write_table(rows, os.path.join(folder, f"embeddings-{start // step:05d}-b.parquet"),
                       compression="zstd")
    failures = glob.glob(os.path.join(template, manifest["snapshot"], "failures-*.parquet"))
    pq.write_table(pq.read_schema(failures[0]).empty_table(),
                   os.path.join(folder, "failures-empty.parquet"))
    built = dict(manifest, snapshot=snapshot, previous_snapshot=None,
                 counts=dict(manifest["counts"], embedded=n, export_rows=n))
    with open(os.path.join(folder, "manifest.json"), "w") as handle:
        json.dump(built, handle)
    with open(os.path.join(output, "LATEST"), "w") as handle:
        handle.write(snapshot + "\n")
    store = os.path.join(output, "store")
    os.makedirs(os.path.join(store, "urls"))
    now = pa.scalar(time.time() * 1e6, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    url_schema = pq.read_schema(glob.glob(os.path.join(template, "store", "urls",
                                                       "*.parquet"))[0])
    for start in range(0, n, step):
        stop = min(n, start + step)
        k = stop - start
        columns = {"identifier": pa.array(urls[start:stop]),
                   "fetched_from": pa.array(urls[start:stop]),
                   "image_sha256": pa.array(shas[start:stop]),
                   "etag": pa.nulls(k, pa.string()), "last_modified": pa.nulls(k, pa.string()),
                   "http_status": pa.array([200] * k, pa.int32()),
                   "outcome": pa.array(["ok"] * k),
                   "fetched_at": pa.array([now.value] * k, pa.int64()).cast(
                       pa.timestamp("us", tz="UTC"))}
        table = pa.table({f.name: columns.get(f.name, pa.nulls(k, f.type)).cast(f.type)
                          for f in url_schema}, schema=url_schema)
        pq.write_table(table, os.path.join(store, "urls", f"built-{start // step:05d}.parquet"))
    shutil.copy(os.path.join(template, "store", "store.json"), store) \
        if os.path.exists(os.path.join(template, "store", "store.json")) else None
    if not pictures:
        return
    os.makedirs(os.path.join(store, "images"))
    copies = pq.read_table(sorted(glob.glob(os.path.join(template, "store", "images",
                                                        "*.parquet"))))
    per_part = 2000
    for start in range(0, n, per_part):
        stop = min(n, start + per_part)
        rows = copies.take(pa.array([i % copies.num_rows for i in range(start, stop)]))
        rows = rows.set_column(rows.schema.get_field_index("image_sha256"), "image_sha256",
                               pa.array(shas[start:stop]))
        pq.write_table(rows, os.path.join(store, "images", f"built-{start // per_part:05d}.parquet"),
                       row_group_size=64, compression="zstd")


def _svampeatlas(work: str, template: tuple[str, dict], model: str,
                 batch_size: int) -> tuple[float, float]:
    """An unchanged refresh of 1.3 M occurrences and 546 k image rows."""
    from pipeline.demo.sample_data import DMS_DATASET_KEY, Media, Occurrence, write_dwca
    occurrences, images = 1_300_000, 546_000
    log(f"writing a {occurrences:,}-occurrence export with {images:,} image rows ...")
    urls = [f"https://svampe.databasen.org/uploads/2019-{100000 + i}_{i}.JPG"
            for i in range(images)]
    occ = [Occurrence(gbifID=BASE_ID + i, occurrenceID=f"dms-{i}", datasetKey=DMS_DATASET_KEY,
                      taxonKey=1000 + i % 4000, scientificName=f"Species {i % 4000}")
           for i in range(occurrences)]
    # Pictures belong to the first occurrences, 1-2 each (about 0.42 per occurrence).
    media = [Media(BASE_ID + (i * 3) // 4, url) for i, url in enumerate(urls)]
    export = write_dwca(os.path.join(work, "svampeatlas.zip"), occ, media)
    del occ, media
    output = os.path.join(work, "out-svampeatlas")
    log("building its previous snapshot and store index with pyarrow ...")
    ids = [BASE_ID + (i * 3) // 4 for i in range(images)]
    _build_with_ids(template, output, urls, ids)
    peak, seconds, manifest = _measure(f"svampeatlas refresh {images}", export, model, output,
                                       batch_size, [], images)
    return peak, seconds


def _build_with_ids(template: tuple[str, dict], output: str, urls: list[str],
                    ids: list[int]) -> None:
    """build_previous for rows whose gbifIDs are not consecutive."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    build_previous(template, output, urls, pictures=False)
    with open(os.path.join(output, "LATEST")) as handle:
        snapshot = handle.read().strip()
    start = 0
    for path in sorted(glob.glob(os.path.join(output, snapshot, "embeddings-*.parquet"))):
        table = pq.read_table(path)
        chunk = ids[start:start + table.num_rows]
        start += table.num_rows
        table = table.set_column(table.schema.get_field_index("gbifID"), "gbifID",
                                 pa.array(chunk, pa.int64()))
        table = table.set_column(table.schema.get_field_index("coreID"), "coreID",
                                 pc.cast(pa.array(chunk, pa.int64()), pa.string()))
        pq.write_table(table, path, compression="zstd")


def _raw_rate(model: str, batch_size: int) -> tuple[float, float, int]:
    """The model alone on decoded batches of its input size: images/s, the
    CPU it spent per picture (ms, all cores together), and that size."""
    import numpy as np
    from transforms.embed.models import load
    loaded = load(model)
    side = loaded.spec.image_size
    batches = [np.random.default_rng(i).integers(0, 255, (batch_size, side, side, 3),
                                                 dtype=np.uint8) for i in range(4)]
    cpu = time.process_time()
    start = time.perf_counter()
    rate = common.tight_loop(loaded.embed, batches, seconds=5.0)
    images = rate * (time.perf_counter() - start)  # the warm-up call's share is small
    return rate, 1000 * (time.process_time() - cpu) / images, side


def _decode_cpu_ms(folder: str, names: list[str], side: int) -> tuple[float, float]:
    """CPU per picture (ms) of what a model change does to a stored copy
    before the model sees it, and a tight loop does not: decode, then resize
    (returned apart: Pillow's resize is most of it)."""
    from transforms.common.pictures import decode_rgb
    from transforms.embed.decode import model_input
    contents = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as handle:
            contents.append(handle.read())
    rounds = max(1, 400 // len(contents))
    cpu = time.process_time()
    decoded = [decode_rgb(content, "squash", side)[0] for content in contents]
    for _ in range(rounds - 1):
        for content in contents:
            decode_rgb(content, "squash", side)
    decode_s = time.process_time() - cpu
    cpu = time.process_time()
    for _ in range(rounds):
        for rgb in decoded:
            model_input(rgb, "squash", side)
    resize_s = time.process_time() - cpu
    per = 1000 / (rounds * len(contents))
    return decode_s * per, resize_s * per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--first_run_max", type=int, default=10000,
                        help="larger sizes get a built previous snapshot and store")
    parser.add_argument("--pictures", type=int, default=20, help="distinct JPEG files")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--model_change_max", type=int, default=100_000,
                        help="larger sizes skip the model change (it embeds every picture)")
    parser.add_argument("--svampeatlas", action="store_true")
    parser.add_argument("--only_svampeatlas", action="store_true")
    parser.add_argument("--beam_arg", action="append", default=[],
                        help="extra pipeline flag, e.g. --beam_arg=--decode_threads=1")
    args = parser.parse_args()
    print(f"cpu                 {describe_cpu()}", flush=True)
    sizes = [int(v) for v in args.sizes.split(",")] if not args.only_svampeatlas else [1000]
    size = tuple(int(v) for v in args.size.split("x"))
    model_dir = common.model("tiny")
    work = tempfile.mkdtemp(prefix="bench-memory-")
    peaks: dict = {kind: {} for kind in KINDS}
    rates: dict = {}
    try:
        from pipeline.models.make_model import build_model
        other = build_model(os.path.join(work, "tiny-other"), "tiny", seed=7)
        images = os.path.join(work, "images")
        os.makedirs(images)
        names = _pictures(images, args.pictures, size)
        template = None
        with common.serve(images, distinct=True) as base_url:
            for n in sizes:
                urls = _urls(base_url, names, n)
                export = common.write_export(os.path.join(work, f"export-{n}.zip"), urls)
                output = os.path.join(work, f"out-{n}")
                if n <= args.first_run_max:
                    peaks["first_run"][n], _, _ = _measure(
                        f"first run {n}", export, model_dir, output, args.batch_size,
                        args.beam_arg, n)
                else:
                    log(f"building the previous snapshot and store of {n} rows ...")
                    build_previous(template, output, urls, pictures=True)
                    print(f"first run {n:<24} not run: previous snapshot and store built "
                          f"with pyarrow from the {sizes[0]}-row run", flush=True)
                peaks["refresh"][n], _, refreshed = _measure(
                    f"unchanged refresh {n}", export, model_dir, output, args.batch_size,
                    args.beam_arg, n)
                if template is None:  # the first model's snapshot, before the model change
                    template = (output, refreshed)
                if args.only_svampeatlas:
                    break
                if n > args.model_change_max:
                    print(f"model change {n:<21} not run (--model_change_max "
                          f"{args.model_change_max})", flush=True)
                    continue
                peaks["model_change"][n], seconds, _ = _measure(
                    f"model change {n}", export, other, output, args.batch_size,
                    args.beam_arg, n)
                rates[n] = n / seconds
        growth = []
        for kind in KINDS:
            ordered = sorted(peaks[kind])
            for small, large in zip(ordered, ordered[1:]):
                ratio = peaks[kind][large] / peaks[kind][small]
                print(f"memory_growth_{kind}_{large}={ratio:.3f}")
                if kind != "first_run" and large == small * 10:
                    growth.append(ratio)
        if growth:
            print(f"memory_growth={max(growth):.3f}")
        if rates:
            largest = max(rates)
            raw, model_ms, side = _raw_rate(other, args.batch_size)
            decode_ms, resize_ms = _decode_cpu_ms(images, names, side)
            ceiling = 1000 * (os.cpu_count() or 1) / (model_ms + decode_ms + resize_ms)
            print(f"model change at {largest}: {rates[largest]:.0f} pictures/s end to end, "
                  f"the model alone {raw:.0f} pictures/s (1 process, tight loop, "
                  f"{model_ms:.2f} ms of CPU a picture)")
            print(f"CPU ceiling: {os.cpu_count()} cores ÷ (the model {model_ms:.2f} + decoding "
                  f"a copy {decode_ms:.2f} + resizing it to {side}×{side} {resize_ms:.2f} ms "
                  f"of CPU a picture) = {ceiling:.0f} pictures/s")
            print(f"model_change_ceiling={min(1.0, ceiling / raw):.3f}")
            print(f"model_change_efficiency={rates[largest] / raw:.3f}")
        if args.svampeatlas or args.only_svampeatlas:
            peak, seconds = _svampeatlas(work, template, model_dir, args.batch_size)
            print(f"svampeatlas_refresh_peak_mb={peak:.0f}")
            print(f"svampeatlas_refresh_s={seconds:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
