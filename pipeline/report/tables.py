"""The report's numbers as rows of strings: the run summary (manifest + totals) and the per-class table
(accuracy, confidence, map statistics, localisation and faithfulness where the run has them)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .run_data import RunData
from .selection import NO_LABEL, class_key

# (column, heading) of per-class means shown when the run has the column with any value
MEAN_COLUMNS = [
    ("pred_probability", "mean p(pred)"),
    ("gini", "mean Gini"),
    ("positive_in_top5pct", "R+ in top 5 %"),
    ("positive_in_box", "R+ in box"),
    ("aopc_morf", "AOPC MoRF"),
    ("aopc_random", "AOPC random"),
]


def fmt(value, digits: int = 3) -> str:
    """A number for a table: '–' for missing, integers as they are, floats with `digits` significant digits."""
    if value is None or pd.isna(value):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{float(value):.{digits}g}"


def _rate(flags: pd.Series) -> tuple[float | None, int]:
    """Share of True among the known values, and how many are known."""
    known = flags.astype("boolean").dropna()
    return (float(known.mean()) if len(known) else None), len(known)


def _pointing(flags: pd.Series) -> str:
    """The pointing game as a rate: '62.5 % (5 of 8' (the caller closes the parenthesis)."""
    known = flags.astype("boolean").dropna()
    if not len(known):
        return "– (0 of 0"
    hits = int(known.sum())
    return f"{100 * hits / len(known):.3g} % ({hits} of {len(known)}"


def _has(stats: pd.DataFrame, column: str) -> bool:
    return column in stats and bool(stats[column].notna().any())


def summary(run: RunData, extra: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(field, value) rows describing the run: configuration, weights, totals, accuracy, localisation, AOPC."""
    m, stats = run.manifest, run.stats
    config, weights, totals = run.config, m.weights, m.totals
    weights_text = " ".join(value for value in (weights.kind, weights.source) if value) or "–"
    if weights.sha256:
        weights_text += f" (sha256 {weights.sha256[:12]}…)"
    rows = [
        ("run", str(run.root)),
        ("dataset", f"{_known(config.dataset)} ({_known(config.root)})"),
        ("model", _known(config.model)),
        ("weights", weights_text + ("  — RANDOM weights: the maps say nothing about a trained model"
                                    if m.random_weights else "")),
        ("composite", _known(config.composite)),
        ("top-k", fmt(config.top_k)),
        ("target", _known(config.target)),
        ("input / map size", f"{run.size} x {run.size} ({_known(config.map_dtype, '?')})"),
        ("images", (f"{fmt(totals.images)} in the dataset, {fmt(totals.explained)} explained, "
                    f"{fmt(totals.failed)} failed") if run.complete and totals
         else f"{fmt(len(stats))} explained, {fmt(len(run.failures))} failed so far (the run is incomplete)"),
    ]
    accuracy, labelled = _rate(stats["correct"]) if len(stats) else (None, 0)
    rows.append(("accuracy", f"{fmt(accuracy)} on {fmt(labelled)} labelled images" if labelled else
                 "– (no labels)"))
    rows.append(("mean p(pred)", fmt(stats["pred_probability"].mean() if len(stats) else None)))
    if _has(stats, "pointing_game_hit"):
        rows.append(("pointing game", _pointing(stats["pointing_game_hit"]) + " images with boxes)"))
    if _has(stats, "positive_in_box"):
        rows.append(("relevance mass in box", fmt(stats["positive_in_box"].mean())))
    if _has(stats, "conservation"):
        rows.append(("conservation (median)", _conservation(stats)))
    if m.precision:
        rows.append(("precision (float64 probe)", precision_text(m.precision)))
    if _has(stats, "aopc_morf"):
        text = f"MoRF {fmt(stats['aopc_morf'].mean())}"
        if _has(stats, "aopc_random"):
            text += f", random order {fmt(stats['aopc_random'].mean())} (higher MoRF than random: faithful)"
        rows.append(("AOPC (mean)", text))
    return rows + list(extra)


