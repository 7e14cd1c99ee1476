"""A distributed job's writers and its publishing step renew the job's leases
while they are set up (a lost launcher no longer lets the lease expire while
the job writes and publishes), and a job that no longer holds its output never
moves LATEST (transforms/common/lease.py, transforms/write/)."""
from __future__ import annotations

import time

import pytest

from tests.write.test_whole_snapshots import SCHEMAS, _manifest, _prepared, _tally
from transforms.common import lease as lease_module
from transforms.common.lease import Lease, LeaseLost
from transforms.write.parts import _WriteParts
from transforms.write.snapshot import _Publish, read_latest


def test_the_writers_and_publishing_renew_the_jobs_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    launcher = Lease(str(tmp_path / "out"), "snapshot-job", workers=True)
    launcher.acquire()
    launcher._stop.set()  # the launcher is gone
    writer = _WriteParts(str(tmp_path / "out" / "snapshot-job"), "embeddings",
                         SCHEMAS["embeddings"], leases=[launcher.ref()])
    publisher = _Publish(str(tmp_path / "out"), "snapshot-job", {}, SCHEMAS,
                         leases=[launcher.ref()])
    writer.setup()
    publisher.setup()
    try:
        time.sleep(1.5)  # past the TTL: only the workers' renewals keep it
        held = launcher.read()
        assert held["token"] == launcher.holder["token"]
        assert held["renewed_by"]["role"] == "worker"
        assert not Lease._expired(held)
    finally:
        writer.teardown()
        publisher.teardown()
        launcher.release()


def test_a_job_that_lost_its_output_does_not_publish(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    output = str(tmp_path / "out")
    _prepared(output, "snapshot-job", embedded=3, failed=0)
    launcher = Lease(output, "snapshot-job", workers=True)
    launcher.acquire()
    launcher.release()  # given back (the launcher cancelled the job, say)
    publisher = _Publish(output, "snapshot-job", _manifest("snapshot-job"), SCHEMAS,
                         leases=[launcher.ref()])
    publisher.setup()
    try:
        with pytest.raises(LeaseLost, match="is gone"):
            list(publisher.process(None, [], [], _tally(3)))
    finally:
        publisher.teardown()
    assert read_latest(output) is None
