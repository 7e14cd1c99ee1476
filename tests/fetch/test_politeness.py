"""Politeness for the whole job: what loopback hosts saw when several worker
processes fetched from them, and how a host's limits are split into shards."""
from __future__ import annotations

import collections
import math
import random

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.sample_data import Media, Occurrence, write_dwca
from tests.conftest import FakeClock, portable_runner
from tests.image_hosts import Host, ImageHosts, violations
from transforms.fetch.politeness import Budget, Politeness, shard_budgets

RATE, CONCURRENCY = 4, 2  # two shards of (1 in flight, 2/s) per host


# ------------------------------------------------------------------ shard budgets

@pytest.mark.parametrize("concurrency,rate", [(8, 20), (2, 4), (2, 5), (1, 20), (8, 0.5),
                                              (3, 9.7), (8, 0)])
def test_shard_budgets_never_add_up_to_more_than_the_host_allows(concurrency, rate):
    shards = shard_budgets(concurrency, rate)
    assert sum(b.concurrency for b in shards) <= concurrency
    if rate >= 1:
        assert sum(b.rate for b in shards) <= math.floor(rate)
        assert all(b.rate == int(b.rate) and b.rate >= 1 for b in shards)
    elif rate > 0:
        assert len(shards) == 1 and shards[0].rate == rate
    assert len(set(shards)) == 1  # equal shares: a host's shards last equally long


def test_the_defaults_split_into_four_shards():
    assert shard_budgets(8, 20) == [Budget(2, 5.0)] * 4


def test_politeness_halves_once_per_burst_and_recovers_slowly():
    clock = FakeClock()
    politeness = Politeness(8, 10.0, clock=clock, sleep=clock.sleep)
    burst = [politeness.acquire("h", deadline=100) for _ in range(4)]
    for ticket in burst:  # four concurrent 429s are one signal
        politeness.release(ticket, 429)
    assert politeness.current_rate("h") == 5.0
    politeness.release(politeness.acquire("h", deadline=100), 429)
    assert politeness.current_rate("h") == 2.5
    for _ in range(10):
        politeness.release(politeness.acquire("h", deadline=1000), 200)
    assert 2.5 < politeness.current_rate("h") < 10.0
    for _ in range(60):
        politeness.release(politeness.acquire("h", deadline=1000), 200)
    assert politeness.current_rate("h") == 10.0


