"""The fetch stage: image tasks in; fetched images, 304s or failure rows out.

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
at once, each host from its own queue, so hosts never wait for each other.

When a runner retries a bundle (a worker died, a bundle failed), the rows
that the failed attempt already wrote are in the run's parts: the new
attempt reads their keys once and fetches only the rest, so the fetching
redone is what the failed attempt had not yet written (at most about
`--checkpoint_seconds` or `--checkpoint_rows` per writer, see transforms/write/parts.py).
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from transforms.common import progress
from transforms.fetch.config import FetchConfig, fetch_url, host_of
from transforms.fetch.outcome import FetchResult
from transforms.fetch.fetcher import Fetcher
from transforms.fetch.scheduler import HostScheduler, Job
from transforms.fetch.politeness import Budget, shard_budgets, shared
from transforms.write.compact import part_files, read_keys
from transforms.common.records import FAILURES, NOT_MODIFIED, failure, key_of
from transforms.common.tally import TALLY, Tally, latency_key, tally_outputs

INVALID_HOST = "(invalid)"
# Limits of a host this process holds no shard of: a redirect target on
# another host. They hold per process, not for the job.
UNOWNED_LIMITS = (1, 1.0)
# Distinct URLs a process holds in its queues before `process` waits for
# some to finish: bounds the memory of task metadata.
MAX_QUEUED = 50_000


def shard_key(task: dict, config: FetchConfig) -> tuple[str, int]:
    """(host, shard): where a task is fetched. The shard comes from a stable
    hash of the URL, so every row of one URL lands in the same group."""
    try:
        url = fetch_url(task, config)
    except ValueError:
        return (INVALID_HOST, 0)
    host = host_of(url)
    shards = len(shard_budgets(*config.host_limits(host)))
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (host, int.from_bytes(digest, "big") % shards)


class _MetricBuffer:
    """Beam metrics updated from pool threads would be lost: Beam keeps the
    metrics container per thread. Counts are kept here and moved into Beam
    from the bundle's own thread in `flush`."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._latencies: list[int] = []
        self._counters: dict[str, Any] = {}
        self._latency = Metrics.distribution(namespace, "latency_ms")

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def latency_ms(self, ms: int) -> None:
        with self._lock:
            self._latencies.append(ms)

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            latencies, self._latencies = self._latencies, []
        for name, n in counts.items():
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(self._namespace, name)
            counter.inc(n)
        for ms in latencies:
            self._latency.update(ms)


