"""Concept activation vectors (CAVs) for an artifact, fitted on the run's concept-relevance vectors at one layer:
the pattern ("signal") CAV of Pahde et al. 2024 ("Navigating Neural Space"): the covariance of the vectors with the
0/1 mark, normalised; and a linear classifier's CAV (scikit-learn's logistic regression on standardised vectors,
its weights taken back to the vectors' own units, normalised). An image's score on a CAV is its vector's
projection on it, measured from the clean images' mean; rank 1 is the image most like the marked ones.

Why concept-relevance space and not activations (Reveal to Revise fits on activations): the audit reads the
finished run and never runs the model again, and what the run stores per image at a layer is the relevance of
each channel (docs/audit.md). The correction (P-ClArC) computes the activation-space direction with the model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..errors import PipelineError

KINDS = ("pattern", "classifier")
CLASSIFIER_C = 1.0  # inverse regularisation strength of the logistic regression (scikit-learn's default)
CLASSIFIER_ITERATIONS = 1000


class CavError(PipelineError, ValueError):
    """A CAV cannot be fitted on these vectors and marks (the message says why)."""


@dataclass(frozen=True)
class Cav:
    """One CAV at a layer: a unit vector, and the means of the clean (unmarked) and the marked images' vectors."""

    kind: str
    layer: str
    vector: np.ndarray  # (C,) float64, unit length
    clean_mean: np.ndarray  # (C,)
    marked_mean: np.ndarray  # (C,)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(N,) each vector's projection on the CAV, from the clean images' mean (0: as the clean mean)."""
        return (np.asarray(vectors, np.float64) - self.clean_mean) @ self.vector


def _checked(vectors: np.ndarray, marked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, t = np.asarray(vectors, np.float64), np.asarray(marked, bool)
    if x.ndim != 2 or t.shape != (len(x),):
        raise CavError(f"vectors (N, C) and marks (N,) expected, got {x.shape} and {t.shape}")
    if not t.any():
        raise CavError("no image is marked: nothing to fit a CAV to")
    if t.all():
        raise CavError(f"all {len(t)} images are marked: no clean image to contrast them with")
    return x, t


def _unit(vector: np.ndarray, kind: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise CavError(f"the {kind} CAV is zero: the marked images' vectors do not differ from the others'")
    return vector / norm


def pattern_cav(vectors: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """(C,) unit vector: cov(x, t) = mean over images of (x - mean x)(t - mean t), t the 0/1 mark, normalised
    (Pahde et al. 2024's pattern CAV; for a 0/1 mark it points along marked mean - clean mean)."""
    x, t = _checked(vectors, marked)
    weights = t - t.mean()
    return _unit((x - x.mean(axis=0)).T @ weights / len(t), "pattern")


def classifier_cav(vectors: np.ndarray, marked: np.ndarray, seed: int = 0) -> np.ndarray:
    """(C,) unit vector: the weights of a logistic regression (L2, C = 1, balanced class weights, lbfgs:
    deterministic) separating marked from clean vectors, fitted on each channel standardised (concept relevances
    are small numbers of very different spreads) and divided by the channel's spread, so that the score is the
    classifier's decision function (less its intercept) on the vectors as stored."""
    x, t = _checked(vectors, marked)
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=CLASSIFIER_C, class_weight="balanced", max_iter=CLASSIFIER_ITERATIONS,
                               random_state=seed).fit(scaler.transform(x), t)
    return _unit(model.coef_[0] / scaler.scale_, "classifier")


def fit_cavs(vectors: np.ndarray, marked: np.ndarray, layer: str, seed: int = 0) -> list[Cav]:
    """Both CAVs (KINDS order) of the marked images against the others at `layer`."""
    x, t = _checked(vectors, marked)
    clean_mean, marked_mean = x[~t].mean(axis=0), x[t].mean(axis=0)
    directions = {"pattern": pattern_cav(x, t), "classifier": classifier_cav(x, t, seed)}
    return [Cav(kind, layer, directions[kind], clean_mean, marked_mean) for kind in KINDS]


def ranks(scores: np.ndarray) -> np.ndarray:
    """(N,) int64: 1 for the highest score, ties in the given (dataset) order."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    out = np.empty(len(order), np.int64)
    out[order] = np.arange(1, len(order) + 1)
    return out
