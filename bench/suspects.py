"""Benchmark: does the suspects list find names that are wrong?

A real run (the demo's export and pictures, served on loopback) embeds
every picture with the trained EfficientNet-Lite0 (`make-model --arch
efficientnet_lite0`, ImageNet weights: embeddings that separate the demo's
species). Then the names of 5% of the occurrences, picked at random, are
swapped for another species' name in a copy of the snapshot, and the
suspects list is computed on the copy. The top of the list should be those
records: precision and recall at the number swapped (the list's first m
records against the m swapped; both are the same number when the list
holds at least m records).

    .venv/bin/python bench/suspects.py [--occurrences 200] [--share 0.05] [--seeds 3]

Prints the CPU first, then one figure a line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import log  # noqa: E402
from pipeline.machine import describe_cpu  # noqa: E402


def real_run(work: str, occurrences: int, model_dir: str) -> str:
    """The demo export with every species, run for real; returns its output folder."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from pipeline.demo.demo import serve_folder
    from pipeline.demo.sample_data import FUNGI, make_sample
    from pipeline.launch import run
    images = os.path.join(work, "data", "images")
    os.makedirs(images)
    output = os.path.join(work, "output")
    with serve_folder(images) as base_url:
        sample = make_sample(os.path.join(work, "data"), base_url, occurrences,
                             species=len(FUNGI), photo_size=(640, 480), with_problems=False)
        run(PipelineOptions(["--export", sample.export, "--model", model_dir, "--output", output,
                             "--allow_private_networks", "127.0.0.1/32", "--quiet"]))
    return output


def swapped_copy(output: str, target: str, share: float, seed: int) -> set[str]:
    """A copy of the snapshot with `share` of its occurrences renamed to another
    species; returns the renamed occurrences (gbifIDs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.tools.query import open_snapshot
    from transforms.common.files import write_atomically
    snapshot = open_snapshot(output)
    tables = [pq.read_table(path) for path in snapshot.files]
    ids = sorted({g for t in tables for g in t.column("gbifID").to_pylist()})
    names = sorted({n for t in tables for n in t.column("scientificName").to_pylist() if n})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(ids, max(1, round(share * len(ids))), replace=False).tolist())
    new_name = {}
    for g in sorted(chosen):
        new_name[g] = None  # filled from the occurrence's own name below
    folder = os.path.join(target, snapshot.name)
    os.makedirs(folder)
    listed = []
    for path, table in zip(snapshot.files, tables):
        gbif, current = table.column("gbifID").to_pylist(), table.column("scientificName").to_pylist()
        for g, n in zip(gbif, current):
            if g in new_name and new_name[g] is None:
                others = [m for m in names if m != n]
                new_name[g] = others[int(rng.integers(len(others)))]
        renamed = [new_name.get(g) or n for g, n in zip(gbif, current)]
        table = table.set_column(table.schema.get_field_index("scientificName"),
                                 "scientificName", pa.array(renamed, pa.string()))
        name = os.path.basename(path)
        pq.write_table(table, os.path.join(folder, name))
        listed.append({"path": name, "rows": table.num_rows})
    manifest = dict(snapshot.manifest, files={"embeddings": listed, "failures": []})
    write_atomically(os.path.join(folder, "manifest.json"), json.dumps(manifest))
    write_atomically(os.path.join(target, "LATEST"), snapshot.name + "\n")
    return {str(g) for g in chosen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--occurrences", type=int, default=200)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"cpu={describe_cpu()}", flush=True)
    from pipeline.tools.explore.index import Explorer, ensure_built
    from pipeline.tools.explore.suspects import compute
    from pipeline.tools.query import open_snapshot
    work = tempfile.mkdtemp(prefix="bench-suspects-")
    try:
        output = real_run(work, args.occurrences, common.trained_model())
        precisions, recalls = [], []
        for seed in range(args.seeds):
            target = os.path.join(work, f"swapped-{seed}")
            swapped = swapped_copy(output, target, args.share, seed)
            snapshot = open_snapshot(target)
            explorer = Explorer.load(snapshot, ensure_built(snapshot))
            table = compute(explorer)
            listed = [str(r["gbifID"]) for r in explorer.rows(table.column("row").to_pylist())]
            top = set(listed[:len(swapped)])
            found = len(top & swapped)
            precisions.append(found / max(1, len(top)))
            recalls.append(found / len(swapped))
            log(f"seed {seed}: {len(swapped)} swapped of {explorer.size} pictures "
                f"({len(set(explorer.records.column('gbifID').to_pylist()))} occurrences); "
                f"list holds {len(listed)}; {found} of the top {len(swapped)} are swapped ones")
        print(f"swapped_share={args.share}", flush=True)
        print(f"precision_at_swapped={np.mean(precisions):.3f}", flush=True)
        print(f"recall_at_swapped={np.mean(recalls):.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
