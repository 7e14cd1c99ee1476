"""A long run keeps its work: durable parts, resume after SIGKILL, a clean stop
on Ctrl-C or SIGTERM, and compaction into a snapshot that holds each image once.
Each end-to-end case runs on the in-process runner and on two worker processes."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import LOOPBACK
from tests.http_server import FaultServer
from tests.compare.test_refresh import _export, _photo, _rows, _run
from transforms.write.compact import compact, part_files
from transforms.write.snapshot import MANIFEST, read_latest
from transforms.write.parts import embedding_schema, parts_folder, to_table, write_table_atomically

N = 40
MODES = {"in-process": [],
         "two processes": ["--direct_running_mode", "multi_processing",
                           "--direct_num_workers", "2"]}


@pytest.fixture
def slow():
    """Images that take 0.1 s each, so that a run lasts long enough to be stopped."""
    with FaultServer() as server:
        for i in range(N):
            server.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg"},
                       delay=0.1)
        yield server


def _start(export: str, model: str, output: str, *extra: str) -> subprocess.Popen:
    script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
    return subprocess.Popen(
        [script, "run", "--export", export, "--model", model, "--output", output,
         "--batch_size", "2", "--fetch_concurrency", "2", "--per_host_concurrency", "2",
         "--checkpoint_rows", "4", "--report_samples", "0", "--quiet", *LOOPBACK, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _running_folder(output: str) -> str:
    folders = [f for f in glob.glob(f"{output}/snapshot-*")
               if not os.path.exists(f"{f}/{MANIFEST}")]
    return folders[0] if folders else ""


def _kept(folder: str) -> set:
    """gbifIDs - 1000 of the embedding rows in a run's closed parts."""
    ids = set()
    for path in part_files(folder, "embeddings"):
        ids.update(i - 1000 for i in pq.read_table(path, columns=["gbifID"])
                   .column("gbifID").to_pylist())
    return ids


def _wait_for_parts(process: subprocess.Popen, output: str, rows: int) -> str:
    deadline = time.time() + 180
    while True:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no parts were written"
        folder = _running_folder(output)
        if folder and len(_kept(folder)) >= rows:
            return folder
        time.sleep(0.1)


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_run_keeps_its_parts_and_the_rerun_resumes_them(tmp_path, tiny_model,
                                                                 slow, mode):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", slow, list(range(N)))
    process = _start(export, tiny_model, output, *MODES[mode])
    folder = _wait_for_parts(process, output, 8)
    os.killpg(process.pid, signal.SIGKILL)  # the whole machine goes, as in a preemption
    process.communicate()
    kept = _kept(folder)
    assert read_latest(output) is None and len(kept) >= 8
    hits = {i: slow.hits(f"/img/{i}.jpg") for i in range(N)}
    rerun = _run(export, tiny_model, output, *MODES[mode])
    counts = rerun["counts"]
    assert rerun["resumed_from"] == [os.path.basename(folder)]
    assert counts["resumed"] == len(kept) and counts["embedded"] == N
    assert all(slow.hits(f"/img/{i}.jpg") == hits[i] for i in kept)  # not fetched again
    assert sorted(_rows(output)) == list(range(N))  # each image exactly once
    assert not os.path.exists(parts_folder(f"{output}/{rerun['snapshot']}"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_keeps_its_work_and_says_how_to_resume(tmp_path, tiny_model,
                                                                      slow, mode, sig):
    output = str(tmp_path / "out")
    first = _run(_export(tmp_path / "a.zip", slow, [0, 1]), tiny_model, output)
    export = _export(tmp_path / "b.zip", slow, list(range(N)))
    process = _start(export, tiny_model, output, *MODES[mode])
    folder = _wait_for_parts(process, output, 6)
    # Ctrl-C reaches the whole process group; `kill PID` only the launcher.
    started = time.time()
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert time.time() - started < 10
    assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], stderr
    kept = _kept(folder)
    assert f"kept {len(kept):,} embedded" in stderr and "To resume" in stderr
    assert "gbif-embed run --export" in stderr
    assert read_latest(output) == first["snapshot"]
    time.sleep(1)  # nothing of the stopped run is still writing
    assert _kept(folder) == kept
    rerun = _run(export, tiny_model, output)
    # 0 and 1 were reused from the first snapshot, written into parts: resumed too.
    assert rerun["counts"]["resumed"] == len(kept)
    assert sorted(_rows(output)) == list(range(N))


def test_keep_snapshots_never_deletes_a_run_that_can_still_be_resumed(tmp_path, tiny_model,
                                                                      slow):
    from pipeline.models.make_model import build_model
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", slow, list(range(12)))
    process = _start(export, tiny_model, output)
    folder = _wait_for_parts(process, output, 4)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    kept = _kept(folder)
    other = str(tmp_path / "other-model")
    build_model(other, "tiny", seed=3)
    elsewhere = _run(export, other, output, "--keep_snapshots", "1")
    assert elsewhere["resumed_from"] == [] and os.path.isdir(folder)  # another model's run
    assert read_latest(output) == elsewhere["snapshot"]
    resumed = _run(export, tiny_model, output, "--keep_snapshots", "1")
    assert resumed["resumed_from"] == [os.path.basename(folder)]
    assert resumed["counts"]["resumed"] == len(kept) and resumed["counts"]["embedded"] == 12
    assert not os.path.isdir(folder)  # used, and superseded by this run: gone


def _emb(i: int) -> dict:
    import datetime
    return {"gbifID": i, "identifier": f"u{i}", "embedding": np.full(256, i, np.float32),
            "embedded_at": datetime.datetime.now(datetime.timezone.utc)}


def test_compaction_keeps_each_key_once_and_streams_into_large_files(tmp_path, monkeypatch):
    import transforms.write.compact as compact_module
    folder = str(tmp_path / "snap")
    schema = embedding_schema()
    for part, ids in enumerate([range(0, 5), range(3, 9), range(8, 12)]):
        write_table_atomically(f"{parts_folder(folder)}/embeddings-{part}.parquet",
                               to_table([_emb(i) for i in ids], schema))
    monkeypatch.setattr(compact_module, "ROWS_PER_FILE", 5)
    written = compact(folder, "embeddings", schema)
    assert [rows for _, rows in written] == [5, 5, 2]
    ids = [i for path, _ in written for i in pq.read_table(path).column("gbifID").to_pylist()]
    assert sorted(ids) == list(range(12))
    assert not [p for p in os.listdir(parts_folder(folder)) if p.startswith(".")]
