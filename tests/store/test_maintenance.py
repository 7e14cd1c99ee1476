"""The store stays lean: permanent failures remembered and asked again on a
backing-off schedule, the URL index compacted, copies and caches no kept
snapshot uses pruned, copies keyed on how they were made."""
from __future__ import annotations

import datetime
import glob
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.demo.sample_data import Media, Occurrence, write_dwca
from pipeline.models.make_model import build_model
from tests.compare.test_refresh import _export, _hits, _photo, _rows, _run
from tests.http_server import FaultServer
from transforms.compare.planning import plan_run
from transforms.store.layout import COPY_METADATA, IMAGES, URL_SCHEMA, URLS, ImageStore
from transforms.store.maintenance import compact_url_index

DAY = datetime.timedelta(days=1)
T0 = datetime.datetime(2026, 1, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture
def server():
    with FaultServer() as srv:
        for i in range(12):
            srv.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg"})
        yield srv


def _entry(url: str, outcome: str, when: datetime.datetime, sha=None) -> dict:
    return {"identifier": url, "fetched_from": url, "image_sha256": sha, "etag": None,
            "last_modified": None, "http_status": 404 if outcome == "http_404" else 200,
            "outcome": outcome, "fetched_at": when, "failed_times": None}


def _index(store: str, entries: list[dict], name: str) -> None:
    folder = os.path.join(store, URLS)
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(entries, schema=URL_SCHEMA),
                   os.path.join(folder, f"{name}.parquet"))


def _plan(tmp_path, store: str, urls: list[str], now, retry: float = 28.0) -> dict:
    export = write_dwca(str(tmp_path / "e.zip"),
                        [Occurrence(gbifID=1 + i, occurrenceID=f"o{i}", datasetKey="d",
                                    taxonKey=1, scientificName="S") for i in range(len(urls))],
                        [Media(gbifID=1 + i, identifier=url) for i, url in enumerate(urls)])
    folder = str(tmp_path / "out" / f"snapshot-{now:%Y%m%d}")
    plan = plan_run(export=export, folder=folder, fingerprint="sha256:m", store=store,
                    retry_failed_after=retry, now=now)
    return plan.tally


def test_a_url_that_failed_for_good_is_asked_again_after_a_doubling_wait(tmp_path):
    store = str(tmp_path / "store")
    url = "http://example.org/gone.jpg"
    _index(store, [_entry(url, "http_404", T0)], "a")
    assert _plan(tmp_path, store, [url], T0 + 27 * DAY)["store.remembered_failures"] == 1
    assert _plan(tmp_path, store, [url], T0 + 29 * DAY)["store.not_stored"] == 1
    # Asked again on day 29: gone again. Twice in a row: 56 days, counted through compaction.
    _index(store, [_entry(url, "http_404", T0 + 29 * DAY)], "b")
    assert compact_url_index(store)["entries_after"] == 1
    (part,) = ImageStore(store).parts(ImageStore(store).folder(URLS))
    assert pq.read_table(part).column("failed_times").to_pylist() == [2]
    assert _plan(tmp_path, store, [url], T0 + 80 * DAY)["store.remembered_failures"] == 1
    assert _plan(tmp_path, store, [url], T0 + 86 * DAY)["store.not_stored"] == 1
    assert _plan(tmp_path, store, [url], T0 + 30 * DAY, retry=0)["store.not_stored"] == 1
    # An answer with a picture in between starts the count again.
    _index(store, [_entry(url, "ok", T0 + 90 * DAY, sha="ab" * 32),
                   _entry(url, "http_404", T0 + 120 * DAY)], "c")
    compact_url_index(store)
    (part,) = ImageStore(store).parts(ImageStore(store).folder(URLS))
    assert pq.read_table(part).to_pylist()[0]["failed_times"] == 1


