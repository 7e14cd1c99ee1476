"""The fetch stage: image tasks in; stored copies, 304s or failure rows out.

Politeness must hold for the whole job, however many workers run it, and
that needs no service beside Beam: the way crawlers do it (Nutch's per-host
queues, StormCrawler's partitioning by host), every task is keyed by the
host it is fetched from and one of that host's few shards, and grouped. A
shard is fetched by one worker process at a time, within its share of the
host's limits (`shard_budgets`): the shares of all shards add up to at most
`--per_host_concurrency` requests in flight and `--per_host_rate` requests in
any 1-second window. Grouping also brings every row of one URL together, so
each distinct URL is fetched once and its result goes to all of its rows.

Inside a worker process the `HostScheduler` fetches all the shards it holds
at once, each host from its own queue, so hosts never wait for each other,
and every group of a bundle is queued as soon as it arrives, so groups never
wait for each other either. Each fetched picture becomes the image store's
copy on one of a few copy threads (`COPY_THREADS`), so a fetching thread is
back on the network as soon as its answer is in, and is written to the store
as the stage goes (`transforms/store/writing.py`), with its URL entry.

A bundle that fails and is retried cannot hold a shard's budget twice
(grants are keyed by shard, and a new bundle first gives back what an
unfinished one held), nor see the failed attempt's queued fetches; the retry
reads back what the failed attempt already stored for its shards (their own
parts only): first which of its URLs were stored (two index columns), then
the copies themselves, streamed a row group at a time and emitted as they are
read, so memory stays bounded however late in a shard the failure came; it
fetches only the rest.

Which runner gets which: on distributed runners (`FetchImages` given
`work_item_seconds`) `FetchWorkItems` fetches a shard in work items of
bounded length that checkpoint, one holder of the shard's budget at a time
(transforms/fetch/work_items.py), so a failure redoes minutes, not a large
shard's hours. The local runner keeps `FetchHostShards`, one work item per
shard: it fuses fetching with embedding in one stage and retries no bundle,
so checkpoints would only add pauses there.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.windowed_value import WindowedValue

from transforms.common import lease, progress
from transforms.common.heap import freeze_long_lived
from transforms.common.lease import LeaseRef
from transforms.common.records import FAILURES, NOT_MODIFIED, failure
from transforms.common.tally import TALLY, Tally, latency_key, tally_outputs
from transforms.fetch.config import FetchConfig, fetch_url, host_of
from transforms.fetch.fetcher import Fetcher
from transforms.fetch.metrics import MetricBuffer
from transforms.fetch.outcome import FetchResult
from transforms.fetch.politeness import shared
from transforms.fetch.results import copy_of, image, outputs, store_entries
from transforms.fetch.scheduler import HostScheduler, Job
from transforms.fetch.work_items import (
    ShardItem,
    WorkItemTracker,
    cached_shard_items,
    work_item_size,
)
from transforms.store.copies import StoredCopy
from transforms.store.layout import ImageStore
from transforms.store.writing import StoreWriter, stored_copies_in_run, stored_entries_in_run

INVALID_HOST = "(invalid)"
# Threads making the store's copies, per process: copies are CPU work, so
# more threads than cores only take cores from the model.
COPY_THREADS = max(1, min(4, os.cpu_count() or 2))
# Limits of a host this process holds no shard of: a redirect target on
# another host. They hold per process, not for the job.
UNOWNED_LIMITS = (1, 1.0)


def shard_key(task: dict, config: FetchConfig) -> tuple[str, int]:
    """(host, shard): where a task is fetched. The shard comes from a stable
    hash of the URL, so every row of one URL lands in the same group."""
    try:
        url = fetch_url(task, config)
    except ValueError:
        return (INVALID_HOST, 0)
    host = host_of(url)
    budgets = config.shard_budgets(host)
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (host, _weighted(int.from_bytes(digest, "big"), budgets))


def _weighted(value: int, budgets: list) -> int:
    """A shard for a hash value, in proportion to the shards' rates (equal
    shards: value mod n), so each shard's share of URLs matches its budget."""
    weights = [b.rate or b.concurrency for b in budgets]
    if len(set(weights)) <= 1:
        return value % len(budgets)
    point = (value % 1_000_003) / 1_000_003 * sum(weights)
    for shard, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return shard
    return len(budgets) - 1


