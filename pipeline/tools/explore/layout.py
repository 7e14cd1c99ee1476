"""The map: a 2-D layout of every embedding of a snapshot, computed once.

UMAP (umap-learn) gives the map people know from embedding explorers, but
fitting it on 565,000 points takes far longer than the 10 minutes a build
may take on 2 cores. So: PCA to 50 dimensions (scikit-learn), UMAP fitted
on a random sample of SAMPLE points, and every other point placed at the
similarity-weighted mean of its K nearest sampled points (exact inner
product search in faiss over the PCA vectors). Points of one species land
where their sampled neighbours are: the same clusters, at a fraction of the
cost. Tiny snapshots (too few points for UMAP's neighbourhood) get PCA's
first two components.
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from transforms.common.imports import without_modules

_LOG = logging.getLogger(__name__)

PCA_DIMS = 50
SAMPLE = 20_000
NEIGHBOURS = 15     # UMAP's n_neighbors
PLACE_K = 8         # sampled neighbours that place an unsampled point
MIN_UMAP = 32       # fewer points: PCA's plane
PLACE_BLOCK = 16_384


def layout(vectors: np.ndarray, seed: int = 0, sample: int = SAMPLE) -> np.ndarray:
    """[n, dim] unit vectors → [n, 2] float32 map coordinates in [0, 1]."""
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    reduced = _pca(vectors, min(PCA_DIMS, vectors.shape[1], n))
    if n < MIN_UMAP:
        plane = reduced[:, :2] if reduced.shape[1] >= 2 else np.pad(
            reduced, ((0, 0), (0, 2 - reduced.shape[1])))
        return _unit_square(plane)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    fitted = _umap(reduced[chosen], seed)
    out = np.zeros((n, 2), np.float32)
    out[chosen] = fitted
    rest = np.setdiff1d(np.arange(n), chosen, assume_unique=True)
    if len(rest):
        out[rest] = _place(reduced[chosen], fitted, reduced[rest])
    return _unit_square(out)


def _pca(vectors: np.ndarray, dims: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    fit_rows = vectors if len(vectors) <= 100_000 else vectors[
        np.random.default_rng(1).choice(len(vectors), 100_000, replace=False)]
    pca = PCA(n_components=dims, random_state=0).fit(fit_rows)
    return pca.transform(vectors).astype(np.float32)


def _import_umap():
    """umap-learn imports TensorFlow and Keras when it is imported (for
    ParametricUMAP, not used here): many seconds and hundreds of MB. They are
    hidden while it imports (it then goes without them), unless already loaded."""
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
        os.path.expanduser("~"), ".cache", "gbif-embed-numba"))
    import sklearn.base  # noqa: F401 (imported first: it looks at sys.modules itself)
    with without_modules("tensorflow", "keras"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap
    return umap


def _umap(points: np.ndarray, seed: int) -> np.ndarray:
    umap = _import_umap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state, and the like
        model = umap.UMAP(n_neighbors=min(NEIGHBOURS, len(points) - 1), n_components=2,
                          metric="cosine", random_state=seed, init="pca" if len(points) > 64
                          else "random", low_memory=True)
        return model.fit_transform(points).astype(np.float32)


def _place(sampled: np.ndarray, fitted: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Each other point at the weighted mean of its nearest sampled points."""
    import faiss
    unit = _unit_rows(sampled)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    out = np.zeros((len(others), 2), np.float32)
    k = min(PLACE_K, len(sampled))
    for lo in range(0, len(others), PLACE_BLOCK):
        scores, rows = index.search(_unit_rows(others[lo:lo + PLACE_BLOCK]), k)
        weights = np.maximum(scores, 0) + 1e-6
        weights /= weights.sum(axis=1, keepdims=True)
        out[lo:lo + PLACE_BLOCK] = np.einsum("qk,qkd->qd", weights, fitted[rows])
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1), np.float32)


def _unit_square(points: np.ndarray) -> np.ndarray:
    """Scaled into [0, 1] keeping the aspect; outliers clipped to 0.1–99.9%."""
    lo = np.percentile(points, 0.1, axis=0)
    hi = np.percentile(points, 99.9, axis=0)
    span = float(max((hi - lo).max(), 1e-9))
    centred = (points - (lo + hi) / 2) / span + 0.5
    return np.clip(centred, 0, 1).astype(np.float32)
