"""`gbif-embed run --runner FlinkRunner` on the session's real cluster.

Each test needs Beam's Flink job server jar; while Maven cannot fetch it they
are skipped with Maven's answer (tests/flink/conftest.py). They have not
run yet on any machine of this project (see README, "Running on Flink").
"""
from __future__ import annotations

import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import make_sample
from pipeline.flink.distribution import FLINK_MINOR
from pipeline.lease import LeaseHeld, held
from tests.conftest import LOOPBACK


def flink_flags(spec, jar: str) -> list[str]:
    """The flags of a run on the cluster (the README's command)."""
    return ["--runner", "FlinkRunner", "--flink_master", spec.master,
            "--flink_version", FLINK_MINOR, "--flink_job_server_jar", jar,
            "--environment_type", "EXTERNAL", "--environment_config", spec.environment_config,
            "--parallelism", "2"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    data = tmp_path_factory.mktemp("flink-data")
    (data / "images").mkdir()
    with serve_folder(str(data / "images")) as base_url:
        yield make_sample(str(data), base_url, 10, photo_size=(240, 180))


def _run(sample, model: str, output: str, *extra: str) -> dict:
    return run(PipelineOptions(["--export", sample.export, "--model", model, "--output", output,
                                "--quiet", "--batch_size", "4", "--precision", "float32",
                                *LOOPBACK, *extra]))


def _rows(output: str, manifest: dict) -> dict:
    paths = sorted(glob.glob(f"{output}/{manifest['snapshot']}/embeddings-*.parquet"))
    table = pq.ParquetDataset(paths).read().select(["gbifID", "identifier", "embedding"])
    rows = table.to_pylist()
    keys = [(row["gbifID"], row["identifier"]) for row in rows]
    assert len(keys) == len(set(keys)), "a row was written twice"
    return {key: np.asarray(row["embedding"]) for key, row in zip(keys, rows)}


@pytest.fixture(scope="module")
def local_run(sample, tiny_model, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("local") / "out")
    return output, _run(sample, tiny_model, output)


def test_every_row_once_and_the_local_runners_embeddings(flink_cluster, job_server_jar,
                                                         sample, tiny_model, local_run,
                                                         tmp_path):
    output = str(tmp_path / "out")
    manifest = _run(sample, tiny_model, output, *flink_flags(flink_cluster, job_server_jar))
    counts = manifest["counts"]
    assert counts["embedded"] == sample.expected_images
    assert counts["accounted"] == counts["export_rows"]
    local, flink = _rows(*local_run), _rows(output, manifest)
    assert local.keys() == flink.keys()
    for key in local:
        a, b = local[key], flink[key]
        assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.99999, key
    with open(f"{output}/LATEST") as latest:  # published by the job itself
        assert latest.read().strip() == manifest["snapshot"]


def test_output_and_store_on_gcs(flink_cluster, job_server_jar, sample, tiny_model,
                                 gcs_bucket):
    output = f"{gcs_bucket}/flink/out"
    manifest = _run(sample, tiny_model, output, *flink_flags(flink_cluster, job_server_jar))
    assert manifest["counts"]["embedded"] == sample.expected_images


def test_a_second_run_on_the_same_output_is_refused(flink_cluster, job_server_jar, sample,
                                                    tiny_model, tmp_path):
    output = str(tmp_path / "out")
    with held(output, "snapshot-first"):
        with pytest.raises(LeaseHeld):
            _run(sample, tiny_model, output, *flink_flags(flink_cluster, job_server_jar))


def test_a_shard_is_fetched_in_work_items_that_checkpoint(flink_cluster, job_server_jar,
                                                          sample, tiny_model, tmp_path):
    """Flink (batch) replays a work item's deferred rest after its bundle: every
    row once, in several work items of a shard."""
    output = str(tmp_path / "out")
    manifest = _run(sample, tiny_model, output, *flink_flags(flink_cluster, job_server_jar),
                    "--per_host_rate", "4", "--per_host_concurrency", "2",
                    "--fetch_work_item_seconds", "0.5")
    counts, tally = manifest["counts"], manifest["tally"]
    assert counts["embedded"] == sample.expected_images
    assert counts["accounted"] == counts["export_rows"]
    assert tally["fetch.checkpoints"] >= 1, tally
    assert tally["fetch.work_items"] > tally["fetch.checkpoints"], tally
    _rows(output, manifest)  # each row once