class FetchHostShards(beam.DoFn):
    """(host, shard) groups of tasks in; one output per task.

    Outputs: main, one element per fetched distinct URL: the store's copy as
    `content`, image_sha256 (of the fetched bytes), image_format,
    http_status, attempts, etag, last_modified, fetch_seconds, bytes, the
    fetched picture's width and height, and `tasks`, every task (row) of that
    URL; `NOT_MODIFIED`, one per revalidated task answered 304; `FAILURES`,
    one failure row per task.
    """

    def __init__(self, config: FetchConfig, store: Optional[str] = None, run: str = "",
                 every: tuple[int, float] = (500, 5.0), leases: Sequence[LeaseRef] = ()):
        self.config = config
        self._leases = tuple(leases)  # a distributed job's: renewed while this is set up
        self._store_root = store
        self._run = run
        self._every = every
        self._fetcher: Optional[Fetcher] = None
        self._scheduler: Optional[HostScheduler] = None

    def setup(self):
        lease.keep_alive(self._leases)  # this process renews the job's leases meanwhile
        self._politeness = shared(*UNOWNED_LIMITS, self.config.host_overrides())
        self._fetcher = Fetcher(self.config, politeness=self._politeness)
        max_pixels = self.config.max_image_pixels
        self._scheduler = HostScheduler(self._fetcher, self._politeness,
                                        self.config.fetch_concurrency,
                                        after=lambda job, result: copy_of(result, max_pixels),
                                        after_threads=COPY_THREADS)
        self._store = ImageStore(self._store_root) if self._store_root else None
        self._writer = (StoreWriter(self._store, self._run, *self._every)
                        if self._store is not None else None)
        self._metrics = MetricBuffer("fetch")
        self._granted: list[tuple[str, Any]] = []  # (host, shard key) held by this instance
        self._bundle = 0
        self.tally = Tally()
        freeze_long_lived()  # full collections would stall every fetch thread

    def start_bundle(self):
        # A bundle that failed never reached finish_bundle: give back what it
        # held and forget the fetches it queued.
        self._release_grants()
        self._scheduler.reset()
        self.tally.flush()  # its counts too: its retry counts its own
        self._bundle += 1
        self._busy_since: Optional[float] = None  # the first URL of this bundle

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        lease.check(self._leases)  # no new work for a run that lost its folder
        (host, shard), tasks = element
        by_url: dict[str, list[dict]] = {}
        for task in tasks:
            try:
                url = fetch_url(task, self.config)
            except ValueError as exc:
                yield self._failed(task, "invalid_url", str(exc), window, timestamp)
                continue
            by_url.setdefault(url, []).append(task)
        yield from self._fetch(host, shard, by_url, window, timestamp)

    def _fetch(self, host: str, shard: int, by_url: dict[str, list[dict]], window,
               timestamp) -> Iterable[Any]:
        """Queues the fetches of one shard's URLs (what an earlier attempt of
        this run stored is read back instead) and emits what is done."""
        if not by_url:
            return
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        done = self._stored_before(host, shard, set(
            rows[0].get("identifier") or "" for rows in by_url.values()))
        if host != INVALID_HOST:
            key = (host, shard)
            self._politeness.grant(host, self.config.shard_budgets(host)[shard], key=key)
            if (host, key) not in self._granted:
                self._granted.append((host, key))
        waiting: dict[str, list] = {}  # content → (url, rows, entry) stored by an earlier attempt
        for url, rows in by_url.items():
            self.tally.add("fetch.distinct_urls")
            if len(rows) > 1:
                self.tally.add("dedup.rows_sharing_a_fetch", len(rows) - 1)
            stored = done.get(rows[0].get("identifier") or "")
            if stored is not None and not any(r.get("revalidate") for r in rows):
                waiting.setdefault(stored["image_sha256"], []).append((url, rows, stored))
                continue
            self._submit(host, shard, url, rows, window, timestamp)
        if waiting:
            yield from self._stream_stored(host, shard, waiting, window, timestamp)
        yield from self._emit(block=False)
        self._metrics.flush()

    def _submit(self, host: str, shard: int, url: str, rows: list, window, timestamp) -> None:
        etag, last_modified = _conditional(rows)
        self._scheduler.submit(Job(host, url, etag, last_modified,
                                   payload=(self._bundle, shard, rows, window, timestamp),
                                   group=shard))

    def _stream_stored(self, host: str, shard: int, waiting: dict, window, timestamp):
        """What an earlier attempt of this bundle stored, read back copy by copy
        (bounded memory however much it was) and emitted as it is read; a copy
        no longer found is fetched again."""
        for copy in stored_copies_in_run(self._store, self._run, host, shard, set(waiting)):
            for _, rows, entry in waiting.pop(copy["image_sha256"], ()):
                self.tally.add("fetch.already_stored_in_run")
                yield _windowed(_from_store(rows, dict(entry, copy=copy)), window, timestamp)
            yield from self._emit(block=False)
        for pending in waiting.values():
            for url, rows, _ in pending:
                self._submit(host, shard, url, rows, window, timestamp)

    def finish_bundle(self):
        while self._scheduler.pending():
            yield from self._emit(block=True)
        if self._writer is not None:
            self._writer.flush()  # everything this bundle fetched is durable now
        self._release_grants()
        if self._busy_since is not None:
            self.tally.add("time.fetch_s", time.monotonic() - self._busy_since)
        self._metrics.flush()
        yield from tally_outputs(self.tally)

    def teardown(self):
        lease.let_go(self._leases)
        self._release_grants()
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def _release_grants(self) -> None:
        for host, key in self._granted:
            self._politeness.revoke(host, None, key=key)
        self._granted = []

    def _stored_before(self, host: str, shard: int, identifiers: set) -> dict:
        """Which of these URLs this run already stored for the shard (a retried
        bundle's earlier attempt): their URL entries, without the pictures;
        empty on a first attempt, at the cost of one listing."""
        if self._store is None or not self._run or host == INVALID_HOST:
            return {}
        return stored_entries_in_run(self._store, self._run, host, shard, identifiers)

    def _emit(self, block: bool) -> Iterable[Any]:
        for job, result, copy in self._scheduler.take(block):
            bundle, shard, rows, window, timestamp = job.payload
            if bundle != self._bundle:
                continue  # a fetch of a bundle that failed: its retry has its own
            self._record(result, copy)
            if self._writer is not None:
                entry, row = store_entries(rows[0].get("identifier") or job.url, job.url,
                                           result, copy)
                if entry is not None:
                    self._writer.add(job.host, shard, entry, row)
            for output in outputs(rows, result, copy):
                yield _windowed(output, window, timestamp)

    def _failed(self, task: dict, reason: str, detail: str, window, timestamp):
        self.tally.add("fetch.failed")
        self.tally.add(f"fetch.reason.{reason}")
        return _windowed(TaggedOutput(FAILURES, failure(task, "fetch", reason, detail)),
                         window, timestamp)

    def _record(self, result: FetchResult, copy: Any) -> None:
        outcome = "not_modified" if result.not_modified else ("ok" if result.ok else "failed")
        counts = {outcome: 1, "requests": result.requests,
                  "retries": max(0, result.attempts - 1)}
        if result.reason:
            counts[f"reason.{result.reason}"] = 1
        if result.nbytes:
            counts["bytes"] = result.nbytes
        if isinstance(copy, StoredCopy):
            counts["stored_bytes"] = len(copy.data)
        for name, n in counts.items():
            if n:
                self._metrics.inc(name, n)
                self.tally.add(f"fetch.{name}", n)
        progress.report("fetched" if result.ok else "fetch_failed")
        self._metrics.latency_ms(int(result.elapsed_s * 1000))
        self.tally.add(latency_key("fetch.latency_ms", result.elapsed_s))


