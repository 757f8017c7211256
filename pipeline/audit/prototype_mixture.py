"""PCX's prototypes of one class (Dreyer et al. 2024), pure: the class's concept-relevance vectors (N, C) -> a
Gaussian mixture whose number of components BIC chooses up to a cap, each component a prototype. No files, no Ray
(prototypes.py reads the run and fans the classes out).

The mixture is fitted with full covariances in the class's leading principal components (the fewest that explain
`variance` of the class's variance, at most `dims` and at most one per `images_per_dim` images: every kept noise
direction costs each component d parameters, which BIC then charges against splitting a class), whitened, and the
C - d discarded directions are one isotropic Gaussian shared by all components (probabilistic PCA's residual,
Tipping and Bishop 1999): the log-likelihood is a density over all C concepts, so an image unusual only in a
discarded direction is still an outlier. The shared residual term does not depend on the component, so BIC's choice
and the assignments are the subspace mixture's. A class larger than `search_sample` images has BIC's search run on
a seeded sample of that many and the chosen k fitted to all its images from there (the speed target: 100,000
images in minutes on 2 cores; the cost: less power to see prototypes smaller than about 1 % of the class).

Full covariance in all C = 512 dimensions would cost N x C^2 per component and iteration (and needs far more than C
images per component); a diagonal covariance cannot model concepts that rise and fall together, which is what a
strategy is."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from ..laps import Laps

LOG_2PI = float(np.log(2 * np.pi))


@dataclass(frozen=True)
class MixtureParams:
    """The fit's settings; `check` names the command-line option of a bad one."""

    max_components: int = 8  # BIC's cap
    seed: int = 0
    variance: float = 0.7  # principal components kept: the fewest that explain this share of the class's variance
    dims: int = 32  # and at most this many
    images_per_dim: int = 10  # and at most one per this many images
    images_per_component: int = 5  # components tried: at most one per this many images
    max_iter: int = 300
    n_init: int = 4  # initialisations per k (k-means with different seeds); the best likelihood is kept
    search_sample: int = 20_000  # a larger class: BIC's search on this many of its images (seeded), then the chosen
    # k fitted to all of them from the sample's mixture
    reg_covar: float = 1e-4  # added to each whitened covariance's diagonal (1e-4 of the class's variance per axis)

    def check(self) -> None:
        if self.max_components < 1:
            raise ValueError(f"--max-components must be >= 1, got {self.max_components}")
        if self.dims < 1:
            raise ValueError(f"--dims must be >= 1, got {self.dims}")
        if not 0 < self.variance <= 1:
            raise ValueError(f"--variance must be in (0, 1], got {self.variance}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"--seed must be in 0 .. 2**32 - 1 (numpy's seeds), got {self.seed}")

    def smallest_class(self) -> int:
        """The fewest images a mixture is fitted to: one principal component's worth, and two per component."""
        return max(self.images_per_dim, 2 * self.images_per_component)


@dataclass
class ClassMixture:
    """One class's prototypes; prototypes numbered by weight (0 = the heaviest)."""

    components: int  # chosen by BIC
    bic: dict[int, float]  # k -> BIC of the k-component subspace mixture (lower is better; on the search sample)
    dims: int  # principal components the mixture lives in
    explained_variance: float  # their share of the class's variance
    residual_variance: float  # per discarded direction (0 when none is discarded)
    weights: np.ndarray  # (k,) mixture weights
    means: np.ndarray  # (k, C) mean concept profile: the responsibility-weighted mean of the class's vectors
    prototype: np.ndarray  # (N,) int64, the most probable prototype of each image
    probability: np.ndarray  # (N,) its posterior probability
    log_likelihood: np.ndarray  # (N,) float64 log density of the vector under the class's model (all C concepts)
    component_log_density: np.ndarray  # (N,) float64 log density under its own prototype (subspace only): closeness
    converged: bool = True
    seconds: dict[str, float] = field(default_factory=dict)

    def deviations(self, vectors: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """(n, C) the vectors of images `rows` (the class's rows, in order) minus their prototypes' mean profiles."""
        return vectors - self.means[self.prototype[rows]]


def dims_for(images: int, channels: int, params: MixtureParams) -> int:
    """The most principal components the class's mixture may live in: `dims`, at most C, N - 1 and one per
    images_per_dim images."""
    return max(1, min(params.dims, channels, images // params.images_per_dim, images - 1))


def components_for(images: int, params: MixtureParams) -> int:
    """The largest number of components tried: the cap, at most one per images_per_component images."""
    return max(1, min(params.max_components, images // params.images_per_component))


def _mixture(k: int, params: MixtureParams) -> GaussianMixture:
    return GaussianMixture(n_components=k, covariance_type="full", reg_covar=params.reg_covar,
                           max_iter=params.max_iter, n_init=params.n_init, init_params="kmeans",
                           random_state=params.seed)


def centred_norms(x: np.ndarray, mean: np.ndarray, block: int = 8192) -> np.ndarray:
    """(N,) |x_i - mean|^2, a block of rows at a time (no second N x C array)."""
    out = np.empty(len(x))
    for start in range(0, len(x), block):
        part = x[start:start + block] - mean
        out[start:start + block] = np.einsum("ij,ij->i", part, part)
    return out


def component_log_densities(mixture: GaussianMixture, z: np.ndarray) -> np.ndarray:
    """(N, k) log N(z_i; mean_j, covariance_j) of each point under each component (full covariances), from the
    fitted precisions' Cholesky factors."""
    out = np.empty((len(z), mixture.n_components))
    for j, (mean, chol) in enumerate(zip(mixture.means_, mixture.precisions_cholesky_)):
        y = (z - mean) @ chol
        out[:, j] = -0.5 * (z.shape[1] * LOG_2PI + np.einsum("ij,ij->i", y, y)) + np.log(np.diag(chol)).sum()
    return out


def fit_class(vectors: np.ndarray, params: MixtureParams = MixtureParams(), threads: int = 1) -> ClassMixture:
    """The prototypes of one class's vectors (N, C); N must be at least params.smallest_class()."""
    params.check()
    n, channels = vectors.shape
    if n < params.smallest_class():
        raise ValueError(f"a mixture needs at least {params.smallest_class()} images of a class, got {n}")
    laps = Laps()

    with threadpool_limits(threads):
        x = np.asarray(vectors, dtype=np.float64)
        most = dims_for(n, channels, params)
        pca = PCA(n_components=most, svd_solver="covariance_eigh" if n > channels else "full",
                  random_state=params.seed)
        scores = pca.fit_transform(x)
        total = float(x.var(axis=0, ddof=1).sum())
        kept = np.maximum(pca.explained_variance_, 0.0)
        share = np.cumsum(kept) / total if total > 0 else np.ones(most)
        d = int(min(most, np.searchsorted(share, params.variance - 1e-12) + 1))
        scores, kept = np.ascontiguousarray(scores[:, :d]), kept[:d]
        floor = 1e-12 * total + 1e-30
        scale = np.sqrt(kept + floor)  # whitened: reg_covar relative to each axis's variance
        z = scores / scale
        discarded = channels - d
        residual_variance = max(total - float(kept.sum()), 0.0) / discarded if discarded else 0.0
        laps.lap("pca")
        search = z
        if n > params.search_sample:
            rows = np.sort(np.random.default_rng(params.seed).choice(n, params.search_sample, replace=False))
            search = z[rows]
        fits: dict[int, GaussianMixture] = {}
        bic: dict[int, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for k in range(1, components_for(len(search), params) + 1):
                fits[k] = _mixture(k, params).fit(search)
                bic[k] = float(fits[k].bic(search))
            chosen = min(bic, key=lambda k: (bic[k], k))
            mixture = fits[chosen]
            if search is not z:  # the chosen k on every image, from the sample's fit
                start = mixture
                mixture = GaussianMixture(n_components=chosen, covariance_type="full", reg_covar=params.reg_covar,
                                          max_iter=params.max_iter, weights_init=start.weights_,
                                          means_init=start.means_, precisions_init=start.precisions_,
                                          random_state=params.seed).fit(z)
        laps.lap("mixtures")
        responsibilities = mixture.predict_proba(z)
        subspace = mixture.score_samples(z) - float(np.log(scale).sum())  # density of the scores, unwhitened
        if discarded:
            residual = centred_norms(x, pca.mean_) - np.einsum("ij,ij->i", scores, scores)  # |x - mean|^2 outside
            variance = max(residual_variance, floor)
            outside = -0.5 * (discarded * (LOG_2PI + np.log(variance)) + np.maximum(residual, 0.0) / variance)
        else:
            outside = np.zeros(n)
        order = np.argsort(-mixture.weights_, kind="stable")  # prototype 0 = the heaviest
        responsibilities = responsibilities[:, order]
        prototype = responsibilities.argmax(axis=1).astype(np.int64)
        totals = responsibilities.sum(axis=0)
        means = (responsibilities.T @ x) / np.maximum(totals, 1e-300)[:, None]
        own = component_log_densities(mixture, z)[:, order]
        laps.lap("scores")
    return ClassMixture(
        components=chosen, bic=bic, dims=d, explained_variance=float(kept.sum() / total) if total > 0 else 1.0,
        residual_variance=residual_variance, weights=mixture.weights_[order].astype(np.float64),
        means=means.astype(np.float32), prototype=prototype,
        probability=responsibilities[np.arange(n), prototype].astype(np.float32),
        log_likelihood=subspace + outside,
        component_log_density=own[np.arange(n), prototype] - float(np.log(scale).sum()),
        converged=bool(mixture.converged_), seconds=laps.seconds)
