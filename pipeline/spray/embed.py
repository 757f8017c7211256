"""The 2-D picture of a class: t-SNE (openTSNE: Barnes-Hut for small classes, FFT-accelerated interpolation for
large ones, so 100,000 points take minutes, not hours) of the row-normalised spectral embedding, as corelay embeds
the eigenvectors for ViRelAy."""
from __future__ import annotations

import numpy as np

from .graph import row_normalised

PERPLEXITY = 30.0


def tsne(eigenvectors: np.ndarray, seed: int = 0, threads: int = 1) -> np.ndarray:
    """(N, 2) float32 t-SNE coordinates (PCA initialisation, seeded); perplexity 30, or (N - 1) / 3 for small N.
    Fewer than 4 points: the first two eigenvector coordinates after the trivial one (t-SNE needs more)."""
    points = row_normalised(eigenvectors).astype(np.float64)
    n = len(points)
    if n < 4:
        return np.pad(points[:, 1:3], ((0, 0), (0, max(0, 3 - points.shape[1])))).astype(np.float32)
    from openTSNE import TSNE  # imported here: its import costs ~1 s and only workers need it

    perplexity = min(PERPLEXITY, (n - 1) / 3.0)
    method = "fft" if n > 10_000 else "bh"
    model = TSNE(n_components=2, perplexity=perplexity, initialization="pca", random_state=seed, n_jobs=threads,
                 negative_gradient_method=method, neighbors="exact" if n <= 1_000 else "annoy", verbose=False)
    return np.asarray(model.fit(points), dtype=np.float32)