class FetchWorkItems(FetchHostShards, RestrictionProvider):
    """`FetchHostShards` for distributed runners: a (host, shard) group is
    fetched in work items of about `work_item_seconds` of fetching each
    (transforms/fetch/work_items.py), so a failure redoes one work item, not
    the shard's hours.

    A work item claims its URLs' positions before queueing them, defers the
    rest of the shard (a self-checkpoint) and returns at once, so the groups
    of a bundle still fetch side by side; the bundle's end drains them, makes
    what they fetched durable in the image store and gives the shards'
    budgets back. A shard handed on to a later work item (perhaps in another
    worker process) is given back only once this process has kept to its
    smaller limits for a rate window (`Politeness.settle`), so the host never
    sees a shard's share twice. A retried work item reads back what its failed
    attempt stored, as a retried bundle does, and fetches only the rest.
    """

    def __init__(self, config: FetchConfig, store: Optional[str] = None, run: str = "",
                 every: tuple[int, float] = (500, 5.0), work_item_seconds: float = 120.0,
                 leases: Sequence[LeaseRef] = ()):
        super().__init__(config, store, run, every, leases)
        self.work_item_seconds = float(work_item_seconds)

    # -- the restriction: positions over the group's distinct URLs

    def initial_restriction(self, element) -> OffsetRange:
        return OffsetRange(0, len(cached_shard_items(self._run, tuple(element[0]), element[1],
                                                     self.config)))

    def create_tracker(self, restriction: OffsetRange) -> WorkItemTracker:
        return WorkItemTracker(restriction)

    def restriction_size(self, element, restriction: OffsetRange) -> int:
        return restriction.size()

    # (`split`, the initial split, keeps the whole restriction: RestrictionProvider's default.)

    def setup(self):
        super().setup()
        self._handed_on: set[str] = set()  # hosts of shards deferred in this bundle

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam,
                tracker=beam.DoFn.RestrictionParam()):  # last: Beam passes it by name
        lease.check(self._leases)  # no new work for a run that lost its folder
        (host, shard), tasks = element
        items = cached_shard_items(self._run, (host, shard), tasks, self.config)
        span = tracker.current_restriction()
        budget = (self.config.shard_budgets(host)[shard] if host != INVALID_HOST
                  else None)
        size = (work_item_size(self.work_item_seconds, budget.concurrency, budget.rate,
                               self._politeness.pace(host))
                if budget is not None else span.stop - span.start)
        claimed: list[ShardItem] = []
        position = span.start
        while position < span.stop and len(claimed) < size and tracker.try_claim(position):
            claimed.append(items[position])
            position += 1
        if position < span.stop:
            tracker.defer_remainder()
            self.tally.add("fetch.checkpoints")
            self._handed_on.add(host)
        self.tally.add("fetch.work_items")
        by_url: dict[str, list[dict]] = {}
        for item in claimed:
            if item.url is None:
                yield self._failed(item.rows[0], "invalid_url", item.error or "", window,
                                   timestamp)
            else:
                by_url[item.url] = item.rows
        yield from self._fetch(host, shard, by_url, window, timestamp)

    def _release_grants(self) -> None:
        since = time.monotonic()
        super()._release_grants()
        if self._handed_on:
            self._politeness.settle(sorted(self._handed_on), since)
            self._handed_on = set()


