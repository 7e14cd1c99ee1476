"""Work items of bounded length for one host shard on distributed runners.

On a distributed runner a (host, shard) group would otherwise be one work
item: for a large host that is hours of fetching at its polite rate, and a
failure late in it redoes hours. The fetch stage there processes a group as
a splittable DoFn over an offset restriction: the group's distinct URLs in a
fixed order (`shard_items`), so that a restriction means the same URLs on
every attempt however the shuffle ordered the group. A work item claims as
many positions as its shard's budget fetches in `--fetch_work_item_seconds`
and defers the rest (a self-checkpoint): the runner schedules the residual
only once the work item's bundle has returned, so a shard, and its share of
the host's limits, has one holder at a time, possibly on another worker.

Runners may also split a restriction while it is being processed (dynamic
work rebalancing, a runner's checkpoint): the residual would be scheduled at
once, a second holder of the shard's budget beside the first, and the host
would see the shard's share twice. `WorkItemTracker` refuses every such split;
only the DoFn's own checkpoint splits, and the initial split keeps the whole
restriction (the default of `RestrictionProvider.split`).
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Any, Iterable, NamedTuple, Optional

from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker

from transforms.fetch.config import FetchConfig, fetch_url


class ShardItem(NamedTuple):
    """One position of a shard's restriction: a distinct URL and its rows, or
    one task whose URL is invalid (`error` says why)."""

    url: Optional[str]
    rows: list
    error: Optional[str] = None


def shard_items(tasks: Iterable[dict], config: FetchConfig) -> list[ShardItem]:
    """A group's positions in a fixed order: distinct URLs sorted, then the
    tasks with invalid URLs sorted by their content."""
    by_url: dict[str, list[dict]] = {}
    invalid: list[tuple[str, dict, str]] = []
    for task in tasks:
        try:
            by_url.setdefault(fetch_url(task, config), []).append(task)
        except ValueError as exc:
            invalid.append((json.dumps(task, sort_keys=True, default=str), task, str(exc)))
    items = [ShardItem(url, rows) for url, rows in sorted(by_url.items())]
    items += [ShardItem(None, [task], error) for _, task, error in
              sorted(invalid, key=lambda entry: entry[0])]
    return items


# Shards whose positions this process keeps: a shard's work items follow one
# another (often in this process), and rebuilding its sorted list each time
# costs 1.3 s for 141,000 URLs. A few entries: each holds a shard's rows.
CACHED_SHARDS = 2
_cached: "collections.OrderedDict[tuple, list[ShardItem]]" = collections.OrderedDict()
_cached_lock = threading.Lock()
BUILT = [0]  # shard lists this process built (a cached one is not counted)


def cached_shard_items(run: str, key: Any, tasks: Iterable[dict],
                       config: FetchConfig) -> list[ShardItem]:
    """`shard_items` of a (host, shard) group, built once per process for its
    successive work items. A group is one element per run, so the run, the
    group's key, the config and the tasks' identifiers in their order (30 ms
    to read for 141,000 tasks) name it; any other element builds its own."""
    tasks = tasks if isinstance(tasks, (list, tuple)) else list(tasks)
    name = (run, key, config, tuple(task.get("identifier") for task in tasks))
    with _cached_lock:
        items = _cached.get(name)
        if items is not None:
            _cached.move_to_end(name)
            return items
    items = shard_items(tasks, config)
    with _cached_lock:
        BUILT[0] += 1
        _cached[name] = items
        while len(_cached) > CACHED_SHARDS:
            _cached.popitem(last=False)
    return items


class WorkItemTracker(OffsetRestrictionTracker):
    """An offset tracker that splits only for the DoFn's own checkpoint.

    `defer_remainder` splits (at fraction 0) on the thread that claims the
    positions, inside `process`; a runner's split request arrives on the SDK
    harness's other threads while `process` runs, and a dynamic split asks
    for a fraction above 0. Both are refused (None: "cannot split now", which
    every runner accepts), because their residual would be fetched at the same
    time as the rest of this work item, by a second holder of the shard's
    share of the host's limits.
    """

    def __init__(self, offset_range: OffsetRange):
        super().__init__(offset_range)
        self._claiming_thread: Optional[int] = None

    def try_claim(self, position) -> bool:
        self._claiming_thread = threading.get_ident()
        return super().try_claim(position)

    def try_split(self, fraction_of_remainder: float) -> Optional[tuple[Any, Any]]:
        if fraction_of_remainder > 0 or threading.get_ident() != self._claiming_thread:
            return None
        return super().try_split(0)


def work_item_size(seconds: float, concurrency: int, rate: float, pace: float = 1.0) -> int:
    """Positions a work item claims: what a shard with this budget fetches in
    `seconds` at its rate, slowed by `pace` (a throttled host). Without a rate
    limit, a fetch per slot every UNLIMITED_FETCH_S."""
    per_second = rate * pace if rate > 0 else concurrency / UNLIMITED_FETCH_S
    return max(1, int(seconds * per_second))


# A guess of one fetch's length for a host without a rate limit (rare: the
# default is 20/s): the work item's size then follows its slots.
UNLIMITED_FETCH_S = 0.25
