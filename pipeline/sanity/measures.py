"""The similarities MPRT compares an original map with a randomised model's map by, and eMPRT's entropy, in float64
numpy, following Quantus 0.6.0's protocol (its `MPRT`, `EfficientMPRT`, `TopKIntersection`, `correlation_spearman`,
`ssim`, `discrete_entropy`) so that equal maps give Quantus's values; where the literature differs (SSIM of the 2-D
map) that is a setting (docs/sanity.md)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.stats import entropy, rankdata

SSIM_MODES = ("image", "flat")  # image: the 2-D map, a 7x7 window (Adebayo et al.); flat: Quantus's MPRT (1-D, 7)
SSIM_WINDOW = 7  # skimage's (and so Quantus's) default window
ENTROPY_BINS = 100  # Quantus's eMPRT default (no n_bins rule): equal-width bins over the map's own range


def prepared(maps: np.ndarray, absolute: bool = True) -> np.ndarray:
    """(N, H, W) maps as Quantus's MPRT compares them: divided by each map's largest |value| (an all-zero map kept),
    then |.| when `absolute`. Quantus divides by the largest |value| of each batch of its call: equal at batch size
    1, which the parity test uses; per map here, so that an image's score never depends on its batch mates."""
    maps = np.asarray(maps, dtype=np.float64)
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, *([1] * (maps.ndim - 1)))
    maps = maps / scale
    return np.abs(maps) if absolute else maps


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Spearman rank correlation of each pair of maps (flattened), ties at their average rank as scipy's
    `spearmanr`; nan where a map is constant."""
    return rank_correlation(centred_ranks(a), centred_ranks(b))


def centred_ranks(maps: np.ndarray) -> np.ndarray:
    """(N, pixels) each flattened map's ranks (ties averaged) less their mean: what `spearman` correlates (a map
    compared many times is ranked once)."""
    ranks = rankdata(maps.reshape(len(maps), -1), axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    return ranks


def rank_correlation(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """(N,) Pearson correlation of centred ranks (`centred_ranks`): Spearman's."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def ssim(a: np.ndarray, b: np.ndarray, mode: str = "image", window: int = SSIM_WINDOW) -> np.ndarray:
    """(N,) structural similarity of each pair of maps as scikit-image's `structural_similarity` computes it
    (uniform window, sample covariance, K1 0.01, K2 0.03, data range = max - min of the two maps together, the mean
    over the positions whose window lies inside): of the (H, W) map (`image`) or of the flattened map (`flat`:
    Quantus's MPRT, which passes the maps flattened)."""
    if mode not in SSIM_MODES:
        raise ValueError(f"unknown SSIM mode {mode!r} (known: {', '.join(SSIM_MODES)})")
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mode == "flat":
        x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    # every map at once: the filters run along the map's own axes only (axis 0 is the image), so each image's
    # values are those of a filter over that image alone
    axes = tuple(range(1, x.ndim))
    shape = (-1,) + (1,) * len(axes)
    data_range = np.abs(np.maximum(x.max(axis=axes), y.max(axis=axes)) - np.minimum(x.min(axis=axes),
                                                                                    y.min(axis=axes)))
    points = window ** len(axes)
    cov_norm = points / (points - 1)

    def mean(t: np.ndarray) -> np.ndarray:
        return uniform_filter(t, window, axes=axes)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = ((0.01 * data_range) ** 2).reshape(shape), ((0.03 * data_range) ** 2).reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (window - 1) // 2
    inside = tuple(slice(pad, n - pad) for n in s.shape[1:])
    return np.array([image[inside].mean(dtype=np.float64) for image in s])  # per image: the same summation order


def top_k_intersection(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """(N,) the share of the original map's k highest pixels (`a`) that are among the randomised map's k highest
    (`b`): Quantus's TopKIntersection of `b` against the mask of `a`'s top k. Ties in order of position (a stable
    sort; Quantus's quicksort may order equal values otherwise)."""
    return intersection(top_k_mask(a, k), b, k)


def top_k_mask(a: np.ndarray, k: int) -> np.ndarray:
    """(N, pixels) True at each flattened map's k highest pixels (ties in order of position)."""
    a = a.reshape(len(a), -1)
    mask = np.zeros(a.shape, dtype=bool)
    mask[np.arange(len(a))[:, None], np.argsort(-a, axis=1, kind="stable")[:, :k]] = True
    return mask


def intersection(mask: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """(N,) the share of `b`'s k highest pixels where `mask` (`top_k_mask` of the original) is True."""
    b = b.reshape(len(b), -1)
    return mask[np.arange(len(b))[:, None], np.argsort(-b, axis=1, kind="stable")[:, :k]].mean(axis=1)


def discrete_entropy(maps: np.ndarray, bins: int = ENTROPY_BINS) -> np.ndarray:
    """(N,) eMPRT's complexity: the entropy (nats) of the histogram of each map's values in `bins` equal-width bins
    over its own range (Quantus's `discrete_entropy`, on the raw map: eMPRT takes neither |.| nor a normalisation)."""
    maps = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    return np.array([entropy(np.histogram(m, bins=bins)[0]) for m in maps])
