"""Build a stand-in for the withdrawn fungi embedder, in its exact TF1 Hub format.

The pipeline embeds images with the Danish Mycological Society's TF Hub model
`svampeatlas/vision/embedder/fungi_V2/1`. That model is no longer downloadable,
yet tests, benchmarks and demos need a model folder that users' code loads
exactly as it would load the real one:

    m = hub.load(path)
    m.signatures["image_feature_vector"](images=x)["default"]

So this module writes a module with the same *contract* and *format* (not the
same weights):

* TF1 Hub format, because that is what the real model is, and `hub.load` takes
  a different code path for it (empty tag set, signatures wrapped from a TF1
  graph) than for a TF2 SavedModel. A folder holding `tfhub_module.pb`
  (a ModuleDef with format 3: the bytes 0x08 0x03), `saved_model.pb` and
  `variables/`. tensorflow-hub 0.16 can no longer create such modules
  (`hub.create_module_spec` is gone), so the graph is built with
  `tf.compat.v1` and written with `tf.compat.v1.saved_model.Builder`.
* Signatures `default` and `image_feature_vector`, both taking `images`
  (float32 [None, 299, 299, 3], RGB in [0, 1]) and returning `default`
  (float32 [None, embedding_dim]).
* `inception_v4`: the real Inception-v4 backbone (as TF-slim's
  `inception_v4_base`, batch norm folded into conv biases) plus a linear
  projection, so throughput and memory measured with the stand-in are those of
  the real model (~12.3 GMAC per 299x299 image).
* `tiny`: a few strided convolutions, for fast tests.

Weights are random but deterministic: drawn from `numpy.random.default_rng(seed)`
with He-normal scaling (zero-mean filters where a layer reads ReLU outputs, see
`_Weights.kernel`), so activations stay finite and different images give clearly
different embeddings. They carry no meaning: the stand-in is for contract,
format, speed and memory, not for the quality of the embeddings. They live in
variables (a checkpoint under `variables/`), never as graph constants, so
`saved_model.pb` stays small (~1 MB), as in the real module.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf.meta_graph_pb2 import SignatureDef

tf1 = tf.compat.v1

ARCHITECTURES = ("inception_v4", "tiny")

IMAGE_SIZE = 299
INPUT_KEY = "images"
OUTPUT_KEY = "default"
SIGNATURE_NAMES = ("default", "image_feature_vector")
# A serialized tensorflow_hub ModuleDef with `format: 3` (field 1, varint 3),
# the marker `hub.load` looks for to treat a folder as a TF1 Hub module.
HUB_MODULE_PB = b"\x08\x03"
HUB_MODULE_FILENAME = "tfhub_module.pb"

# Folded batch norm leaves a (small) bias per channel; a non-zero bias also keeps
# the random network from being scale-invariant (f(a*x) == a*f(x)).
_BIAS_STD = 0.01


class _Weights:
    """Creates variables and remembers the numpy values to load into them.

    The values are drawn in creation order from one generator, so the same
    seed and architecture always give the same weights.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.assignments: list[tuple[tf.Variable, np.ndarray]] = []

    def _variable(self, name: str, value: np.ndarray) -> tf.Variable:
        # A zeros initializer is a tiny Fill op in the graph; the real values
        # are fed into the variables by `load_into`, never stored as constants.
        var = tf1.get_variable(name, shape=value.shape, dtype=tf.float32,
                               initializer=tf1.zeros_initializer())
        self.assignments.append((var, value))
        return var

    def kernel(self, name: str, shape: Sequence[int], relu_input: bool) -> tf.Variable:
        """A He-normal kernel (fan-in axes first, output axis last).

        Plain He-normal (std sqrt(2/fan_in)) makes a deep random ReLU network
        map every input to nearly the same direction: with Inception-v4's depth,
        different images gave embeddings with cosine similarity ~0.9999. The
        positive mean of ReLU outputs drives that collapse, so kernels that read
        ReLU outputs get zero-mean filters (each output channel's weights sum to
        0), which removes the mean, and a std of sqrt(2*pi / ((pi-1) * fan_in))
        to keep the activations' scale, as the removed mean no longer adds to it.
        Different images then get clearly different embeddings (cosine ~0.6-0.9),
        though, the network being random, a slightly altered image is about as
        far from the original as an unrelated one. Kernels that read the image
        keep plain He-normal: centering them would discard its overall brightness.
        """
        fan_in = int(np.prod(shape[:-1]))
        value = self._rng.standard_normal(tuple(shape), dtype=np.float32)
        if relu_input:
            value -= value.mean(axis=tuple(range(len(shape) - 1)), keepdims=True)
            std = np.sqrt(2.0 * np.pi / ((np.pi - 1.0) * fan_in))
        else:
            std = np.sqrt(2.0 / fan_in)
        return self._variable(name, value * np.float32(std))

    def bias(self, name: str, size: int) -> tf.Variable:
        """A small random bias, standing in for a folded batch norm's offset."""
        value = self._rng.standard_normal((size,), dtype=np.float32) * np.float32(_BIAS_STD)
        return self._variable(name, value)

    def load_into(self, sess: tf1.Session) -> None:
        """Feeds every drawn value through its variable's initializer."""
        for var, value in self.assignments:
            var.load(value, sess)


