"""The stand-ins for the withdrawn fungi embedder: random weights, real shapes.

`svampeatlas/vision/embedder/fungi_V2/1` is no longer downloadable, yet tests,
benchmarks and demos need a model with its contract (299x299 RGB in [0, 1] in,
`embedding_dim` floats out). A stand-in is a backbone plus a linear projection
to `embedding_dim`, with deterministic random weights (see
`pipeline.models.random_weights`): for contract, format, speed and memory,
never for the quality of the embeddings.

* `inception_v4`: the real model's backbone, the real model's cost.
* `tiny`: four strided convolutions, for fast tests.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.models.backend import Backend
from pipeline.models.inception_v4 import inception_v4_features
from pipeline.models.network import Network
from pipeline.models.random_weights import RandomWeights, random_conv

IMAGE_SIZE = 299

Features = Callable[[Backend, RandomWeights, Any], Any]


def tiny_features(b: Backend, w: RandomWeights, x: Any) -> Any:
    """Four stride-2 convolutions + global average pool: [N, 64]; cheap on purpose."""
    with b.scope("Tiny"):
        for i, filters in enumerate((16, 32, 64, 64)):
            x = random_conv(b, w, x, filters, (3, 3), f"Conv2d_{i}", stride=2,
                            relu_input=i > 0)
        return b.global_mean(x, name="global_pool")


FEATURES: dict[str, Features] = {
    "inception_v4": inception_v4_features,
    "tiny": tiny_features,
}


def _project(b: Backend, w: RandomWeights, features: Any, embedding_dim: int) -> Any:
    """Linear map of the pooled features to the embedding width (no activation)."""
    with b.scope("Embedding"):
        # The pooled features are averaged ReLU outputs, hence relu_input.
        weights = w.kernel((b.channels(features), embedding_dim), relu_input=True)
        return b.dense(features, weights, w.bias(embedding_dim))


def standin(arch: str, embedding_dim: int, seed: int) -> Network:
    """The stand-in `arch` with the weights `seed` draws."""
    features = FEATURES[arch]

    def forward(b: Backend, x: Any) -> Any:
        # Fresh draws on every call, so every pass builds the same weights.
        weights = RandomWeights(seed)
        return _project(b, weights, features(b, weights, x), embedding_dim)

    # Hub image modules take RGB in [0, 1]; Inception works on [-1, 1].
    return Network(
        name=arch, image_size=IMAGE_SIZE, output_dim=embedding_dim,
        input_scale=np.float32([2.0]), input_shift=np.float32([-1.0]), forward=forward,
        summary=(f"a STAND-IN for svampeatlas/vision/embedder/fungi_V2/1 ({arch}, "
                 f"{embedding_dim}-d, seed {seed}): random weights, no fungus knowledge"))
