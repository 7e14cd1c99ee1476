"""Shared fixtures: the real GBIF samples and photographs in ../shared, read in place."""
from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
GBIF_SAMPLES = SHARED / "gbif-samples"
FUNGI_IMAGES = SHARED / "fungi-images"

# gcsfs otherwise waits 60 s per bucket for a gRPC call the emulator cannot answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# Tests serve pictures from 127.0.0.1, which the fetcher refuses unless opened.
LOOPBACK = ["--allow_private_networks", "127.0.0.1/32"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The small stand-in embedder, built once per test session."""
    from pipeline.models.make_model import build_model
    path = str(tmp_path_factory.mktemp("models") / "tiny")
    build_model(path, "tiny")
    return path


@pytest.fixture(scope="session")
def lite0_models(tmp_path_factory) -> dict[str, str]:
    """ImageNet EfficientNet-Lite0 (trained weights, from the `models` extra) in
    each format the pipeline accepts, built once per test session."""
    from pipeline.models.make_model import build_model
    root = tmp_path_factory.mktemp("lite0")
    return {fmt: build_model(str(root / fmt), "efficientnet_lite0", 1280, 0, fmt)
            for fmt in ("tf1hub", "tf2", "onnx")}


def shared_path(*parts: str) -> pathlib.Path:
    """A file of ../shared/data, or a skip that says why (third-party data is never
    copied into the repository, so without ../shared these tests cannot run)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}: real third-party data read in place from ../shared, "
                    "absent on this machine")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_bucket():
    """A GCS emulator on loopback (gcp-storage-emulator); yields `gs://<bucket>`.

    gcsfs and Beam's GCS client both honour STORAGE_EMULATOR_HOST.
    """
    import shutil

    import fsspec
    executable = shutil.which("gcp-storage-emulator") or os.path.join(
        os.path.dirname(sys.executable), "gcp-storage-emulator")
    port, bucket = _free_port(), "gbif-embed-test"
    process = subprocess.Popen(
        [executable, "start", "--port", str(port), "--in-memory", "--default-bucket", bucket],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
    fsspec.filesystem("gs").invalidate_cache()
    deadline = time.time() + 30
    while True:
        try:
            fsspec.filesystem("gs", skip_instance_cache=True).ls(bucket)
            break
        except Exception:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the GCS emulator did not start")
            time.sleep(0.2)
    yield f"gs://{bucket}"
    process.terminate()
    process.wait(timeout=10)
    os.environ.pop("STORAGE_EMULATOR_HOST", None)


class FakeClock:
    """A clock whose sleep only moves it on: politeness tests in no time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def portable_runner() -> Iterator[list[str]]:
    """Beam's job service plus an external worker pool, as a Flink deployment's
    sidecar runs it; yields the flags of a run on it. The pool starts workers
    with the `python` on PATH, so PATH leads to this venv."""
    job_port, pool_port = _free_port(), _free_port()
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    services = [
        subprocess.Popen([sys.executable, "-m",
                          "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], env=env, cwd=str(ROOT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          "--service_port", str(pool_port)], env=env, cwd=str(ROOT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        for port in (job_port, pool_port):
            deadline = time.time() + 60
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                assert time.time() < deadline, f"nothing listens on {port}"
                time.sleep(0.2)
        yield ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job_port}",
               "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool_port}"]
    finally:
        for service in services:
            service.terminate()
            service.wait(timeout=10)
