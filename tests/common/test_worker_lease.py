"""On a distributed runner the lease lives as long as the job: its workers
renew it (transforms/common/lease.py `WorkerRenewer`) after the launcher is
gone, never recreate a lease that was given back or taken by another run,
and a holder they renew is judged by its expiry, not by its launcher's pid.
Real leases on a local path and on gs:// (the GCS emulator)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from transforms.common import lease as lease_module
from transforms.common.lease import (
    LEASE,
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseRef,
    WorkerRenewer,
)


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
    """An output folder on a local path or on gs://, and the TTL used there
    (the emulator answers a renewal in tens of milliseconds, locally in one)."""
    if request.param == "local":
        return str(tmp_path / "out"), 1.0
    bucket = request.getfixturevalue("gcs_bucket")
    return f"{bucket}/worker-lease-{time.time_ns()}", 2.0


def _read(folder: str):
    return lease_module._read(lease_module.join(folder, LEASE))[0]


def _wait(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _launcher_stopped(lease: Lease) -> None:
    """The launcher's own renewal ends, as when its process is killed."""
    lease._stop.set()
    lease._thread.join(timeout=10)


def test_workers_keep_the_lease_alive_after_the_launcher_stops_renewing(folder, monkeypatch):
    path, ttl = folder
    monkeypatch.setattr(lease_module, "TTL_S", ttl)
    launcher = Lease(path, "snapshot-job", workers=True)
    launcher.acquire()
    _launcher_stopped(launcher)
    renewer = WorkerRenewer()
    renewer.keep_alive([launcher.ref()])
    try:
        time.sleep(3 * ttl)  # three TTLs without the launcher
        held = _read(path)
        assert held["token"] == launcher.holder["token"]
        assert held["renewed_by"] == {"host": socket.gethostname(), "pid": os.getpid(),
                                      "role": "worker"}
        assert time.time() - held["renewed_at_s"] < ttl
        assert held["snapshot"] == "snapshot-job" and held["workers"] is True  # kept
        with pytest.raises(LeaseHeld, match="kept alive by its job's workers"):
            Lease(path, "snapshot-second").acquire()
        assert renewer.renewals >= 3 and renewer.running()
    finally:
        renewer.let_go([launcher.ref()])
    assert _wait(lambda: not renewer.running(), 2 * ttl)  # the last user left
    time.sleep(ttl * 1.2)  # then the lease expires TTL after the last renewal
    second = Lease(path, "snapshot-second")
    second.acquire()
    second.release()


def test_workers_never_recreate_a_lease_the_launcher_gave_back(folder, monkeypatch):
    """At the end of a job (or after Ctrl-C) the launcher gives the lease back:
    the workers' next renewal finds it gone, stops, and the fetch stage's
    check refuses new work from then on."""
    path, ttl = folder
    monkeypatch.setattr(lease_module, "TTL_S", ttl)
    launcher = Lease(path, "snapshot-job", workers=True)
    launcher.acquire()
    ref = launcher.ref()
    renewer = WorkerRenewer()
    renewer.keep_alive([ref])
    renewer.check([ref])  # held: nothing raised
    launcher.release()
    assert _wait(lambda: not renewer.running(), 2 * ttl)
    with pytest.raises(LeaseLost, match="is gone"):
        renewer.check([ref])
    time.sleep(ttl / 2)
    assert _read(path) is None  # never recreated
    # A process whose stage is set up only now learns it at once.
    late = WorkerRenewer()
    late.keep_alive([ref])
    with pytest.raises(LeaseLost, match="is gone"):
        late.check([ref])
    late.let_go([ref])


def test_workers_never_renew_a_lease_another_run_took(folder, monkeypatch):
    path, ttl = folder
    monkeypatch.setattr(lease_module, "TTL_S", ttl)
    launcher = Lease(path, "snapshot-job", workers=True)
    launcher.acquire()
    _launcher_stopped(launcher)
    ref = launcher.ref()
    renewer = WorkerRenewer()
    renewer.keep_alive([ref])
    other = {"snapshot": "snapshot-other", "token": "someone-else", "host": "elsewhere",
             "pid": 1, "started_at": "then", "renewed_at_s": time.time(), "ttl_s": 120}
    lease_module._write(lease_module.join(path, LEASE), other, 0, 120)
    assert _wait(lambda: not renewer.running(), 2 * ttl)
    with pytest.raises(LeaseLost, match=r"another run took the output .*snapshot-other.*"
                                        r"this job stops"):
        renewer.check([ref])
    time.sleep(ttl / 2)
    held = _read(path)
    assert held["token"] == "someone-else" and "renewed_by" not in held
    renewer.let_go([ref])


def test_a_lease_kept_until_its_job_ends_expires_after_its_workers_stop(tmp_path,
                                                                       monkeypatch):
    """Ctrl-C that could not see the job end leaves the lease without expiry,
    naming the job: the workers' renewals keep the job's name and give it an
    expiry again, so it ends TTL after the last worker stops."""
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    path = str(tmp_path / "out")
    launcher = Lease(path, "snapshot-job", workers=True)
    launcher.acquire()
    launcher.keep_until_job_ends("job-7")
    assert _read(path)["expires_at"] == "when its job ends"
    renewer = WorkerRenewer()
    renewer.keep_alive([launcher.ref()])
    assert _wait(lambda: _read(path).get("renewed_by", {}).get("role") == "worker", 3)
    held = _read(path)
    assert held["job"] == "job-7" and held["ttl_s"] == 1.0
    with pytest.raises(LeaseHeld, match="kept for its job job-7"):
        Lease(path, "snapshot-next").acquire()
    renewer.let_go([launcher.ref()])
    assert _wait(lambda: not renewer.running(), 2)
    time.sleep(1.2)
    after = Lease(path, "snapshot-next")
    after.acquire()
    after.release()


