"""Supported Pythons (3.11, 3.12, 3.13): how scripts/setup_venv.sh chooses and
refuses one, and the launcher's check that a worker image (--sdk_container_image)
was built for the launcher's Python minor version."""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import main, run
from pipeline.sdk_image import (
    SUPPORTED,
    SdkImageError,
    check_image,
    check_sdk_image,
    named_versions,
    split_reference,
)
from tests.conftest import ROOT

HERE = (sys.version_info[0], sys.version_info[1])
HERE_TEXT = "%d.%d" % HERE
# A supported minor version that is not the one running these tests.
OTHER = (3, 13) if HERE != (3, 13) else (3, 11)
OTHER_TEXT = "%d.%d" % OTHER


# --- which Python an image reference names ------------------------------------------

@pytest.mark.parametrize("image, versions", [
    ("apache/beam_python3.12_sdk:2.77.0", [(3, 12)]),
    ("apache/beam_python3.11_sdk", [(3, 11)]),
    ("europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1-py3.12", [(3, 12)]),
    ("europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1-py3.13-gpu", [(3, 13)]),
    ("registry.example.org:5000/gbif-embed:py311", [(3, 11)]),
    ("gbif-embed:0.1-PY3.12", [(3, 12)]),
    ("gbif-embed:python3.10", [(3, 10)]),
    ("python:3.12-slim", [(3, 12)]),
    ("library/python:3.13.1-bookworm", [(3, 13)]),
    ("gbif_python3.11:0.1-py3.12", [(3, 11), (3, 12)]),
    ("gbif-embed:py3.12-py3.12", [(3, 12)]),
    # no version: a bare tag, a digest, Beam's version, `py3` alone, glued to a word
    ("gbif-embed:0.1", []),
    ("gbif-embed@sha256:0123456789abcdef", []),
    ("registry:5000/gbif-embed", []),
    ("gbif-embed:2.77.0", []),
    ("gbif-embed:py3-slim", []),
    ("gbif-embed:numpy3.12", []),
    # only the name (last path segment) and the tag are read, not the path or host
    ("py3.12.example.org/tools-py3.11/gbif-embed:0.1", []),
])
def test_named_versions(image, versions):
    assert named_versions(image) == versions


def test_split_reference():
    assert split_reference("host:5000/a/b/gbif-embed:0.1-py3.12@sha256:ab") == (
        "gbif-embed", "0.1-py3.12")
    assert split_reference("gbif-embed") == ("gbif-embed", "")


def test_an_image_for_the_launchers_python_passes():
    assert check_image(f"apache/beam_python{HERE_TEXT}_sdk:2.77.0") == HERE
    assert check_image("gbif-embed:0.1-py3.12", python=(3, 12)) == (3, 12)


@pytest.mark.parametrize("image", [
    "apache/beam_python3.11_sdk:2.77.0",
    "europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1-py3.11",
    "gbif_python3.12:py3.11",  # one of two names is wrong
])
def test_an_image_for_another_python_is_refused(image):
    with pytest.raises(SdkImageError) as err:
        check_image(image, python=(3, 12))
    message = str(err.value)
    assert re.search(r"names (Python 3\.12 and )?Python 3\.11,", message), message
    assert "this launcher runs Python 3.12" in message
    assert "expected an image for Python 3.12" in message
    assert "--build-arg PYTHON_VERSION=3.12" in message
    assert "launch from Python 3.11" in message


def test_an_unsupported_python_is_not_offered_as_the_way_out():
    with pytest.raises(SdkImageError) as err:
        check_image("apache/beam_python3.9_sdk:2.60.0", python=(3, 12))
    assert "names Python 3.9" in str(err.value)
    assert "launch from" not in str(err.value)


def test_an_image_that_names_no_python_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.sdk_image"):
        assert check_image("europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1",
                           python=(3, 12)) is None
    assert "names no Python version" in caplog.text
    assert "must run Python 3.12" in caplog.text


@pytest.mark.parametrize("flags", [
    ["--sdk_container_image", "repo/gbif-embed:0.1-py{v}"],
    ["--worker_harness_container_image", "apache/beam_python{v}_sdk:2.77.0"],
    ["--environment_type", "DOCKER", "--environment_config", "repo/gbif-embed:py{v}"],
    ["--environment_type", "DOCKER",
     "--environment_option", "docker_container_image=repo/gbif-embed:py{v}"],
])
def test_every_flag_that_names_a_worker_image_is_checked(flags):
    def options(version):
        return PipelineOptions([flag.format(v=version) for flag in flags])
    check_sdk_image(options(HERE_TEXT))
    with pytest.raises(SdkImageError, match=f"names Python {OTHER_TEXT}"):
        check_sdk_image(options(OTHER_TEXT))


