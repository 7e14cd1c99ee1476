"""A DoFn base that works on several elements at once on a bounded thread pool.

Fetching waits on the network and decoding runs in C code that releases the
GIL, so both overlap with inference when they run on threads. The number of
elements in flight is bounded, so memory stays flat however large the input,
and every submitted element is drained before the bundle ends, so none is lost.

Overlap needs care: the runner calls `process` on the same thread that runs
the fused downstream steps, inference included, so while a batch is inferred
no new element reaches the pool. A stage that emits eagerly has little or
nothing queued at that moment, and the next batch's work starts only after
inference returns. `lookahead` keeps that many elements submitted before
results are emitted, so the pool works on the next batch during inference.
"""
from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any, Iterable, Iterator

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from transforms.common.tally import Tally, tally_outputs

HOLD_S = 1.0  # finished work is never held back longer than this


class ThreadedDoFn(beam.DoFn):
    """Runs `work(element)` on a thread pool; outputs leave in completion order.

    Subclasses implement `work`, which must not raise: it returns the element's
    outputs (plain values or `TaggedOutput`s). An exception that escapes `work`
    anyway fails the bundle, which the runner retries, rather than losing the
    element silently.

    `lookahead`: results are emitted only while more than this many elements
    are pending (0: as soon as they are done); `max_in_flight`: `process`
    blocks while this many are pending and none is done (default: twice the
    threads, and at least `lookahead` plus the threads).

    `self.tally` collects counts for the manifest; it is emitted on the
    `tally` output at the end of each bundle.
    """

    def __init__(self, threads: int, max_in_flight: int = 0, lookahead: int = 0):
        self._threads = max(1, int(threads))
        self._lookahead = max(0, int(lookahead))
        self._max_in_flight = max(self._threads, self._lookahead + 1, int(
            max_in_flight or max(2 * self._threads, self._lookahead + self._threads)))
        self._pool = None
        self._pending: collections.deque = collections.deque()
        self.tally = Tally()

    def work(self, element: Any) -> Iterable[Any]:
        raise NotImplementedError

    def setup(self):
        self.tally = Tally()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._threads, thread_name_prefix=type(self).__name__)

    def start_bundle(self):
        self._pending = collections.deque()

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        self._pending.append((self._pool.submit(lambda: list(self.work(element))), window,
                              timestamp, time.monotonic()))
        yield from self._drain(self._lookahead, self._max_in_flight - 1)

    def finish_bundle(self):
        yield from self._drain(0, 0)
        yield from tally_outputs(self.tally)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _drain(self, lookahead: int, keep: int) -> Iterator[Any]:
        """Emit finished work while more than `lookahead` elements are pending,
        and, while fewer are (input trickles in: holding work back then saves
        nothing and delays writing it), work submitted `HOLD_S` ago; block
        until at most `keep` (>= lookahead) are pending."""
        while self._pending:
            now = time.monotonic()
            done = [entry for entry in self._pending if entry[0].done()]
            over = len(self._pending) - lookahead
            # Held-back work is let go early only while fewer than `lookahead`
            # are pending: input is trickling in, so nothing is gained by waiting.
            chosen = [entry for i, entry in enumerate(done)
                      if i < over or (over < 0 and now - entry[3] >= HOLD_S)]
            if not chosen:
                if over <= 0 or done or len(self._pending) <= keep:
                    return
                concurrent.futures.wait(
                    [entry[0] for entry in self._pending],
                    return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            for entry in chosen:
                self._pending.remove(entry)
                future, window, timestamp, _ = entry
                for output in future.result():
                    yield _windowed(output, window, timestamp)


def _windowed(output: Any, window, timestamp) -> Any:
    """Outputs keep the window of the element that produced them."""
    if isinstance(output, TaggedOutput):
        return TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
    return WindowedValue(output, timestamp, [window])
