"""Helpers shared by the benchmarks: models, exports, a loopback image server,
tight inference loops and peak memory.

The development machine is shared and noisy, so every benchmark compares two
things measured in the same run (interleaved where it can) and prints the
ratio; absolute images/s are printed for context only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from transforms.embed.tf_quiet import quiet_environment  # noqa: E402
quiet_environment()

FUNGI_IMAGES = os.path.join(os.path.dirname(ROOT), "shared", "data", "fungi-images")
BIG_PHOTO = "mo_test_perf_unlabeled_small_gilled_mushroom.jpg"
CACHE = os.path.join(tempfile.gettempdir(), "gbif-embed-bench")


def log(*parts) -> None:
    """Progress lines go to stderr; stdout holds the figures."""
    print(*parts, file=sys.stderr, flush=True)


def real_photos() -> list[str]:
    """The real fungus photographs of ../shared, read in place (never copied)."""
    if not os.path.isdir(FUNGI_IMAGES):
        sys.exit(f"needs {FUNGI_IMAGES} (real photos read in place from ../shared)")
    return sorted(os.path.join(FUNGI_IMAGES, name) for name in os.listdir(FUNGI_IMAGES)
                  if name.lower().endswith(".jpg"))


def photo_links(work: str) -> tuple[str, list[str]]:
    """A folder in `work` of links to the real photos (read in place, never
    copied), to serve; returns it and the photos' names, sorted."""
    folder = os.path.join(work, "images")
    os.makedirs(folder)
    for path in real_photos():
        os.symlink(path, os.path.join(folder, os.path.basename(path)))
    return folder, sorted(os.listdir(folder))


def model(arch: str, fmt: str = "tf1hub") -> str:
    """`arch` in `fmt`, as `gbif-embed make-model` builds it, built once into
    the cache folder (about 6 s for inception_v4) and reused by later runs;
    the build is atomic, and marked complete beside the model's own files."""
    target = os.path.join(CACHE, "models", f"{arch}-{fmt}")
    if os.path.exists(target + ".complete"):
        return target
    from pipeline.models.make_model import build_model
    os.makedirs(os.path.dirname(target), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"{arch}-{fmt}-", dir=os.path.dirname(target))
    log(f"building {arch} ({fmt}) in {target} ...")
    build_model(os.path.join(scratch, "m"), arch, fmt=fmt)
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(os.path.join(scratch, "m"), target)
    except OSError:  # another run built it meanwhile
        pass
    open(target + ".complete", "w").close()
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def trained_model(fmt: str = "tf1hub") -> str:
    """ImageNet EfficientNet-Lite0 (trained weights, `gbif-embed make-model --arch
    efficientnet_lite0`) in `fmt`: what every fidelity figure is measured on
    (random weights amplify any change)."""
    return model("efficientnet_lite0", fmt)


def nearest_unchanged(reference, candidate) -> tuple[int, int]:
    """(photos whose nearest neighbour among the others is the same under both
    embeddings, photos): retrieval is what the embeddings are for."""
    import numpy as np

    def nearest(vectors):
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)
    return int((nearest(reference) == nearest(candidate)).sum()), len(reference)


_SERVER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from pipeline.demo.demo import serve_folder
with serve_folder(sys.argv[1]) as url:
    print(url, flush=True)
    sys.stdin.read()   # until the parent closes our stdin
"""

# Serves `folder` with each URL's query appended after the file's bytes (a JPEG's
# decoder stops at its end marker): every URL is a distinct content, so a
# benchmark of inference is not shortened by the pipeline's content dedup.
_DISTINCT_SERVER = r"""
import functools, http.server, os, sys, threading, urllib.parse
folder = sys.argv[1]

@functools.lru_cache(maxsize=64)
def read(name):
    with open(os.path.join(folder, name), "rb") as handle:
        return handle.read()