def _conv(w: _Weights, x: tf.Tensor, filters: int, kernel: tuple[int, int], name: str,
          stride: int = 1, padding: str = "SAME", relu_input: bool = True) -> tf.Tensor:
    """Conv + bias + ReLU (a conv with its batch norm folded in), NHWC."""
    with tf1.variable_scope(name):
        weights = w.kernel("weights", (*kernel, int(x.shape[-1]), filters), relu_input)
        biases = w.bias("biases", filters)
        y = tf.nn.conv2d(x, weights, strides=stride, padding=padding)
        return tf.nn.relu(tf.nn.bias_add(y, biases))


def _max_pool(x: tf.Tensor, stride: int, padding: str) -> tf.Tensor:
    return tf.nn.max_pool2d(x, 3, strides=stride, padding=padding)


def _avg_pool(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.avg_pool2d(x, 3, strides=1, padding="SAME")


def _concat(branches: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.concat(list(branches), axis=3)


def _branch(name: str, fn: Callable[[], tf.Tensor]) -> tf.Tensor:
    with tf1.variable_scope(name):
        return fn()


def _inception_a(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """35x35x384 -> 35x35x384."""
    return _concat([
        _branch("Branch_0", lambda: _conv(w, x, 96, (1, 1), "Conv2d_0a_1x1")),
        _branch("Branch_1", lambda: _conv(
            w, _conv(w, x, 64, (1, 1), "Conv2d_0a_1x1"), 96, (3, 3), "Conv2d_0b_3x3")),
        _branch("Branch_2", lambda: _conv(w, _conv(
            w, _conv(w, x, 64, (1, 1), "Conv2d_0a_1x1"), 96, (3, 3), "Conv2d_0b_3x3"),
            96, (3, 3), "Conv2d_0c_3x3")),
        _branch("Branch_3", lambda: _conv(w, _avg_pool(x), 96, (1, 1), "Conv2d_0b_1x1")),
    ])


def _reduction_a(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """35x35x384 -> 17x17x1024."""
    def branch_1() -> tf.Tensor:
        y = _conv(w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(w, y, 224, (3, 3), "Conv2d_0b_3x3")
        return _conv(w, y, 256, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    return _concat([
        _branch("Branch_0", lambda: _conv(
            w, x, 384, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")),
        _branch("Branch_1", branch_1),
        _branch("Branch_2", lambda: _max_pool(x, 2, "VALID")),
    ])


def _inception_b(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """17x17x1024 -> 17x17x1024."""
    def branch_1() -> tf.Tensor:
        y = _conv(w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(w, y, 224, (1, 7), "Conv2d_0b_1x7")
        return _conv(w, y, 256, (7, 1), "Conv2d_0c_7x1")

    def branch_2() -> tf.Tensor:
        y = _conv(w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(w, y, 192, (7, 1), "Conv2d_0b_7x1")
        y = _conv(w, y, 224, (1, 7), "Conv2d_0c_1x7")
        y = _conv(w, y, 224, (7, 1), "Conv2d_0d_7x1")
        return _conv(w, y, 256, (1, 7), "Conv2d_0e_1x7")

    return _concat([
        _branch("Branch_0", lambda: _conv(w, x, 384, (1, 1), "Conv2d_0a_1x1")),
        _branch("Branch_1", branch_1),
        _branch("Branch_2", branch_2),
        _branch("Branch_3", lambda: _conv(w, _avg_pool(x), 128, (1, 1), "Conv2d_0b_1x1")),
    ])


def _reduction_b(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """17x17x1024 -> 8x8x1536."""
    def branch_0() -> tf.Tensor:
        y = _conv(w, x, 192, (1, 1), "Conv2d_0a_1x1")
        return _conv(w, y, 192, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    def branch_1() -> tf.Tensor:
        y = _conv(w, x, 256, (1, 1), "Conv2d_0a_1x1")
        y = _conv(w, y, 256, (1, 7), "Conv2d_0b_1x7")
        y = _conv(w, y, 320, (7, 1), "Conv2d_0c_7x1")
        return _conv(w, y, 320, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    return _concat([
        _branch("Branch_0", branch_0),
        _branch("Branch_1", branch_1),
        _branch("Branch_2", lambda: _max_pool(x, 2, "VALID")),
    ])


def _inception_c(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """8x8x1536 -> 8x8x1536."""
    def branch_1() -> tf.Tensor:
        y = _conv(w, x, 384, (1, 1), "Conv2d_0a_1x1")
        return _concat([_conv(w, y, 256, (1, 3), "Conv2d_0b_1x3"),
                        _conv(w, y, 256, (3, 1), "Conv2d_0c_3x1")])

    def branch_2() -> tf.Tensor:
        y = _conv(w, x, 384, (1, 1), "Conv2d_0a_1x1")
        y = _conv(w, y, 448, (3, 1), "Conv2d_0b_3x1")
        y = _conv(w, y, 512, (1, 3), "Conv2d_0c_1x3")
        return _concat([_conv(w, y, 256, (1, 3), "Conv2d_0d_1x3"),
                        _conv(w, y, 256, (3, 1), "Conv2d_0e_3x1")])

    return _concat([
        _branch("Branch_0", lambda: _conv(w, x, 256, (1, 1), "Conv2d_0a_1x1")),
        _branch("Branch_1", branch_1),
        _branch("Branch_2", branch_2),
        _branch("Branch_3", lambda: _conv(w, _avg_pool(x), 256, (1, 1), "Conv2d_0b_1x1")),
    ])


def _inception_v4_stem(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """299x299x3 -> 35x35x384."""
    x = _conv(w, x, 32, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID", relu_input=False)
    x = _conv(w, x, 32, (3, 3), "Conv2d_2a_3x3", padding="VALID")
    x = _conv(w, x, 64, (3, 3), "Conv2d_2b_3x3")
    with tf1.variable_scope("Mixed_3a"):
        x = _concat([
            _branch("Branch_0", lambda: _max_pool(x, 2, "VALID")),
            _branch("Branch_1", lambda: _conv(
                w, x, 96, (3, 3), "Conv2d_0a_3x3", stride=2, padding="VALID")),
        ])
    with tf1.variable_scope("Mixed_4a"):
        def branch_0() -> tf.Tensor:
            y = _conv(w, x, 64, (1, 1), "Conv2d_0a_1x1")
            return _conv(w, y, 96, (3, 3), "Conv2d_1a_3x3", padding="VALID")

        def branch_1() -> tf.Tensor:
            y = _conv(w, x, 64, (1, 1), "Conv2d_0a_1x1")
            y = _conv(w, y, 64, (1, 7), "Conv2d_0b_1x7")
            y = _conv(w, y, 64, (7, 1), "Conv2d_0c_7x1")
            return _conv(w, y, 96, (3, 3), "Conv2d_1a_3x3", padding="VALID")

        x = _concat([_branch("Branch_0", branch_0), _branch("Branch_1", branch_1)])
    with tf1.variable_scope("Mixed_5a"):
        x = _concat([
            _branch("Branch_0", lambda: _conv(
                w, x, 192, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")),
            _branch("Branch_1", lambda: _max_pool(x, 2, "VALID")),
        ])
    return x


def _inception_v4_features(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """Inception-v4 (TF-slim's `inception_v4_base`) + global average pool: [N, 1536]."""
    with tf1.variable_scope("InceptionV4"):
        x = _inception_v4_stem(w, x)
        blocks: list[tuple[str, Callable[[_Weights, tf.Tensor], tf.Tensor]]] = (
            [(f"Mixed_5{c}", _inception_a) for c in "bcde"]
            + [("Mixed_6a", _reduction_a)]
            + [(f"Mixed_6{c}", _inception_b) for c in "bcdefgh"]
            + [("Mixed_7a", _reduction_b)]
            + [(f"Mixed_7{c}", _inception_c) for c in "bcd"])
        for name, block in blocks:
            with tf1.variable_scope(name):
                x = block(w, x)
        return tf.reduce_mean(x, axis=[1, 2], name="global_pool")


def _tiny_features(w: _Weights, x: tf.Tensor) -> tf.Tensor:
    """Four stride-2 convolutions + global average pool: [N, 64]; cheap on purpose."""
    with tf1.variable_scope("Tiny"):
        for i, filters in enumerate((16, 32, 64, 64)):
            x = _conv(w, x, filters, (3, 3), f"Conv2d_{i}", stride=2, relu_input=i > 0)
        return tf.reduce_mean(x, axis=[1, 2], name="global_pool")


_FEATURES: dict[str, Callable[[_Weights, tf.Tensor], tf.Tensor]] = {
    "inception_v4": _inception_v4_features,
    "tiny": _tiny_features,
}


def _project(w: _Weights, features: tf.Tensor, embedding_dim: int) -> tf.Tensor:
    """Linear map of the pooled features to the embedding width (no activation)."""
    in_dim = int(features.shape[-1])
    with tf1.variable_scope("Embedding"):
        # The pooled features are averaged ReLU outputs, hence relu_input.
        weights = w.kernel("weights", (in_dim, embedding_dim), relu_input=True)
        biases = w.bias("biases", embedding_dim)
        return tf.nn.bias_add(tf.matmul(features, weights), biases)


def _signature(images: tf.Tensor, embeddings: tf.Tensor) -> SignatureDef:
    """A signature as `hub.add_signature` wrote them: `images` in, `default` out.

    No method name, like the signatures of modules made by tensorflow-hub.
    """
    info = tf1.saved_model.utils.build_tensor_info
    return tf1.saved_model.signature_def_utils.build_signature_def(
        inputs={INPUT_KEY: info(images)}, outputs={OUTPUT_KEY: info(embeddings)})


def _check_args(out_dir: str, arch: str, embedding_dim: int) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {ARCHITECTURES}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if tf.io.gfile.exists(out_dir) and tf.io.gfile.listdir(out_dir):
        raise ValueError(f"Output folder {out_dir!r} is not empty; "
                         "refusing to mix a new module with existing files")


def build_model(out_dir: str, arch: str = "inception_v4", embedding_dim: int = 256,
                seed: int = 0) -> str:
    """Writes the module to out_dir (must not exist or be empty); returns out_dir.

    The folder loads with `hub.load(out_dir)` exactly like the real fungi
    embedder: signatures `default` and `image_feature_vector`, input `images`
    float32 [None, 299, 299, 3] in [0, 1], output `default` float32
    [None, embedding_dim]. Same `arch`, `embedding_dim` and `seed` give the same
    weights on any machine, so embeddings are reproducible across builds (up to
    the float rounding of the CPU that runs the model).

    Raises:
      ValueError: unknown `arch`, non-positive `embedding_dim`, or a non-empty
        `out_dir`.
    """
    out_dir = os.fspath(out_dir)
    _check_args(out_dir, arch, embedding_dim)
    with tf.Graph().as_default():
        weights = _Weights(seed)
        images = tf1.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3], name=INPUT_KEY)
        # Hub image modules take RGB in [0, 1]; Inception works on [-1, 1].
        scaled = images * 2.0 - 1.0
        embeddings = tf.identity(
            _project(weights, _FEATURES[arch](weights, scaled), embedding_dim),
            name="embeddings")
        signature = _signature(images, embeddings)
        with tf1.Session() as sess:
            weights.load_into(sess)
            builder = tf1.saved_model.Builder(out_dir)
            # Empty tag set: what TF1 Hub modules use and what `hub.load` asks for.
            builder.add_meta_graph_and_variables(
                sess, tags=[], signature_def_map={name: signature for name in SIGNATURE_NAMES},
                clear_devices=True, strip_default_attrs=True)
            builder.save()
    with tf.io.gfile.GFile(os.path.join(out_dir, HUB_MODULE_FILENAME), "wb") as f:
        f.write(HUB_MODULE_PB)
    return out_dir


def main(argv) -> int:
    """`gbif-embed make-model`: writes a stand-in embedder."""
    import argparse
    parser = argparse.ArgumentParser(prog="gbif-embed make-model", description=(
        "Write a STAND-IN for svampeatlas/vision/embedder/fungi_V2/1: same TF1 Hub "
        "format and contract, deterministic random weights, no fungus knowledge."))
    parser.add_argument("--out", required=True, help="Folder to create")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="inception_v4")
    parser.add_argument("--embedding_dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_model(args.out, args.arch, args.embedding_dim, args.seed)
    print(f"wrote the {args.arch} stand-in embedder to {args.out}")
    return 0
