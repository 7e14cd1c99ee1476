"""A publisher's own archive (IPT-shaped: string occurrence ids, no gbifID) end
to end: rows keyed by the core id, a refresh that reuses them, and the tools
that read snapshots (query by core id, evaluate) working on that key."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.demo.sample_data import jpeg_bytes, synthetic_photo
from pipeline.tools.evaluate import evaluate
from pipeline.tools.query import query
from tests.compare.test_refresh import _run
from tests.http_server import FaultServer
from tests.read.archives import ipt_occurrences, write_ipt_archive
from transforms.write.snapshot import read_latest


def _snapshot_rows(output: str) -> list[dict]:
    import glob
    snapshot = read_latest(output)
    return pq.read_table(sorted(glob.glob(f"{output}/{snapshot}/embeddings-*.parquet"))).to_pylist()


@pytest.fixture
def server():
    with FaultServer() as srv:
        for i in range(8):
            for j in range(2):
                srv.add(f"/{i}-{j}.jpg", jpeg_bytes(synthetic_photo(i * 2 + j, species=i % 3,
                                                                    size=(160, 120))))
        yield srv


def test_an_ipt_archive_is_embedded_refreshed_and_queried_by_its_core_id(tmp_path, tiny_model,
                                                                         server, capsys):
    occurrences = ipt_occurrences(6, server.url("/"))
    export = write_ipt_archive(str(tmp_path / "ipt.zip"), occurrences)
    output = str(tmp_path / "out")
    first = _run(export, tiny_model, output)
    assert first["counts"]["embedded"] == 9 and first["counts"]["accounted"] == 9
    assert first["export"]["kind"] == "dataset archive (no gbifIDs)"
    assert first["export"]["core_id_term"] == "occurrenceID"
    assert first["export"]["row_key"] == ["coreID", "identifier"]
    rows = _snapshot_rows(output)
    assert {r["coreID"] for r in rows} == {o.occurrence_id for o in occurrences}
    assert all(r["gbifID"] is None and r["occurrenceID"] == r["coreID"] for r in rows)

    # A refresh: the same occurrences and two new ones; only the new URLs are asked for.
    more = ipt_occurrences(8, server.url("/"))
    hits = {path: server.hits(path) for path in (f"/{i}-{j}.jpg" for i in range(8)
                                                 for j in range(2))}
    refresh = _run(write_ipt_archive(str(tmp_path / "ipt2.zip"), more), tiny_model, output)
    assert refresh["counts"]["reused"] == 9 and refresh["counts"]["new"] == 3
    asked = {p for p, n in hits.items() if server.hits(p) > n}
    assert asked == {"/6-0.jpg", "/7-0.jpg", "/7-1.jpg"}

    # The snapshot's tools on the core id key.
    result = query(output, core_id="urn:catalog:XYZ:101", k=3)
    assert result.neighbours and all(r["coreID"] != "urn:catalog:XYZ:101"
                                     for r in result.neighbours)
    assert main(["query", "--output", output, "--core_id", "urn:catalog:XYZ:103",
                 "--k", "2"]) == 0
    assert "urn:catalog:XYZ:" in capsys.readouterr().out
    assert evaluate(output)["queries"] > 0
