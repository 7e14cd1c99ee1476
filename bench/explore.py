"""Benchmark: `gbif-embed explore` at Svampeatlas' size.

Generates (once, cached under /tmp/gbif-embed-bench/explore-N/, never in the
repository) a snapshot of N = 565,000 × 256 float32 embeddings with
realistic metadata: 10,000 names in 1,000 genera (each name a cluster in
embedding space), 40 countries, 30 years, 20 datasets, three licence
classes, and a DwC-A export whose occurrence.txt carries country, date and
ranks; the rows carry the fingerprint of the Inception-v4 stand-in
(`make-model --arch inception_v4`), so photos can be searched. Then:

    build_s          the explorer's cache (records, export fields, PCA + UMAP map),
                     in a fresh process: `gbif-embed explore` with no cache yet
    start_s          `gbif-embed explore` with the cache built: until /api/info answers
    query_p95_ms     search by gbifID over HTTP, k=10 (200 queries)
    filtered_p95_ms  the same with a filter (country, years, licence class or genus)
    upload_p95_ms    a photo POSTed and embedded by the stand-in (20 uploads)
    recall_at_10     the server's top 10 against float32 numpy brute force (200 queries)
    rss_mb           the server's resident memory after all of that

    .venv/bin/python bench/explore.py [--rows 565000] [--queries 200]

The CPU is printed first, then one figure a line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402

DIM = 256
NAMES = 10_000
GENERA = 1_000
COUNTRIES = [f"C{i:02d}" for i in range(40)]
YEARS = list(range(1996, 2026))
DATASETS = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(20)]
LICENCES = ["http://creativecommons.org/licenses/by/4.0/", "CC_BY_NC_4_0",
            "http://creativecommons.org/publicdomain/zero/1.0/", ""]


def vectors_of(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Names as clusters: a centre per name plus noise (cosine to own centre ~0.7)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NAMES, DIM)).astype(np.float32)
    names = rng.zipf(1.3, rows) % NAMES  # a few common species, a long tail
    vectors = centres[names]
    vectors += rng.standard_normal((rows, DIM), dtype=np.float32)
    return vectors, names


def generate(folder: str, rows: int, model_dir: str) -> str:
    """The snapshot and its export in `folder` (kept between runs); returns OUTPUT."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.model_check import run_model
    from transforms.write.parts import embedding_schema
    from transforms.common.files import write_atomically
    output = os.path.join(folder, "output")
    done = os.path.join(folder, "generated.json")
    if os.path.exists(done):
        return output
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(output)
    log(f"generating {rows:,} rows in {folder} ...")
    model = run_model(model_dir, embedding_dim=0, normalize="unit", image_size=0,
                      resize="squash", output=output, previous=None)
    vectors, names = vectors_of(rows)
    rng = np.random.default_rng(1)
    gbif = 4_000_000_000 + np.arange(rows, dtype=np.int64)
    gbif[1::7] = gbif[0::7][:len(gbif[1::7])]  # some occurrences have two pictures
    country = rng.integers(0, len(COUNTRIES), rows)
    year = rng.integers(0, len(YEARS), rows)
    dataset = rng.integers(0, len(DATASETS), rows)
    licence = rng.integers(0, len(LICENCES), rows)
    sha = [f"{v:064x}" for v in rng.integers(0, 2**62, rows)]
    name_of = [f"Genus{n % GENERA:04d} species{n:05d}" for n in range(NAMES)]
    schema = embedding_schema(DIM)
    snapshot = "snapshot-20261202T000000.000000Z-bench"
    os.makedirs(os.path.join(output, snapshot))
    listed = []
    per_file = 100_000
    for part, lo in enumerate(range(0, rows, per_file)):
        hi = min(rows, lo + per_file)
        n = hi - lo
        columns = {
            "coreID": pa.array([str(g) for g in gbif[lo:hi]]),
            "gbifID": pa.array(gbif[lo:hi]),
            "occurrenceID": pa.array([f"urn:bench:{g}" for g in gbif[lo:hi]]),
            "datasetKey": pa.array([DATASETS[d] for d in dataset[lo:hi]]),
            "taxonKey": pa.array(names[lo:hi].astype(np.int64) + 5_000_000),
            "scientificName": pa.array([name_of[v] for v in names[lo:hi]]),
            "identifier": pa.array([f"https://images.example.org/{lo + i}.jpg" for i in range(n)]),
            "license": pa.array([LICENCES[v] for v in licence[lo:hi]]),
            "rightsHolder": pa.array([f"Photographer {i % 997}" for i in range(lo, hi)]),
            "creator": pa.array([f"Photographer {i % 997}" for i in range(lo, hi)]),
            "image_sha256": pa.array(sha[lo:hi]),
            "width": pa.array(np.full(n, 1024, np.int32)),
            "height": pa.array(np.full(n, 768, np.int32)),
            "etag": pa.nulls(n, pa.string()), "last_modified": pa.nulls(n, pa.string()),
            "model_fingerprint": pa.array([model.fingerprint] * n),
            "precision": pa.array(["float32"] * n),
            "embedded_at": pa.array([datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)]
                                    * n, pa.timestamp("us", tz="UTC")),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[lo:hi].reshape(-1)), DIM),
        }
        name = f"embeddings-{part:04d}.parquet"
        pq.write_table(pa.table(columns, schema=schema),
                       os.path.join(output, snapshot, name), compression="zstd")
        listed.append({"path": name, "rows": n})
    export = _write_export(folder, gbif, names, name_of, country, year)
    manifest = {"snapshot": snapshot, "previous_snapshot": None, "refresh_mode": "first run",
                "export": {"path": export}, "model": model.manifest_entry(),
                "options": {"precision": "float32"}, "image_store": os.path.join(output, "store"),
                "files": {"embeddings": listed, "failures": []},
                "counts": {"embedded": rows}}
    write_atomically(os.path.join(output, snapshot, "manifest.json"), json.dumps(manifest))
    write_atomically(os.path.join(output, "LATEST"), snapshot + "\n")
    np.save(os.path.join(folder, "names.npy"), names)
    with open(done, "w") as handle:
        json.dump({"rows": rows}, handle)
    return output


