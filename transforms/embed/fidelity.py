"""Does another precision leave a run's embeddings where float32 puts them?

A precision other than float32 (`--precision auto`, transforms/embed/auto_precision.py)
is acceptable only if, on a sample of the run's own pictures, every picture's
embedding stays close to its float32 one and each picture's nearest neighbour
within the sample stays the same: retrieval is what embeddings are for.
numpy only.
"""
from __future__ import annotations

import numpy as np

COSINE_MIN = 0.995            # every sampled picture's cosine to float32
NEIGHBOUR_AGREEMENT_MIN = 0.95  # share of pictures whose nearest neighbour is unchanged


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [n, d] embedding matrices."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(candidate, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-30)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine: what a search over
    the run's embeddings returns first, the thing a precision must not change."""
    e = np.asarray(embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    similarity = e @ e.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(1)


def self_check(reference: np.ndarray, candidate: np.ndarray,
               cosine_min: float = COSINE_MIN,
               agreement_min: float = NEIGHBOUR_AGREEMENT_MIN) -> dict:
    """Whether `candidate` (the same pictures in another precision) may stand
    in for `reference` (float32): each picture's cosine >= cosine_min and
    each picture's nearest neighbour within the sample unchanged for at
    least agreement_min of them."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) < 2:
        raise ValueError(f"expected two [n >= 2, d] matrices of the same shape; found "
                         f"{list(reference.shape)} and {list(candidate.shape)}")
    cos = cosines(reference, candidate)
    agreement = float((nearest_neighbours(reference) == nearest_neighbours(candidate)).mean())
    finite = bool(np.isfinite(candidate).all())
    return {"images": int(len(cos)), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()), "neighbour_agreement": agreement,
            "passed": finite and float(cos.min()) >= cosine_min and agreement >= agreement_min}
