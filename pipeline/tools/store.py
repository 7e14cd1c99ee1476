"""`gbif-embed store prune`: remove what no kept snapshot uses from the image store.

    gbif-embed store prune --output OUT [--output OTHER ...] [--image_store S] [--dry_run]
    gbif-embed store compact --output OUT [--image_store S]

`prune` removes copies, URL entries and embedding caches that no kept
snapshot of the named outputs uses, and stray temporary files
(`transforms/store/maintenance.py`); a store shared by several outputs
(`--image_store`) must be pruned naming all of them. `--dry_run` says what
would be removed and removes nothing. It holds each output's lease, so no
run writes meanwhile. `compact` rewrites the URL index as one entry per URL
(runs do it themselves once the index has more than a few parts).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from pipeline import lease
from transforms.store.layout import default_store
from transforms.store.maintenance import compact_url_index, prune
from transforms.write.snapshot import new_snapshot_name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gbif-embed store",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("prune", "compact"))
    parser.add_argument("--output", action="append", required=True,
                        help="an output folder whose snapshots use the store (repeatable)")
    parser.add_argument("--image_store", default="",
                        help="the store (default: OUTPUT/store of the first --output)")
    parser.add_argument("--dry_run", action="store_true",
                        help="say what would be removed, remove nothing")
    return parser


def store_command(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    store = args.image_store or default_store(args.output[0])
    leases = []
    try:
        if not args.dry_run:
            for output in args.output:  # no run writes while the store changes
                held = lease.Lease(output, new_snapshot_name(), f"gbif-embed store {args.action}")
                held.acquire()
                leases.append(held)
        if args.action == "compact":
            done = compact_url_index(store)
            print(f"URL index of {store}: {done['entries_before']} entries in "
                  f"{done['parts_before']} parts -> {done['entries_after']} entries in 1 part")
            return 0
        report = prune(args.output, store, dry_run=args.dry_run)
        print(f"store {store}" + (" (dry run: nothing removed)" if args.dry_run else ""))
        for line in report.lines():
            print(line)
        return 0
    finally:
        for held in leases:
            held.release()


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys
    return store_command(sys.argv[1:] if argv is None else argv)
