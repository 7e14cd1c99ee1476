"""Writes a `Network` as a TF1 Hub module, a TF2 SavedModel or an ONNX file.

Each format is laid out like the models users bring from where that format
is published, so the pipeline's loader meets here what it meets in the wild:

* `tf1hub`: as the real fungi embedder (TF Hub's TF1 format). `hub.load`
  takes a different code path for it (empty tag set, signatures wrapped from a
  TF1 graph) than for a TF2 SavedModel. A folder holding `tfhub_module.pb` (a
  ModuleDef with format 3: the bytes 0x08 0x03), `saved_model.pb` and
  `variables/`; signatures `default` and `image_feature_vector`, input
  `images` float32 [None, S, S, 3] RGB in [0, 1], output `default`. Written
  with `tf.compat.v1`, since tensorflow-hub 0.16 can no longer create such
  modules (`hub.create_module_spec` is gone).
* `tf2`: as Kaggle Models' / TF Hub's TF2 image feature vectors: the saved
  object itself is callable (`obj(images)`, a `tf.function` over
  [None, S, S, 3] in [0, 1]), with `variables`, `trainable_variables` and
  `regularization_losses` (the reusable SavedModel API `hub.KerasLayer`
  reads). Many such models have no signatures, so by default none is written.
* `onnx`: as a PyTorch/torchvision export: `model.onnx`, input
  `pixel_values` float32 [batch, 3, S, S] normalised with ImageNet's mean and
  std, output `embedding` [batch, D]. The graph undoes that normalisation, so
  all three formats compute the same function of the picture.

Weights are variables (a checkpoint under `variables/`) in both TF formats,
never graph constants; ONNX has no variables, so they are initializers.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf.meta_graph_pb2 import SignatureDef

from pipeline.models.network import Network, apply
from pipeline.models.tf_backend import TF1Variables, TF2Variables, TFBackend

tf1 = tf.compat.v1

FORMATS = ("tf1hub", "tf2", "onnx")

INPUT_KEY = "images"
OUTPUT_KEY = "default"
SIGNATURE_NAMES = ("default", "image_feature_vector")
# A serialized tensorflow_hub ModuleDef with `format: 3` (field 1, varint 3),
# the marker `hub.load` looks for to treat a folder as a TF1 Hub module.
HUB_MODULE_PB = b"\x08\x03"
HUB_MODULE_FILENAME = "tfhub_module.pb"

ONNX_FILENAME = "model.onnx"
ONNX_INPUT = "pixel_values"
ONNX_OUTPUT = "embedding"
IMAGENET_MEAN = np.float32([0.485, 0.456, 0.406])
IMAGENET_STD = np.float32([0.229, 0.224, 0.225])


def _signature(images: tf.Tensor, embeddings: tf.Tensor) -> SignatureDef:
    """A signature as `hub.add_signature` wrote them: `images` in, `default` out.

    No method name, like the signatures of modules made by tensorflow-hub.
    """
    info = tf1.saved_model.utils.build_tensor_info
    return tf1.saved_model.signature_def_utils.build_signature_def(
        inputs={INPUT_KEY: info(images)}, outputs={OUTPUT_KEY: info(embeddings)})


def write_tf1hub(net: Network, out_dir: str) -> None:
    """A TF1 Hub module that `hub.load` reads exactly like the real embedder."""
    with tf.Graph().as_default():
        variables = TF1Variables()
        size = net.image_size
        images = tf1.placeholder(tf.float32, [None, size, size, 3], name=INPUT_KEY)
        embeddings = tf.identity(apply(net, TFBackend(variables), images), name="embeddings")
        signature = _signature(images, embeddings)
        with tf1.Session() as sess:
            variables.load_into(sess)
            builder = tf1.saved_model.Builder(out_dir)
            # Empty tag set: what TF1 Hub modules use and what `hub.load` asks for.
            builder.add_meta_graph_and_variables(
                sess, tags=[], signature_def_map={name: signature for name in SIGNATURE_NAMES},
                clear_devices=True, strip_default_attrs=True)
            builder.save()
    with tf.io.gfile.GFile(os.path.join(out_dir, HUB_MODULE_FILENAME), "wb") as f:
        f.write(HUB_MODULE_PB)


def write_tf2(net: Network, out_dir: str, signatures: bool = False) -> None:
    """A TF2 SavedModel whose root object is the embedder.

    With `signatures`, also a `serving_default` signature (input `images`,
    output `output_0`: the names `tf.saved_model.save` gives a function that
    returns one tensor, as in many published models).
    """
    variables = TF2Variables()
    backend = TFBackend(variables)
    size = net.image_size
    # Creates every variable eagerly, on one picture: not on an empty batch,
    # whose shapes oneDNN gets wrong (with its kernels on, conv2d of a batch
    # of 0 returns its input's shape, so the next bias_add fails).
    apply(net, backend, tf.zeros([1, size, size, 3], tf.float32))

    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_KEY)

    @tf.function(input_signature=[spec], autograph=False)
    def call(images: tf.Tensor) -> tf.Tensor:
        return tf.identity(apply(net, backend, images), name="embeddings")

    root = tf.__internal__.tracking.AutoTrackable()
    root.__call__ = call
    root.variables = list(variables.variables.values())
    root.trainable_variables = list(root.variables)
    root.regularization_losses = []
    concrete = call.get_concrete_function()
    # `signatures=None` would export `__call__` as `serving_default` anyway.
    tf.saved_model.save(root, out_dir,
                        signatures={"serving_default": concrete} if signatures else {})


def write_onnx(net: Network, out_dir: str) -> None:
    """`model.onnx` in a folder, taking ImageNet-normalised NCHW pictures."""
    from pipeline.models.onnx_backend import OnnxBackend
    backend = OnnxBackend()
    pixels = backend.input(ONNX_INPUT, 3, net.image_size)
    # Back to RGB in [0, 1]: x = pixel * std + mean.
    images = backend.affine(pixels, IMAGENET_STD, IMAGENET_MEAN)
    model = backend.model(pixels, apply(net, backend, images), ONNX_OUTPUT,
                          graph_name=net.name, doc=net.summary)
    tf.io.gfile.makedirs(out_dir)
    with tf.io.gfile.GFile(os.path.join(out_dir, ONNX_FILENAME), "wb") as f:
        f.write(model.SerializeToString())


WRITERS = {"tf1hub": write_tf1hub, "tf2": write_tf2, "onnx": write_onnx}
