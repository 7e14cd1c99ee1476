"""The fetch stage under the runner's bundles: a failed bundle and its retry
never hold a host's budget twice nor fetch what the failed attempt stored,
and the groups of one bundle never wait for each other. Driven directly, as
a runner drives a DoFn, against a real loopback host that counts requests."""
from __future__ import annotations

import time

import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from tests.fetch.test_fetch import JPEG, config
from tests.http_server import FaultServer
from transforms.fetch.politeness import shared
from transforms.fetch.stage import UNOWNED_LIMITS, FetchHostShards
from transforms.store.layout import ImageStore

WINDOW = GlobalWindow()


def _task(i: int, url: str) -> dict:
    return {"gbifID": i, "identifier": url, "occurrenceID": f"o{i}"}


def _values(outputs) -> list:
    return [getattr(o, "value", o) for o in outputs]


def _images(outputs) -> list[dict]:
    return [v for v in _values(outputs) if isinstance(v, dict) and "tasks" in v]


def _windows_over(times: list[float], rate: int) -> int:
    return sum(1 for t in times if sum(t <= u < t + 1.0 for u in times) > rate)


def _drive(fn, group):
    return list(fn.process(group, window=WINDOW, timestamp=MIN_TIMESTAMP))


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def test_a_failed_bundle_and_its_retry_keep_the_limits_and_fetch_the_rest(server, tmp_path):
    urls = [server.add(f"/b/{i}.jpg", JPEG, delay=0.05) for i in range(12)]
    cfg = config(per_host_concurrency=2, per_host_rate=4.0)
    store = str(tmp_path / "store")
    group = (("127.0.0.1", 0), [_task(i, u) for i, u in enumerate(urls)])
    fn = FetchHostShards(cfg, store, "snapshot-r", every=(1, 0.0))
    fn.setup()
    fn.start_bundle()
    outputs = _drive(fn, group)
    while len(_images(outputs)) < 4:  # the attempt gets some way, then its bundle fails
        outputs += list(fn._emit(block=True))
    politeness = shared(*UNOWNED_LIMITS, cfg.host_overrides())
    assert len(politeness.granted_keys("127.0.0.1")) == 1
    fetched_before = sum(server.hits(f"/b/{i}.jpg") for i in range(12))
    # The runner retries the bundle (here in the same process and instance).
    fn.start_bundle()
    assert politeness.granted_keys("127.0.0.1") == []  # the failed bundle's grant is back
    retried = _drive(fn, group)
    assert len(politeness.granted_keys("127.0.0.1")) == 1  # one shard, held once
    retried += list(fn.finish_bundle())
    fn.teardown()
    assert politeness.granted_keys("127.0.0.1") == []
    images = _images(retried)
    assert sorted(t["gbifID"] for image in images for t in image["tasks"]) == list(range(12))
    hits = [server.hits(f"/b/{i}.jpg") for i in range(12)]
    assert max(hits) == 1  # what the failed attempt stored is read back, not fetched
    assert sum(hits) >= fetched_before
    times = sorted(t for i in range(12) for t in server.hit_times(f"/b/{i}.jpg"))
    assert _windows_over(times, 4) == 0
    stored = ImageStore(store)
    assert stored.parts(stored.folder("images"), "snapshot-r-")


def test_groups_of_one_bundle_do_not_wait_for_each_other(server, tmp_path):
    """A slow host's large group first, a second host's group after it in the
    same bundle: the second host is fetched at once, not after the first."""
    slow = [server.add(f"/slow/{i}.jpg", JPEG) for i in range(30)]
    with FaultServer() as other:
        fast = [other.add(f"/fast/{i}.jpg", JPEG) for i in range(3)]
        cfg = config(per_host_concurrency=1, per_host_rate=2.0)
        fn = FetchHostShards(cfg, str(tmp_path / "store"), "snapshot-g", every=(50, 5.0))
        fn.setup()
        fn.start_bundle()
        started = time.monotonic()
        slow_host = ("127.0.0.1", 0)
        outputs = _drive(fn, (slow_host, [_task(i, u) for i, u in enumerate(slow)]))
        # Both loopback servers are 127.0.0.1: tell them apart by the shard key,
        # as two hosts are; the second group's budget is its own.
        outputs += _drive(fn, (("localhost", 0), [
            _task(100 + i, u.replace("127.0.0.1", "localhost")) for i, u in enumerate(fast)]))
        deadline = time.time() + 30
        while sum(other.hits(f"/fast/{i}.jpg") for i in range(3)) < 3:
            outputs += list(fn._emit(block=False))
            assert time.time() < deadline
            time.sleep(0.05)
        fast_done = time.monotonic() - started
        slow_so_far = sum(server.hits(f"/slow/{i}.jpg") for i in range(30))
        assert slow_so_far < 30 and fast_done < 5.0, (fast_done, slow_so_far)
        fn.start_bundle()  # stop here: the rest of the slow host is not needed
        fn.teardown()


def _noise_jpeg(seed: int, side: int = 256) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_failure_late_in_a_large_shard_retries_in_bounded_memory(server, tmp_path):
    """A bundle fails after most of its shard was fetched and stored: the retry
    fetches only what was not stored, and streams the stored copies back a
    row group at a time instead of holding every copy of the shard at once."""
    import tracemalloc
    n = 300
    urls = [server.add(f"/big/{i}.jpg", _noise_jpeg(i, 384)) for i in range(n)]
    cfg = config(per_host_concurrency=4, per_host_rate=1000.0, max_image_bytes=1_000_000)
    group = (("127.0.0.1", 0), [_task(i, u) for i, u in enumerate(urls)])
    fn = FetchHostShards(cfg, str(tmp_path / "store"), "snapshot-m", every=(1, 0.0))
    fn.setup()
    fn.start_bundle()
    first = _images(_drive(fn, group))
    while len(first) < n - 20:  # late in the shard, the bundle fails
        first += _images(fn._emit(block=True))
    stored_bytes = sum(len(image["content"]) for image in first)
    del first
    fetched_before = [server.hits(f"/big/{i}.jpg") for i in range(n)]
    fn.start_bundle()  # the runner retries it
    tracemalloc.start()
    seen, largest = 0, 0
    for output in fn.process(group, window=WINDOW, timestamp=MIN_TIMESTAMP):
        value = getattr(output, "value", output)
        if isinstance(value, dict) and "tasks" in value:
            seen += len(value["tasks"])
            largest = max(largest, len(value["content"]))
        del output, value  # the runner hands each output on: nothing here keeps it
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tally: dict = {}
    for output in fn.finish_bundle():
        value = getattr(output, "value", output)
        value = getattr(value, "value", value)  # a tagged output's windowed value
        if isinstance(value, dict) and "tasks" in value:
            seen += len(value["tasks"])
        elif isinstance(value, dict) and getattr(output, "tag", None) == "tally":
            tally.update(value)
    fn.teardown()
    assert seen == n  # every row, once
    from_store = tally.get("fetch.already_stored_in_run", 0)
    assert from_store >= n - 20 - 4  # what was stored is not fetched again...
    again = [server.hits(f"/big/{i}.jpg") - fetched_before[i] for i in range(n)]
    assert sum(again) == n - from_store and max(again) <= 1  # ...only the rest is
    # Memory while streaming the stored copies back: a few row groups of
    # pictures, not the shard's (the old retry held every stored copy at once).
    from transforms.store.writing import ROW_GROUP_ROWS
    assert stored_bytes > 25_000_000
    assert peak < 2.5 * ROW_GROUP_ROWS * largest and peak < stored_bytes / 2, (
        peak, stored_bytes, largest)