def _write_export(folder: str, gbif, names, name_of, country, year) -> str:
    """A DwC-A folder: occurrence.txt with country, date and ranks; multimedia.txt."""
    export = os.path.join(folder, "export")
    os.makedirs(export)
    occ_terms = ["gbifID", "occurrenceID", "countryCode", "eventDate", "year", "kingdom",
                 "phylum", "class", "order", "family", "genus", "scientificName"]
    media_terms = ["gbifID", "type", "format", "identifier"]
    dwc = "http://rs.tdwg.org/dwc/terms/"
    term = {"gbifID": "http://rs.gbif.org/terms/1.0/gbifID", "type": "http://purl.org/dc/terms/type",
            "format": "http://purl.org/dc/terms/format",
            "identifier": "http://purl.org/dc/terms/identifier"}

    def fields(terms):
        return "\n".join(f'    <field index="{i}" term="{term.get(t, dwc + t)}"/>'
                         for i, t in enumerate(terms))
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="metadata.xml">
  <core encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy="" ignoreHeaderLines="1" rowType="http://rs.tdwg.org/dwc/terms/Occurrence">
    <files><location>occurrence.txt</location></files>
    <id index="0"/>
{fields(occ_terms)}
  </core>
  <extension encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" fieldsEnclosedBy="" ignoreHeaderLines="1" rowType="http://rs.gbif.org/terms/1.0/Multimedia">
    <files><location>multimedia.txt</location></files>
    <coreid index="0"/>
{fields(media_terms)}
  </extension>
