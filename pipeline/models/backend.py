"""The small set of ops every architecture here is written against.

Each architecture is described once, as calls on a `Backend`, and each model
format is a backend: TensorFlow (for TF1 Hub graphs and TF2 `tf.function`s
alike) and ONNX. Writing the networks once is what makes the three formats of
one architecture compute the same function: there is no second copy of a
network to drift out of step.

Conventions every backend honours, so that architectures never need to know
which one they run on:

* Images are NHWC to the architecture; a backend may hold them in another
  layout (ONNX holds NCHW) but `channels` and the channel axis of `concat`,
  `affine` and the pools refer to the same logical axis.
* Kernels are numpy arrays in TF's grouped HWIO layout:
  `[kh, kw, in_channels // groups, out_channels]`. Dense weights are
  `[in, out]`. Backends transpose as their format needs.
* Padding is TF's: "VALID", or "SAME" (output `ceil(in / stride)`, the odd
  pixel of padding at the end). Average pools never count padded pixels.
* Only `groups == 1` and depthwise (`groups == in_channels == out_channels`)
  convolutions exist: TensorFlow has no other grouped convolution on CPU.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

PADDINGS = ("SAME", "VALID")


class Backend(Protocol[T]):
    """Builds a network in one format; `T` is that format's tensor type."""

    def scope(self, name: str) -> ContextManager[None]:
        """Names what is created inside, like TF's variable scopes."""

    def channels(self, x: T) -> int:
        """The channel (last logical) dimension of x."""

    def conv(self, x: T, kernel: np.ndarray, bias: np.ndarray | None, stride: int = 1,
             padding: str = "SAME", groups: int = 1) -> T:
        """2-D convolution, kernel `[kh, kw, cin // groups, cout]`, plus bias."""

    def relu(self, x: T) -> T: ...

    def relu6(self, x: T) -> T: ...

    def max_pool(self, x: T, size: int, stride: int, padding: str) -> T: ...

    def avg_pool(self, x: T, size: int, stride: int, padding: str) -> T:
        """Average over the window's real pixels only (TF semantics)."""

    def concat(self, xs: Sequence[T]) -> T:
        """Along channels."""

    def add(self, a: T, b: T) -> T: ...

    def global_mean(self, x: T, name: str = "global_pool") -> T:
        """Mean over height and width: `[N, C]`."""

    def dense(self, x: T, weights: np.ndarray, bias: np.ndarray) -> T:
        """`x @ weights + bias` on `[N, in]` features."""

    def affine(self, x: T, scale: np.ndarray, shift: np.ndarray) -> T:
        """`x * scale + shift` per channel (arrays of length 1 or C)."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial axis, as (before, after).

    Formats that take explicit pads (ONNX) need the numbers TF derives
    implicitly; putting the odd pixel after is what makes stride-2 layers
    agree with TF.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """Spatial size after a conv or pool with TF padding."""
    if padding == "SAME":
        return -(-size // stride)
    if padding == "VALID":
        return (size - kernel) // stride + 1
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def check_groups(kernel: np.ndarray, in_channels: int, groups: int) -> None:
    """Refuses the grouped convolutions not every backend can run."""
    cout = kernel.shape[-1]
    if groups == 1:
        expected = in_channels
    elif groups == in_channels == cout:
        expected = 1
    else:
        raise ValueError(f"only plain (groups=1) or depthwise (groups=channels) convolutions "
                         f"are supported, got groups={groups} for {in_channels}->{cout}")
    if kernel.ndim != 4 or kernel.shape[2] != expected:
        raise ValueError(f"kernel must be [kh, kw, {expected}, cout] for {in_channels} input "
                         f"channels and groups={groups}, got {list(kernel.shape)}")


@contextlib.contextmanager
def nested(stack: list[str], name: str):
    """Pushes a scope name for the duration of a `with` block."""
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
