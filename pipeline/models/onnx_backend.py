"""The ONNX backend: the same ops as nodes of an ONNX graph, NCHW.

ONNX graphs are static lists of nodes with weights as initializers, so this
backend only needs to track each value's name and shape; nothing is computed
while building. Shapes are tracked so that TF's "SAME" padding can be written
as explicit pads (odd pixel at the end, as TF does): every runtime honours
explicit pads, while `auto_pad` is deprecated in the ONNX spec.

Kernels arrive in TF's HWIO layout (see `pipeline.models.backend`) and are
transposed to ONNX's OIHW; a depthwise kernel `[kh, kw, 1, C]` becomes
`[C, 1, kh, kw]` with `group=C`, which is the same transpose.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.models.backend import check_groups, nested, output_size, same_padding

OPSET = 17
# IR version 8 is the one that goes with opset 17: older runtimes can load it.
IR_VERSION = 8


@dataclasses.dataclass(frozen=True)
class Value:
    """A tensor of the graph: NCHW when `height` is set, else `[N, C]`."""

    name: str
    channels: int
    height: int | None = None
    width: int | None = None


class OnnxBackend:
    """The backend ops (see `pipeline.models.backend`) as ONNX nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._path: list[str] = []
        self._names: set[str] = set()
        self._clip: tuple[str, str] | None = None

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        with nested(self._path, name):
            yield

    def _unique(self, leaf: str) -> str:
        base = "/".join([*self._path, leaf])
        name, n = base, 0
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def _initializer(self, leaf: str, value: np.ndarray) -> str:
        name = self._unique(leaf)
        self.initializers.append(
            numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def _node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        output = self._unique(op)
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def input(self, name: str, channels: int, size: int) -> Value:
        self._names.add(name)
        return Value(name, channels, size, size)

    def channels(self, x: Value) -> int:
        return x.channels

    def conv(self, x: Value, kernel: np.ndarray, bias: np.ndarray | None, stride: int = 1,
             padding: str = "SAME", groups: int = 1) -> Value:
        check_groups(kernel, x.channels, groups)
        kh, kw, _, cout = kernel.shape
        inputs = [x.name, self._initializer("weights", kernel.transpose(3, 2, 0, 1))]
        if bias is not None:
            inputs.append(self._initializer("biases", bias))
        name = self._node("Conv", inputs, kernel_shape=[kh, kw], strides=[stride, stride],
                          pads=_pads(x, kh, kw, stride, padding), group=groups)
        return Value(name, cout, output_size(x.height, kh, stride, padding),
                     output_size(x.width, kw, stride, padding))

    def relu(self, x: Value) -> Value:
        return dataclasses.replace(x, name=self._node("Relu", [x.name]))

    def relu6(self, x: Value) -> Value:
        if self._clip is None:
            path, self._path = self._path, []
            self._clip = (self._initializer("relu6_min", np.float32(0.0)),
                          self._initializer("relu6_max", np.float32(6.0)))
            self._path = path
        return dataclasses.replace(x, name=self._node("Clip", [x.name, *self._clip]))

    def _pool(self, op: str, x: Value, size: int, stride: int, padding: str, **attrs) -> Value:
        name = self._node(op, [x.name], kernel_shape=[size, size], strides=[stride, stride],
                          pads=_pads(x, size, size, stride, padding), **attrs)
        return Value(name, x.channels, output_size(x.height, size, stride, padding),
                     output_size(x.width, size, stride, padding))

    def max_pool(self, x: Value, size: int, stride: int, padding: str) -> Value:
        return self._pool("MaxPool", x, size, stride, padding)

    def avg_pool(self, x: Value, size: int, stride: int, padding: str) -> Value:
        return self._pool("AveragePool", x, size, stride, padding, count_include_pad=0)

    def concat(self, xs: Sequence[Value]) -> Value:
        if len({(x.height, x.width) for x in xs}) != 1:
            raise ValueError(f"concat of different sizes: {[(x.height, x.width) for x in xs]}")
        name = self._node("Concat", [x.name for x in xs], axis=1)
        return dataclasses.replace(xs[0], name=name, channels=sum(x.channels for x in xs))

    def add(self, a: Value, b: Value) -> Value:
        if (a.channels, a.height, a.width) != (b.channels, b.height, b.width):
            raise ValueError(f"add of different shapes: {a} and {b}")
        return dataclasses.replace(a, name=self._node("Add", [a.name, b.name]))

    def global_mean(self, x: Value, name: str = "global_pool") -> Value:
        with self.scope(name):
            pooled = self._node("GlobalAveragePool", [x.name])
            return Value(self._node("Flatten", [pooled], axis=1), x.channels)

    def dense(self, x: Value, weights: np.ndarray, bias: np.ndarray) -> Value:
        if x.height is not None or weights.shape[0] != x.channels:
            raise ValueError(f"dense needs [N, {weights.shape[0]}] features, got {x}")
        inputs = [x.name, self._initializer("weights", weights), self._initializer("biases", bias)]
        return Value(self._node("Gemm", inputs), int(weights.shape[1]))

    def affine(self, x: Value, scale: np.ndarray, shift: np.ndarray) -> Value:
        shape = (1, -1, 1, 1) if x.height is not None else (1, -1)
        scale = np.asarray(scale, np.float32).reshape(shape)
        shift = np.asarray(shift, np.float32).reshape(shape)
        scaled = self._node("Mul", [x.name, self._initializer("scale", scale)])
        shifted = self._node("Add", [scaled, self._initializer("shift", shift)])
        return dataclasses.replace(x, name=shifted)

    def model(self, image: Value, output: Value, output_name: str, graph_name: str,
              doc: str) -> onnx.ModelProto:
        """The finished model: `image` in with a dynamic batch dim, `output_name` out."""
        self.nodes.append(helper.make_node("Identity", [output.name], [output_name],
                                           name=output_name))
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(image.name, onnx.TensorProto.FLOAT,
                                           ["batch", image.channels, image.height, image.width])],
            [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT,
                                           ["batch", output.channels])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="gbif-embed",
                                  doc_string=doc)
        onnx.checker.check_model(model)
        return model


def _pads(x: Value, kh: int, kw: int, stride: int, padding: str) -> list[int]:
    """ONNX pads `[top, left, bottom, right]` for TF padding."""
    if x.height is None:
        raise ValueError(f"a spatial op needs an image tensor, got {x}")
    output_size(x.height, kh, stride, padding)  # validates `padding`
    if padding == "VALID":
        return [0, 0, 0, 0]
    top, bottom = same_padding(x.height, kh, stride)
    left, right = same_padding(x.width, kw, stride)
    return [top, left, bottom, right]
