"""Deterministic random weights for the stand-in embedders.

Values are drawn in request order from one `numpy.random.default_rng(seed)`,
so the same seed and architecture give the same weights on any machine and in
every format (the formats build the same network, requesting the same arrays
in the same order).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline.models.backend import Backend

# Folded batch norm leaves a (small) bias per channel; a non-zero bias also keeps
# the random network from being scale-invariant (f(a*x) == a*f(x)).
BIAS_STD = 0.01


class RandomWeights:
    """He-normal kernels and small biases, drawn in request order."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def kernel(self, shape: Sequence[int], relu_input: bool) -> np.ndarray:
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
        return value * np.float32(std)

    def bias(self, size: int) -> np.ndarray:
        """A small random bias, standing in for a folded batch norm's offset."""
        return self._rng.standard_normal((size,), dtype=np.float32) * np.float32(BIAS_STD)


def random_conv(b: Backend, w: RandomWeights, x: Any, filters: int, kernel: tuple[int, int],
                name: str, stride: int = 1, padding: str = "SAME",
                relu_input: bool = True) -> Any:
    """Conv + bias + ReLU (a conv with its batch norm folded in), random weights.

    The kernel is drawn before the bias, layer by layer in network order: the
    order the stand-ins have always drawn them, so a seed keeps its weights.
    """
    with b.scope(name):
        weights = w.kernel((*kernel, b.channels(x), filters), relu_input)
        return b.relu(b.conv(x, weights, w.bias(filters), stride, padding))
