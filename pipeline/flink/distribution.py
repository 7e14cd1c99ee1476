"""The pinned Flink distribution and Beam job server jar, fetched once and cached.

Flink's full distribution is published on PyPI in two parts (FIELD_NOTES,
"Distributed engines"): `apache-flink-libraries` (an sdist whose `deps/` holds
lib/, opt/, plugins/ and bin/bash-java-utils.jar) and `apache-flink` (a wheel
whose `pyflink/bin` and `pyflink/conf` hold the scripts and config.yaml).
`apache-flink` declares `apache-beam<=2.61`, so both are downloaded with
`pip download --no-deps` and unpacked into a folder of their own, never
installed into the project's environment. Each file's sha256 is pinned here
and checked before it is unpacked.

The job server jar (Beam's Flink runner, which translates the pipeline for
Flink) comes from Maven Central through `mvn dependency:copy`.
"""
from __future__ import annotations

import hashlib
import os
import re
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from typing import Optional

FLINK_VERSION = "1.20.5"
FLINK_MINOR = "1.20"
# Beam's Flink job server for the same Beam version as the SDK (2.77.0).
BEAM_VERSION = "2.77.0"
JOB_SERVER_ARTIFACT = f"org.apache.beam:beam-runners-flink-{FLINK_MINOR}-job-server:{BEAM_VERSION}"
# The wheel only contributes bin/ and conf/, the same for every Python: the
# cp311 one is pinned so that any Python can fetch it.
FLINK_FILES = {
    "apache_flink_libraries-1.20.5.tar.gz":
        "e6aee62ea1a1fe7b32e28894ad079f3f1a50a372a4caac3df52405267f4228c8",
    "apache_flink-1.20.5-cp311-cp311-manylinux_2_5_x86_64.manylinux1_x86_64."
    "manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
        "6e8ec098a7c06ea34d01fd540e81d44703a90e3bda74052dcbcbb7db5253c10f",
}
# Unknown until Maven Central serves the jar to these machines (see README,
# "Running on Flink"); once it does, pin the printed sha256 here.
JOB_SERVER_SHA256: Optional[str] = None


class FlinkSetupError(RuntimeError):
    """Something the cluster needs is missing; the message is one line."""


def cache_root() -> pathlib.Path:
    """~/.cache/gbif-embed/flink (GBIF_EMBED_FLINK_CACHE overrides it)."""
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return pathlib.Path(os.environ.get("GBIF_EMBED_FLINK_CACHE")
                        or default / "gbif-embed" / "flink")


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def java() -> str:
    """The `java` that Flink's scripts will run, or one clear line."""
    home = os.environ.get("JAVA_HOME")
    found = (os.path.join(home, "bin", "java") if home else None) or shutil.which("java")
    if not found or not os.path.exists(found):
        raise FlinkSetupError("Flink needs Java 11 or 17 and none was found (no `java` on "
                              "PATH, JAVA_HOME unset): install it, e.g. "
                              "`apt-get install -y openjdk-17-jre-headless`")
    return found


def flink_home(cache: Optional[pathlib.Path] = None) -> pathlib.Path:
    """FLINK_HOME of the pinned distribution, downloaded and unpacked on first use."""
    cache = cache or cache_root()
    home = cache / f"flink-{FLINK_VERSION}"
    if (home / ".complete").exists():
        return home
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    _pip_download(downloads)
    staging = cache / f".flink-{FLINK_VERSION}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sdist, wheel = (downloads / name for name in FLINK_FILES)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = pathlib.PurePosixPath(member.name).parts
            # <name>/deps/{lib,plugins,bin}/...; opt/ (optional jars) is left out.
            if len(parts) > 3 and parts[1] == "deps" and parts[2] in ("lib", "plugins", "bin"):
                member.name = str(pathlib.PurePosixPath(*parts[2:]))
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                    archive.extract(member, staging, filter="data")
                else:
                    archive.extract(member, staging)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            parts = pathlib.PurePosixPath(name).parts
            if len(parts) > 2 and parts[0] == "pyflink" and parts[1] in ("bin", "conf"):
                target = staging.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
                if parts[1] == "bin":
                    target.chmod(0o755)
    if not (staging / "lib" / f"flink-dist-{FLINK_VERSION}.jar").exists() or not (
            staging / "bin" / "jobmanager.sh").exists():
        raise FlinkSetupError(f"the Flink {FLINK_VERSION} packages did not hold lib/flink-dist "
                              f"and bin/jobmanager.sh as expected (unpacked in {staging})")
    (staging / ".complete").write_text(FLINK_VERSION + "\n")
    shutil.rmtree(home, ignore_errors=True)
    staging.rename(home)
    shutil.rmtree(downloads, ignore_errors=True)  # 224 MB no longer needed
    return home


