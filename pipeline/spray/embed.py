"""The 2-D picture of a class: t-SNE (openTSNE, Barnes-Hut) of the row-normalised spectral embedding, as corelay
embeds the eigenvectors for ViRelAy. t-SNE is by far the costliest step (at 5,000 images about 20 times all the
rest), and it only draws a picture, so a class larger than `sample` images is embedded through a seeded sample of
`sample` images; every other image is placed at the mean position of its nearest sampled neighbours in the spectral
embedding (the clusters come from the spectral embedding itself, never from this picture)."""
from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from .graph import row_normalised

PERPLEXITY = 30.0
SAMPLE = 1000
PLACE_NEIGHBOURS = 5


def _tsne(points: np.ndarray, seed: int, threads: int) -> np.ndarray:
    from openTSNE import TSNE  # imported here: its import costs ~1 s and only workers need it

    perplexity = min(PERPLEXITY, (len(points) - 1) / 3.0)
    model = TSNE(n_components=2, perplexity=perplexity, initialization="pca", random_state=seed, n_jobs=threads,
                 negative_gradient_method="bh", neighbors="exact" if len(points) <= 1_000 else "annoy",
                 verbose=False)
    return np.asarray(model.fit(points), dtype=np.float32)


def tsne(eigenvectors: np.ndarray, seed: int = 0, threads: int = 1, sample: int = SAMPLE) -> np.ndarray:
    """(N, 2) float32 t-SNE coordinates (PCA initialisation, seeded); perplexity 30, or (N - 1) / 3 for small N;
    N > sample: t-SNE of a seeded sample, the rest placed by their nearest sampled neighbours (see above).
    Fewer than 4 points: the 2nd and 3rd coordinates of the embedding (t-SNE needs more)."""
    points = row_normalised(eigenvectors).astype(np.float64)
    n = len(points)
    if n < 4:
        return np.pad(points[:, 1:3], ((0, 0), (0, max(0, 3 - points.shape[1])))).astype(np.float32)
    if n <= sample:
        return _tsne(points, seed, threads)
    chosen = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    reference = _tsne(points[chosen], seed, threads)
    neighbours = NearestNeighbors(n_neighbors=PLACE_NEIGHBOURS, n_jobs=threads).fit(points[chosen])
    _, nearest = neighbours.kneighbors(points)
    xy = reference[nearest].mean(1)
    xy[chosen] = reference
    return xy.astype(np.float32)
