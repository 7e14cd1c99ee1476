"""The image store across runs, counted at a real loopback host: a new model
never asks the host, a refresh fetches only what the store lacks, each
content is embedded once per model across runs, and a store that lost a
picture fetches it again."""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.models.make_model import build_model
from tests.compare.test_refresh import _export, _hits, _photo, _rows, _run
from tests.http_server import FaultServer
from transforms.store.layout import IMAGES, URLS, ImageStore


@pytest.fixture
def server():
    with FaultServer() as srv:
        for i in range(12):
            srv.add(f"/img/{i}.jpg", _photo(i), headers={"Content-Type": "image/jpeg",
                                                         "ETag": f'"v1-{i}"'})
        srv.add("/img/twin.jpg", _photo(0), headers={"Content-Type": "image/jpeg"})
        yield srv


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    return build_model(str(tmp_path_factory.mktemp("models") / "tiny-seed1"), "tiny", seed=1)


def test_a_new_model_reads_the_store_and_asks_no_host(tmp_path, tiny_model, other_model,
                                                     server):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1, 2, 3, 4, 5])
    first = _run(export, tiny_model, output)
    assert first["counts"]["embedded"] == 6
    store = ImageStore(os.path.join(output, "store"))
    assert store.parts(store.folder(IMAGES)) and store.parts(store.folder(URLS))
    hits = _hits(server, range(6))
    assert set(hits.values()) == {1}
    second = _run(export, other_model, output)
    assert second["counts"]["embedded"] == 6
    assert second["counts"]["from_store"] == 6 and second["counts"]["inferences"] == 6
    assert _hits(server, range(6)) == hits  # not one request
    # Back to the first model: every content was embedded by it before, in
    # any run: the embedding cache answers, no inference, no request.
    third = _run(export, tiny_model, output)
    assert third["counts"]["embedded"] == 6
    assert third["counts"]["from_embedding_cache"] == 6 and third["counts"]["inferences"] == 0
    assert _hits(server, range(6)) == hits
    by_first, by_third = _rows(output, first["snapshot"]), _rows(output, third["snapshot"])
    for i in range(6):
        assert np.array_equal(by_first[i]["embedding"], by_third[i]["embedding"])
        assert by_third[i]["image_sha256"] == by_first[i]["image_sha256"]
        assert by_third[i]["etag"] == f'"v1-{i}"'


def test_fetched_and_stored_paths_embed_the_same_copy(tmp_path, tiny_model, server):
    """A first run embeds the copies as it fetches; --full re-embeds them from
    the store: the same vectors, since both embed the store's copy."""
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1, 2])
    first = _run(export, tiny_model, output)
    full = _run(export, tiny_model, output, "--full")
    assert full["counts"]["from_store"] == 3 and full["counts"]["inferences"] == 3
    a, b = _rows(output, first["snapshot"]), _rows(output, full["snapshot"])
    for i in range(3):
        assert np.allclose(a[i]["embedding"], b[i]["embedding"], atol=1e-6)


def test_a_refresh_fetches_only_urls_the_store_lacks(tmp_path, tiny_model, other_model,
                                                     server):
    output = str(tmp_path / "out")
    _run(_export(tmp_path / "a.zip", server, [0, 1, 2, 3]), tiny_model, output)
    before = _hits(server, range(12))
    # Another model and two new occurrences: only the new URLs are requested.
    result = _run(_export(tmp_path / "b.zip", server, [0, 1, 2, 3, 4, 5]), other_model,
                  output)
    assert result["counts"]["embedded"] == 6 and result["counts"]["from_store"] == 4
    after = _hits(server, range(12))
    assert {i: after[i] - before[i] for i in range(12)} == {
        i: int(i in (4, 5)) for i in range(12)}


def test_a_store_that_lost_pictures_fetches_them_again(tmp_path, tiny_model, other_model,
                                                       server):
    output = str(tmp_path / "out")
    export = _export(tmp_path / "a.zip", server, [0, 1, 2])
    _run(export, tiny_model, output)
    store = ImageStore(os.path.join(output, "store"))
    for path in store.parts(store.folder(IMAGES)):
        os.remove(path)
    before = _hits(server, range(3))
    result = _run(export, other_model, output)
    assert result["counts"]["embedded"] == 3 and result["counts"]["store_missing"] == 3
    assert {i: n - before[i] for i, n in _hits(server, range(3)).items()} == {0: 1, 1: 1, 2: 1}


def test_a_separate_store_is_shared_by_outputs(tmp_path, tiny_model, other_model, server):
    """--image_store outside --output: a second output folder (another model)
    reads what the first fetched."""
    store = str(tmp_path / "shared-store")
    export = _export(tmp_path / "a.zip", server, [0, 1])
    _run(export, tiny_model, str(tmp_path / "out-a"), "--image_store", store)
    before = _hits(server, range(2))
    result = _run(export, other_model, str(tmp_path / "out-b"), "--image_store", store)
    assert result["counts"]["from_store"] == 2
    assert _hits(server, range(2)) == before
    assert not os.path.exists(tmp_path / "out-a" / "store")
    shutil.rmtree(store)


def test_twins_under_two_urls_are_stored_and_embedded_once(tmp_path, tiny_model, server):
    from pipeline.demo.sample_data import Media, Occurrence, write_dwca
    occurrences = [Occurrence(gbifID=1000 + i, occurrenceID=f"o{i}", datasetKey="d",
                              taxonKey=1, scientificName="S") for i in range(2)]
    media = [Media(gbifID=1000, identifier=server.url("/img/0.jpg")),
             Media(gbifID=1001, identifier=server.url("/img/twin.jpg"))]
    export = write_dwca(str(tmp_path / "t.zip"), occurrences, media)
    output = str(tmp_path / "out")
    result = _run(export, tiny_model, output)
    # The local runner embeds as it fetches, each process holding twins back
    # for a while (transforms/embed/dedup.py): at a bundle's end the last
    # twin may be embedded again. Distributed runners group by content first
    # (tests/fetch/test_politeness.py counts one inference per content there).
    assert result["counts"]["embedded"] == 2 and result["counts"]["inferences"] in (1, 2)
    table = pq.read_table(glob.glob(os.path.join(output, "store", "images", "*.parquet")),
                          columns=["image_sha256"])
    assert table.num_rows == 1
    rows = _rows(output)
    assert np.allclose(rows[0]["embedding"], rows[1]["embedding"], atol=1e-5)
