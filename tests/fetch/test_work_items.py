"""Work items of bounded length on distributed runners: a host shard is
fetched in work items that checkpoint (transforms/fetch/work_items.py), one
holder of its budget at a time, and a failure redoes one work item's URLs.

The work items are driven here as Beam's SDK harness drives a splittable
DoFn (its own ThreadsafeRestrictionTracker and RestrictionTrackerView, the
residual taken from `deferred_status` after `process` returns) against a real
loopback host that counts requests; on the real portable runner in
`test_a_portable_runner_fetches_a_shard_in_several_work_items`.
"""
from __future__ import annotations

import collections
import threading
import time
import tracemalloc

import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from pipeline.cli import run
from pipeline.demo.sample_data import Media, Occurrence, write_dwca
from tests.conftest import portable_runner
from tests.fetch.test_bundles import _noise_jpeg
from tests.fetch.test_fetch import JPEG, config
from tests.http_server import FaultServer
from tests.image_hosts import Host, ImageHosts, violations
from transforms.fetch.politeness import WINDOW_S, Budget, Politeness
from transforms.fetch.stage import FetchWorkItems
from transforms.fetch.work_items import WorkItemTracker, shard_items, work_item_size
from transforms.store.writing import ROW_GROUP_ROWS

WINDOW = GlobalWindow()


# ------------------------------------------------------------------ the tracker

def test_the_tracker_refuses_dynamic_splits_and_allows_the_checkpoint():
    tracker = WorkItemTracker(OffsetRange(0, 100))
    assert tracker.try_claim(0) and tracker.try_claim(1)
    for fraction in (0.5, 0.01, 0.99):  # a runner's dynamic split: a second holder
        assert tracker.try_split(fraction) is None
    assert tracker.current_restriction() == OffsetRange(0, 100)
    # A runner's checkpoint arrives on another thread while process() runs: refused.
    from_runner = []
    thread = threading.Thread(target=lambda: from_runner.append(tracker.try_split(0)))
    thread.start()
    thread.join()
    assert from_runner == [None] and tracker.current_restriction() == OffsetRange(0, 100)
    # The DoFn's own checkpoint (defer_remainder, on the claiming thread) splits.
    safe = ThreadsafeRestrictionTracker(tracker)
    RestrictionTrackerView(safe).defer_remainder()
    residual, _ = safe.deferred_status()
    assert tracker.current_restriction() == OffsetRange(0, 2)
    assert residual == OffsetRange(2, 100)
    safe.check_done()
    assert tracker.try_split(0) is None  # nothing left to split


def test_a_tracker_that_claimed_nothing_does_not_split():
    assert WorkItemTracker(OffsetRange(3, 9)).try_split(0) is None


def test_no_initial_split_and_a_fixed_order_of_urls():
    fn = FetchWorkItems(config(), work_item_seconds=1.0)
    tasks = [{"gbifID": i, "identifier": f"http://127.0.0.1/{i % 7}.jpg"} for i in range(20)]
    tasks += [{"gbifID": 98, "identifier": ""}, {"gbifID": 99, "identifier": " "}]
    element = (("127.0.0.1", 0), tasks)
    restriction = fn.initial_restriction(element)
    assert restriction == OffsetRange(0, 9) and fn.restriction_size(element, restriction) == 9
    assert list(fn.split(element, restriction)) == [restriction]  # no initial split
    # However the shuffle ordered the group, a position means the same URL.
    items = shard_items(tasks, config())
    shuffled = shard_items(tasks[::-1], config())
    assert [i.url for i in items] == [i.url for i in shuffled]
    assert [i.rows[0]["gbifID"] for i in items[-2:]] == [
        i.rows[0]["gbifID"] for i in shuffled[-2:]] == [98, 99]
    assert items[-1].url is None and items[-1].error == "task has no identifier"


