"""Clusterings of one class's spectral embedding: the eigengap's choice of k, k-means and Ward agglomerative
clusterings for k = 2..K (scikit-learn), each cluster numbered by size (0 = the largest). Ward of a class larger than
`graph.LARGE_CLASS` runs on a seeded sample of it and assigns the rest by nearest cluster centroid (sampled_ward)."""
from __future__ import annotations

import tempfile
import warnings

import numpy as np
import scipy.sparse as sp
from joblib import Memory
from sklearn.cluster import AgglomerativeClustering, KMeans

from .graph import LARGE_CLASS, row_normalised

WARD_SAMPLE = 10_000  # Ward of a large class: this many images (scipy's dense Ward: 8 * S^2 / 2 bytes = 400 MB)


def eigengap(eigenvalues: np.ndarray, k_max: int) -> tuple[int, float]:
    """The number of clusters k in 2..k_max with the largest gap λ_{k+1} - λ_k between consecutive eigenvalues of
    the normalised Laplacian (increasing, λ_1 = 0), and that gap. A graph of k well-separated groups has k
    eigenvalues near 0 and then a jump (von Luxburg 2007, "A tutorial on spectral clustering", §8.3); the gap's size
    says how distinct the groups are, so it ranks classes too. Ties go to the smaller k."""
    k_max = min(k_max, len(eigenvalues) - 1)
    if k_max < 2:
        raise ValueError(f"the eigengap needs at least 3 eigenvalues, got {len(eigenvalues)}")
    gaps = np.diff(eigenvalues[: k_max + 1])[1:]  # gaps[j] = λ_{j+3} - λ_{j+2} (1-based), i.e. k = j + 2
    best = int(np.argmax(gaps))
    return best + 2, float(gaps[best])


def by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster numbers renumbered so that 0 is the largest cluster (ties: the smaller old number first)."""
    values, counts = np.unique(labels, return_counts=True)
    order = values[np.lexsort((values, -counts))]
    mapping = np.empty(int(values.max()) + 1, dtype=np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


def kmeans(eigenvectors: np.ndarray, ks: range, seed: int = 0) -> dict[int, np.ndarray]:
    """k -> labels: k-means (10 restarts, seeded) on the first k eigenvectors, rows scaled to unit length (Ng,
    Jordan & Weiss 2002)."""
    out = {}
    for k in ks:
        points = row_normalised(eigenvectors[:, :k])
        model = KMeans(n_clusters=k, n_init=10, random_state=seed)
        out[k] = by_size(model.fit_predict(points).astype(np.int64))
    return out


def agglomerative(eigenvectors: np.ndarray, graph: sp.csr_matrix, ks: range, large: int = LARGE_CLASS,
                  seed: int = 0, sample: int | None = None) -> dict[int, np.ndarray]:
    """k -> labels: Ward agglomerative clustering of the row-normalised embedding (the first max(ks) eigenvectors),
    merging only along kNN edges (`graph` as connectivity keeps it sparse: no N^2 distance matrix); the tree is
    built once and cut at each k (joblib's cache, as scikit-learn documents). N > `large`: sampled_ward of `sample`
    (default WARD_SAMPLE) images."""
    points = row_normalised(eigenvectors[:, : max(ks)])
    if len(points) > large:
        return sampled_ward(points, ks, seed, min(sample or WARD_SAMPLE, len(points)))
    out = {}
    with tempfile.TemporaryDirectory(prefix="spray-ward-") as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the number of connected components ... is > 1": it completes the graph
        memory = Memory(cache, verbose=0)
        for k in ks:
            model = AgglomerativeClustering(n_clusters=k, linkage="ward", connectivity=graph, memory=memory,
                                            compute_full_tree=True)
            out[k] = by_size(model.fit_predict(points).astype(np.int64))
    return out


def sampled_ward(points: np.ndarray, ks: range, seed: int, sample: int) -> dict[int, np.ndarray]:
    """k -> labels for a large class: unconstrained Ward of a seeded sample of the (row-normalised) embedding, cut at
    each k, and every image assigned to the nearest centroid of the sample's clusters (Ward merges by centroid
    distance, so this is its own criterion; at 100,000 images the kNN-constrained tree took 184 s and this seconds).
    The sample's images keep their Ward labels."""
    n = len(points)
    chosen = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    picked = points[chosen]
    out = {}
    with tempfile.TemporaryDirectory(prefix="spray-ward-") as cache:
        memory = Memory(cache, verbose=0)
        for k in ks:
            model = AgglomerativeClustering(n_clusters=k, linkage="ward", memory=memory, compute_full_tree=True)
            sampled = model.fit_predict(picked)
            centroids = np.stack([picked[sampled == c].mean(0) for c in range(k)])
            squared = (points ** 2).sum(1)[:, None] - 2 * points @ centroids.T + (centroids ** 2).sum(1)[None]
            labels = np.argmin(squared, 1)
            labels[chosen] = sampled
            out[k] = by_size(labels.astype(np.int64))
    return out