</archive>
"""
    with open(os.path.join(export, "meta.xml"), "w") as handle:
        handle.write(meta)
    seen = set()
    with open(os.path.join(export, "occurrence.txt"), "w") as occ, \
            open(os.path.join(export, "multimedia.txt"), "w") as media:
        occ.write("\t".join(occ_terms) + "\n")
        media.write("\t".join(media_terms) + "\n")
        for i, g in enumerate(gbif.tolist()):
            media.write(f"{g}\tStillImage\timage/jpeg\thttps://images.example.org/{i}.jpg\n")
            if g in seen:
                continue
            seen.add(g)
            n = int(names[i])
            y = YEARS[int(year[i])]
            occ.write(f"{g}\turn:bench:{g}\t{COUNTRIES[int(country[i])]}\t{y}-09-15\t{y}\tFungi\t"
                      f"Basidiomycota\tAgaricomycetes\tOrder{n % 50:02d}\tFamily{n % 200:03d}\t"
                      f"Genus{n % GENERA:04d}\t{name_of[n]}\n")
    return export


def _get(url: str, data: bytes = None, timeout: float = 600) -> tuple[float, dict]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.loads(response.read())
    return (time.perf_counter() - started) * 1000, body


def _p95(values) -> float:
    return float(np.percentile(values, 95))


def _rss_mb(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/status") as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


def serve(output: str) -> tuple[subprocess.Popen, str, float]:
    """`gbif-embed explore` in a fresh process; (process, URL, seconds until it answered)."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "explore", "--output", output,
                                "--port", "0"], stdout=subprocess.PIPE, text=True,
                               cwd=common.ROOT, env=dict(os.environ, PYTHONPATH=common.ROOT))
    line = process.stdout.readline()
    if " at http" not in line:
        process.kill()
        sys.exit(f"explore did not start: {line!r}")
    url = line.split(" at ", 1)[1].split()[0]
    _get(url + "api/info")
    return process, url, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=565_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--rebuild", action="store_true", help="Generate the snapshot again")
    args = parser.parse_args()
    print(f"cpu={describe_cpu()}", flush=True)
    model_dir = common.model("inception_v4")
    folder = os.path.join(common.CACHE, f"explore-{args.rows}")
    if args.rebuild:
        shutil.rmtree(folder, ignore_errors=True)
    output = generate(folder, args.rows, model_dir)
    from pipeline.tools.query import open_snapshot
    from pipeline.tools.explore.index import cache_folder
    shutil.rmtree(cache_folder(open_snapshot(output)), ignore_errors=True)

    log("building the explorer's cache (first start) ...")
    process, _, build_s = serve(output)
    process.terminate()
    process.wait(60)
    print(f"build_s={build_s:.1f}", flush=True)

    process, url, start_s = serve(output)
    try:
        print(f"start_s={start_s:.2f}", flush=True)
        while _get(url + "api/info")[1]["model"]["status"] == "loading":
            time.sleep(1)  # the model loads in the background: measure the steady state
        rng = np.random.default_rng(7)
        vectors, _ = vectors_of(args.rows)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        gbif = 4_000_000_000 + np.arange(args.rows, dtype=np.int64)
        gbif[1::7] = gbif[0::7][:len(gbif[1::7])]
        picks = rng.choice(args.rows, args.queries, replace=False)
        _get(f"{url}api/search?q={int(gbif[picks[0]])}&k=10")  # warm
        times, hits = [], []
        for row in picks:
            ms, answer = _get(f"{url}api/search?q={int(gbif[row])}&k=10")
            times.append(ms)
            first = answer["query"]["row"]  # the occurrence's first picture is the query
            scores = vectors @ vectors[first]
            scores[gbif == gbif[first]] = -np.inf
            truth = set(np.argpartition(-scores, 10)[:10].tolist())
            hits.append(len(truth & {r["row"] for r in answer["results"]}) / 10)
        print(f"query_p95_ms={_p95(times):.1f}", flush=True)
        filters = [f"country={COUNTRIES[3]}", f"year_from={YEARS[5]}&year_to={YEARS[9]}",
                   "licence=reusable+%28CC0%2C+CC+BY%29", "rank=genus&taxon=Genus0042",
                   f"country={COUNTRIES[7]}&year_from={YEARS[0]}&year_to={YEARS[14]}"]
        times = []
        for i, row in enumerate(picks):
            ms, answer = _get(f"{url}api/search?q={int(gbif[row])}&k=10&{filters[i % len(filters)]}")
            times.append(ms)
        print(f"filtered_p95_ms={_p95(times):.1f}", flush=True)
        photo = open(common.real_photos()[0], "rb").read() if os.path.isdir(
            common.FUNGI_IMAGES) else _synthetic_photo()
        _get(f"{url}api/photo?k=10", photo)  # waits for the model; not timed
        times = [_get(f"{url}api/photo?k=10", photo)[0] for _ in range(args.uploads)]
        print(f"upload_p95_ms={_p95(times):.1f}", flush=True)
        print(f"recall_at_10={np.mean(hits):.4f}", flush=True)
        rss, peak = _rss_mb(process.pid)
        print(f"rss_mb={rss:.0f}", flush=True)
        log(f"(server peak RSS {peak:.0f} MB; the index scores every vector in float16: "
            "recall@10 falls below 1 only where that rounding swaps near-ties; photo: "
            + ("a real photo of ../shared" if os.path.isdir(common.FUNGI_IMAGES)
               else "a synthetic photo") + ")")
    finally:
        process.terminate()
        process.wait(60)
    return 0


def _synthetic_photo() -> bytes:
    from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
    return jpeg_bytes(synthetic_photo(1, size=(1024, 768)))


if __name__ == "__main__":
    sys.exit(main())
