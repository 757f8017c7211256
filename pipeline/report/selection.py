"""Which images the report shows: the most confident errors, the least confident correct predictions (or, without
labels, the most and least confident predictions) and a deterministic sample per class. Pure functions on the
statistics table; ties are broken by image id so that the same run always gives the same report."""
from __future__ import annotations

import numpy as np
import pandas as pd

NO_LABEL = -1


def _flag(stats: pd.DataFrame, column: str) -> pd.Series:
    """A nullable boolean column as True / False / <NA> whatever pandas made of it."""
    return stats[column].astype("boolean")


def _ranked(rows: pd.DataFrame, column: str, descending: bool, n: int) -> pd.DataFrame:
    return rows.sort_values([column, "image_id"], ascending=[not descending, True], kind="stable").head(n)


def most_confident_errors(stats: pd.DataFrame, n: int) -> pd.DataFrame:
    """Wrong predictions (label known) with the highest predicted-class probability, highest first."""
    return _ranked(stats[_flag(stats, "correct").eq(False).fillna(False)], "pred_probability", True, n)


def least_confident_correct(stats: pd.DataFrame, n: int) -> pd.DataFrame:
    """Right predictions with the lowest predicted-class probability, lowest first."""
    return _ranked(stats[_flag(stats, "correct").eq(True).fillna(False)], "pred_probability", False, n)


def most_confident(stats: pd.DataFrame, n: int) -> pd.DataFrame:
    """Any prediction, highest probability first (the gallery of a run without labels)."""
    return _ranked(stats, "pred_probability", True, n)


def least_confident(stats: pd.DataFrame, n: int) -> pd.DataFrame:
    return _ranked(stats, "pred_probability", False, n)


def class_key(stats: pd.DataFrame, by_label: bool) -> pd.Series:
    """The class an image is counted under: its label (NO_LABEL when it has none) or its prediction."""
    if by_label:
        return stats["label"].fillna(NO_LABEL).astype("int64")
    return stats["pred"].astype("int64")


def per_class_sample(stats: pd.DataFrame, n: int, by_label: bool, seed: int = 0) -> pd.DataFrame:
    """Up to n images per class, drawn at random with a fixed seed, classes in index order."""
    if n <= 0 or stats.empty:
        return stats.iloc[:0]
    order = stats.sort_values("image_id", kind="stable")  # the draw must not depend on shard order
    shuffled = order.assign(_class=class_key(order, by_label).to_numpy(),
                            _draw=np.random.default_rng(seed).permutation(len(order)))
    picked = shuffled.sort_values(["_class", "_draw"], kind="stable").groupby("_class", sort=False).head(n)
    return picked.drop(columns=["_draw"])
