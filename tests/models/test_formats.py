"""The three formats of a stand-in: laid out as in the wild, loaded as users load
them, and computing the same embeddings."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from pipeline.models.formats import FORMATS
from pipeline.models.make_model import build_model
from tests.models.helpers import EMBED, assert_same_embeddings, embed_onnx, onnx_session

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, 299, 299, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_formats")
    return {fmt: build_model(str(root / fmt), "tiny", fmt=fmt) for fmt in FORMATS}


def test_formats():
    assert FORMATS == ("tf1hub", "tf2", "onnx")


def test_tf2_layout(tiny):
    path = tiny["tf2"]
    # No tfhub_module.pb: a plain TF2 SavedModel (assets/ is empty).
    assert sorted(os.listdir(path)) == ["assets", "fingerprint.pb", "saved_model.pb",
                                        "variables"]
    loaded = tf.saved_model.load(path)
    assert list(loaded.signatures) == []  # like many Kaggle models: the loader must cope
    (spec,), kwargs = loaded.__call__.concrete_functions[0].structured_input_signature
    assert kwargs == {}
    assert spec.shape.as_list() == [None, 299, 299, 3] and spec.dtype == tf.float32
    assert all(isinstance(v, tf.Variable) for v in loaded.variables)
    assert len(loaded.variables) == len(loaded.trainable_variables) == 10  # 5 layers
    assert "Tiny/Conv2d_0/weights:0" in [v.name for v in loaded.variables]


@pytest.mark.parametrize("load", [hub.load, tf.saved_model.load])
def test_tf2_call(tiny, load):
    out = load(tiny["tf2"])(tf.constant(_images(3))).numpy()
    assert out.shape == (3, 256) and out.dtype == np.float32 and np.isfinite(out).all()


def test_tf2_signatures(tmp_path):
    path = build_model(str(tmp_path / "m"), "tiny", fmt="tf2", signatures=True)
    loaded = hub.load(path)
    fn = loaded.signatures["serving_default"]
    assert fn.structured_input_signature == (
        (), {"images": tf.TensorSpec([None, 299, 299, 3], tf.float32, name="images")})
    images = _images(2)
    out = fn(images=tf.constant(images))["output_0"].numpy()
    np.testing.assert_array_equal(out, loaded(tf.constant(images)).numpy())


def test_onnx_layout(tiny):
    path = tiny["onnx"]
    assert os.listdir(path) == ["model.onnx"]
    model = onnx.load(os.path.join(path, "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp)) == ("pixel_values", ["batch", 3, 299, 299])
    assert (out.name, dims(out)) == ("embedding", ["batch", 256])
    session = onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]


def test_onnx_dynamic_batch(tiny):
    images = _images(3)
    whole = embed_onnx(tiny["onnx"], images)
    assert whole.shape == (3, 256) and whole.dtype == np.float32
    one = embed_onnx(tiny["onnx"], images[1:2])
    np.testing.assert_allclose(one[0], whole[1], rtol=0, atol=1e-6)


def test_formats_agree(tiny):
    images = _images(4, seed=3)
    out = {fmt: EMBED[fmt](path, images) for fmt, path in tiny.items()}
    assert_same_embeddings(out["tf1hub"], out["tf2"])
    assert_same_embeddings(out["tf1hub"], out["onnx"])
    assert not np.allclose(out["onnx"][0], out["onnx"][1], rtol=1e-3, atol=1e-3)


def test_formats_agree_for_every_seed_and_width(tmp_path):
    images = _images(2, seed=4)
    out = {fmt: EMBED[fmt](build_model(str(tmp_path / fmt), "tiny", 32, 5, fmt), images)
           for fmt in FORMATS}
    assert out["tf1hub"].shape == (2, 32)
    assert_same_embeddings(out["tf1hub"], out["tf2"])
    assert_same_embeddings(out["tf1hub"], out["onnx"])


def test_onnx_deterministic(tiny, tmp_path):
    def read(path: str) -> bytes:
        with open(os.path.join(path, "model.onnx"), "rb") as f:
            return f.read()

    assert read(build_model(str(tmp_path / "again"), "tiny", fmt="onnx")) == read(tiny["onnx"])
    assert read(build_model(str(tmp_path / "other"), "tiny", seed=1, fmt="onnx")) != read(
        tiny["onnx"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_empty_out_dir(tmp_path, fmt):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_model(str(tmp_path), "tiny", fmt=fmt)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_bad_format_and_combinations(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown format 'savedmodel'.*expected one of"):
        build_model(str(tmp_path / "a"), "tiny", fmt="savedmodel")
    with pytest.raises(ValueError, match="signatures=True applies only to the tf2 format"):
        build_model(str(tmp_path / "b"), "tiny", fmt="onnx", signatures=True)
    assert os.listdir(tmp_path) == []
