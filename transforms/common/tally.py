"""Counts that stages report for the manifest, on every runner.

Beam metrics cannot be read back reliably on every runner before the run
ends, and the manifest is written inside the pipeline. So each stage also
emits small dicts of counts on the `tally` output (once per bundle, not per
element); `MergeTallies` sums them into one dict that the finalize step reads
as a side input. Keys are dotted names, e.g. `skipped.not_still_image` or
`fetch.latency_ms.le_250`. Keys that start with `min:` hold a figure, and
merge by their minimum instead of their sum.
"""
from __future__ import annotations

import bisect
import collections
import threading
from typing import Iterable

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

TALLY = "tally"

# Upper bounds (ms) of the latency histogram's buckets.
LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def latency_key(prefix: str, seconds: float) -> str:
    """The histogram key for one latency: `<prefix>.le_<bound>` or `.gt_<max>`."""
    ms = seconds * 1000.0
    i = bisect.bisect_left(LATENCY_BUCKETS_MS, ms)
    if i == len(LATENCY_BUCKETS_MS):
        return f"{prefix}.gt_{LATENCY_BUCKETS_MS[-1]}"
    return f"{prefix}.le_{LATENCY_BUCKETS_MS[i]}"


class Tally:
    """A thread-safe counter that a DoFn flushes once per bundle."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def add(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def flush(self) -> dict:
        with self._lock:
            counts, self._counts = dict(self._counts), collections.Counter()
        return counts


def tally_outputs(tally: Tally) -> list:
    """The tally's counts as an output that `finish_bundle` may yield."""
    counts = tally.flush()
    if not counts:
        return []
    return [TaggedOutput(TALLY, WindowedValue(counts, MIN_TIMESTAMP, [GlobalWindow()]))]


class MergeTallies(beam.CombineFn):
    """Sums tally dicts key by key."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, acc: dict, counts: dict) -> dict:
        for key, value in counts.items():
            if key.startswith("min:"):  # a figure, not a count: the worst one wins
                acc[key] = min(acc[key], value) if key in acc else value
            else:
                acc[key] = acc.get(key, 0) + value
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        merged: dict = {}
        for acc in accs:
            self.add_input(merged, acc)
        return merged

    def extract_output(self, acc: dict) -> dict:
        return dict(sorted(acc.items()))
