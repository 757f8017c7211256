"""SpRAy on one class's feature vectors: kNN graph -> Laplacian spectrum -> eigengap k -> k-means and agglomerative
clusterings for k = 2..K -> t-SNE -> outlier scores. Pure: no files, no Ray (run.py reads the maps and fans out)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from ..laps import Laps
from . import cluster, embed, graph


@dataclass(frozen=True)
class SprayParams:
    """The analysis's settings (defaults as corelay's SpRAy examples: 10 neighbours, 32 eigenvalues)."""

    neighbours: int = 10
    eigenvalues: int = 32
    k_max: int = 8
    seed: int = 0
    embedding: bool = True  # t-SNE (the costliest step at scale); off: x, y are the 2nd and 3rd eigenvectors
    tsne_sample: int = embed.SAMPLE  # larger classes: t-SNE of this many, the rest placed by neighbours
    agglomerative: bool = True
    large_class: int = graph.LARGE_CLASS  # larger classes: neighbours via 64 principal components, Ward of a sample

    def check(self) -> None:
        """ValueError naming the command-line option of the first setting no analysis can use."""
        if self.neighbours < 1:
            raise ValueError(f"--neighbours must be >= 1, got {self.neighbours}")
        if self.large_class < 0:
            raise ValueError(f"--large-class must be >= 0, got {self.large_class}")
        if self.k_max < 2:
            raise ValueError(f"--k-max must be >= 2, got {self.k_max}")
        if self.eigenvalues < self.k_max + 1:
            raise ValueError(f"--eigenvalues ({self.eigenvalues}) must exceed --k-max ({self.k_max}): the eigengap "
                             "at k needs the (k+1)-th eigenvalue")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"--seed must be in 0 .. 2**32 - 1 (numpy's seeds), got {self.seed}")


@dataclass
class ClassAnalysis:
    """What SpRAy found for one class; cluster labels numbered by size (0 = largest)."""

    eigenvalues: np.ndarray  # (m,) of the normalised Laplacian, increasing
    eigenvectors: np.ndarray  # (N, m) float32, the spectral embedding
    k_chosen: int
    eigengap: float
    kmeans: dict[int, np.ndarray]  # k -> (N,) int64
    agglomerative: dict[int, np.ndarray]
    embedding: np.ndarray  # (N, 2) float32
    outlier: np.ndarray  # (N,) float32
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ks(self) -> list[int]:
        return sorted(self.kmeans)


def outlier_scores(neighbours: graph.Neighbours) -> np.ndarray:
    """Mean distance to the k nearest neighbours over the class's median of it (1 = typical, higher = more unusual;
    the kNN-distance outlier score of Ramaswamy et al. 2000, made comparable between classes)."""
    mean = neighbours.distances.mean(1)
    median = float(np.median(mean))
    return (mean / median if median > 0 else np.zeros_like(mean)).astype(np.float32)


def largest_k(n: int, params: SprayParams) -> int:
    """The largest k analysed for n images: k_max, but at most n - 1 clusters and one below the eigenvalues."""
    return max(2, min(params.k_max, n - 1, min(params.eigenvalues, n - 1) - 1))


def analyse_class(vectors: np.ndarray, params: SprayParams = SprayParams(), threads: int = 1) -> ClassAnalysis:
    """SpRAy of one class: vectors (N, D) -> its strategies. N must be at least 4."""
    params.check()
    n = len(vectors)
    if n < 4:
        raise ValueError(f"SpRAy needs at least 4 images of a class, got {n}")
    laps = Laps()

    with threadpool_limits(threads):
        neighbours = graph.nearest_neighbours(vectors, params.neighbours, threads, params.large_class,
                                              params.seed)
        laps.lap("neighbours")
        affinity = graph.affinity(neighbours)
        spectrum = graph.spectrum(affinity, min(params.eigenvalues, n - 1), params.seed)
        laps.lap("eigenvectors")
        k_top = largest_k(n, params)
        k_chosen, gap = cluster.eigengap(spectrum.eigenvalues, k_top)
        ks = range(2, k_top + 1)
        kmeans = cluster.kmeans(spectrum.eigenvectors, ks, params.seed)
        laps.lap("kmeans")
        agglomerative = (cluster.agglomerative(spectrum.eigenvectors, affinity, ks, params.large_class, params.seed)
                         if params.agglomerative else {})
        laps.lap("agglomerative")
        if params.embedding:
            xy = embed.tsne(spectrum.eigenvectors, params.seed, threads, params.tsne_sample)
        else:
            xy = spectrum.eigenvectors[:, 1:3].astype(np.float32)
        laps.lap("embedding")
    return ClassAnalysis(spectrum.eigenvalues, spectrum.eigenvectors.astype(np.float32), k_chosen, gap, kmeans,
                         agglomerative, xy, outlier_scores(neighbours), laps.seconds)
