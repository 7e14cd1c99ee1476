"""A distributed run's lease lives as long as its job: the launcher of a run
on the portable runner (Beam's job service and an EXTERNAL worker pool, as a
Flink deployment runs them) is killed with SIGKILL mid-fetch; its job goes
on, its workers keep the output's lease, a second launch is refused while
the job runs, and once the job has ended and the lease's TTL has passed a
launch proceeds (transforms/common/lease.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import LOOPBACK, ROOT, portable_runner
from tests.http_server import FaultServer
from transforms.common.lease import LEASE

TTL_S = 4  # GBIF_EMBED_LEASE_SECONDS of the launches; the workers get it from the graph
IMAGES = 24


def _lease(output: str) -> dict:
    try:
        with open(os.path.join(output, LEASE)) as handle:
            return json.load(handle)
    except (OSError, ValueError):  # absent, or between a write and its rename
        return {}


def _slow_export(server: FaultServer, tmp_path, prefix: str, images: int,
                 delay: float) -> str:
    """An export of `images` occurrences whose pictures `server` answers after
    `delay` seconds each, under `/prefix/`."""
    from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo
    from pipeline.demo.sample_data import write_dwca
    for i in range(images):
        server.add(f"/{prefix}/{i}.jpg", jpeg_bytes(synthetic_photo(i, size=(100, 80))),
                   delay=delay)
    occurrences = [Occurrence(gbifID=10 + i, occurrenceID=f"o{i}", datasetKey="d",
                              taxonKey=1, scientificName="S") for i in range(images)]
    return write_dwca(str(tmp_path / "e.zip"), occurrences,
                      [Media(10 + i, server.url(f"/{prefix}/{i}.jpg")) for i in range(images)])


def test_a_killed_launchers_job_keeps_its_output_until_it_ends(tmp_path, tiny_model):
    env = dict(os.environ, GBIF_EMBED_LEASE_SECONDS=str(TTL_S))
    with FaultServer() as server, portable_runner() as flags:
        export = _slow_export(server, tmp_path, "w", IMAGES, delay=1.0)
        output = str(tmp_path / "out")
        command = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                   "--export", export, "--model", tiny_model, "--output", output, "--quiet",
                   "--per_host_concurrency", "1", "--per_host_rate", "1", *flags, *LOOPBACK]

        def hits() -> int:
            return sum(server.hits(f"/w/{i}.jpg") for i in range(IMAGES))

        launcher = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while hits() < 2:
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.2)
        launcher.send_signal(signal.SIGKILL)  # a lost launcher: nothing is given back
        launcher.communicate(timeout=30)
        killed_at, fetched_then = time.time(), hits()
        second = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True,
                                text=True, timeout=240)
        refused_at, fetched_since = time.time(), hits() - fetched_then
        assert second.returncode == 2, second.stderr
        assert "another run is writing to" in second.stderr
        assert "kept alive by its job's workers" in second.stderr, second.stderr
        assert refused_at - killed_at > TTL_S and fetched_since > 0  # the job went on
        renewed_by = _lease(output).get("renewed_by") or {}
        assert renewed_by.get("role") == "worker", _lease(output)
        # The job ends by itself (its launcher is gone) and publishes...
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(output, "LATEST")):
            assert time.time() < deadline, (hits(), _lease(output))
            time.sleep(0.5)
        assert hits() == IMAGES  # every URL once, by the first job only
        # ...then its workers stop, and the lease expires TTL after their last renewal.
        deadline = time.time() + 180
        while _lease(output) and time.time() < _lease(output).get("renewed_at_s", 0) + TTL_S:
            assert time.time() < deadline, _lease(output)
            time.sleep(0.5)
        third = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True,
                               text=True, timeout=300)
        assert third.returncode == 0, third.stderr
    assert hits() == IMAGES  # the third run found everything stored


def test_a_job_whose_lease_was_given_back_stops_fetching(tmp_path, tiny_model):
    """Ctrl-C on the portable runner: Beam's local job service answers the
    cancellation with CANCELLED but goes on running the job, so the launcher
    gives the lease back while the workers still fetch. Their next renewal
    finds the lease gone, never recreates it, and the fetch stage refuses the
    next work item: the job stops fetching long before its URLs are done."""
    images = 40
    env = dict(os.environ, GBIF_EMBED_LEASE_SECONDS="2")
    with FaultServer() as server, portable_runner() as flags:
        export = _slow_export(server, tmp_path, "g", images, delay=0.5)
        output = str(tmp_path / "out")
        command = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                   "--export", export, "--model", tiny_model, "--output", output, "--quiet",
                   "--per_host_concurrency", "1", "--per_host_rate", "1",
                   "--fetch_work_item_seconds", "2", *flags, *LOOPBACK]

        def hits() -> int:
            return sum(server.hits(f"/g/{i}.jpg") for i in range(images))

        launcher = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while hits() < 3:
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=180)
        assert launcher.returncode == 130, stderr
        assert "the lease is given back" in stderr, stderr  # the job service's CANCELLED
        time.sleep(8)  # a renewal (every 0.5 s here) and a work item (2 s) later
        stopped = hits()
        time.sleep(8)
        assert hits() == stopped < images  # no new work item started
        assert not os.path.exists(os.path.join(output, LEASE))  # never recreated