def _pip_download(downloads: pathlib.Path) -> None:
    """Both PyPI files, checked against their pinned sha256 (a mismatch is
    deleted and refused, never unpacked)."""
    wanted = [name for name in FLINK_FILES if not (downloads / name).exists()]
    commands = []
    if any(name.startswith("apache_flink_libraries") for name in wanted):
        commands.append([f"apache-flink-libraries=={FLINK_VERSION}"])
    if any(name.startswith("apache_flink-") for name in wanted):
        commands.append(["--only-binary=:all:", "--python-version", "3.11",
                         "--platform", "manylinux2014_x86_64", f"apache-flink=={FLINK_VERSION}"])
    for args in commands:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", str(downloads), *args], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FlinkSetupError(f"pip download {args[-1]} failed: {last}")
    for name, expected in FLINK_FILES.items():
        path = downloads / name
        if not path.exists():
            raise FlinkSetupError(f"pip download did not write {name} into {downloads}")
        found = sha256(path)
        if found != expected:
            path.unlink()
            raise FlinkSetupError(f"{name}: sha256 {found}, expected {expected} (deleted; "
                                  "the pinned file changed or the download was corrupted)")


def job_server_jar(cache: Optional[pathlib.Path] = None, fetch: bool = True) -> pathlib.Path:
    """Beam's Flink job server jar, fetched with Maven on first use (`fetch`),
    or one clear line saying why there is none."""
    cache = cache or cache_root()
    group, artifact, version = JOB_SERVER_ARTIFACT.split(":")
    jar = cache / f"{artifact}-{version}.jar"
    missing = cache / f"{artifact}-{version}.missing"  # why the last fetch failed
    if fetch and missing.exists() and time.time() - missing.stat().st_mtime < 86400:
        fetch = False  # asked today already: say why without asking again
    if not jar.exists():
        if not fetch:
            raise FlinkSetupError(missing.read_text().strip() if missing.exists() else
                                  f"{JOB_SERVER_ARTIFACT} not fetched yet "
                                  "(`gbif-embed flink start` fetches it)")
        mvn = shutil.which("mvn")
        if not mvn:
            raise FlinkSetupError(f"fetching {JOB_SERVER_ARTIFACT} needs Maven and `mvn` is "
                                  "not on PATH: install it, e.g. `apt-get install -y maven`")
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [mvn, "-B", "-q", "dependency:copy", f"-Dartifact={JOB_SERVER_ARTIFACT}",
             f"-DoutputDirectory={cache}"], capture_output=True, text=True, cwd=str(cache))
        if done.returncode != 0 or not jar.exists():
            said = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
            reason = ("the Maven repository this machine reaches does not serve it "
                      "(mvn: Could not find artifact)" if "find artifact" in said else
                      "mvn: " + next((line for line in said.splitlines() if "ERROR" in line),
                                     f"exit status {done.returncode}")[:300])
            message = f"Maven could not fetch {JOB_SERVER_ARTIFACT}: {reason}"
            missing.write_text(message + "\n")
            raise FlinkSetupError(message)
        missing.unlink(missing_ok=True)
    if JOB_SERVER_SHA256 is None:
        print(f"flink: {jar.name} sha256 {sha256(jar)} is not pinned yet "
              "(pipeline/flink/distribution.py, JOB_SERVER_SHA256)", file=sys.stderr)
    elif sha256(jar) != JOB_SERVER_SHA256:
        jar.unlink()
        raise FlinkSetupError(f"{jar.name}: sha256 differs from the pinned "
                              f"{JOB_SERVER_SHA256} (deleted)")
    return jar
