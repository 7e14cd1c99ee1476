"""TF1 Hub modules and TF2 SavedModels as ONNX graphs (for `bench/precision.py`),
and the converted or quantised models cached by fingerprint.

TF models as ONNX graphs, so that they can run in int8 or in ONNX Runtime.

ONNX Runtime quantises ONNX graphs only. tf2onnx 1.17 converts the function
the pipeline already runs for a TF model (`TFModel`'s traced uint8 → embedding
function, which finds the module's entry point, scales and lays out the
pixels in-graph) for both TF formats under TensorFlow 2.21; its command line
cannot, since a TF2 feature vector often has no signature. The converted graph
takes uint8 NHWC pictures as the pipeline has them, so calibration and
inference feed pixels unchanged (`bench.int8.model_input`).

Measured on an AMD EPYC (AVX2, 2 vCPUs): EfficientNet-Lite0 converts in
2.6-3.3 s and the Inception-v4 stand-in in 30-43 s, both to within 5e-4 of
TensorFlow's embeddings (cosine 1.000000), so a converted model is cached by
the model's fingerprint (`recipe_key`, `cached_model` below) rather than made per run.

Needs: tensorflow, tf2onnx (not a dependency of the pipeline today), onnx.
"""
from __future__ import annotations

import os
import tempfile
import hashlib
import json
from typing import Any, Callable

from transforms.embed.spec import ModelSpec

OPSET = 17


def traced_function(model: Any) -> Any:
    """The tf.function of a loaded TF model: uint8 [None, S, S, 3] → float32 [None, D].

    `TFModel` keeps it private (`_embed`); a public attribute there would
    make this lookup unnecessary.
    """
    function = getattr(model, "function", None) or getattr(model, "_embed", None)
    if function is None or not hasattr(function, "get_concrete_function"):
        raise TypeError(f"expected a loaded TF model (transforms.embed.tf_model.TFModel); "
                        f"found {type(model).__name__}")
    return function


def tf_to_onnx(model: Any, dst_path: str, opset: int = OPSET) -> str:
    """Writes the loaded TF model (`transforms.embed.models.load` of a TF1 Hub
    module or a TF2 SavedModel) as an ONNX graph with a uint8 NHWC input named
    `images`; returns dst_path. The write is atomic."""
    import tensorflow as tf
    import tf2onnx

    size = model.spec.image_size
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
    folder = os.path.dirname(os.path.abspath(dst_path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tf2onnx-", dir=folder) as work:
        out = os.path.join(work, "model.onnx")
        tf2onnx.convert.from_function(traced_function(model), input_signature=signature,
                                      opset=opset, output_path=out)
        _rename_input(out, "images")
        os.replace(out, dst_path)
    return dst_path


def _rename_input(path: str, name: str) -> None:
    """tf2onnx names the input after the function's argument; say what it is."""
    import onnx
    model = onnx.load(path)
    old = model.graph.input[0].name
    if old == name:
        return
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if value == old else value for value in node.input]
    onnx.save(model, path)


FORMAT_VERSION = 1  # bump when bench/int8.py changes what it writes


def _version(package: str) -> str:
    """An installed package's version, or "absent"; imports nothing."""
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def recipe_key(files_fingerprint: str, spec: ModelSpec, float_head: float = 0.0,
               float_tail: float = 0.0, opset: int = 17) -> str:
    """A file-name-safe key of the int8 model these inputs make."""
    recipe = {"files": files_fingerprint, "format": spec.format, "size": spec.image_size,
              "layout": spec.layout, "normalize": spec.normalize, "head": float_head,
              "tail": float_tail, "opset": opset, "v": FORMAT_VERSION,
              "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
              "tf2onnx": _version("tf2onnx") if spec.format != "onnx" else ""}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return f"int8-{digest[:24]}"


def cached_model(folder: str, key: str, build: Callable[[str], str]) -> tuple[str, bool]:
    """(path of `folder/key.onnx`, whether it was built now). `build(path)`
    writes the model to the path it is given; it is called only on a miss,
    into a scratch file renamed into place, so concurrent workers never read
    half a model (the last writer wins; both wrote the same recipe)."""
    target = os.path.join(folder, key + ".onnx")
    if os.path.isfile(target):
        return target, False
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=key + "-", dir=folder) as work:
        scratch = os.path.join(work, "model.onnx")
        build(scratch)
        os.replace(scratch, target)
    return target, True
