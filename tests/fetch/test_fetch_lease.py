"""The fetch and embed stages of a distributed job renew its leases while
they are set up in a process, and the fetch stage refuses new work once the
job no longer holds its output (transforms/common/lease.py)."""
from __future__ import annotations

import time

import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from tests.fetch.test_fetch import config
from transforms.common import lease as lease_module
from transforms.common.lease import Lease, LeaseLost
from transforms.embed.decode import DecodeImages
from transforms.fetch.stage import FetchHostShards, FetchWorkItems


def _work_item(fn: FetchWorkItems, element) -> list:
    tracker = ThreadsafeRestrictionTracker(fn.create_tracker(OffsetRange(0, 1)))
    return list(fn.process(element, tracker=RestrictionTrackerView(tracker),
                           window=GlobalWindow(), timestamp=MIN_TIMESTAMP))


def test_the_stages_renew_the_jobs_lease_while_set_up_in_a_process(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    launcher = Lease(str(tmp_path / "out"), "snapshot-job", workers=True)
    launcher.acquire()
    launcher._stop.set()  # the launcher is gone
    fetch = FetchWorkItems(config(), work_item_seconds=1.0, leases=[launcher.ref()])
    decode = DecodeImages(leases=[launcher.ref()])
    fetch.setup()
    decode.setup()
    assert lease_module._PROCESS.running()
    fetch.teardown()
    time.sleep(0.6)
    assert lease_module._PROCESS.running()  # the embed stage still runs here
    assert launcher.read()["renewed_by"]["role"] == "worker"
    decode.teardown()
    deadline = time.time() + 2
    while lease_module._PROCESS.running() and time.time() < deadline:
        time.sleep(0.05)
    assert not lease_module._PROCESS.running()  # no stage left: the lease may expire
    launcher.release()


@pytest.mark.parametrize("stage", [FetchWorkItems, FetchHostShards])
def test_the_fetch_stage_refuses_new_work_once_the_lease_is_gone(tmp_path, monkeypatch,
                                                                  stage):
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    output = str(tmp_path / "out")
    launcher = Lease(output, "snapshot-job", workers=True)
    launcher.acquire()
    launcher.release()  # e.g. the launcher gave it back after a cancellation
    fn = (FetchWorkItems(config(), work_item_seconds=1.0, leases=[launcher.ref()])
          if stage is FetchWorkItems else FetchHostShards(config(), leases=[launcher.ref()]))
    fn.setup()
    try:
        fn.start_bundle()
        element = (("127.0.0.1", 0), [{"gbifID": 1, "identifier": "http://127.0.0.1/1.jpg"}])
        with pytest.raises(LeaseLost, match=f"of this job's output {output} is gone"):
            if stage is FetchWorkItems:
                _work_item(fn, element)
            else:
                list(fn.process(element, window=GlobalWindow(), timestamp=MIN_TIMESTAMP))
    finally:
        fn.teardown()