def test_a_storage_error_does_not_end_the_renewals(tmp_path, monkeypatch):
    """A renewal that fails (here the lease cannot be read: a folder stands in
    its place) is logged and tried again; once the storage answers again the
    renewals go on."""
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    path = str(tmp_path / "out")
    launcher = Lease(path, "snapshot-job", workers=True)
    launcher.acquire()
    _launcher_stopped(launcher)
    renewer = WorkerRenewer()
    renewer.keep_alive([launcher.ref()])
    lease_file = os.path.join(path, LEASE)
    content = open(lease_file).read()
    os.remove(lease_file)
    os.makedirs(os.path.join(lease_file, "in-the-way"))
    try:
        assert _wait(lambda: renewer.errors >= 2, 3)
        assert renewer.running() and not renewer.lost
    finally:
        os.rmdir(os.path.join(lease_file, "in-the-way"))
        os.rmdir(lease_file)
        with open(lease_file, "w") as handle:
            handle.write(content)
    before = renewer.renewals
    assert _wait(lambda: renewer.renewals > before, 3)
    assert _read(path)["renewed_by"]["role"] == "worker"
    renewer.let_go([launcher.ref()])


def test_a_process_renews_only_the_leases_its_stages_still_use(tmp_path, monkeypatch):
    """A worker process that outlives its job (a worker pool's may) and runs
    the next job's stages never keeps the finished job's lease alive."""
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    finished, running = (Lease(str(tmp_path / name), f"snapshot-{name}", workers=True)
                         for name in ("finished", "running"))
    for launcher in (finished, running):
        launcher.acquire()
        _launcher_stopped(launcher)
    renewer = WorkerRenewer()
    renewer.keep_alive([finished.ref()])
    renewer.keep_alive([running.ref()])
    renewer.let_go([finished.ref()])  # the first job's stages were torn down
    time.sleep(2.5)
    assert time.time() - _read(str(tmp_path / "finished"))["renewed_at_s"] > 2.0
    assert time.time() - _read(str(tmp_path / "running"))["renewed_at_s"] < 1.0
    after = Lease(str(tmp_path / "finished"), "snapshot-next")
    after.acquire()  # expired
    after.release()
    renewer.let_go([running.ref()])
    assert _wait(lambda: not renewer.running(), 2)


LAUNCHER = """
import json, sys, time
from transforms.common.lease import Lease
lease = Lease(sys.argv[1], "snapshot-killed", workers=True)
lease.acquire()
print(json.dumps(lease.ref()), flush=True)
time.sleep(600)
"""


def test_a_holder_renewed_by_workers_is_not_taken_over_when_its_launcher_is_killed(folder):
    """The launcher (a process of its own, TTL from GBIF_EMBED_LEASE_SECONDS as
    `gbif-embed run` reads it) is killed with SIGKILL; its job's workers (here
    a renewer in this process) go on: the lease is refused to a second run,
    although its holder's pid on this machine is gone, until it expires
    after the workers stop."""
    path, ttl = folder
    env = dict(os.environ, GBIF_EMBED_LEASE_SECONDS=str(ttl),
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(),
                                                        os.environ.get("PYTHONPATH")])))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, path], env=env,
                                stdout=subprocess.PIPE, text=True)
    ref = LeaseRef(*json.loads(launcher.stdout.readline()))
    assert ref.ttl_s == ttl
    renewer = WorkerRenewer()
    renewer.keep_alive([ref])
    try:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        held = _read(path)
        assert held["host"] == socket.gethostname() and held["pid"] == launcher.pid
        assert Lease._holder_gone(dict(held, workers=False)) is True  # were it not for them
        time.sleep(2 * ttl)
        with pytest.raises(LeaseHeld, match="snapshot-killed.*kept alive by its job's "
                                            "workers .*last renewed by its worker"):
            Lease(path, "snapshot-second").acquire()
    finally:
        renewer.let_go([ref])
    assert _wait(lambda: not renewer.running(), 2 * ttl)
    expires = _read(path)["renewed_at_s"] + ttl
    assert time.time() < expires - 0.3  # the last renewal was at most TTL/4 ago
    with pytest.raises(LeaseHeld):  # not before it expires
        Lease(path, "snapshot-second").acquire()
    time.sleep(max(0.0, expires - time.time()) + 0.2)
    second = Lease(path, "snapshot-second")
    second.acquire()
    second.release()


def test_a_lease_last_renewed_by_a_worker_is_judged_by_its_expiry_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = {"host": socket.gethostname(), "pid": dead.pid, "pid_started": 1,
            "renewed_at_s": time.time(), "ttl_s": 120}
    assert Lease._holder_gone(held)
    assert not Lease._holder_gone(dict(held, renewed_by={"host": "w", "pid": 9,
                                                         "role": "worker"}))
    assert Lease._holder_gone(dict(held, renewed_by={"host": "w", "pid": 9,
                                                     "role": "launcher"}))
