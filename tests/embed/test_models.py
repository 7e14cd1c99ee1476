"""Every accepted model format, loaded through its real loading path (`hub.load`,
ONNX Runtime) on small models built here, and the launch-time contract check's
messages: what was expected and what was found."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from transforms.embed.model_files import fingerprint, model_format
from transforms.embed.models import check_contract, load
from transforms.embed.spec import ModelError, embedder_fingerprint, scale_and_offset

tf1 = tf.compat.v1
WEIGHTS = np.linspace(-1.0, 1.0, 3 * 8, dtype=np.float32).reshape(3, 8)


def _pictures(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def _reference(pictures: np.ndarray, normalize: str = "unit") -> np.ndarray:
    """What every small model here computes: per-channel means of the normalised
    picture times WEIGHTS."""
    scale, offset = scale_and_offset(normalize)
    x = pictures.astype(np.float64) * np.asarray(scale) + np.asarray(offset)
    return (x.mean(axis=(1, 2)) @ WEIGHTS).astype(np.float32)


def tf1_module(path: str, *, input_key: str = "images", dtype=tf.float32,
               shape=(None, 299, 299, 3), output_key: str = "default",
               signatures=("default", "image_feature_vector")) -> str:
    """A small TF1 Hub-format module whose contract can be wrong on purpose."""
    with tf.Graph().as_default():
        images = tf1.placeholder(dtype, list(shape), name=input_key)
        pooled = tf.reduce_mean(tf.cast(images, tf.float32), axis=list(range(1, len(shape) - 1)))
        weights = tf1.get_variable("w", [shape[-1], 8],
                                   initializer=tf1.constant_initializer(WEIGHTS)
                                   if shape[-1] == 3 else tf1.ones_initializer())
        out = tf.matmul(pooled, weights)
        info = tf1.saved_model.utils.build_tensor_info
        signature = tf1.saved_model.signature_def_utils.build_signature_def(
            inputs={input_key: info(images)}, outputs={output_key: info(out)})
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            builder = tf1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                session, tags=[], signature_def_map={name: signature for name in signatures})
            builder.save()
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as handle:
        handle.write(b"\x08\x03")
    return path


class _Callable(tf.Module):
    """A TF2 feature vector as Kaggle Models ships them: a callable, maybe without
    signatures, here of any input size."""

    def __init__(self, spec: tf.TensorSpec, nan: bool = False, integer: bool = False):
        super().__init__()
        self.w = tf.Variable(WEIGHTS)
        self._nan, self._integer = nan, integer
        self.__call__ = tf.function(self._call, input_signature=[spec])

    def _call(self, x):
        out = tf.matmul(tf.reduce_mean(x, [1, 2]), self.w)
        if self._nan:
            out = out * np.float32("nan")
        return tf.cast(out, tf.int32) if self._integer else out


def tf2_model(path: str, *, size=None, signatures: bool = False, **kwargs) -> str:
    module = _Callable(tf.TensorSpec([None, size, size, 3], tf.float32), **kwargs)
    tf.saved_model.save(module, path, signatures=module.__call__ if signatures else {})
    return path


def onnx_model(path: str, *, layout: str = "NCHW", size=224, elem=None,
               out_type=None) -> str:
    """An ONNX model as PyTorch exports them: NCHW, a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    elem = TensorProto.FLOAT if elem is None else elem
    dims = ["batch", 3, size, size] if layout == "NCHW" else ["batch", size, size, 3]
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    nodes = [helper.make_node("Cast", ["pixel_values"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["embedding_f"])]
    out_elem = TensorProto.FLOAT
    if out_type is not None:
        nodes.append(helper.make_node("Cast", ["embedding_f"], ["embedding"], to=out_type))
        out_elem = out_type
    else:
        nodes.append(helper.make_node("Identity", ["embedding_f"], ["embedding"]))
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("pixel_values", elem, dims)],
        [helper.make_tensor_value_info("embedding", out_elem, ["batch", 8])],
        initializer=[numpy_helper.from_array(WEIGHTS, "w"),
                     numpy_helper.from_array(np.asarray(axes, np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    os.makedirs(path, exist_ok=True)
    onnx.save(model, os.path.join(path, "model.onnx"))
    return path


# ------------------------------------------------------------------ each format loads

def test_a_tf1_hub_module_is_read_from_its_signature(tmp_path):
    path = tf1_module(str(tmp_path / "m"))
    spec = check_contract(path)
    assert (spec.format, spec.image_size, spec.layout, spec.width, spec.size_from) == \
        ("tf1hub", 299, "NHWC", 8, "model")
    pictures = _pictures(3, 299)
    assert np.allclose(load(path).embed(pictures), _reference(pictures), atol=1e-4)


def test_a_tf2_callable_without_signatures_at_its_declared_size(tmp_path):
    path = tf2_model(str(tmp_path / "m"), size=224)
    assert model_format(path) == "tf2"
    spec = check_contract(path)
    assert (spec.format, spec.image_size, spec.width, spec.input_name) == \
        ("tf2", 224, 8, "__call__")
    pictures = _pictures(2, 224)
    assert np.allclose(load(path).embed(pictures), _reference(pictures), atol=1e-4)


def test_a_variable_size_tf2_input_takes_image_size_or_says_what_it_assumed(tmp_path):
    path = tf2_model(str(tmp_path / "m"), size=None, signatures=True)
    assumed = check_contract(path)
    assert (assumed.image_size, assumed.size_from) == (224, "assumed")
    assert "assumed" in assumed.describe() and "--image_size" in assumed.describe()
    given = check_contract(path, image_size=384)
    assert (given.image_size, given.size_from, given.input_name) == \
        (384, "flag", "serving_default:x")
    pictures = _pictures(2, 384)
    assert np.allclose(load(path, image_size=384).embed(pictures), _reference(pictures),
                       atol=1e-4)


def test_an_onnx_export_reads_its_layout_and_takes_its_normalisation(tmp_path):
    path = onnx_model(str(tmp_path / "m"))
    assert model_format(path) == "onnx"
    assert model_format(os.path.join(path, "model.onnx")) == "onnx"  # the file itself too
    spec = check_contract(path, normalize="imagenet")
    assert (spec.format, spec.image_size, spec.layout, spec.width, spec.input_name,
            spec.output_name) == ("onnx", 224, "NCHW", 8, "pixel_values", "embedding")
    pictures = _pictures(3, 224)
    got = load(path, normalize="imagenet").embed(pictures)
    assert np.allclose(got, _reference(pictures, "imagenet"), atol=1e-4)
    assert not np.allclose(got, _reference(pictures, "clip"), atol=1e-3)
    nhwc = onnx_model(str(tmp_path / "nhwc"), layout="NHWC", size=160)
    spec = check_contract(nhwc, normalize="clip")
    assert (spec.layout, spec.image_size) == ("NHWC", 160)
    pictures = _pictures(2, 160)
    assert np.allclose(load(nhwc, normalize="clip").embed(pictures),
                       _reference(pictures, "clip"), atol=1e-4)


# ------------------------------------------------------------------ what is refused

@pytest.mark.parametrize("kwargs, message", [
    ({"input_key": "a", "signatures": ("default",)}, None),  # one input: any name works
    ({"dtype": tf.uint8}, r"expected a float image input in .*; found uint8 "
                          r"\[None, 299, 299, 3\]"),
    ({"shape": (None, 299, 299, 4)}, r"expected 3 colour channels \(RGB\) in the input of "
                                     r".*; found float32 \[None, 299, 299, 4\]"),
    ({"shape": (None, 299, 3)}, r"expected a rank-4 image input \[batch, height, width, 3\] "
                                r"in .*; found float32 \[None, 299, 3\]"),
    ({"shape": (None, 299, 224, 3)}, r"expected a square image input in .*; found 299x224"),
    ({"signatures": ("serving_default",)}, r"expected a signature named image_feature_vector "
                                           r"or default in .*; found \['serving_default'\]"),
])
def test_a_tf1_module_that_does_not_fit_is_refused_with_what_was_found(tmp_path, kwargs,
                                                                       message):
    path = tf1_module(str(tmp_path / "module"), **kwargs)
    if message is None:
        assert check_contract(path).width == 8
        return
    with pytest.raises(ModelError, match=message):
        check_contract(path)


def test_wrong_width_nan_and_non_float_outputs_are_refused(tmp_path):
    path = tf1_module(str(tmp_path / "m"))
    with pytest.raises(ModelError, match=r"expected output 'default' float32 \[None, 256\] "
                                         r"\(--embedding_dim 256\); found float32 \[None, 8\]"):
        check_contract(path, 256)
    nan = tf2_model(str(tmp_path / "nan"), size=64, nan=True)
    with pytest.raises(ModelError, match=r"expected finite embeddings from .*; found NaN"):
        check_contract(nan)
    integer = onnx_model(str(tmp_path / "int"), out_type=6)  # INT32
    with pytest.raises(ModelError, match=r"expected a float embedding output in .*; found "
                                         r"embedding tensor\(int32\)"):
        check_contract(integer)
    int_input = onnx_model(str(tmp_path / "int_in"), elem=2)  # UINT8
    with pytest.raises(ModelError, match=r"expected a float image input in .*; found "
                                         r"tensor\(uint8\)"):
        check_contract(int_input)
    with pytest.raises(ModelError, match=r"--image_size 299 does not match .*, whose input is "
                                         r"224x224; leave --image_size out"):
        check_contract(onnx_model(str(tmp_path / "o"), size=224), image_size=299)


def test_folders_that_hold_no_model_and_a_withdrawn_address(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"expected a TF1 Hub module \(tfhub_module.pb\), a TF2 "
                                         r"SavedModel \(saved_model.pb\) or one .onnx file in "
                                         r".*; found an empty folder"):
        load(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="found a file of another kind"):
        load(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="expected an ONNX model at .*; loading it failed"):
        load(str(tmp_path / "broken.onnx"))
    with pytest.raises(ModelError, match="withdrawn from TF Hub on 2024-03-18"):
        load("https://tfhub.dev/svampeatlas/vision/embedder/fungi_V2/1")


# ------------------------------------------------------------------ fingerprints

def test_the_fingerprint_covers_the_input_options(tmp_path):
    path = onnx_model(str(tmp_path / "m"))
    files = fingerprint(path)
    assert fingerprint(os.path.join(path, "model.onnx")) != files  # a file, not the folder
    unit = check_contract(path)
    imagenet = check_contract(path, normalize="imagenet")
    prints = {embedder_fingerprint(files, unit, "squash"),
              embedder_fingerprint(files, imagenet, "squash"),
              embedder_fingerprint(files, unit, "center_crop")}
    assert len(prints) == 3
    # The defaults keep the files' own fingerprint: snapshots made before these
    # options existed keep matching their model.
    assert embedder_fingerprint(files, unit, "squash") == files
    variable = tf2_model(str(tmp_path / "v"), size=None)
    assumed, flagged = check_contract(variable), check_contract(variable, image_size=224)
    assert embedder_fingerprint("sha256:x", assumed, "squash") != "sha256:x"
    assert embedder_fingerprint("sha256:x", flagged, "squash") != \
        embedder_fingerprint("sha256:x", check_contract(variable, image_size=256), "squash")
