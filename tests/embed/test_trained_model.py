"""A real trained model through `gbif-embed run`, in every format: ImageNet
EfficientNet-Lite0 (built offline by `make-model`) on the real photographs of
../shared. Its ImageNet head knows a mushroom when it sees one; the three
formats give the same embeddings; switching model re-embeds every row and asks
the host nothing."""
from __future__ import annotations

import os

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.cli import run
from pipeline.demo.sample_data import Media, Occurrence, write_dwca
from pipeline.models.efficientnet_lite import FUNGUS_CLASSES, imagenet_head
from tests.compare.test_refresh import _rows
from tests.conftest import LOOPBACK, shared_path
from tests.http_server import FaultServer

# One photo the tests rely on: a fly agaric (ImageNet: agaric).
FLY_AGARIC = "gbif_portal16_fly_agaric_Amanita_muscaria_2.jpg"


@pytest.fixture(scope="module")
def photos() -> list[str]:
    folder = shared_path("fungi-images")
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith(".jpg"))


@pytest.fixture
def server(photos):
    with FaultServer() as srv:
        for path in photos:
            srv.add_file(f"/p/{os.path.basename(path)}", path)
        yield srv


def _export(path, server, photos) -> str:
    occurrences = [Occurrence(gbifID=100 + i, occurrenceID=f"o{i}", datasetKey="d",
                              taxonKey=1, scientificName=os.path.basename(p))
                   for i, p in enumerate(photos)]
    media = [Media(100 + i, server.url(f"/p/{os.path.basename(p)}"))
             for i, p in enumerate(photos)]
    return write_dwca(str(path), occurrences, media)


def _run(export: str, model: str, output: str, *extra: str) -> dict:
    return run(PipelineOptions(["--export", export, "--model", model, "--output", output,
                                "--quiet", "--batch_size", "4", "--report_samples", "0",
                                *LOOPBACK, *extra]))


def _matrix(rows: dict) -> np.ndarray:
    return np.stack([np.asarray(rows[k]["embedding"], np.float32) for k in sorted(rows)])


def test_three_formats_through_run_give_the_same_embeddings(tmp_path, server, photos,
                                                            lite0_models):
    export = _export(tmp_path / "e.zip", server, photos)
    output = str(tmp_path / "out")
    first = _run(export, lite0_models["tf1hub"], output)
    assert first["counts"]["embedded"] == len(photos)
    model = first["model"]
    assert (model["format"], model["image_size"], model["embedding_dim"],
            model["normalize"]) == ("tf1hub", 224, 1280, "unit")
    hits = {p: server.hits(f"/p/{os.path.basename(p)}") for p in photos}
    tf1 = _rows(output, first["snapshot"])
    # The ONNX export expects ImageNet normalisation and NCHW, as PyTorch's do:
    # a refresh that switches model re-embeds every row, from the image store.
    onnx = _run(export, lite0_models["onnx"], output, "--normalize", "imagenet")
    assert onnx["counts"]["reembedded"] == len(photos) and onnx["counts"]["reused"] == 0
    assert onnx["counts"]["from_store"] == len(photos)
    assert {p: server.hits(f"/p/{os.path.basename(p)}") for p in photos} == hits
    assert onnx["model"]["format"] == "onnx" and onnx["model"]["layout"] == "NCHW"
    assert onnx["model"]["fingerprint"] != model["fingerprint"]
    tf2 = _run(export, lite0_models["tf2"], output)
    assert tf2["counts"]["reembedded"] == len(photos)
    by_format = {"tf1hub": _matrix(tf1), "onnx": _matrix(_rows(output, onnx["snapshot"])),
                 "tf2": _matrix(_rows(output, tf2["snapshot"]))}
    reference = by_format["tf1hub"]
    for fmt in ("tf2", "onnx"):
        other = by_format[fmt]
        cosine = (reference * other).sum(1) / np.linalg.norm(reference, axis=1) / \
            np.linalg.norm(other, axis=1)
        assert cosine.min() >= 0.9999, (fmt, cosine.min())
    # Its ImageNet head puts a fungus class first on a real fly agaric, from the
    # embedding the run wrote.
    weight, bias = imagenet_head()
    row = next(r for r in tf1.values() if r["scientificName"] == FLY_AGARIC)
    logits = weight @ np.asarray(row["embedding"], np.float32) + bias
    assert int(np.argmax(logits)) in FUNGUS_CLASSES
    top = [int(np.argmax(weight @ np.asarray(r["embedding"]) + bias)) for r in tf1.values()]
    assert sum(t in FUNGUS_CLASSES for t in top) >= 10  # 11 of 12 measured (see README)
