"""The fungi-embedder stand-ins as TF1 Hub modules, loaded the way users load the real one."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from pipeline.models.make_model import ARCHITECTURES, build_model

SIGNATURES = ("default", "image_feature_vector")


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Random RGB images in [0, 1], as the module expects them."""
    return np.random.default_rng(seed).uniform(size=(n, 299, 299, 3)).astype(np.float32)


def _embed(path: str, images: np.ndarray, signature: str = "image_feature_vector") -> np.ndarray:
    module = hub.load(path)
    return module.signatures[signature](images=tf.constant(images))["default"].numpy()


def _check_signature(path: str, embedding_dim: int) -> None:
    module = hub.load(path)
    for name in SIGNATURES:
        fn = module.signatures[name]
        args, kwargs = fn.structured_input_signature
        assert args == ()
        assert kwargs == {"images": tf.TensorSpec([None, 299, 299, 3], tf.float32, name="images")}
        (out_key, out), = fn.structured_outputs.items()
        assert out_key == "default"
        assert out.shape.as_list() == [None, embedding_dim]
        assert out.dtype == tf.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_model(str(tmp_path_factory.mktemp("tiny") / "module"), arch="tiny")


@pytest.fixture(scope="module")
def inception_v4(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_model(str(tmp_path_factory.mktemp("inception_v4") / "module"))


def test_architectures():
    assert ARCHITECTURES == ("inception_v4", "tiny", "efficientnet_lite0")


def test_tiny_files(tiny):
    assert sorted(os.listdir(tiny)) == ["saved_model.pb", "tfhub_module.pb", "variables"]
    with open(os.path.join(tiny, "tfhub_module.pb"), "rb") as f:
        assert f.read() == b"\x08\x03"
    variables = os.listdir(os.path.join(tiny, "variables"))
    assert "variables.index" in variables
    assert any(name.startswith("variables.data-") for name in variables)


def test_tiny_signatures(tiny):
    _check_signature(tiny, 256)
    images = _images(3)
    outputs = {name: _embed(tiny, images, name) for name in SIGNATURES}
    for out in outputs.values():
        assert out.shape == (3, 256)
        assert out.dtype == np.float32
        assert np.isfinite(out).all()
    np.testing.assert_array_equal(outputs["default"], outputs["image_feature_vector"])


def test_tiny_embedding_dim(tmp_path):
    path = build_model(str(tmp_path / "module"), arch="tiny", embedding_dim=128)
    _check_signature(path, 128)
    assert _embed(path, _images(2)).shape == (2, 128)


def test_same_seed_same_model(tiny, tmp_path):
    again = build_model(str(tmp_path / "module"), arch="tiny", seed=0)
    first, second = hub.load(tiny), hub.load(again)
    assert [v.name for v in first.variables] == [v.name for v in second.variables]
    for a, b in zip(first.variables, second.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = _images(2)
    np.testing.assert_array_equal(_embed(tiny, images), _embed(again, images))


def test_different_seed_different_outputs(tiny, tmp_path):
    other = build_model(str(tmp_path / "module"), arch="tiny", seed=1)
    images = _images(2)
    assert not np.allclose(_embed(tiny, images), _embed(other, images))


def test_tiny_different_images_different_rows(tiny):
    out = _embed(tiny, _images(2))
    assert not np.allclose(out[0], out[1], rtol=1e-3, atol=1e-3)


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_model(str(tmp_path / "module"), arch="resnet50")
    assert not (tmp_path / "module").exists()


def test_bad_embedding_dim(tmp_path):
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model(str(tmp_path / "module"), arch="tiny", embedding_dim=0)


def test_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_model(str(tmp_path), arch="tiny")
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_existing_empty_out_dir(tmp_path):
    assert build_model(str(tmp_path), arch="tiny") == str(tmp_path)
    assert (tmp_path / "tfhub_module.pb").read_bytes() == b"\x08\x03"


def test_inception_v4(inception_v4):
    _check_signature(inception_v4, 256)
    # A small graph: the ~166 MB of weights are in variables/, not constants.
    assert os.path.getsize(os.path.join(inception_v4, "saved_model.pb")) < 4 << 20
    out = _embed(inception_v4, _images(2, seed=1))
    assert out.shape == (2, 256)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert np.abs(out).max() < 1e3
    # Different images, clearly different embeddings (plain He-normal weights
    # gave cosine ~0.9999 here).
    cosine = out[0] @ out[1] / np.linalg.norm(out[0]) / np.linalg.norm(out[1])
    assert cosine < 0.99


def test_inception_v4_is_inception_v4(inception_v4):
    """Same width and compute as the real backbone: 1536-d pool, ~12.3 GMAC/image."""
    module = hub.load(inception_v4)
    graph = module.signatures["default"].graph
    pool = graph.get_tensor_by_name("InceptionV4/global_pool:0")
    assert pool.shape.as_list() == [None, 1536]
    macs = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            _, height, width, _ = op.outputs[0].shape
            kh, kw, cin, cout = op.inputs[1].shape
            macs += height * width * kh * kw * cin * cout
    assert 12.0e9 < macs < 12.5e9
    params = sum(int(np.prod(v.shape)) for v in module.variables)
    assert 41.0e6 < params < 42.0e6  # TF-slim's backbone: ~41.1M, + 1536x256 projection
