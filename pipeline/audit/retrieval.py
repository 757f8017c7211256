"""How well a score retrieves a set of images: AUROC and average precision (scikit-learn's), and the AUROC of every
column of a matrix at once (each channel's relevance as a score), from one ranking of all columns."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score


def auroc_ap(truth: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """(AUROC, average precision) of `scores` for the boolean `truth`; (None, None) when `truth` holds only one
    value (neither is defined)."""
    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        return None, None
    scores = np.asarray(scores, np.float64)
    return float(roc_auc_score(truth, scores)), float(average_precision_score(truth, scores))


def column_ranks(values: np.ndarray) -> np.ndarray:
    """(N, C) float64: each column's average ranks (1 = the smallest; ties share their mean rank)."""
    return rankdata(values, axis=0)


def column_aurocs(values: np.ndarray, truth: np.ndarray, ranks: np.ndarray | None = None) -> np.ndarray:
    """(C,) the AUROC of each column of (N, C) `values` as a score for the boolean (N,) `truth`: the Mann-Whitney U
    of the positives' average ranks over n1 n0 (ties count one half, as roc_auc_score); `ranks`: column_ranks(values)
    when already computed (one ranking serves several truths). NaN where `truth` holds only one value."""
    truth = np.asarray(truth, bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not positives or not negatives:
        return np.full(values.shape[1], np.nan)
    if ranks is None:
        ranks = column_ranks(values)  # average ranks: a tie between a positive and a negative counts one half
    u = ranks[truth].sum(axis=0) - positives * (positives + 1) / 2
    return u / (positives * negatives)