def test_no_image_no_docker_nothing_to_check():
    check_sdk_image(PipelineOptions(["--runner", "DataflowRunner"]))
    # EXTERNAL's config is an address, not an image
    check_sdk_image(PipelineOptions(["--environment_type", "EXTERNAL",
                                     "--environment_config", "localhost:50000"]))


# --- the check at the real command line ----------------------------------------------

def test_gbif_embed_run_refuses_an_image_for_another_python(tmp_path, capsys):
    """Through `gbif-embed run`: refused before the export or the model is read."""
    image = f"europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1-py{OTHER_TEXT}"
    status = main(["run", "--export", str(tmp_path / "absent.zip"),
                   "--model", str(tmp_path / "absent-model"), "--output", str(tmp_path / "out"),
                   "--runner", "DataflowRunner", "--dry_run=True", "--project", "p",
                   "--region", "europe-west1", "--temp_location", "gs://b/tmp",
                   "--sdk_container_image", image, "--sdk_location", "container"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("gbif-embed run: error: --sdk_container_image ")
    assert f"names Python {OTHER_TEXT}, but this launcher runs Python {HERE_TEXT}" in err
    assert f"--build-arg PYTHON_VERSION={HERE_TEXT}" in err
    assert not (tmp_path / "out").exists()


def test_dataflow_dry_run_accepts_an_image_for_this_python(tmp_path, tiny_model, gcs_bucket):
    """A matching image passes the check and the real Dataflow job is built."""
    from pipeline.demo.sample_data import make_sample
    sample = make_sample(str(tmp_path / "data"), "http://127.0.0.1:9/", 4,
                         photo_size=(64, 48), with_problems=False)
    result = run(PipelineOptions([
        "--export", sample.export, "--model", tiny_model,
        "--output", f"{gcs_bucket}/py-versions/out", "--runner", "DataflowRunner",
        "--dry_run=True", "--project", "gbif-embed-test", "--region", "europe-west1",
        "--temp_location", f"{gcs_bucket}/tmp",
        "--sdk_container_image",
        f"europe-west1-docker.pkg.dev/proj/repo/gbif-embed:0.1-py{HERE_TEXT}",
        "--sdk_location", "container", "--quiet"]))
    assert result["dry_run"] is True
    assert any("Embed" in name for name in result["transforms"])


# --- the versions named in each place agree ------------------------------------------

def _setup_py() -> str:
    return (ROOT / "setup.py").read_text()


def test_python_requires_names_the_supported_versions():
    match = re.search(r'python_requires=">=3\.(\d+),<3\.(\d+)"', _setup_py())
    assert match, "python_requires is not of the form >=3.X,<3.Y"
    assert SUPPORTED == tuple((3, m) for m in range(int(match[1]), int(match[2])))
    script = (ROOT / "scripts" / "setup_venv.sh").read_text()
    listed = re.search(r"^SUPPORTED=\(([^)]*)\)", script, re.MULTILINE)[1].split()
    assert listed == ["%d.%d" % v for v in SUPPORTED]
    assert HERE in SUPPORTED


def test_dockerfile_takes_the_python_version_and_beams_own_image():
    text = (ROOT / "Dockerfile").read_text()
    default = re.search(r"^ARG PYTHON_VERSION=(3\.\d+)$", text, re.MULTILINE)
    assert default and tuple(map(int, default[1].split("."))) in SUPPORTED
    assert text.index("ARG PYTHON_VERSION") < text.index("\nFROM ")
    beam = re.search(r'"apache-beam\[gcp\]==([\d.]+)"', _setup_py())[1]
    assert f"FROM apache/beam_python${{PYTHON_VERSION}}_sdk:{beam}\n" in text


def test_pkg_resources_is_declared_and_quiet():
    """tensorflow-hub 0.16.1 imports pkg_resources: setuptools must be a declared
    dependency below 81, and importing tensorflow_hub must not print its warning."""
    from importlib import metadata
    pin = re.search(r'"setuptools==(\d+)\.[\d.]+"', _setup_py())
    assert pin and int(pin[1]) < 81
    assert any(r.replace(" ", "").startswith("setuptools==")
               for r in metadata.requires("gbif-embed") or []), \
        "the installed gbif-embed does not declare setuptools (reinstall: ./run_tests.sh)"
    assert int(metadata.version("setuptools").split(".")[0]) < 81
    probe = subprocess.run(
        [sys.executable, "-c", "import warnings; warnings.simplefilter('default', UserWarning); "
         "import tensorflow_hub"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "pkg_resources is deprecated" not in probe.stderr


# --- scripts/setup_venv.sh: which Python it chooses, which it refuses ------------------

def _fake_python(path, version: str) -> str:
    """A `python` that answers any question with its version, as setup_venv.sh asks it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def project(tmp_path):
    """A copy of the script where it expects to be, so no real .venv is touched."""
    (tmp_path / "proj" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_venv.sh", tmp_path / "proj" / "scripts")
    shutil.copy(ROOT / "setup.py", tmp_path / "proj")
    return tmp_path / "proj"


def _setup_venv(project, *args, path=None, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHON", "GBIF_EMBED_VENV")}
    full_env.update(env)
    if path is not None:
        full_env["PATH"] = path
    return subprocess.run([shutil.which("bash"), str(project / "scripts" / "setup_venv.sh"),
                           *args], capture_output=True, text=True, timeout=120, env=full_env)


def _only_tools(tmp_path, *fake_bins) -> str:
    """A PATH of the few tools the script needs, plus fake Pythons: no real Python on it."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for tool in ("bash", "sh", "dirname", "cut", "head", "sha256sum", "rm", "touch"):
        where = shutil.which(tool)
        if where and not (tools / tool).exists():
            (tools / tool).symlink_to(where)
    return os.pathsep.join([*map(str, fake_bins), str(tools)])


def test_an_unsupported_python_is_refused(project, tmp_path):
    fake = _fake_python(tmp_path / "fake" / "python", "3.10.13")
    done = _setup_venv(project, PYTHON=fake)
    assert done.returncode != 0
    assert f"PYTHON={fake} is Python 3.10.13" in done.stderr
    assert "supports Python 3.11, 3.12, 3.13 only" in done.stderr
    assert not (project / ".venv").exists()


def _real_unsupported_python():
    candidates = [shutil.which(name) for name in ("python3.10", "python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() in ("(3, 10)", "(3, 9)"):
            return candidate
    return None


def test_a_real_unsupported_python_is_refused(project):
    python = _real_unsupported_python()
    if python is None:
        pytest.skip("no Python 3.10 or 3.9 on this machine (on PATH or under ~/.pyenv); "
                    "test_an_unsupported_python_is_refused covers the same with a fake one")
    done = _setup_venv(project, PYTHON=python)
    assert done.returncode != 0
    assert re.search(r"is Python 3\.(10|9)\.\d+; gbif-embed supports Python 3\.11, 3\.12, "
                     r"3\.13 only", done.stderr), done.stderr
    assert not (project / ".venv").exists()


def test_a_missing_python_is_refused(project):
    done = _setup_venv(project, PYTHON="python3.99-absent")
    assert done.returncode != 0
    assert "PYTHON=python3.99-absent: no such command" in done.stderr


def test_the_newest_supported_python_on_path_is_chosen(project, tmp_path):
    bin_dir = tmp_path / "bin"
    for version in ("3.11.7", "3.12.1", "3.13.0"):
        _fake_python(bin_dir / f"python{version.rsplit('.', 1)[0]}", version)
    _fake_python(bin_dir / "python3", "3.10.13")
    path = _only_tools(tmp_path, bin_dir)
    done = _setup_venv(project, "--which", path=path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python3.13", "3.13.0"]
    (bin_dir / "python3.13").unlink()
    assert _setup_venv(project, "--which", path=path).stdout.split() == ["python3.12", "3.12.1"]
    (bin_dir / "python3.12").unlink()
    (bin_dir / "python3.11").unlink()
    done = _setup_venv(project, "--which", path=path)  # python3 is 3.10: refused
    assert done.returncode != 0
    assert "no supported Python found on PATH" in done.stderr


def test_an_existing_venv_keeps_its_python(project, tmp_path):
    _fake_python(project / ".venv" / "bin" / "python", "3.11.7")
    bin_dir = tmp_path / "bin"
    _fake_python(bin_dir / "python3.13", "3.13.0")
    path = _only_tools(tmp_path, bin_dir)
    done = _setup_venv(project, "--which", path=path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [".venv/bin/python", "3.11.7"]


def test_python_that_differs_from_the_existing_venv_is_refused(project, tmp_path):
    _fake_python(project / ".venv" / "bin" / "python", "3.11.7")
    python = _fake_python(tmp_path / "bin" / "python3.13", "3.13.0")
    done = _setup_venv(project, PYTHON=python)
    assert done.returncode != 0
    assert ".venv was made with Python 3.11.7, not Python 3.13.0" in done.stderr
    assert f"rm -rf .venv && PYTHON={python} scripts/setup_venv.sh" in done.stderr
    assert (project / ".venv" / "bin" / "python").exists()  # left as it is


def test_an_existing_venv_of_an_unsupported_python_is_refused(project):
    _fake_python(project / ".venv" / "bin" / "python", "3.10.13")
    done = _setup_venv(project)
    assert done.returncode != 0
    assert ".venv was made with Python 3.10.13, which gbif-embed does not support" in done.stderr
    assert "rm -rf .venv" in done.stderr
    assert (project / ".venv" / "bin" / "python").exists()
