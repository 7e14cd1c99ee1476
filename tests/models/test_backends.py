"""Each backend op computes the same in TensorFlow and in ONNX Runtime.

The whole-network agreement tests would show a difference but not where it
comes from; these pin down the semantics that differ between the two worlds:
TF "SAME" padding with its odd pixel at the end (odd and even sizes, strides
1 and 2, non-square kernels), average pools that skip padded pixels,
depthwise kernels, and layouts (HWIO vs OIHW, NHWC vs NCHW).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf

from pipeline.models.tf_backend import TF2Variables, TFBackend

pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

rng = np.random.default_rng(0)


def _random(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _run_both(build: Callable[[Any, Any], Any], size: int, channels: int = 4,
              batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`build` on TF (eager) and on ONNX Runtime; outputs as NHWC / [N, C]."""
    from pipeline.models.onnx_backend import OnnxBackend
    images = _random(batch, size, size, channels)
    tf_out = build(TFBackend(TF2Variables()), tf.constant(images)).numpy()
    backend = OnnxBackend()
    x = backend.input("x", channels, size)
    model = backend.model(x, build(backend, x), "y", graph_name="op", doc="")
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["y"], {"x": images.transpose(0, 3, 1, 2)})
    if onnx_out.ndim == 4:
        onnx_out = onnx_out.transpose(0, 2, 3, 1)
    return tf_out, onnx_out


K33, K17, K71 = _random(3, 3, 4, 8), _random(1, 7, 4, 8), _random(7, 1, 4, 8)
DW55, DW33 = _random(5, 5, 1, 4), _random(3, 3, 1, 4)
B8, B4, B3, D43 = _random(8), _random(4), _random(3), _random(4, 3)

CASES: dict[str, tuple[Callable[[Any, Any], Any], int]] = {
    "conv 3x3 stride 2 SAME, odd size": (
        lambda b, x: b.conv(x, K33, B8, stride=2, padding="SAME"), 7),
    "conv 3x3 stride 2 SAME, even size": (
        lambda b, x: b.conv(x, K33, B8, stride=2, padding="SAME"), 8),
    "conv 3x3 stride 2 VALID": (lambda b, x: b.conv(x, K33, B8, stride=2, padding="VALID"), 9),
    "conv 1x7 SAME, no bias": (lambda b, x: b.conv(x, K17, None), 9),
    "conv 7x1 SAME": (lambda b, x: b.conv(x, K71, B8), 9),
    "depthwise 5x5 stride 2 SAME": (
        lambda b, x: b.conv(x, DW55, B4, stride=2, padding="SAME", groups=4), 9),
    "depthwise 3x3 stride 1 SAME": (
        lambda b, x: b.conv(x, DW33, B4, stride=1, padding="SAME", groups=4), 6),
    "max pool 3 stride 2 VALID": (lambda b, x: b.max_pool(x, 3, 2, "VALID"), 9),
    "max pool 3 stride 2 SAME": (lambda b, x: b.max_pool(x, 3, 2, "SAME"), 8),
    "avg pool 3 stride 1 SAME skips padding": (lambda b, x: b.avg_pool(x, 3, 1, "SAME"), 5),
    "avg pool 3 stride 2 SAME skips padding": (lambda b, x: b.avg_pool(x, 3, 2, "SAME"), 8),
    "relu6 and relu": (lambda b, x: b.relu(b.relu6(b.affine(x, np.float32([4]),
                                                              np.float32([1])))), 4),
    "affine per channel": (lambda b, x: b.affine(x, np.float32([1, 2, 3, 4]),
                                                 np.float32([0, -1, 1, 2])), 4),
    "concat and add": (lambda b, x: b.add(b.concat([x, b.relu(x)]),
                                          b.concat([b.relu(x), x])), 5),
    "global mean and dense": (lambda b, x: b.dense(b.global_mean(x), D43, B3), 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_agrees(case):
    build, size = CASES[case]
    tf_out, onnx_out = _run_both(build, size)
    assert tf_out.shape == onnx_out.shape
    np.testing.assert_allclose(onnx_out, tf_out, rtol=1e-5, atol=1e-5)


def test_avg_pool_really_skips_padding():
    """A corner of a constant image stays that constant only if padding is skipped."""
    def build(b, x):
        return b.avg_pool(b.affine(b.relu(x), np.float32([0]), np.float32([1])), 3, 1, "SAME")

    tf_out, onnx_out = _run_both(build, 4)
    np.testing.assert_allclose(tf_out, 1.0, rtol=1e-6)
    np.testing.assert_allclose(onnx_out, 1.0, rtol=1e-6)


def test_refuses_grouped_convolutions():
    with pytest.raises(ValueError, match="only plain .* or depthwise"):
        _run_both(lambda b, x: b.conv(x, _random(3, 3, 2, 4), None, groups=2), 5)
