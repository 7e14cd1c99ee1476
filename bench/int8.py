"""int8 inference of an embedder through ONNX Runtime, for `bench/precision.py`.

Evaluated, not adopted: on the trained test model int8 either fails the
self-check or, kept partly in float to pass it, is no faster than float32 in
ONNX Runtime (see the README's Performance section). The pieces stay here so
that the figures can be measured again, on any CPU.

int8 is ONNX Runtime's static post-training quantisation (QDQ format, uint8
activations, int8 weights per output channel, MinMax ranges); TF models reach
it through `bench.int8_convert.tf_to_onnx`. Two facts measured on the trained
EfficientNet-Lite0 decide how:

* x86 CPUs without VNNI multiply uint8 by int8 with `vpmaddubsw`, whose
  16-bit pair sums saturate: ONNX Runtime's fast kernel then gives cosine
  0.56 to float32. `session.x64quantprecision = 1` selects its exact (slower)
  kernel, so `load_quantized` sets it wherever the CPU lacks VNNI.
* The graph's leading element-wise nodes (its own scaling of the input) are
  kept in float: quantising the normalised input to 8 bits throws away
  pixel levels. `float_head` / `float_tail` keep a share of the first and last
  compute nodes (Conv, Gemm, MatMul) in float too, trading speed for fidelity.

Needs: onnx and onnxruntime (`quantize_onnx`), onnxruntime (`load_quantized`),
imported when called.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Iterator, Optional

import numpy as np

from transforms.embed.spec import ModelSpec, scale_and_offset

CALIBRATION_PICTURES = 32
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_CALIBRATION_BATCH = 8


# ------------------------------------------------------------------ inputs

def model_input(pixels: np.ndarray, spec: ModelSpec, input_type: str = "tensor(float)"
                ) -> np.ndarray:
    """uint8 NHWC pictures → what the ONNX graph takes, exactly as
    `OnnxModel.embed` makes it (per-channel scale and offset, then layout);
    a graph with a uint8 input (a converted TF model) scales them itself."""
    if input_type == "tensor(uint8)":
        return np.ascontiguousarray(pixels, np.uint8)
    scale, offset = scale_and_offset(spec.normalize)
    x = pixels.astype(np.float32) * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)
    if spec.layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x.astype(np.float16 if input_type == "tensor(float16)" else np.float32, copy=False)


def cpu_has_vnni(flags: Optional[set] = None) -> bool:
    """uint8 x int8 dot products without 16-bit saturation (VNNI or AMX)."""
    if flags is None:
        from transforms.embed.precision import cpu_flags
        flags = cpu_flags()
    return bool(set(VNNI_FLAGS) & flags)


# ------------------------------------------------------------------ quantise

def quantize_onnx(src_path: str, calibration_pixels: np.ndarray, spec: ModelSpec,
                  dst_path: str, *, float_head: float = 0.0, float_tail: float = 0.0,
                  ranges_path: Optional[str] = None) -> str:
    """Writes an int8 (QDQ) copy of the ONNX model at src_path to dst_path,
    its activation ranges measured on `calibration_pixels` (uint8 NHWC, the
    run's own pictures as decoded for this model); returns dst_path.

    float_head / float_tail: shares (0..1) of the compute nodes, first and
    last in graph order, left in float32. ranges_path: a JSON file of the
    measured activation ranges, written on the first call and read (skipping
    calibration: a quarter to a third of the time) by later calls on the model,
    so that trying several float shares calibrates once. The write is atomic.
    """
    import onnx
    from onnxruntime import quantization as q

    pixels = np.asarray(calibration_pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or not len(pixels):
        raise ValueError(f"expected uint8 calibration pictures [n, S, S, 3]; found "
                         f"{pixels.dtype} {list(pixels.shape)}")
    folder = os.path.dirname(os.path.abspath(dst_path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=folder) as work:
        prepared = os.path.join(work, "prepared.onnx")
        # Shape inference and graph fusions; sympy's symbolic shapes are not needed
        # for image models with one symbolic (batch) dimension.
        q.quant_pre_process(src_path, prepared, skip_symbolic_shape=True)
        model = onnx.load(prepared)
        graph_input = model.graph.input[0]
        input_type = _onnx_type(graph_input)
        reader = _Reader(graph_input.name, model_input(pixels, spec, input_type))
        excluded = float_nodes(model, float_head, float_tail)
        onnx.save(model, prepared)  # with the names float_nodes gave unnamed nodes
        out = os.path.join(work, "int8.onnx")
        q.quantize_static(prepared, out, reader, quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          per_channel=True, calibrate_method=q.CalibrationMethod.MinMax,
                          nodes_to_exclude=excluded, calibration_cache_path=ranges_path)
        os.replace(out, dst_path)
    return dst_path


def float_nodes(model: Any, float_head: float = 0.0, float_tail: float = 0.0) -> list[str]:
    """Names of the nodes to keep in float: those before the first compute
    node (the graph's own input scaling), plus the first `float_head` and last
    `float_tail` shares of the compute nodes and everything between them."""
    nodes = list(model.graph.node)
    compute = [i for i, n in enumerate(nodes) if n.op_type in COMPUTE_OPS]
    if not compute:
        return []
    head = int(round(float_head * len(compute)))
    tail = int(round(float_tail * len(compute)))
    start = compute[head] if head < len(compute) else len(nodes)
    end = compute[len(compute) - tail] if tail else len(nodes)
    return [_name(n, i) for i, n in enumerate(nodes) if i < start or i >= end]


def _name(node: Any, index: int) -> str:
    if not node.name:  # the quantiser matches nodes by name; give unnamed ones theirs
        node.name = f"{node.op_type}_{index}"
    return node.name


def _onnx_type(value_info: Any) -> str:
    """The input's type as onnxruntime names it ("tensor(float)", ...)."""
    import onnx
    names = {onnx.TensorProto.UINT8: "tensor(uint8)", onnx.TensorProto.FLOAT16: "tensor(float16)"}
    return names.get(value_info.type.tensor_type.elem_type, "tensor(float)")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared inputs."""

    def __init__(self, name: str, inputs: np.ndarray):
        self.name, self.inputs = name, inputs
        self._batches: Iterator = iter(())
        self.rewind()

    def get_next(self) -> Optional[dict]:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = iter([{self.name: self.inputs[i:i + _CALIBRATION_BATCH]}
                              for i in range(0, len(self.inputs), _CALIBRATION_BATCH)])

    def __len__(self) -> int:
        return -(-len(self.inputs) // _CALIBRATION_BATCH)


# ------------------------------------------------------------------ run

class QuantizedModel:
    """An int8 ONNX Runtime session with the loaded models' interface:
    `.spec` and `.embed(uint8 [n, S, S, 3]) -> float32 [n, D]`."""

    def __init__(self, session: Any, spec: ModelSpec, precise: bool):
        self.session, self.spec, self.precise = session, spec, precise
        graph_input = session.get_inputs()[0]
        self._input_name, self._input_type = graph_input.name, graph_input.type
        self._output_name = session.get_outputs()[0].name

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = model_input(pixels, self.spec, self._input_type)
        (out,) = self.session.run([self._output_name], {self._input_name: x})
        return np.asarray(out, dtype=np.float32)


def load_quantized(path: str, spec: ModelSpec, threads: int = 0,
                   precise: Optional[bool] = None) -> QuantizedModel:
    """The int8 model at `path` in an ONNX Runtime session. `precise` (default:
    this CPU lacks VNNI) selects the non-saturating uint8 x int8 kernel,
    without which a CPU without VNNI gives wrong embeddings."""
    import onnxruntime as ort
    if precise is None:
        precise = not cpu_has_vnni()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.x64quantprecision", "1" if precise else "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return QuantizedModel(session, spec, precise)


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result, seconds): conversion and calibration are a run's fixed cost."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
