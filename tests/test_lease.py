"""One run at a time per output folder, and no folder locked forever by a run that died."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from transforms.common import lease as lease_module
from transforms.common.lease import LEASE, Lease, LeaseHeld, held
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
                       delay=4.0)  # long enough for the second launch to start
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


# -- a real lock: launches at the same instant, lost leases, shared stores ------

ROUNDS = 15


def _contend(folder: str, barrier, wins, index: int, rounds: int) -> None:
    """One contender process: in every round, all start `acquire` together."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        import fsspec
        fsspec.filesystem("gs").invalidate_cache()
    for round_ in range(rounds):
        barrier.wait(timeout=120)
        lease = Lease(folder, f"snapshot-{round_}-{index}")
        try:
            lease.acquire()
            took = True
        except LeaseHeld:
            took = False
        wins.put((round_, index, took))
        barrier.wait(timeout=120)  # everyone has tried before the winner gives it back
        if took:
            lease.release()


def _race(folder: str, contenders: int = 2, rounds: int = ROUNDS) -> dict:
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    barrier, wins = context.Barrier(contenders), context.Queue()
    processes = [context.Process(target=_contend, args=(folder, barrier, wins, i, rounds))
                 for i in range(contenders)]
    for process in processes:
        process.start()
    results = [wins.get(timeout=300) for _ in range(contenders * rounds)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    by_round: dict = {}
    for round_, index, took in results:
        by_round.setdefault(round_, []).append(took)
    return by_round


def test_launches_at_the_same_instant_on_a_local_path_exactly_one_proceeds(tmp_path):
    """Processes released by one barrier, many rounds: one takes the lease each time."""
    by_round = _race(str(tmp_path / "out"), contenders=3)
    assert len(by_round) == ROUNDS
    assert all(sum(took) == 1 for took in by_round.values()), by_round


def test_launches_at_the_same_instant_on_gcs_exactly_one_proceeds(gcs_bucket):
    """The same on gs:// (the emulator ignores ifGenerationMatch, so this is the
    claims mutex at work: without it both would proceed)."""
    by_round = _race(f"{gcs_bucket}/race-{time.time_ns()}")
    assert len(by_round) == ROUNDS
    assert all(sum(took) == 1 for took in by_round.values()), by_round


def test_the_emulator_ignores_generation_preconditions(gcs_bucket):
    """Why gs:// needs the claims mutex here: a create-only write (ifGenerationMatch=0)
    over an existing object succeeds on the emulator (real GCS answers 412)."""
    import fsspec
    from pipeline.lease import _write_if_generation
    fs = fsspec.filesystem("gs")
    path = f"{gcs_bucket[5:]}/precondition-{time.time_ns()}"
    _write_if_generation(fs, path, b"first", 0)
    _write_if_generation(fs, path, b"second", 0)
    assert fs.cat(path) == b"second"


def test_a_lease_taken_over_is_noticed_at_the_next_renewal(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "TTL_S", 0.8)
    output = str(tmp_path / "out")
    lost = []
    with held(output, "snapshot-slow") as lease:
        lease.on_lost = lost.append
        with open(os.path.join(output, LEASE), "w") as handle:  # another run took it
            json.dump({"snapshot": "snapshot-other", "token": "someone-else", "host": "x",
                       "pid": 1, "renewed_at_s": time.time(), "ttl_s": 120}, handle)
        deadline = time.time() + 5
        while not lost and time.time() < deadline:
            time.sleep(0.05)
        assert lost and "taken over" in lost[0] and "snapshot-other" in lost[0]
        assert lease.lost == lost[0]
    assert json.load(open(os.path.join(output, LEASE)))["snapshot"] == "snapshot-other"


def test_a_lease_that_cannot_be_renewed_is_lost_before_it_expires(tmp_path, monkeypatch):
    """Any error (not only OSError) is retried, and the holder is told before
    another run could take the lease."""
    monkeypatch.setattr(lease_module, "TTL_S", 1.0)
    output = str(tmp_path / "out")
    lost = []
    with held(output, "snapshot-cut-off") as lease:
        lease.on_lost = lost.append
        started = time.time()

        def broken(*_args, **_kwargs):
            raise RuntimeError("HttpError: the storage does not answer")
        monkeypatch.setattr(lease, "renew_once", broken)
        while not lost and time.time() < started + 5:
            time.sleep(0.02)
        assert lost and "could not renew" in lost[0] and "RuntimeError" in lost[0]
        assert time.time() - started < 1.0  # told before the lease expired
        monkeypatch.undo()


def test_a_store_shared_by_two_outputs_takes_one_run_at_a_time(tmp_path):
    from pipeline import store_guard
    store = str(tmp_path / "store")
    with store_guard.held(store, "snapshot-a", str(tmp_path / "out-a")):
        with pytest.raises(LeaseHeld, match=r"another run \(output .*out-a\) is using the "
                                            r"image store .*store: snapshot-a"):
            with store_guard.held(store, "snapshot-b", str(tmp_path / "out-b")):
                pass
    with store_guard.held(store, "snapshot-b", str(tmp_path / "out-b")):
        pass


@contextlib.contextmanager
def _emulator(data_dir: str, port: int):
    """A GCS emulator that keeps its objects on disk, so that it can be stopped
    and started again with its data (the session's emulator is in memory)."""
    executable = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    process = subprocess.Popen([executable, "-d", data_dir, "start", "--port", str(port),
                                "--default-bucket", "outage"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert process.poll() is None and time.time() < deadline, "no emulator"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_run_whose_storage_stops_answering_stops_and_its_rerun_resumes(tmp_path,
                                                                         tiny_model):
    """The output's storage (the emulator) goes away during a run: the run
    cannot renew its lease, stops with a message and the resume command
    (exit 3), and once the storage is back, the same command finishes the run
    from what the first one kept."""
    import gcsfs
    from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo
    from pipeline.demo.sample_data import write_dwca
    from tests.conftest import _free_port
    port, data = _free_port(), str(tmp_path / "gcs")
    os.makedirs(data)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://localhost:{port}",
               GBIF_EMBED_LEASE_SECONDS="4", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    images = 12
    with FaultServer() as server:
        for i in range(images):
            server.add(f"/o/{i}.jpg", jpeg_bytes(synthetic_photo(i, size=(100, 80))),
                       delay=1.0)
        occurrences = [Occurrence(gbifID=10 + i, occurrenceID=f"o{i}", datasetKey="d",
                                  taxonKey=1, scientificName="S") for i in range(images)]
        export = write_dwca(str(tmp_path / "e.zip"), occurrences,
                            [Media(10 + i, server.url(f"/o/{i}.jpg")) for i in range(images)])
        command = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                   "--export", export, "--model", tiny_model, "--output", "gs://outage/out",
                   "--quiet", "--batch_size", "1", "--checkpoint_rows", "1",
                   "--per_host_concurrency", "1", "--per_host_rate", "1", *LOOPBACK]
        with _emulator(data, port) as emulator:
            fs = gcsfs.GCSFileSystem(endpoint_url=f"http://localhost:{port}", token="anon",
                                     skip_instance_cache=True)
            first = subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 240
            while not fs.glob("outage/out/snapshot-*/parts/embeddings-*.parquet"):
                assert first.poll() is None and time.time() < deadline, first.communicate()
                time.sleep(0.2)
                fs.invalidate_cache()
            emulator.terminate()  # the storage goes away mid-run
            emulator.wait(timeout=10)
            stopped_at = time.time()
            _, stderr = first.communicate(timeout=120)
        assert first.returncode == 3, stderr
        assert "could not renew this run's lease" in stderr, stderr
        # The last lines are the launcher's (Beam and gcsfs log the interrupted calls before).
        message = stderr[stderr.rindex("gbif-embed run: stopped: could not renew"):]
        assert "the storage did not answer" in message and "(LATEST is unchanged)" in message
        assert "To resume, run the same command again" in message, message
        assert time.time() - stopped_at < 60
        fetched_before = [server.hits(f"/o/{i}.jpg") for i in range(images)]
        assert 0 < sum(fetched_before) < images, fetched_before
        with _emulator(data, port):
            second = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True,
                                    text=True, timeout=300)
            assert second.returncode == 0, second.stderr
            fs.invalidate_cache()
            latest = fs.cat("outage/out/LATEST").decode().strip()
            manifest = json.loads(fs.cat(f"outage/out/{latest}/manifest.json"))
    assert manifest["counts"]["embedded"] == images
    assert manifest["counts"]["resumed"] >= 1
    # What the stopped run kept is not fetched again (at most the picture in
    # flight when the storage went away is).
    again = [server.hits(f"/o/{i}.jpg") - fetched_before[i] for i in range(images)]
    assert sum(again) <= images - manifest["counts"]["resumed"], (again, manifest["counts"])


def test_ctrl_c_on_a_distributed_run_cancels_its_job_and_says_what_became_of_the_lease(
        tmp_path, tiny_model):
    """The portable runner (as Flink runs it): Ctrl-C cancels the job, and the
    message says whether the lease was given back (the job was seen to end)
    or kept for the job; the LEASE file agrees with the message.

    Beam's own local job service (used here) answers a cancellation with the
    state CANCELLED without stopping the job (its `BeamJob.cancel` is a TODO):
    here the launcher reports "cancelled" and gives the lease back while the
    worker pool still fetches. Flink's job server and Dataflow cancel for
    real; neither was run from here."""
    import signal

    from pipeline.demo.sample_data import Media, Occurrence, jpeg_bytes, synthetic_photo
    from pipeline.demo.sample_data import write_dwca
    from tests.conftest import portable_runner
    with FaultServer() as server, portable_runner() as flags:
        for i in range(20):
            server.add(f"/p/{i}.jpg", jpeg_bytes(synthetic_photo(i, size=(100, 80))),
                       delay=1.0)
        occurrences = [Occurrence(gbifID=10 + i, occurrenceID=f"o{i}", datasetKey="d",
                                  taxonKey=1, scientificName="S") for i in range(20)]
        export = write_dwca(str(tmp_path / "e.zip"), occurrences,
                            [Media(10 + i, server.url(f"/p/{i}.jpg")) for i in range(20)])
        output = str(tmp_path / "out")
        command = [os.path.join(os.path.dirname(sys.executable), "gbif-embed"), "run",
                   "--export", export, "--model", tiny_model, "--output", output, "--quiet",
                   "--per_host_concurrency", "1", "--per_host_rate", "1", *flags, *LOOPBACK]
        launcher = subprocess.Popen(command, cwd=str(ROOT), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while sum(server.hits(f"/p/{i}.jpg") for i in range(20)) < 2:
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == 130, stderr
    message = stderr[stderr.rindex("gbif-embed run: stopped by SIGINT"):]
    assert "To resume, run the same command again" in message
    lease_file = os.path.join(output, LEASE)
    if "cancelled the job" in message:
        assert "the lease is given back" in message and not os.path.exists(lease_file)
    else:
        assert "its lease stays until it ends" in message, message
        kept = json.load(open(lease_file))
        assert kept["job"] and kept["expires_at"] == "when its job ends"
        with pytest.raises(LeaseHeld, match="kept for its job"):
            Lease(output, "snapshot-next").acquire()
