"""The cluster `gbif-embed flink start` runs: two TaskManagers, a worker pool
beside each, the restart strategy, reuse, and one clear line for what is wrong."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.flink import cluster
from pipeline.flink.distribution import FLINK_VERSION
from tests.conftest import ROOT, _free_port


def test_two_taskmanagers_each_with_a_worker_pool(flink_cluster):
    state = cluster.status(flink_cluster, say=lambda line: None)
    assert state["running"], state
    assert state["flink_version"] == FLINK_VERSION
    assert state["taskmanagers"] == ["taskmanager-1", "taskmanager-2"]
    assert state["slots"] == 2
    for index in (1, 2):
        with socket.create_connection((flink_cluster.pool_host(index),
                                       flink_cluster.pool_port), timeout=5):
            pass


def test_each_pool_runs_on_its_taskmanagers_share_of_the_cores(flink_cluster):
    """TensorFlow sizes its thread pools from the CPUs a worker may run on: the
    pools' shares never add up to more than the machine's cores."""
    shares = []
    for index in (1, 2):
        pid = cluster.piece_pid(flink_cluster, f"pool-{index}")
        shares.append(os.sched_getaffinity(pid))
        assert shares[-1] == set(cluster.cpu_share(2, index))
    cores = len(os.sched_getaffinity(0))
    assert sum(len(share) for share in shares) <= max(cores, 2)
    if cores >= 2:
        assert not shares[0] & shares[1]


def test_restart_strategy_is_fixed_delay(flink_cluster):
    config = {entry["key"]: entry["value"]
              for entry in cluster.rest(flink_cluster, "/jobmanager/config")}
    assert config["restart-strategy.type"] == "fixed-delay"
    assert config["restart-strategy.fixed-delay.attempts"] == "3"
    assert config["parallelism.default"] == "2"


def _tm_hosts_flag(spec, index: int) -> str:
    pid = cluster.piece_pid(spec, f"taskmanager-{index}")
    args = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    (flag,) = [a.decode() for a in args if a.startswith(b"-Djdk.net.hosts.file=")]
    return flag


def test_each_taskmanager_resolves_the_pool_name_to_its_own_pool(flink_cluster, tmp_path):
    """What a TaskManager's JVM makes of `beam-worker-pool`: its own pool's address."""
    if not shutil.which("javac"):
        pytest.skip("needs a JDK (javac) to run a one-file Java check with the "
                    "TaskManager's own -Djdk.net.hosts.file")
    source = tmp_path / "Resolve.java"
    source.write_text("public class Resolve { public static void main(String[] a) throws "
                      "Exception { System.out.println(java.net.InetAddress.getByName(a[0])"
                      ".getHostAddress()); } }\n")
    for index in (1, 2):
        flag = _tm_hosts_flag(flink_cluster, index)
        answer = subprocess.run(["java", flag, str(source), cluster.POOL_NAME],
                                capture_output=True, text=True, timeout=120)
        assert answer.stdout.strip() == flink_cluster.pool_host(index), answer.stderr


def test_start_again_reuses_the_running_cluster(flink_cluster):
    before = {piece: cluster.piece_pid(flink_cluster, piece)
              for piece in cluster.pieces(flink_cluster)}
    lines: list[str] = []
    cluster.start(flink_cluster, say=lines.append)
    assert lines[0].startswith("flink: reusing the running cluster")
    assert before == {piece: cluster.piece_pid(flink_cluster, piece)
                      for piece in cluster.pieces(flink_cluster)}


def test_a_killed_taskmanager_is_seen_and_started_again(flink_cluster):
    """kill -9 of a TaskManager: status says so, start brings it back, the
    JobManager counts two TaskManagers again."""
    pid = cluster.piece_pid(flink_cluster, "taskmanager-2")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cluster.piece_pid(flink_cluster, "taskmanager-2") and time.monotonic() < deadline:
        time.sleep(0.2)
    lines: list[str] = []
    state = cluster.status(flink_cluster, say=lines.append)
    assert not state["running"] and state["pids"]["taskmanager-2"] is None
    assert any("not running: taskmanager-2" in line for line in lines), lines
    cluster.start(flink_cluster, say=lines.append)
    assert cluster.piece_pid(flink_cluster, "taskmanager-2") not in (None, pid)
    assert cluster.registered_taskmanagers(flink_cluster) == ["taskmanager-1", "taskmanager-2"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "flink", *args],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT),
                          env=env or dict(os.environ))


def test_a_port_in_use_is_one_clear_line(flink_cluster, tmp_path):
    with socket.socket() as holder:
        holder.bind(("localhost", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _cli("start", "--state_dir", str(tmp_path / "other"), "--rest_port", str(port),
                    "--rpc_port", str(_free_port()), "--pool_port", str(_free_port()))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"gbif-embed flink: error: port {port} on localhost is in use by another program "
        "(the Flink jobmanager needs it): stop that program or pick another port "
        "(--rest_port, --rpc_port, --pool_port)"]


def test_missing_java_is_one_clear_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mvn",):  # everything a start needs but Java
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(bin_dir)
    done = _cli("start", "--state_dir", str(tmp_path / "state"), env=env)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("gbif-embed flink: error: Flink needs Java 11 or 17 and none was found")


def test_a_taskmanagers_worker_pool_runs_the_pipeline(flink_cluster, tiny_model, tmp_path):
    """The pool `flink start` runs beside TaskManager 2 (its address, its PATH,
    its cores) serves a whole job: submitted here through Beam's own portable
    job service, since Beam's Flink job server jar cannot be had (README)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.cli import run
    from pipeline.demo.demo import serve_folder
    from pipeline.demo.sample_data import make_sample
    from tests.conftest import LOOPBACK

    (tmp_path / "images").mkdir()
    job_port = _free_port()
    service = subprocess.Popen([sys.executable, "-m",
                                "apache_beam.runners.portability.local_job_service_main",
                                "--port", str(job_port)], cwd=str(ROOT),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", job_port)) != 0:
            assert time.monotonic() < deadline, "the job service did not start"
            time.sleep(0.2)
        with serve_folder(str(tmp_path / "images")) as base_url:
            sample = make_sample(str(tmp_path), base_url, 6, photo_size=(200, 150))
            manifest = run(PipelineOptions([
                "--export", sample.export, "--model", tiny_model,
                "--output", str(tmp_path / "out"), "--quiet", "--batch_size", "4",
                *LOOPBACK, "--runner", "PortableRunner", "--job_endpoint",
                f"localhost:{job_port}", "--environment_type", "EXTERNAL",
                "--environment_config",
                f"{flink_cluster.pool_host(2)}:{flink_cluster.pool_port}"]))
    finally:
        service.terminate()
        service.wait(timeout=30)
    assert manifest["counts"]["embedded"] == sample.expected_images
    assert manifest["counts"]["accounted"] == manifest["counts"]["export_rows"]
    log = (flink_cluster.logs / "worker-pool-2.log").read_text()
    assert "Starting worker with command" in log  # this pool, not another, ran it
