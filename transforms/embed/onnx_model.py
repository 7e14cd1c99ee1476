"""ONNX embedders (PyTorch exports such as BioCLIP or DINOv2), through ONNX Runtime.

PyTorch models are commonly exported to ONNX with an NCHW input that expects
ImageNet or CLIP mean/std normalisation; the layout is read from the model's
input (which dimension holds the 3 channels), the normalisation is the
`--normalize` flag, since an ONNX file does not declare it. Pixels are scaled
and laid out in numpy (one fused multiply-add per value) before the session
runs. One session per process; ONNX Runtime releases the GIL while it runs.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from transforms.embed.model_files import onnx_path
from transforms.embed.spec import ModelError, ModelSpec, picture_size, scale_and_offset
from transforms.embed.tf_model import OUTPUT_NAMES

FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64}


class OnnxModel:
    """An ONNX Runtime session and its uint8 → embedding function."""

    def __init__(self, session: Any, spec: ModelSpec, input_type: Any):
        self.session = session
        self.spec = spec
        self._input_type = input_type
        scale, offset = scale_and_offset(spec.normalize)
        self._scale = np.asarray(scale, np.float32)
        self._offset = np.asarray(offset, np.float32)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32) * self._scale + self._offset
        if self.spec.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        (out,) = self.session.run([self.spec.output_name],
                                  {self.spec.input_name: x.astype(self._input_type, copy=False)})
        return np.asarray(out, dtype=np.float32)


def load_onnx(local: str, model_uri: str, normalize: str, image_size: int = 0,
              threads: int = 0) -> OnnxModel:
    try:
        import onnxruntime as ort
    except ImportError as err:  # a pinned dependency; only a broken install lacks it
        raise ModelError(f"{model_uri} is an ONNX model, which needs onnxruntime "
                         f"(pip install onnxruntime): {err}") from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-node placement notes
    try:
        session = ort.InferenceSession(onnx_path(local), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ModelError(f"expected an ONNX model at {model_uri}; loading it failed: "
                         f"{str(err)[:300]}") from err
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"expected one image input in {model_uri}; found "
                         f"{[(i.name, i.shape) for i in inputs]}")
    spec_input = inputs[0]
    found = f"{spec_input.type} {spec_input.shape}"
    if spec_input.type not in FLOAT_TYPES:
        raise ModelError(f"expected a float image input in {model_uri}; found {found}")
    layout, (height, width) = _layout(spec_input.shape, model_uri, found)
    size, size_from = picture_size(height, width, image_size, model_uri)
    output = _output(session.get_outputs(), model_uri)
    spec = ModelSpec(format="onnx", image_size=size, layout=layout, width=0,
                     normalize=normalize, input_name=spec_input.name, output_name=output,
                     size_from=size_from)
    return OnnxModel(session, spec, FLOAT_TYPES[spec_input.type])


def _dim(value: Any) -> Optional[int]:
    """A fixed dimension, or None for a symbolic one ('batch', 'height')."""
    return value if isinstance(value, int) and value > 0 else None


def _layout(shape: list, model_uri: str, found: str) -> tuple[str, tuple]:
    if len(shape) != 4:
        raise ModelError(f"expected a rank-4 image input in {model_uri}; found {found}")
    dims = [_dim(d) for d in shape]
    if dims[1] == 3 and dims[3] != 3:
        return "NCHW", (dims[2], dims[3])
    if dims[3] == 3:
        return "NHWC", (dims[1], dims[2])
    raise ModelError(f"expected 3 colour channels (RGB, NCHW or NHWC) in the input of "
                     f"{model_uri}; found {found}")


def _output(outputs: list, model_uri: str) -> str:
    """The embedding output: the only one, or a well-known name among rank-2 floats."""
    candidates = [o for o in outputs if o.type in FLOAT_TYPES and len(o.shape or []) == 2]
    if len(outputs) == 1:
        out = outputs[0]
        if out.type not in FLOAT_TYPES:
            raise ModelError(f"expected a float embedding output in {model_uri}; found "
                             f"{out.name} {out.type} {out.shape}")
        return out.name
    named = {o.name: o for o in candidates}
    choice = next((n for n in OUTPUT_NAMES if n in named), None)
    if choice is None and len(candidates) == 1:
        choice = candidates[0].name
    if choice is None:
        raise ModelError(f"expected one embedding output (a float [batch, width] tensor) in "
                         f"{model_uri}; found {[(o.name, o.type, o.shape) for o in outputs]}")
    return choice
