"""Inception-v4 (TF-slim's `inception_v4_base`), on any backend, random weights.

The real fungi embedder is an Inception-v4, so the stand-in uses its exact
backbone (batch norm folded into conv biases): throughput and memory measured
with the stand-in are those of the real model (~12.3 GMAC per 299x299 image).
Scope names follow TF-slim, so variables read `InceptionV4/Mixed_5b/...`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from pipeline.models.backend import Backend
from pipeline.models.random_weights import RandomWeights, random_conv as _conv

Block = Callable[[Backend, RandomWeights, Any], Any]


def _branch(b: Backend, name: str, fn: Callable[[], Any]) -> Any:
    with b.scope(name):
        return fn()


def _max_pool(b: Backend, x: Any) -> Any:
    return b.max_pool(x, 3, 2, "VALID")


def _avg_pool(b: Backend, x: Any) -> Any:
    return b.avg_pool(x, 3, 1, "SAME")


def _inception_a(b: Backend, w: RandomWeights, x: Any) -> Any:
    """35x35x384 -> 35x35x384."""
    return b.concat([
        _branch(b, "Branch_0", lambda: _conv(b, w, x, 96, (1, 1), "Conv2d_0a_1x1")),
        _branch(b, "Branch_1", lambda: _conv(
            b, w, _conv(b, w, x, 64, (1, 1), "Conv2d_0a_1x1"), 96, (3, 3), "Conv2d_0b_3x3")),
        _branch(b, "Branch_2", lambda: _conv(b, w, _conv(
            b, w, _conv(b, w, x, 64, (1, 1), "Conv2d_0a_1x1"), 96, (3, 3), "Conv2d_0b_3x3"),
            96, (3, 3), "Conv2d_0c_3x3")),
        _branch(b, "Branch_3", lambda: _conv(b, w, _avg_pool(b, x), 96, (1, 1),
                                             "Conv2d_0b_1x1")),
    ])


def _reduction_a(b: Backend, w: RandomWeights, x: Any) -> Any:
    """35x35x384 -> 17x17x1024."""
    def branch_1() -> Any:
        y = _conv(b, w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(b, w, y, 224, (3, 3), "Conv2d_0b_3x3")
        return _conv(b, w, y, 256, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    return b.concat([
        _branch(b, "Branch_0", lambda: _conv(
            b, w, x, 384, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")),
        _branch(b, "Branch_1", branch_1),
        _branch(b, "Branch_2", lambda: _max_pool(b, x)),
    ])


def _inception_b(b: Backend, w: RandomWeights, x: Any) -> Any:
    """17x17x1024 -> 17x17x1024."""
    def branch_1() -> Any:
        y = _conv(b, w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(b, w, y, 224, (1, 7), "Conv2d_0b_1x7")
        return _conv(b, w, y, 256, (7, 1), "Conv2d_0c_7x1")

    def branch_2() -> Any:
        y = _conv(b, w, x, 192, (1, 1), "Conv2d_0a_1x1")
        y = _conv(b, w, y, 192, (7, 1), "Conv2d_0b_7x1")
        y = _conv(b, w, y, 224, (1, 7), "Conv2d_0c_1x7")
        y = _conv(b, w, y, 224, (7, 1), "Conv2d_0d_7x1")
        return _conv(b, w, y, 256, (1, 7), "Conv2d_0e_1x7")

    return b.concat([
        _branch(b, "Branch_0", lambda: _conv(b, w, x, 384, (1, 1), "Conv2d_0a_1x1")),
        _branch(b, "Branch_1", branch_1),
        _branch(b, "Branch_2", branch_2),
        _branch(b, "Branch_3", lambda: _conv(b, w, _avg_pool(b, x), 128, (1, 1),
                                             "Conv2d_0b_1x1")),
    ])


def _reduction_b(b: Backend, w: RandomWeights, x: Any) -> Any:
    """17x17x1024 -> 8x8x1536."""
    def branch_0() -> Any:
        y = _conv(b, w, x, 192, (1, 1), "Conv2d_0a_1x1")
        return _conv(b, w, y, 192, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    def branch_1() -> Any:
        y = _conv(b, w, x, 256, (1, 1), "Conv2d_0a_1x1")
        y = _conv(b, w, y, 256, (1, 7), "Conv2d_0b_1x7")
        y = _conv(b, w, y, 320, (7, 1), "Conv2d_0c_7x1")
        return _conv(b, w, y, 320, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")

    return b.concat([
        _branch(b, "Branch_0", branch_0),
        _branch(b, "Branch_1", branch_1),
        _branch(b, "Branch_2", lambda: _max_pool(b, x)),
    ])


def _inception_c(b: Backend, w: RandomWeights, x: Any) -> Any:
    """8x8x1536 -> 8x8x1536."""
    def branch_1() -> Any:
        y = _conv(b, w, x, 384, (1, 1), "Conv2d_0a_1x1")
        return b.concat([_conv(b, w, y, 256, (1, 3), "Conv2d_0b_1x3"),
                         _conv(b, w, y, 256, (3, 1), "Conv2d_0c_3x1")])

    def branch_2() -> Any:
        y = _conv(b, w, x, 384, (1, 1), "Conv2d_0a_1x1")
        y = _conv(b, w, y, 448, (3, 1), "Conv2d_0b_3x1")
        y = _conv(b, w, y, 512, (1, 3), "Conv2d_0c_1x3")
        return b.concat([_conv(b, w, y, 256, (1, 3), "Conv2d_0d_1x3"),
                         _conv(b, w, y, 256, (3, 1), "Conv2d_0e_3x1")])

    return b.concat([
        _branch(b, "Branch_0", lambda: _conv(b, w, x, 256, (1, 1), "Conv2d_0a_1x1")),
        _branch(b, "Branch_1", branch_1),
        _branch(b, "Branch_2", branch_2),
        _branch(b, "Branch_3", lambda: _conv(b, w, _avg_pool(b, x), 256, (1, 1),
                                             "Conv2d_0b_1x1")),
    ])


def _stem(b: Backend, w: RandomWeights, x: Any) -> Any:
    """299x299x3 -> 35x35x384."""
    x = _conv(b, w, x, 32, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID", relu_input=False)
    x = _conv(b, w, x, 32, (3, 3), "Conv2d_2a_3x3", padding="VALID")
    x = _conv(b, w, x, 64, (3, 3), "Conv2d_2b_3x3")
    with b.scope("Mixed_3a"):
        x = b.concat([
            _branch(b, "Branch_0", lambda: _max_pool(b, x)),
            _branch(b, "Branch_1", lambda: _conv(
                b, w, x, 96, (3, 3), "Conv2d_0a_3x3", stride=2, padding="VALID")),
        ])
    with b.scope("Mixed_4a"):
        def branch_0() -> Any:
            y = _conv(b, w, x, 64, (1, 1), "Conv2d_0a_1x1")
            return _conv(b, w, y, 96, (3, 3), "Conv2d_1a_3x3", padding="VALID")

        def branch_1() -> Any:
            y = _conv(b, w, x, 64, (1, 1), "Conv2d_0a_1x1")
            y = _conv(b, w, y, 64, (1, 7), "Conv2d_0b_1x7")
            y = _conv(b, w, y, 64, (7, 1), "Conv2d_0c_7x1")
            return _conv(b, w, y, 96, (3, 3), "Conv2d_1a_3x3", padding="VALID")

        x = b.concat([_branch(b, "Branch_0", branch_0), _branch(b, "Branch_1", branch_1)])
    with b.scope("Mixed_5a"):
        x = b.concat([
            _branch(b, "Branch_0", lambda: _conv(
                b, w, x, 192, (3, 3), "Conv2d_1a_3x3", stride=2, padding="VALID")),
            _branch(b, "Branch_1", lambda: _max_pool(b, x)),
        ])
    return x


BLOCKS: Sequence[tuple[str, Block]] = (
    [(f"Mixed_5{c}", _inception_a) for c in "bcde"]
    + [("Mixed_6a", _reduction_a)]
    + [(f"Mixed_6{c}", _inception_b) for c in "bcdefgh"]
    + [("Mixed_7a", _reduction_b)]
    + [(f"Mixed_7{c}", _inception_c) for c in "bcd"])


def inception_v4_features(b: Backend, w: RandomWeights, x: Any) -> Any:
    """Inception-v4 + global average pool: [N, 1536]. Input in [-1, 1]."""
    with b.scope("InceptionV4"):
        x = _stem(b, w, x)
        for name, block in BLOCKS:
            with b.scope(name):
                x = block(b, w, x)
        return b.global_mean(x, name="global_pool")
