"""The spectral part of SpRAy on a sparse graph: exact k nearest neighbours (scikit-learn, chunked: memory grows with
N * k, not N^2; above `LARGE_CLASS` vectors, candidates found among the leading principal components and re-ranked by
their exact distances), the symmetric binary kNN affinity corelay uses, the symmetric normalised Laplacian
L = I - D^-1/2 A D^-1/2 and its smallest eigenpairs from a sparse Lanczos solver (ARPACK via scipy's eigsh)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from sklearn import config_context
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

WORKING_MEMORY_MB = 64
LARGE_CLASS = 20_000  # above this many vectors, neighbours are searched in the reduced space (see reduced_neighbours)
REDUCED_DIMS = 64  # principal components of that space (of the 32x32 = 1,024 features)
CANDIDATES = 3  # that search keeps CANDIDATES * k candidates per vector, re-ranked by their exact distances
RERANK_ROWS = 1024  # vectors re-ranked at a time (2 * RERANK_ROWS * 3k * D floats: 250 MB at k = 10, D = 1,024)


@dataclass(frozen=True)
class Neighbours:
    """Each vector's k nearest other vectors (N, k) and their Euclidean distances (N, k), nearest first."""

    indices: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True)
class Spectrum:
    """The smallest eigenvalues of L in increasing order (the first is 0) and their eigenvectors (N, m)."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray


def nearest_neighbours(vectors: np.ndarray, k: int, threads: int = 1, large: int = LARGE_CLASS,
                       seed: int = 0) -> Neighbours:
    """Euclidean k nearest neighbours of every vector among the others: exact for N <= `large`, else through the
    reduced space (reduced_neighbours). k is capped at N - 1."""
    k = min(k, len(vectors) - 1)
    if k < 1:
        raise ValueError(f"need at least 2 vectors for a neighbour graph, got {len(vectors)}")
    if len(vectors) > large and vectors.shape[1] > REDUCED_DIMS:
        return reduced_neighbours(vectors, k, threads, seed=seed)
    return exact_neighbours(vectors, k, threads)


def exact_neighbours(vectors: np.ndarray, k: int, threads: int = 1) -> Neighbours:
    """Exact k nearest neighbours (brute force in float32 BLAS, in chunks scikit-learn sizes to its working memory);
    k < N."""
    index = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean", n_jobs=threads).fit(vectors)
    with config_context(working_memory=WORKING_MEMORY_MB):  # distance chunks of at most this many MB
        distances, indices = index.kneighbors()  # X=None: a point is not its own neighbour
    return Neighbours(indices.astype(np.int64), distances.astype(np.float32))


def reduced_neighbours(vectors: np.ndarray, k: int, threads: int = 1, dims: int = REDUCED_DIMS,
                       candidates: int = CANDIDATES, seed: int = 0) -> Neighbours:
    """Approximate k nearest neighbours for large classes: the CANDIDATES * k exact nearest neighbours in the space of
    the `dims` leading principal components (randomized PCA, seeded), then each vector's candidates re-ranked by their
    exact distances in the full space and the k nearest kept. Brute force in 64 instead of 1,024 dimensions is ~16x
    less arithmetic; the re-ranking costs N * 3k full-space distances. Distances returned are exact ones; recall
    against the exact graph is measured in `make bench-spray` (docs/benchmarks.md)."""
    n = len(vectors)
    pool = min(n - 1, candidates * k)
    projected = PCA(n_components=dims, svd_solver="randomized", random_state=seed).fit_transform(vectors)
    found = exact_neighbours(projected.astype(np.float32), pool, threads).indices
    del projected
    indices = np.empty((n, k), np.int64)
    distances = np.empty((n, k), np.float32)
    for start in range(0, n, RERANK_ROWS):
        rows = slice(start, min(n, start + RERANK_ROWS))
        near = found[rows]
        gaps = vectors[near] - vectors[rows][:, None, :]  # (rows, pool, D)
        exact = np.sqrt(np.einsum("rpd,rpd->rp", gaps, gaps))
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        indices[rows] = np.take_along_axis(near, order, 1)
        distances[rows] = np.take_along_axis(exact, order, 1)
    return Neighbours(indices, distances)


def neighbour_recall(found: Neighbours, exact: Neighbours) -> float:
    """The share of the exact k nearest neighbours that `found` lists (over all its rows; 1 = the same graph)."""
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found.indices, exact.indices))
    return hits / exact.indices.size


def affinity(neighbours: Neighbours) -> sp.csr_matrix:
    """corelay's SparseKNN: 1 for each kNN edge, made symmetric as (A + A^T) / 2 (1 for mutual neighbours, 1/2 for
    one-sided ones). float64 CSR, zero diagonal."""
    n, k = neighbours.indices.shape
    rows = np.repeat(np.arange(n), k)
    graph = sp.csr_matrix((np.ones(n * k), (rows, neighbours.indices.ravel())), shape=(n, n))
    return ((graph + graph.T) / 2.0).tocsr()


def normalised_affinity(graph: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 (corelay's SymmetricNormalLaplacian returns this matrix; L = I minus it). Every vertex of a kNN
    graph has degree >= k / 2 > 0."""
    degree = np.asarray(graph.sum(1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(degree))
    return (scale @ graph @ scale).tocsr()


def spectrum(graph: sp.csr_matrix, count: int, seed: int = 0) -> Spectrum:
    """The `count` smallest eigenpairs of L = I - D^-1/2 A D^-1/2, as the largest algebraic ones of D^-1/2 A D^-1/2
    (eigsh 'LA', a fixed start vector so that runs repeat). corelay asks for the largest in magnitude ('LM'), which
    can return the most negative eigenvalues (L's largest, near 2) instead of the small ones clustering needs."""
    n = graph.shape[0]
    count = min(count, n - 1)
    matrix = normalised_affinity(graph)
    start = np.random.default_rng(seed).uniform(0.5, 1.5, n)
    if n <= 2 * count + 2:  # too small for Lanczos: dense is exact and instant
        values, vectors = np.linalg.eigh(matrix.toarray())
        values, vectors = values[::-1][:count], vectors[:, ::-1][:, :count]
    else:
        try:
            values, vectors = eigsh(matrix, k=count, which="LA", v0=start, ncv=min(n, max(2 * count + 1, 64)),
                                    maxiter=n * 20)
        except ArpackNoConvergence as error:  # keep what converged: still the leading pairs, in order
            values, vectors = error.eigenvalues, error.eigenvectors
    order = np.argsort(-values)
    eigenvalues = np.clip(1.0 - values[order], 0.0, 2.0)
    return Spectrum(eigenvalues, vectors[:, order])


def row_normalised(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (Ng, Jordan & Weiss 2002; corelay's `normalize=True`); zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