def test_work_item_size_follows_the_shards_rate():
    assert work_item_size(120, 2, 5.0) == 600
    assert work_item_size(120, 2, 5.0, pace=0.5) == 300  # a throttled host
    assert work_item_size(0.1, 1, 2.0) == 1
    assert work_item_size(10, 2, 0.0) == 80  # no rate limit: by slots


def test_a_shard_handed_on_waits_a_rate_window_after_its_budget_is_revoked():
    politeness = Politeness(1, 1.0)
    politeness.grant("h", Budget(1, 2.0), key="s0")
    politeness.release(politeness.acquire("h", deadline=time.monotonic() + 5), 200)
    since = time.monotonic()
    politeness.revoke("h", None, key="s0")
    politeness.settle(["h"], since)
    assert time.monotonic() - since >= WINDOW_S


# ------------------------------------------------------------------ driven as the harness does

def _task(i: int, url: str) -> dict:
    return {"gbifID": i, "identifier": url, "occurrenceID": f"o{i}"}


def _outputs(outputs) -> tuple[list[dict], dict]:
    images, tally = [], {}
    for output in outputs:
        value = getattr(output, "value", output)
        value = getattr(value, "value", value)  # a tagged output's windowed value
        if isinstance(value, dict) and "tasks" in value:
            images.append(value)
        elif isinstance(value, dict) and getattr(output, "tag", None) == "tally":
            for name, n in value.items():
                tally[name] = tally.get(name, 0) + n
    return images, tally


class _Harness:
    """One work item at a time, as the SDK harness and a runner run them."""

    def __init__(self, fn: FetchWorkItems, element):
        self.fn, self.element = fn, element
        self.restriction = fn.initial_restriction(element)

    def start(self) -> tuple[ThreadsafeRestrictionTracker, list]:
        self.fn.start_bundle()
        tracker = ThreadsafeRestrictionTracker(self.fn.create_tracker(self.restriction))
        outputs = list(self.fn.process(self.element, tracker=RestrictionTrackerView(tracker),
                                       window=WINDOW, timestamp=MIN_TIMESTAMP))
        return tracker, outputs

    def finish(self, tracker: ThreadsafeRestrictionTracker, outputs: list) -> list:
        tracker.check_done()
        deferred = tracker.deferred_status()
        outputs = outputs + list(self.fn.finish_bundle())
        self.restriction = deferred[0] if deferred else None
        return outputs


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def test_a_shard_is_fetched_in_work_items_each_url_once(server, tmp_path):
    n = 24
    urls = [server.add(f"/w/{i}.jpg", JPEG) for i in range(n)]
    cfg = config(per_host_concurrency=1, per_host_rate=8.0)
    tasks = [_task(i, u) for i, u in enumerate(urls)] + [_task(100 + i, urls[i]) for i in range(4)]
    fn = FetchWorkItems(cfg, str(tmp_path / "store"), "snapshot-w", every=(50, 5.0),
                        work_item_seconds=0.5)  # 4 URLs a work item at 8/s
    fn.setup()
    harness = _Harness(fn, (("127.0.0.1", 0), tasks))
    outputs, spans = [], []
    while harness.restriction is not None:
        spans.append(harness.restriction)
        outputs += harness.finish(*harness.start())
    fn.teardown()
    images, tally = _outputs(outputs)
    assert len(spans) == 6 and tally["fetch.work_items"] == 6
    assert tally["fetch.checkpoints"] == 5
    assert sorted(t["gbifID"] for image in images for t in image["tasks"]) == sorted(
        t["gbifID"] for t in tasks)
    assert [server.hits(f"/w/{i}.jpg") for i in range(n)] == [1] * n
    times = sorted(t for i in range(n) for t in server.hit_times(f"/w/{i}.jpg"))
    assert all(sum(t <= u < t + 1.0 for u in times) <= 8 for t in times)


