"""Ctrl-C or SIGTERM of a run on a remote runner (Flink, Dataflow, a portable
job service) cancels the job before the output's lease is given back: a job
left running would still fetch and publish while a rerun took the lease."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

from tests.compare.test_refresh import _export, _photo
from tests.compare.test_resume import _start
from tests.conftest import portable_runner
from tests.http_server import FaultServer

N = 30


@pytest.fixture
def slow():
    """Images that take 0.5 s each: the job is still fetching when it is stopped."""
    with FaultServer() as server:
        for i in range(N):
            server.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg"},
                       delay=0.5)
        yield server


def test_sigterm_cancels_the_remote_job_before_giving_the_lease_back(tmp_path, tiny_model,
                                                                      slow):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", slow, list(range(N)))
    with portable_runner() as flags:
        process = _start(export, tiny_model, output, *flags)
        deadline = time.time() + 300
        while sum(slow.hits(f"/img/{i}.jpg") for i in range(N)) < 2:  # the job fetches
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, "the job fetched nothing"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        endpoint = flags[flags.index("--job_endpoint") + 1]
        with grpc.insecure_channel(endpoint) as channel:
            jobs = beam_job_api_pb2_grpc.JobServiceStub(channel).GetJobs(
                beam_job_api_pb2.GetJobsRequest()).job_info
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM: the job was cancelled on the runner (state CANCELLED)" \
        in stderr, stderr
    assert [job.state for job in jobs] == [beam_job_api_pb2.JobState.CANCELLED]
    assert not os.path.exists(f"{output}/LEASE")  # given back once the job had stopped
