"""One fetching run at a time per image store.

Several outputs may name one `--image_store` (one output per model, say).
Two runs of them at the same time would each fetch what the store lacks,
and so the same URLs from the same hosts at the same moment: twice the
hosts' limits, and twice the pictures. The simplest guard that rules this
out on every runner and storage is the output's own lock applied to the
store: a run holds `STORE/LEASE` (`transforms/common/lease.py`: the same exclusive
section, renewal and expiry) from launch to end, and a second run on another
output that names the same store is refused at launch, naming the first.
Runs that share a store therefore run one after another.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from pipeline.lease import Lease, held as held_lease


@contextlib.contextmanager
def held(store: str, snapshot: str, output: str, command: str = "", *,
         workers: bool = False) -> Iterator[Lease]:
    """The store's lease for the run writing `snapshot` into `output`
    (`workers`: its distributed job's workers renew it too)."""
    with held_lease(store, snapshot, command, what="image store", output=output,
                    workers=workers) as lease:
        yield lease