def test_a_failure_late_in_a_shard_redoes_one_work_item_in_bounded_memory(server, tmp_path):
    """The shard's second (last) work item fails after most of its URLs were
    fetched and stored: its retry fetches only what it had not stored (never
    more than its own URLs) and streams back what it had, a row group at a
    time; the first work item is not touched again."""
    n, item = 300, 150
    urls = [server.add(f"/big/{i}.jpg", _noise_jpeg(i, 384)) for i in range(n)]
    # Shard 0 of (4, 1000) is (1, 250/s): 0.6 s of it is 150 URLs.
    cfg = config(per_host_concurrency=4, per_host_rate=1000.0, max_image_bytes=1_000_000)
    fn = FetchWorkItems(cfg, str(tmp_path / "store"), "snapshot-m", every=(1, 0.0),
                        work_item_seconds=item / 250)
    fn.setup()
    harness = _Harness(fn, (("127.0.0.1", 0), [_task(i, u) for i, u in enumerate(urls)]))
    first_images, _ = _outputs(harness.finish(*harness.start()))
    assert len(first_images) == item and harness.restriction == OffsetRange(item, n)
    stored_bytes = sum(len(image["content"]) for image in first_images)
    del first_images
    tracker, outputs = harness.start()
    images, _ = _outputs(outputs)
    while len(images) < item - 20:  # late in the shard, the work item fails
        images += _outputs(fn._emit(block=True))[0]
    stored_bytes += sum(len(image["content"]) for image in images)
    del images, outputs, tracker
    before = [server.hits(f"/big/{i}.jpg") for i in range(n)]
    assert sum(before) <= n
    # The runner retries the work item: the same element and restriction.
    fn.start_bundle()
    retry = ThreadsafeRestrictionTracker(fn.create_tracker(harness.restriction))
    tracemalloc.start()
    seen, largest = 0, 0
    for output in fn.process(harness.element, tracker=RestrictionTrackerView(retry),
                             window=WINDOW, timestamp=MIN_TIMESTAMP):
        value = getattr(output, "value", output)
        if isinstance(value, dict) and "tasks" in value:
            seen += len(value["tasks"])
            largest = max(largest, len(value["content"]))
        del output, value  # the runner hands each output on: nothing here keeps it
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    harness.fn = fn
    rest, tally = _outputs(harness.finish(retry, []))
    fn.teardown()
    assert harness.restriction is None  # the shard is done
    assert seen + sum(len(image["tasks"]) for image in rest) == item  # its rows, once
    from_store = tally.get("fetch.already_stored_in_run", 0)
    assert from_store >= item - 20 - 1
    again = [server.hits(f"/big/{i}.jpg") - before[i] for i in range(n)]
    first_item = {urls.index(url) for url in sorted(urls)[:item]}  # positions: URLs sorted
    assert sum(again[i] for i in first_item) == 0  # the first work item is not redone
    assert sum(again) == item - from_store and max(again) <= 1
    total = sum(server.hits(f"/big/{i}.jpg") for i in range(n))
    assert total <= n + item  # at most one work item's URLs more than the shard
    # Memory while streaming its stored copies back: a few row groups of
    # pictures, not the work item's, nor the shard's.
    assert stored_bytes > 25_000_000
    assert peak < 2.5 * ROW_GROUP_ROWS * largest and peak < stored_bytes / 2, (
        peak, stored_bytes, largest)


# ------------------------------------------------------------------ the portable runner

RATE, CONCURRENCY = 6, 2  # two shards of (1 in flight, 3/s)


