"""The pinned downloads: a file whose sha256 differs is refused and deleted,
and a missing Maven or job server jar is one line saying so."""
from __future__ import annotations

import pytest

from pipeline.flink import distribution
from pipeline.flink.distribution import FLINK_FILES, FlinkSetupError


def test_a_download_whose_sha256_differs_is_refused_and_deleted(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for name in FLINK_FILES:  # present, so pip is not asked
        (downloads / name).write_bytes(b"not the pinned file")
    with pytest.raises(FlinkSetupError, match=r"sha256 [0-9a-f]{64}, expected [0-9a-f]{64} "
                                              r"\(deleted"):
        distribution._pip_download(downloads)
    assert len(list(downloads.iterdir())) == len(FLINK_FILES) - 1


def test_without_maven_the_job_server_jar_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn there
    with pytest.raises(FlinkSetupError) as raised:
        distribution.job_server_jar(tmp_path)
    assert str(raised.value) == (
        f"fetching {distribution.JOB_SERVER_ARTIFACT} needs Maven and `mvn` is not on "
        "PATH: install it, e.g. `apt-get install -y maven`")


def test_status_does_not_fetch_and_says_what_to_run(tmp_path):
    with pytest.raises(FlinkSetupError, match=r"not fetched yet \(`gbif-embed flink start` "
                                              r"fetches it\)"):
        distribution.job_server_jar(tmp_path, fetch=False)