class FetchHostShards(beam.DoFn):
    """(host, shard) groups of tasks in; one output per task.

    Outputs: main, one element per fetched distinct URL: the image fields
    (content, image_sha256, image_format, http_status, attempts, etag,
    last_modified, fetch_seconds, bytes) and `tasks`, every task (row) of
    that URL; `NOT_MODIFIED`, one per revalidated task answered 304;
    `FAILURES`, one failure row per task.
    """

    def __init__(self, config: FetchConfig, run_folder: Optional[str] = None):
        self.config = config
        self._run_folder = run_folder
        self._fetcher: Optional[Fetcher] = None
        self._scheduler: Optional[HostScheduler] = None

    def setup(self):
        self._politeness = shared(*UNOWNED_LIMITS, self.config.host_overrides())
        self._fetcher = Fetcher(self.config, politeness=self._politeness)
        self._scheduler = HostScheduler(self._fetcher, self._politeness,
                                        self.config.fetch_concurrency)
        self._metrics = _MetricBuffer("fetch")
        self.tally = Tally()

    def start_bundle(self):
        self._granted: list[tuple[str, Budget]] = []
        self._written: Optional[set] = None
        self._busy_since: Optional[float] = None  # the first URL of this bundle

    def _already_written(self) -> set:
        """Keys this run already wrote (parts of earlier attempts); read once a bundle."""
        if self._written is None:
            self._written = set()
            if self._run_folder:
                self._written = read_keys(part_files(self._run_folder, "embeddings") +
                                          part_files(self._run_folder, "failures"))
        return self._written

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        (host, shard), tasks = element
        by_url: dict[str, list[dict]] = {}
        written = self._already_written()
        for task in tasks:
            if written and key_of(task) in written:
                self.tally.add("fetch.already_written_in_run")
                continue
            try:
                url = fetch_url(task, self.config)
            except ValueError as exc:
                yield self._failed(task, "invalid_url", str(exc), window, timestamp)
                continue
            by_url.setdefault(url, []).append(task)
        if host != INVALID_HOST and by_url:
            budget = shard_budgets(*self.config.host_limits(host))[shard]
            self._politeness.grant(host, budget)
            self._granted.append((host, budget))
        if by_url and self._busy_since is None:
            self._busy_since = time.monotonic()
        for url, rows in by_url.items():
            self.tally.add("fetch.distinct_urls")
            if len(rows) > 1:
                self.tally.add("dedup.rows_sharing_a_fetch", len(rows) - 1)
            etag, last_modified = _conditional(rows)
            self._scheduler.submit(Job(host, url, etag, last_modified,
                                       payload=(rows, window, timestamp), group=shard))
        yield from self._emit(block=False)
        while self._scheduler.pending() > MAX_QUEUED:
            yield from self._emit(block=True)
        self._metrics.flush()

    def finish_bundle(self):
        while self._scheduler.pending():
            yield from self._emit(block=True)
        for host, budget in self._granted:
            self._politeness.revoke(host, budget)
        self._granted = []
        if self._busy_since is not None:
            self.tally.add("time.fetch_s", time.monotonic() - self._busy_since)
        self._metrics.flush()
        yield from tally_outputs(self.tally)

    def teardown(self):
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def _emit(self, block: bool) -> Iterable[Any]:
        for job, result in self._scheduler.take(block):
            rows, window, timestamp = job.payload
            self._record(result)
            for output in _outputs(rows, result):
                yield _windowed(output, window, timestamp)

    def _failed(self, task: dict, reason: str, detail: str, window, timestamp):
        self.tally.add("fetch.failed")
        self.tally.add(f"fetch.reason.{reason}")
        return _windowed(TaggedOutput(FAILURES, failure(task, "fetch", reason, detail)),
                         window, timestamp)

    def _record(self, result: FetchResult) -> None:
        outcome = "not_modified" if result.not_modified else ("ok" if result.ok else "failed")
        counts = {outcome: 1, "requests": result.requests,
                  "retries": max(0, result.attempts - 1)}
        if result.reason:
            counts[f"reason.{result.reason}"] = 1
        if result.content:
            counts["bytes"] = len(result.content)
        for name, n in counts.items():
            if n:
                self._metrics.inc(name, n)
                self.tally.add(f"fetch.{name}", n)
        progress.report("fetched" if result.ok else "fetch_failed")
        self._metrics.latency_ms(int(result.elapsed_s * 1000))
        self.tally.add(latency_key("fetch.latency_ms", result.elapsed_s))


def _conditional(rows: list[dict]) -> tuple[Optional[str], Optional[str]]:
    """Validators to send: only when every row of the URL asked to revalidate
    with the same ones (otherwise a 304 would not answer all of them)."""
    validators = {(r.get("etag") or None, r.get("last_modified") or None) if
                  r.get("revalidate") else None for r in rows}
    if len(validators) != 1 or None in validators:
        return None, None
    return next(iter(validators))


def _outputs(rows: list[dict], result: FetchResult) -> list:
    """One fetch's result for every row of its URL."""
    if result.not_modified:
        return [TaggedOutput(NOT_MODIFIED, dict(task, http_status=304,
                                                attempts=result.attempts))
                for task in rows]
    if not result.ok:
        return [TaggedOutput(FAILURES, failure(task, "fetch", result.reason or "internal_error",
                                               result.detail, result.http_status,
                                               result.attempts))
                for task in rows]
    content = result.content or b""
    return [dict(content=content, image_sha256=hashlib.sha256(content).hexdigest(),
                 image_format=result.image_format, http_status=result.http_status,
                 attempts=result.attempts, etag=result.etag,
                 last_modified=result.last_modified,
                 fetch_seconds=round(result.elapsed_s, 3), bytes=len(content), tasks=rows)]


def _windowed(output: Any, window, timestamp) -> Any:
    """Outputs keep the window of the group that produced them."""
    if isinstance(output, TaggedOutput):
        return TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
    return WindowedValue(output, timestamp, [window])


class FetchImages(beam.PTransform):
    """Tasks → fetched images (one per distinct URL), 304s, failures, tally.

    Returns the tagged outputs of `FetchHostShards`: `.images`,
    `[NOT_MODIFIED]`, `[FAILURES]` and `[TALLY]`.
    """

    def __init__(self, config: FetchConfig, run_folder: Optional[str] = None):
        super().__init__()
        self._config = config
        self._run_folder = run_folder

    def expand(self, tasks):
        config = self._config
        return (tasks
                | "ByHostShard" >> beam.Map(lambda task: (shard_key(task, config), task))
                | "GroupByHostShard" >> beam.GroupByKey()
                | "FetchByHost" >> beam.ParDo(FetchHostShards(config, self._run_folder)).with_outputs(
                    FAILURES, NOT_MODIFIED, TALLY, main="images"))
