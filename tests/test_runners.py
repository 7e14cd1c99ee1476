"""The same pipeline beyond one process: local multi-processing, a portable
job service with an external worker pool (how Flink runs Python workers),
a Dataflow dry run, and the sdist that Dataflow workers install."""
from __future__ import annotations

import glob
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.demo import serve_folder
from pipeline.demo.sample_data import make_sample
from tests.conftest import LOOPBACK, ROOT, portable_runner



@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small export whose pictures are served from loopback for the whole module."""
    data = tmp_path_factory.mktemp("runners-data")
    (data / "images").mkdir()
    with serve_folder(str(data / "images")) as base_url:
        yield make_sample(str(data), base_url, 10, photo_size=(240, 180))


def _embeddings(output: str, snapshot: str) -> dict:
    paths = sorted(glob.glob(f"{output}/{snapshot}/embeddings-*.parquet"))
    table = pq.ParquetDataset(paths).read()
    return {(row["gbifID"], row["identifier"]): np.asarray(row["embedding"])
            for row in table.select(["gbifID", "identifier", "embedding"]).to_pylist()}


def _run(sample, model: str, output: str, *extra: str) -> dict:
    """float32 pinned: these tests compare runners' vectors, not precisions
    (tests/embed/test_auto_precision.py checks that a job has one precision)."""
    return run(PipelineOptions(["--export", sample.export, "--model", model,
                                "--output", output, "--quiet", "--batch_size", "4",
                                "--precision", "float32", *LOOPBACK, *extra]))


@pytest.fixture(scope="module")
def single_process(sample, tiny_model, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("single") / "out")
    manifest = _run(sample, tiny_model, output)
    return output, manifest


def test_two_local_worker_processes_match_one(sample, tiny_model, single_process,
                                              tmp_path):
    output = str(tmp_path / "out")
    manifest = _run(sample, tiny_model, output, "--direct_running_mode", "multi_processing",
                    "--direct_num_workers", "2")
    assert manifest["counts"]["embedded"] == sample.expected_images
    # Each embed step gets a handle per worker process; the model itself is
    # loaded at most once per process.
    assert 1 <= manifest["metrics"]["counters"].get("embed/models_loaded", 0) <= 2
    assert manifest["metrics"]["counters"]["embed/num_inferences"] == sample.expected_images
    one = _embeddings(single_process[0], single_process[1]["snapshot"])
    two = _embeddings(output, manifest["snapshot"])
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(one[key], two[key], rtol=1e-4, atol=1e-5)


def test_portable_runner_with_external_worker_pool(sample, tiny_model, single_process,
                                                   tmp_path):
    """Beam's job service plus a worker pool, as a Flink deployment's sidecar runs it."""
    output = str(tmp_path / "out")
    with portable_runner() as flags:
        manifest = _run(sample, tiny_model, output, *flags)
    assert manifest["counts"]["embedded"] == sample.expected_images
    one = _embeddings(single_process[0], single_process[1]["snapshot"])
    portable = _embeddings(output, manifest["snapshot"])
    assert one.keys() == portable.keys()
    for key in one:
        np.testing.assert_allclose(one[key], portable[key], rtol=1e-4, atol=1e-5)


def test_dataflow_dry_run_translates_the_real_pipeline(sample, tiny_model, gcs_bucket):
    """Inputs and output on gs://, --setup_file: the job is built, nothing is submitted."""
    import fsspec
    fs = fsspec.filesystem("gs")
    fs.put(sample.export, f"{gcs_bucket}/dry/export.zip")
    fs.put(tiny_model, f"{gcs_bucket}/dry/model", recursive=True)
    result = run(PipelineOptions([
        "--export", f"{gcs_bucket}/dry/export.zip", "--model", f"{gcs_bucket}/dry/model",
        "--output", f"{gcs_bucket}/dry/out", "--runner", "DataflowRunner", "--dry_run=True",
        "--project", "gbif-embed-test", "--region", "europe-west1",
        "--temp_location", f"{gcs_bucket}/tmp", "--setup_file", str(ROOT / "setup.py"),
        "--inference_min_ram", "8GB", "--quiet"]))
    assert result["dry_run"] is True
    steps = " ".join(result["transforms"])
    for stage in ("PlannedTasks", "PlanTally", "Fetch", "Decode", "Embed",
                  "WriteEmbeddings", "WriteFailures", "Publish"):
        assert stage in steps
    assert any("min_ram" in hint for hint in result["resource_hints"])
    # Embedding reads behind a shuffle keyed by content, and the hints hold for
    # decoding as well as inference: what reaches the hinted workers is the
    # store's copy of a picture (tens of kB), never its pixels.
    assert "ByContent/GroupByContent" in steps
    hinted = result["hinted_transforms"]
    assert any(name.startswith("EmbedFetched/Decode") for name in hinted), hinted
    assert any(name.startswith("EmbedFetched/Embed/RunInference") for name in hinted), hinted
    # (The store is empty here, so the branch that embeds stored pictures is not
    # built; when it is, it is the same composite with the same hints.)
    assert not any(name.startswith(("Fetch", "PlannedTasks", "ByContent")) for name in hinted)
    assert not fs.exists(f"{gcs_bucket}/dry/out/LATEST")


def test_sdist_installs_into_a_clean_venv(tmp_path):
    """What Beam's stager does with --setup_file, then a clean venv installs it."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "setup.py", "sdist", "--dist-dir", str(dist)],
                   cwd=str(ROOT), check=True, capture_output=True, timeout=300)
    (sdist,) = [*dist.glob("gbif-embed-*.tar.gz"), *dist.glob("gbif_embed-*.tar.gz")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          str(sdist)], capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    help_text = subprocess.run([str(venv / "bin" / "gbif-embed"), "run", "--help"],
                               capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    assert "--export" in help_text.stdout and "--allow_private_networks" in help_text.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import pipeline.graph, transforms.embed.inference; "
                            "print(pipeline.graph.__file__)"],
                           capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
