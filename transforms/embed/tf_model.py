"""TensorFlow embedders: TF1 Hub modules and TF2 SavedModels, through `hub.load`.

Beam's own TensorFlow handler loads through Keras, which cannot load TF1
Hub modules under Keras 3 (apache/beam#30288), so both formats go through
`tensorflow_hub.load`: a TF1 module's `image_feature_vector` (or `default`)
signature, a TF2 model's `serving_default` signature where it has one, and
otherwise the saved object itself, which Kaggle's feature vectors are: a
callable without signatures. The entry point is wrapped in one `tf.function`
that takes uint8 pictures and scales, normalises and lays them out inside the
graph, so one trace serves every batch size.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from transforms.embed.spec import ModelError, ModelSpec, picture_size, scale_and_offset
from transforms.embed.tf_quiet import import_tensorflow

TF1_SIGNATURES = ("image_feature_vector", "default")
TF2_SIGNATURES = ("serving_default", "image_feature_vector", "default")
# Input and output names to prefer where a signature has several.
INPUT_NAMES = ("images", "inputs", "input", "x", "pixel_values", "input_1")
OUTPUT_NAMES = ("default", "feature_vector", "embedding", "embeddings", "output_0",
                "pooled_output", "image_embeds", "features", "output")


class TFModel:
    """A loaded TF model and its uint8 → embedding function."""

    def __init__(self, module: Any, entry: "_Entry", spec: ModelSpec):
        self.module = module  # kept alive: the function reads its variables
        self.spec = spec
        self._embed = _wrap(entry, spec)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return self._embed(pixels).numpy()


class _Entry:
    """How to call the model: a function of one float tensor, and what it declares."""

    def __init__(self, call: Callable, shape: list, dtype: Any, input_name: str,
                 output_name: str):
        self.call, self.shape, self.dtype = call, shape, dtype
        self.input_name, self.output_name = input_name, output_name


def load_tf(local: str, model_uri: str, fmt: str, normalize: str,
            image_size: int = 0) -> TFModel:
    tf = import_tensorflow()
    import tensorflow_hub as hub
    try:
        module = hub.load(local)
    except Exception as err:
        raise ModelError(f"expected a {'TF1 Hub module' if fmt == 'tf1hub' else 'TF2 SavedModel'}"
                         f" at {model_uri}; loading it failed: {err}") from err
    entry = _entry(module, fmt, model_uri)
    spec = _spec(entry, fmt, normalize, image_size, model_uri, tf)
    return TFModel(module, entry, spec)


def _entry(module: Any, fmt: str, model_uri: str) -> _Entry:
    signatures = getattr(module, "signatures", None) or {}
    names = TF1_SIGNATURES if fmt == "tf1hub" else TF2_SIGNATURES
    name = next((n for n in names if n in signatures), None)
    if name is None and fmt == "tf2" and len(signatures) == 1:
        name = next(iter(signatures))
    if name is not None:
        return _signature_entry(signatures[name], name, model_uri)
    if fmt == "tf2" and callable(getattr(module, "__call__", None)) and \
            getattr(module.__call__, "concrete_functions", None):
        return _callable_entry(module, model_uri)
    wanted = " or ".join(names)
    raise ModelError(f"expected a signature named {wanted}"
                     + (" or a callable saved object" if fmt == "tf2" else "")
                     + f" in {model_uri}; found {sorted(signatures) or 'no signatures'}")


def _signature_entry(function: Any, name: str, model_uri: str) -> _Entry:
    args, kwargs = function.structured_input_signature
    inputs = dict(kwargs)
    input_name = _pick(inputs, INPUT_NAMES)
    if input_name is None:
        raise ModelError(f"expected one image input in signature '{name}' of {model_uri}; "
                         f"found {sorted(inputs) or list(args)}")
    outputs = function.structured_outputs
    if not isinstance(outputs, dict):
        outputs = {"output_0": outputs}
    output_name = _pick(outputs, OUTPUT_NAMES)
    if output_name is None:
        raise ModelError(f"expected one embedding output in signature '{name}' of "
                         f"{model_uri}; found {sorted(outputs)}")
    spec = inputs[input_name]
    return _Entry(lambda x: function(**{input_name: x})[output_name], spec.shape.as_list(),
                  spec.dtype, f"{name}:{input_name}", output_name)


def _callable_entry(module: Any, model_uri: str) -> _Entry:
    """A TF2 saved object without signatures: `module(x)` dispatches on its
    saved concrete functions (some also take `training`, saved for False)."""
    specs = [cf.structured_input_signature[0][0] for cf in module.__call__.concrete_functions
             if cf.structured_input_signature[0]
             and hasattr(cf.structured_input_signature[0][0], "shape")]
    if not specs:
        raise ModelError(f"expected the saved object of {model_uri} to take an image tensor; "
                         "its concrete functions take no tensor argument")
    spec = specs[0]
    outputs = module.__call__.concrete_functions[0].structured_outputs
    output_name = "output_0"
    if isinstance(outputs, dict):
        output_name = _pick(outputs, OUTPUT_NAMES) or ""
        if not output_name:
            raise ModelError(f"expected one embedding output from {model_uri}; found "
                             f"{sorted(outputs)}")

    def call(x):
        try:
            out = module(x)
        except (TypeError, ValueError):
            out = module(x, training=False)
        return out[output_name] if isinstance(out, dict) else out

    return _Entry(call, spec.shape.as_list() if spec.shape.rank is not None else [None] * 4,
                  spec.dtype, "__call__", output_name)


def _pick(named: dict, preferred: tuple) -> Optional[str]:
    if len(named) == 1:
        return next(iter(named))
    return next((n for n in preferred if n in named), None)


def _spec(entry: _Entry, fmt: str, normalize: str, image_size: int, model_uri: str,
          tf: Any) -> ModelSpec:
    shape, dtype = entry.shape, entry.dtype
    found = f"{dtype.name} {shape}"
    if len(shape) != 4:
        raise ModelError(f"expected a rank-4 image input [batch, height, width, 3] in "
                         f"{model_uri}; found {found}")
    if shape[3] == 3:
        layout, (height, width) = "NHWC", shape[1:3]
    elif shape[1] == 3:
        layout, (height, width) = "NCHW", shape[2:4]
    else:
        raise ModelError(f"expected 3 colour channels (RGB) in the input of {model_uri}; "
                         f"found {found}")
    if not dtype.is_floating:
        raise ModelError(f"expected a float image input in {model_uri}; found {found}")
    size, size_from = picture_size(height, width, image_size, model_uri)
    return ModelSpec(format=fmt, image_size=size, layout=layout, width=0,
                     normalize=normalize, input_name=entry.input_name,
                     output_name=entry.output_name, size_from=size_from)


def _wrap(entry: _Entry, spec: ModelSpec):
    tf = import_tensorflow()
    size = spec.image_size
    scale, offset = scale_and_offset(spec.normalize)

    # One trace for every batch size. Call it only with uint8 [n, size, size, 3]
    # (see inference._stacked): a mismatching input leaves the function locked.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def embed(images):
        x = tf.cast(images, tf.float32)
        if spec.normalize == "unit":
            x = x / 255.0  # as the pipeline has always scaled: same bits as before
        else:
            x = x * tf.constant(scale) + tf.constant(offset)
        if spec.layout == "NCHW":
            x = tf.transpose(x, [0, 3, 1, 2])
        out = entry.call(tf.cast(x, entry.dtype))
        return tf.cast(out, tf.float32)

    return embed