def test_politeness_spaces_requests_and_has_a_floor():
    clock = FakeClock()
    politeness = Politeness(1, 4.0, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(3):
        ticket = politeness.acquire("h", deadline=100)
        sent.append(ticket.sent_at)
        politeness.release(ticket, 200)
    assert sent == [0.0, 0.25, 0.5]
    for _ in range(20):
        politeness.release(politeness.acquire("h", deadline=10_000), 503)
    assert politeness.current_rate("h") == pytest.approx(0.1)
    ticket = politeness.acquire("h", deadline=10_000)
    politeness.release(ticket, 429, retry_after=30)
    assert politeness.blocked_for("h") == 30
    assert politeness.acquire("h", deadline=clock.now + 5) is None  # cannot wait that long


def test_granted_budgets_add_up_and_go_back_to_the_default():
    clock = FakeClock()
    politeness = Politeness(1, 1.0, clock=clock, sleep=clock.sleep)
    assert politeness.capacity("h") == 1 and politeness.current_rate("h") == 1.0
    politeness.grant("h", Budget(2, 5.0))
    politeness.grant("h", Budget(2, 5.0))
    assert politeness.capacity("h") == 4 and politeness.current_rate("h") == 10.0
    politeness.revoke("h", Budget(2, 5.0))
    assert politeness.capacity("h") == 2 and politeness.current_rate("h") == 5.0
    politeness.revoke("h", Budget(2, 5.0))
    assert politeness.capacity("h") == 1 and politeness.current_rate("h") == 1.0


def test_no_more_than_the_rate_in_any_window_of_a_second():
    clock = FakeClock()
    politeness = Politeness(10, 3.0, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(30):
        ticket = politeness.acquire("h", deadline=1000)
        sent.append(ticket.sent_at)
        politeness.release(ticket, 200)
    for start in sent:
        assert sum(start <= t < start + 1.0 for t in sent) <= 3


# ------------------------------------------------------------------ hosts seen from outside

def _hosts() -> list[Host]:
    return [Host("127.0.0.2", latency=0.02), Host("127.0.0.3", latency=0.3),
            Host("127.0.0.4", latency=0.1, throttle=1.0), Host("127.0.0.5", latency=0.05)]


def _export(path: str, urls: list[str]) -> tuple[str, int, int]:
    """Rows over the hosts, a quarter of them pointing at 6 shared URLs (as in
    GBIF data: one photo published twice), and 6 URLs of one content (a
    placeholder). Returns (export, rows, distinct URLs)."""
    rng = random.Random(7)
    shared = [f"{urls[i % len(urls)]}/shared-{i}.jpg" for i in range(6)]
    # Six more URLs with one content between them, as a placeholder picture.
    identifiers = [f"{urls[i % len(urls)]}/same-{i}.jpg" for i in range(6)]
    for i in range(96):
        if rng.random() < 0.25:
            identifiers.append(rng.choice(shared))
        else:
            identifiers.append(f"{urls[i % len(urls)]}/img-{i}.jpg")
    occurrences = [Occurrence(gbifID=900 + i, occurrenceID=f"urn:o:{i}", datasetKey="d",
                              taxonKey=1, scientificName="Amanita muscaria")
                   for i in range(len(identifiers))]
    media = [Media(900 + i, url) for i, url in enumerate(identifiers)]
    return write_dwca(path, occurrences, media), len(identifiers), len(set(identifiers))


def _check(farm: ImageHosts, manifest: dict, rows: int, distinct: int,
           distributed: bool = False) -> None:
    seen = farm.requests()
    over, worst = violations(seen, RATE, CONCURRENCY)
    assert over == 0, worst
    assert all(w["max_in_flight"] <= CONCURRENCY for w in worst.values()), worst
    # Each distinct URL fetched once (the throttling host's 429s are retried).
    paths = collections.Counter((address, path) for address, _, _, path in seen
                                if address != "127.0.0.4")
    assert paths and max(paths.values()) == 1
    assert len({(a, p) for a, _, _, p in seen}) == distinct
    counts = manifest["counts"]
    assert counts["embedded"] == rows and counts["accounted"] == rows
    assert manifest["tally"]["fetch.distinct_urls"] == distinct
    assert manifest["tally"]["dedup.rows_sharing_a_fetch"] == rows - distinct
    if distributed:
        # Fetched copies are grouped by content before embedding: each content
        # once for the whole job (the six placeholder URLs are one content).
        assert counts["inferences"] == distinct - 5 and counts["contents_reused"] == 0
    else:
        # Each image was either inferred or took the embedding of its content.
        assert counts["inferences"] + counts["contents_reused"] == distinct
        assert counts["contents_reused"] >= 1 and counts["inferences"] <= distinct - 1


def _run(export: str, model: str, output: str, *extra: str) -> dict:
    return run(PipelineOptions([
        "--export", export, "--model", model, "--output", output, "--quiet",
        "--batch_size", "4", "--allow_private_networks", "127.0.0.0/8",
        "--per_host_rate", str(RATE), "--per_host_concurrency", str(CONCURRENCY),
        "--report_samples", "0", *extra]))


def test_two_worker_processes_together_keep_each_hosts_limits(tiny_model, tmp_path):
    with ImageHosts(_hosts(), str(tmp_path / "log.tsv")) as farm:
        export, rows, distinct = _export(str(tmp_path / "export.zip"), farm.urls)
        manifest = _run(export, tiny_model, str(tmp_path / "out"),
                        "--direct_running_mode", "multi_processing",
                        "--direct_num_workers", "2")
    _check(farm, manifest, rows, distinct)


def test_a_portable_runner_with_two_workers_keeps_each_hosts_limits(tiny_model, tmp_path):
    """Beam's job service and an external worker pool (how Flink runs Python)."""
    with portable_runner() as flags, ImageHosts(_hosts(), str(tmp_path / "log.tsv")) as farm:
        export, rows, distinct = _export(str(tmp_path / "export.zip"), farm.urls)
        manifest = _run(export, tiny_model, str(tmp_path / "out"), *flags,
                        "--sdk_worker_parallelism", "2", "--direct_num_workers", "2")
    _check(farm, manifest, rows, distinct, distributed=True)