served = [0]
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/__requests":  # how many requests for pictures it answered
            body = str(served[0]).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
            return
        with lock:
            served[0] += 1
        try:
            body = read(os.path.basename(urllib.parse.unquote(parts.path))) + parts.query.encode()
        except OSError:
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"http://127.0.0.1:{server.server_address[1]}/", flush=True)
sys.stdin.read()
server.shutdown()
"""


class Server(str):
    """The base URL of a running image server; `cpu_seconds()` is its CPU so far,
    `requests()` the requests for pictures it answered (the distinct server's)."""

    pid: int = 0

    def requests(self) -> int:
        import urllib.request
        with urllib.request.urlopen(self + "__requests", timeout=10) as answer:
            return int(answer.read())

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            return sum(int(v) for v in fields[11:13]) / _TICK
        except OSError:
            return 0.0


@contextlib.contextmanager
def serve(folder: str, distinct: bool = False) -> Iterator[Server]:
    """Serves `folder` over HTTP on 127.0.0.1 from a separate process (so the
    server does not take the GIL of the process measured); yields the base URL.
    `distinct`: each URL's query is appended to the file's bytes, so that
    `name?copy=1` and `name?copy=2` are different contents."""
    process = subprocess.Popen([sys.executable, "-c", _DISTINCT_SERVER if distinct else _SERVER,
                                folder, ROOT],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError("the image server did not start")
        server = Server(url)
        server.pid = process.pid
        yield server
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def write_export(path: str, urls: Sequence[str]) -> str:
    """A GBIF DwC-A zip with one occurrence and one StillImage row per URL."""
    from pipeline.demo.sample_data import DMS_DATASET_KEY, Media, Occurrence, write_dwca
    occurrences = [Occurrence(gbifID=5_000_000_000 + i, occurrenceID=f"bench-{i}",
                              datasetKey=DMS_DATASET_KEY, taxonKey=1000 + i % 7,
                              scientificName="Agaricus bench")
                   for i in range(len(urls))]
    media = [Media(5_000_000_000 + i, url) for i, url in enumerate(urls)]
    return write_dwca(path, occurrences, media)


def pipeline_args(export: str, model_dir: str, output: str, batch_size: int,
                  extra: Sequence[str] = ()) -> list[str]:
    return ["--export", export, "--model", model_dir, "--output", output,
            "--batch_size", str(batch_size), "--allow_private_networks", "127.0.0.1/32",
            "--quiet", *extra]


def tight_loop(embed: Callable, batches: Sequence, seconds: float = 10.0,
               min_calls: int = 4) -> float:
    """images/s of `embed(batch)` (the loaded model's numpy-in, numpy-out call)
    over pre-built uint8 batches, after one warm-up call, for at least
    `seconds` and `min_calls` calls."""
    embed(batches[0])
    images, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        batch = batches[calls % len(batches)]
        embed(batch)
        images += len(batch)
        calls += 1
    return images / (time.perf_counter() - start)


def peak_rss_mb_of_child(argv: Sequence[str], env: Optional[dict] = None) -> tuple[float, float, str]:
    """Runs argv in a fresh process; returns (its peak RSS in MB, seconds, its stdout).

    ru_maxrss of RUSAGE_CHILDREN is the largest peak of any waited-for
    descendant, so each measurement runs in a fresh intermediate process
    whose only descendant is the one measured.
    """
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter()\n"
            "done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
            "seconds = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(json.dumps({'rc': done.returncode, 'peak_mb': peak, 'seconds': seconds,"
            " 'stdout': done.stdout}))\n")
    import json
    out = subprocess.run([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                         text=True, env=env, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{argv} failed with exit status {result['rc']}")
    return result["peak_mb"], result["seconds"], result["stdout"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


_TICK = os.sysconf("SC_CLK_TCK")


def _system_busy_s() -> float:
    """CPU seconds all processes of the machine spent busy (from /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def _tree_cpu_s(root: int) -> float:
    """CPU seconds of `root`, its live descendants and its reaped children."""
    parents, times = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(name)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(v) for v in fields[11:15]) / _TICK  # utime stime cutime cstime
    total = 0.0
    for pid, cpu in times.items():
        p = pid
        while p in parents and p != root and p > 1:
            p = parents[p]
        if p == root:
            total += cpu
    return total


class Meter:
    """Wall time, this process tree's CPU and everyone else's CPU over a phase,
    so that a figure can be judged against the noise of a shared machine."""

    def __init__(self):
        self.wall = self.ours = self.others = 0.0

    def __enter__(self) -> "Meter":
        self._start = (time.perf_counter(), _tree_cpu_s(os.getpid()), _system_busy_s())
        return self

    def __exit__(self, *exc) -> None:
        wall, ours, busy = self._start
        self.wall = time.perf_counter() - wall
        self.ours = _tree_cpu_s(os.getpid()) - ours
        self.others = max(0.0, _system_busy_s() - busy - self.ours)

    def describe(self) -> str:
        cores = os.cpu_count() or 1
        return (f"{self.wall:.1f} s wall, this benchmark {self.ours / self.wall:.2f} cores, "
                f"other processes {self.others / self.wall:.2f} of {cores} cores")