def _from_store(rows: list[dict], stored: dict) -> dict:
    """A URL an earlier attempt of this run already fetched and stored."""
    row = stored["copy"]
    copy = StoredCopy(row["data"], row["width"], row["height"], row["source_width"],
                      row["source_height"], False)
    return image(rows, copy, stored["image_sha256"], None, stored.get("http_status"), 0,
                 stored.get("etag"), stored.get("last_modified"), 0.0,
                 row.get("source_bytes") or 0)


def _conditional(rows: list[dict]) -> tuple[Optional[str], Optional[str]]:
    """Validators to send: only when every row of the URL asked to revalidate
    with the same ones (otherwise a 304 would not answer all of them)."""
    validators = {(r.get("etag") or None, r.get("last_modified") or None) if
                  r.get("revalidate") else None for r in rows}
    if len(validators) != 1 or None in validators:
        return None, None
    return next(iter(validators))


def _windowed(output: Any, window, timestamp) -> Any:
    """Outputs keep the window of the group that produced them."""
    if isinstance(output, TaggedOutput):
        return TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
    return WindowedValue(output, timestamp, [window])


class FetchImages(beam.PTransform):
    """Tasks → fetched images (one per distinct URL, as the store's copy), 304s,
    failures, tally; the copies and URL entries are written to `store`.

    Returns the tagged outputs of `FetchHostShards`: `.images`,
    `[NOT_MODIFIED]`, `[FAILURES]` and `[TALLY]`.
    """

    def __init__(self, config: FetchConfig, store: Optional[str] = None, run: str = "",
                 every: tuple[int, float] = (500, 5.0),
                 work_item_seconds: Optional[float] = None, leases: Sequence[LeaseRef] = ()):
        super().__init__()
        self._leases = tuple(leases)
        self._config = config
        self._store = store
        self._run = run
        self._every = every
        self._work_item_seconds = work_item_seconds

    def expand(self, tasks):
        config = self._config
        # Distributed runners (`work_item_seconds` given) fetch a shard in work
        # items of bounded length; the local runner fetches a shard in one
        # (there a failed bundle fails the run, and nothing is gained).
        fetch = (FetchWorkItems(config, self._store, self._run, self._every,
                                self._work_item_seconds, self._leases)
                 if self._work_item_seconds else
                 FetchHostShards(config, self._store, self._run, self._every, self._leases))
        return (tasks
                | "ByHostShard" >> beam.Map(lambda task: (shard_key(task, config), task))
                | "GroupByHostShard" >> beam.GroupByKey()
                | "FetchByHost" >> beam.ParDo(fetch).with_outputs(
                    FAILURES, NOT_MODIFIED, TALLY, main="images"))
