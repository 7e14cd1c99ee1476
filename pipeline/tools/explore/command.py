"""`gbif-embed explore` (the page) and `gbif-embed suspects` (the CSV)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from pipeline.tools.explore.index import Explorer, ensure_built
from pipeline.tools.query import open_snapshot
from transforms.common.files import write_atomically

DEFAULT_PORT = 8780


def _say(message: str) -> None:
    print(f"explore: {message}", file=sys.stderr, flush=True)


def load(output: str, snapshot_name: Optional[str] = None) -> Explorer:
    """The snapshot's explorer, its cache built first when missing."""
    snapshot = open_snapshot(output, snapshot_name)
    info = ensure_built(snapshot, _say)
    return Explorer.load(snapshot, info)


def explore_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="gbif-embed explore", description=(
        "A local, read-only page over a snapshot: search by occurrence id, scientific "
        "name or a dropped photo, with filters; a map of every embedding; suspect "
        "identifications. The first start builds OUTPUT/SNAPSHOT/explore/ (records and "
        "the map; minutes for 565,000 pictures), later starts take seconds."))
    parser.add_argument("--output", required=True, metavar="OUTPUT",
                        help="The run's output folder (local or gs://)")
    parser.add_argument("--snapshot", metavar="NAME", help="A snapshot (default: LATEST)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="P",
                        help=f"Port (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--model", metavar="MODEL",
                        help="Embedder for photo search (default: the manifest's model.uri)")
    args = parser.parse_args(argv)
    import socket
    import uvicorn
    from pipeline.tools.explore.photos import Photos
    from pipeline.tools.explore.pictures import Pictures
    from pipeline.tools.explore.server import create_app
    explorer = load(args.output, args.snapshot)
    photos = Photos(explorer.snapshot, args.model)
    photos.start()
    app = create_app(explorer, Pictures(explorer.snapshot), photos)
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(128)  # connections wait in the backlog until uvicorn accepts them
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"explore: {explorer.size:,} pictures of {explorer.snapshot.name} at "
          f"http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[listener])
    return 0


def suspects_command(argv: Sequence[str]) -> int:
    from pipeline.tools.explore.suspects import K, rows_of, suspects, to_csv
    parser = argparse.ArgumentParser(prog="gbif-embed suspects", description=(
        "Records whose pictures' nearest pictures (of other occurrences) mostly carry "
        "another scientific name, most suspect first, as CSV with GBIF links (the page's "
        "suspects view, without a browser)."))
    parser.add_argument("--output", required=True, metavar="OUTPUT",
                        help="The run's output folder (local or gs://)")
    parser.add_argument("--snapshot", metavar="NAME", help="A snapshot (default: LATEST)")
    parser.add_argument("--csv", metavar="FILE",
                        help="Where to write (default: OUTPUT/SNAPSHOT/explore/suspects.csv)")
    parser.add_argument("--k", type=int, default=K, metavar="K",
                        help=f"Neighbours that vote (default {K})")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ValueError("--k must be at least 1")
    explorer = load(args.output, args.snapshot)
    table = suspects(explorer, args.k)
    from pipeline.tools.explore.index import cache_folder
    from transforms.common.files import join
    path = args.csv or join(cache_folder(explorer.snapshot), "suspects.csv")
    write_atomically(path, to_csv(rows_of(explorer, table)))
    print(f"{table.num_rows:,} suspect records of {explorer.size:,} pictures in "
          f"{explorer.snapshot.name} (k={args.k}): {path}")
    return 0