def test_a_portable_runner_fetches_a_shard_in_several_work_items(tiny_model, tmp_path):
    """Beam's job service and two SDK workers (how Flink runs Python): one
    host's two shards in work items of about a second each."""
    identifiers = [f"/img-{i}.jpg" for i in range(64)]
    identifiers += identifiers[:8]  # rows sharing a URL
    with portable_runner() as flags, ImageHosts([Host("127.0.0.2", latency=0.02)],
                                                str(tmp_path / "log.tsv")) as farm:
        rows = [f"{farm.urls[0]}{path}" for path in identifiers]
        occurrences = [Occurrence(gbifID=500 + i, occurrenceID=f"urn:o:{i}", datasetKey="d",
                                  taxonKey=1, scientificName="Amanita muscaria")
                       for i in range(len(rows))]
        export = write_dwca(str(tmp_path / "export.zip"), occurrences,
                            [Media(500 + i, url) for i, url in enumerate(rows)])
        manifest = run(PipelineOptions([
            "--export", export, "--model", tiny_model, "--output", str(tmp_path / "out"),
            "--quiet", "--batch_size", "8", "--allow_private_networks", "127.0.0.0/8",
            "--per_host_rate", str(RATE), "--per_host_concurrency", str(CONCURRENCY),
            "--fetch_work_item_seconds", "1.5", "--report_samples", "0", *flags,
            "--sdk_worker_parallelism", "2", "--direct_num_workers", "2"]))
    seen = farm.requests()
    over, worst = violations(seen, RATE, CONCURRENCY)
    assert over == 0, worst
    assert all(w["max_in_flight"] <= CONCURRENCY for w in worst.values()), worst
    paths = collections.Counter(path for _, _, _, path in seen)
    assert len(paths) == 64 and max(paths.values()) == 1  # each URL requested once
    counts, tally = manifest["counts"], manifest["tally"]
    assert counts["embedded"] == len(rows) and counts["accounted"] == len(rows)
    # 32 URLs a shard, 4 a work item (1.5 s at 3/s): 8 work items a shard.
    # About 32 URLs a shard, 4 a work item (1.5 s at 3/s): about 8 work items
    # a shard, each but the shard's last ending in a checkpoint.
    assert tally["fetch.work_items"] >= 14, tally
    assert tally["fetch.work_items"] - tally["fetch.checkpoints"] == 2, tally
    assert tally["fetch.distinct_urls"] == 64


def test_a_negative_work_item_length_is_one_clear_line(tmp_path):
    from pipeline.cli import UsageError
    with pytest.raises(UsageError, match=r"--fetch_work_item_seconds must be 0 \(one work "
                                         r"item per shard\) or more; found -1"):
        run(PipelineOptions(["--export", str(tmp_path / "e.zip"), "--model", "m",
                             "--output", str(tmp_path / "out"),
                             "--fetch_work_item_seconds", "-1"]))


def test_a_shards_positions_are_built_once_for_all_its_work_items(server, tmp_path):
    """Each work item of a shard needs the shard's sorted URLs; the process
    builds them for its first and keeps them for the next (each handed back by
    the runner as an equal element, not the same object); another shard, or
    other tasks under the same key, get their own."""
    import copy

    from transforms.fetch import work_items
    from transforms.fetch.work_items import cached_shard_items
    urls = [server.add(f"/c/{i}.jpg", JPEG) for i in range(12)]
    cfg = config(per_host_concurrency=1, per_host_rate=8.0)
    tasks = [_task(i, u) for i, u in enumerate(urls)]
    fn = FetchWorkItems(cfg, str(tmp_path / "store"), "snapshot-c", every=(50, 5.0),
                        work_item_seconds=0.5)  # 4 URLs a work item at 8/s
    fn.setup()
    built = work_items.BUILT[0]
    harness = _Harness(fn, (("127.0.0.1", 0), tasks))
    fetched = 0
    while harness.restriction is not None:
        harness.element = (("127.0.0.1", 0), copy.deepcopy(tasks))
        fetched += len(_outputs(harness.finish(*harness.start()))[0])
        assert work_items.BUILT[0] == built + 1  # the first work item's list, reused
    assert fetched == 12 and [server.hits(f"/c/{i}.jpg") for i in range(12)] == [1] * 12
    assert fn.initial_restriction((("127.0.0.1", 1), tasks[:5])) == OffsetRange(0, 5)
    assert work_items.BUILT[0] == built + 2  # another shard
    fewer = cached_shard_items("snapshot-c", ("127.0.0.1", 0), tasks[:6], cfg)
    assert [item.url for item in fewer] == sorted(urls[:6])  # never the stale twelve
    assert work_items.BUILT[0] == built + 3
    fn.teardown()