def _known(value: object, unknown: str = "–") -> str:
    """A recorded configuration value for the summary; `unknown` where the run did not record it."""
    return unknown if value is None else str(value)


def _conservation(stats: pd.DataFrame) -> str:
    """The median share of the start relevance the maps keep, and how many images keep under half of it."""
    kept = stats["conservation"].dropna()
    low = int((kept < 0.5).sum())
    return (f"{fmt(kept.median())} of the start relevance reaches the input (absorbed by biases and stabilisers: "
            f"{fmt(stats['absorbed'].dropna().median())}); {fmt(low)} image(s) keep under half")


def precision_text(probe: dict) -> str:
    """The manifest's precision probe in one line; a correlation under 0.999 (or a missing probe) is flagged."""
    from lrp_module.oracle import CORRELATION_WARNING

    if not probe.get("images"):
        return f"not measured: {probe.get('error', 'no probe')}"
    error, corr = probe["max_relative_error"], probe["correlation"]
    text = (f"max relative error {error['max']:.2g} (median {error['median']:.2g}), correlation min "
            f"{corr['min']:.6f} (median {corr['median']:.6f}) on {probe['images']} images against "
            f"{probe['reference']}; {probe['device']}, {probe['dtype']}{', TF32' if probe.get('tf32') else ''}")
    if not corr["min"] >= CORRELATION_WARNING:
        text += (f"  — LOW CORRELATION (< {CORRELATION_WARNING}): these maps are not what float64 gives; "
                 "do not trust them")
    return text


def class_names(stats: pd.DataFrame, by_label: bool) -> dict[int, str]:
    """Class index -> name as the statistics record it."""
    index, name = ("label", "label_name") if by_label else ("pred", "pred_name")
    known = stats[[index, name]].dropna().drop_duplicates(index)
    return {int(i): str(n) for i, n in zip(known[index], known[name])}


def per_class(stats: pd.DataFrame, by_label: bool) -> tuple[list[str], list[list[str]]]:
    """Headings and one row per class (by label when the run has labels, else by prediction)."""
    if stats.empty:
        return [], []
    key = class_key(stats, by_label)
    groups = stats.assign(_class=key.to_numpy()).groupby("_class", sort=True)
    names = class_names(stats, by_label)
    means = [(c, h) for c, h in MEAN_COLUMNS if _has(stats, c)]
    headings = ["class", "name", "images"]
    if by_label:
        headings += ["accuracy", "most frequent error"]
    if _has(stats, "pointing_game_hit"):
        headings += ["pointing game (boxed)"]
    headings += [h for _, h in means]
    mean_values = groups[[c for c, _ in means]].mean() if means else None
    confusions = _most_frequent_errors(stats, key, names) if by_label else {}
    rows = []
    for cls, group in groups:
        cls = int(cls)
        row = ["no label" if cls == NO_LABEL else str(cls), names.get(cls, "–"), fmt(len(group))]
        if by_label:
            accuracy, labelled = _rate(group["correct"])
            row += [fmt(accuracy) if labelled else "–", confusions.get(cls, "–")]
        if _has(stats, "pointing_game_hit"):
            boxed = int(group["pointing_game_hit"].notna().sum())
            row.append(_pointing(group["pointing_game_hit"]) + ")" if boxed else "–")
        row += [fmt(mean_values.loc[cls, c]) for c, _ in means]
        rows.append(row)
    return headings, rows


def _most_frequent_errors(stats: pd.DataFrame, key: pd.Series, names: dict[int, str]) -> dict[int, str]:
    """Label -> 'predicted name (count)' of its most frequent wrong prediction."""
    wrong = stats[stats["correct"].astype("boolean").eq(False).fillna(False)]
    if wrong.empty:
        return {}
    counts = wrong.assign(_class=key[wrong.index].to_numpy()).groupby(["_class", "pred"]).size()
    counts = counts.sort_values(ascending=False, kind="stable")
    top = counts[~counts.index.get_level_values(0).duplicated()]
    pred_names = class_names(stats, by_label=False)
    return {int(c): f"{pred_names.get(int(p), p)} ({n})" for (c, p), n in top.items()}
