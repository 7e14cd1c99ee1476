"""A real Flink cluster for the session: `gbif-embed flink start`'s own code,
on free ports and in a folder of the session's own (the distribution is
cached in ~/.cache/gbif-embed/flink, so only the first run downloads it).

Skipped, with the reason, where Java is missing; the runs on it are also
skipped, with Maven's answer, while Beam's Flink job server jar cannot be
fetched (see README, "Running on Flink")."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import _free_port


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory, gcs_bucket):
    """The GCS emulator starts first: SDK workers inherit its address
    (STORAGE_EMULATOR_HOST) from the worker pools, not from the launcher."""
    from pipeline.flink import cluster, distribution
    try:
        distribution.java()
    except distribution.FlinkSetupError as err:
        pytest.skip(str(err))
    spec = cluster.ClusterSpec(state_dir=tmp_path_factory.mktemp("flink"),
                               rest_port=_free_port(), rpc_port=_free_port(),
                               pool_port=_free_port())
    lines: list[str] = []
    try:
        cluster.start(spec, say=lines.append)
        yield spec
    finally:
        cluster.stop(spec, say=lines.append)
        left = {piece: pid for piece in cluster.pieces(spec)
                if (pid := cluster.piece_pid(spec, piece))}
        assert not left, f"still running after stop: {left}"


@pytest.fixture(scope="session")
def job_server_jar(flink_cluster) -> str:
    from pipeline.flink import distribution
    if not shutil.which("mvn"):
        pytest.skip("Maven (`mvn`) is not on PATH: it fetches Beam's Flink job server jar")
    try:
        return str(distribution.job_server_jar())
    except distribution.FlinkSetupError as err:
        pytest.skip(str(err))
