"""What a format writer needs to know about an architecture, whatever its weights.

A `Network` is an architecture with its weights bound: the format writers
(`pipeline.models.formats`) only see its input size, output width, input
scaling and `forward`. `forward` may be called more than once (the TF2 writer
runs it eagerly, then traces it), and must build the same network each time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from pipeline.models.backend import Backend


@dataclasses.dataclass(frozen=True)
class Network:
    """An architecture with its weights, ready to be written in any format.

    Attributes:
      name: the architecture (`--arch`).
      image_size: S of the `[N, S, S, 3]` input.
      output_dim: D of the `[N, D]` output.
      input_scale, input_shift: how the architecture maps RGB in [0, 1] to what
        its first layer was trained on (`x * scale + shift`, per channel or
        one value for all).
      forward: builds the network on a backend, from the already scaled input.
      summary: one line for the user on what the weights are.
    """

    name: str
    image_size: int
    output_dim: int
    input_scale: np.ndarray
    input_shift: np.ndarray
    forward: Callable[[Backend, Any], Any]
    summary: str


def apply(net: Network, backend: Backend, images: Any) -> Any:
    """The network on RGB in [0, 1]: its own input scaling, then its layers."""
    return net.forward(backend, backend.affine(images, net.input_scale, net.input_shift))
