"""One run at a time per output folder, and no folder locked forever by a run that died."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import lease as lease_module
from pipeline.lease import LEASE, Lease, LeaseHeld, held
from tests.conftest import LOOPBACK, ROOT
from tests.http_server import FaultServer


def test_a_second_run_is_refused_with_a_message_naming_the_first(tmp_path):
    output = str(tmp_path / "out")
    with held(output, "snapshot-first") as first:
        assert os.path.exists(os.path.join(output, LEASE))
        with pytest.raises(LeaseHeld, match=r"another run is writing to .*out: snapshot-first, "
                                            r"started .* \(pid \d+\), lease renewed \d+ s ago"):
            Lease(output, "snapshot-second").acquire()
        assert first.read()["snapshot"] == "snapshot-first"
    assert not os.path.exists(os.path.join(output, LEASE))  # given back
    with held(output, "snapshot-second"):
        pass


def test_a_lease_that_was_not_renewed_expires(tmp_path, monkeypatch):
    """A run killed with SIGKILL leaves its lease; it stops counting once it expires."""
    output = str(tmp_path / "out")
    os.makedirs(output)
    stale = {"snapshot": "snapshot-dead", "pid": 1, "host": "gone",
             "renewed_at_s": time.time() - 10_000, "ttl_s": 120}
    with open(os.path.join(output, LEASE), "w") as handle:
        json.dump(stale, handle)
    with held(output, "snapshot-new") as lease:
        assert lease.read()["snapshot"] == "snapshot-new"


def test_the_lease_is_renewed_while_the_run_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "TTL_S", 0.4)
    output = str(tmp_path / "out")
    with held(output, "snapshot-long") as lease:
        first = lease.read()["renewed_at_s"]
        time.sleep(0.5)
        assert lease.read()["renewed_at_s"] > first
        with pytest.raises(LeaseHeld):
            Lease(output, "snapshot-other").acquire()


def test_the_command_refuses_a_second_run_on_the_same_output(tmp_path, tiny_model):
    """Two real `gbif-embed run`s: the second exits 2 at once, naming the first,
    and fetches nothing; the first finishes normally."""
    from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo
    from pipeline.demo.sample_data import write_dwca
    with FaultServer() as server:
        for i in range(6):
            server.add(f"/s/{i}.jpg", jpeg_bytes(synthetic_photo(i, size=(100, 80))),
                       delay=1.0)
        occurrences = [Occurrence(gbifID=10 + i, occurrenceID=f"o{i}", datasetKey="d",
                                  taxonKey=1, scientificName="S") for i in range(6)]
        media = [Media(10 + i, server.url(f"/s/{i}.jpg")) for i in range(6)]
        export = write_dwca(str(tmp_path / "e.zip"), occurrences, media)
        output = str(tmp_path / "out")
        command = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                   "--export", export, "--model", tiny_model, "--output", output, "--quiet",
                   "--per_host_concurrency", "1", "--per_host_rate", "1", *LOOPBACK]
        first = subprocess.Popen(command, cwd=str(ROOT), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(output, LEASE)):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(command, cwd=str(ROOT), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert "another run is writing to" in second.stderr and "snapshot-" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=300) == 0, first.communicate()
        assert [server.hits(f"/s/{i}.jpg") for i in range(6)] == [1] * 6  # each URL once
    assert not os.path.exists(os.path.join(output, LEASE))


def test_a_holder_on_this_machine_whose_process_is_gone_does_not_hold(tmp_path):
    """A run killed on this machine: its rerun need not wait for the lease to expire."""
    import socket
    output = str(tmp_path / "out")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(output)
    with open(os.path.join(output, LEASE), "w") as handle:
        json.dump({"snapshot": "snapshot-killed", "host": socket.gethostname(), "pid": dead.pid,
                   "pid_started": 12345, "renewed_at_s": time.time(), "ttl_s": 120}, handle)
    with held(output, "snapshot-rerun") as lease:
        assert lease.read()["snapshot"] == "snapshot-rerun"
    with open(os.path.join(output, LEASE), "w") as handle:  # alive, on another machine
        json.dump({"snapshot": "snapshot-elsewhere", "host": "another-machine", "pid": 1,
                   "renewed_at_s": time.time(), "ttl_s": 120}, handle)
    with pytest.raises(LeaseHeld, match="snapshot-elsewhere"):
        Lease(output, "snapshot-mine").acquire()