def test_a_404_is_remembered_by_the_next_run_without_a_request(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    server.add("/img/9.jpg", b"gone", status=404)
    export = _export(tmp_path / "a.zip", server, [0, 9])
    _run(export, tiny_model, output)
    hits = _hits(server, [0, 9])
    second = _run(export, tiny_model, output)
    assert _hits(server, [0, 9]) == hits
    assert second["counts"]["failed_by_reason"] == {"fetch.http_404": 1}
    assert second["counts"]["accounted"] == 2 == second["counts"]["export_rows"]
    assert second["tally"]["store.remembered_failures"] == 1
    (failure,) = pq.read_table(glob.glob(f"{output}/{second['snapshot']}/failures-*.parquet")
                               ).to_pylist()
    assert failure["reason"] == "http_404" and "not asked again before" in failure["detail"]


def test_compaction_keeps_one_current_entry_per_url(tmp_path):
    store = str(tmp_path / "store")
    _index(store, [_entry("u1", "http_500", T0), _entry("u1", "ok", T0 + DAY, sha="1" * 64),
                   _entry("u2", "ok", T0, sha="2" * 64)], "a")
    _index(store, [_entry("u2", "http_404", T0 + DAY), _entry("u3", "ok", T0, sha="3" * 64)],
           "b")
    done = compact_url_index(store)
    assert (done["parts_before"], done["entries_before"], done["entries_after"]) == (2, 5, 3)
    (part,) = ImageStore(store).parts(ImageStore(store).folder(URLS))
    rows = {r["identifier"]: r for r in pq.read_table(part).to_pylist()}
    assert rows["u1"]["outcome"] == "ok" and rows["u2"]["outcome"] == "http_404"
    assert rows["u2"]["failed_times"] == 1 and rows["u1"]["failed_times"] == 0


def test_prune_removes_what_no_kept_snapshot_uses(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    other = build_model(str(tmp_path / "other"), "tiny", seed=3)
    _run(_export(tmp_path / "a.zip", server, [0, 1, 2, 3, 4, 5]), other, output)
    _run(_export(tmp_path / "b.zip", server, [0, 1, 2]), tiny_model, output,
         "--keep_snapshots", "1")
    store = os.path.join(output, "store")
    stray = os.path.join(store, IMAGES, ".x.parquet.tmp-deadbeef")
    open(stray, "wb").close()
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    script = os.path.join(os.path.dirname(sys.executable), "gbif-embed")
    dry = subprocess.run([script, "store", "prune", "--output", output, "--dry_run"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "would remove 3 copies" in dry.stdout and "would remove 1 embedding caches" in \
        dry.stdout and "would remove 1 stray" in dry.stdout, dry.stdout
    assert os.path.exists(stray)
    done = subprocess.run([script, "store", "prune", "--output", output],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "removed 3 copies" in done.stdout and "removed 3 URL index entries" in done.stdout
    image_store = ImageStore(store)
    shas = pq.read_table(image_store.parts(image_store.folder(IMAGES)),
                         columns=["image_sha256"]).column("image_sha256").to_pylist()
    assert sorted(shas) == sorted(r["image_sha256"] for r in _rows(output).values())
    assert len(os.listdir(os.path.join(store, "embeddings"))) == 1
    assert not os.path.exists(stray)
    hits = _hits(server, range(6))
    again = _run(_export(tmp_path / "b.zip", server, [0, 1, 2]), tiny_model, output)
    assert again["counts"]["reused"] == 3 and _hits(server, range(6)) == hits


def test_copies_made_otherwise_are_not_reused(tmp_path, tiny_model, server):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1])
    _run(export, tiny_model, output)
    store = ImageStore(os.path.join(output, "store"))
    assert "jpeg-q95" in next(iter(store.describe()["copies"]))
    for part in store.parts(store.folder(IMAGES)):  # as if made at another quality
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({COPY_METADATA: "jpeg-q80-other"}), part)
    other = build_model(str(tmp_path / "other"), "tiny", seed=3)
    hits = _hits(server, [0, 1])
    result = _run(export, other, output)
    assert result["counts"]["store_missing"] == 2 and result["counts"]["from_store"] == 0
    assert {i: n - hits[i] for i, n in _hits(server, [0, 1]).items()} == {0: 1, 1: 1}
