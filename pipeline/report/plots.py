"""Distributions of the per-image statistics as small PNG histograms (matplotlib, Agg, no pyplot state), split
into correct and wrong predictions where the run has labels; mean perturbation curves where the run has them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

# Integer ids and bookkeeping: not distributions worth a plot.
NOT_PLOTTED = {"label", "pred", "target", "row"}
BINS = 40


def plotted_columns(stats: pd.DataFrame) -> list[str]:
    """Numeric (not boolean) statistics columns with at least one value, in table order."""
    return [c for c in stats.columns
            if c not in NOT_PLOTTED and not c.startswith("_") and pd.api.types.is_numeric_dtype(stats[c])
            and not pd.api.types.is_bool_dtype(stats[c]) and stats[c].notna().any()]


def _figure(width: float, height: float) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=0.17, right=0.97, bottom=0.14, top=0.88)  # fixed margins: layout engines are slow
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=80)


def histogram(stats: pd.DataFrame, column: str, path: Path, split_by_correct: bool) -> None:
    """One histogram, written as a PNG (see `histogram_figure`)."""
    _save(histogram_figure(stats, column, split_by_correct), path)


def histogram_figure(stats: pd.DataFrame, column: str, split_by_correct: bool) -> Figure:
    """One histogram (counts computed by numpy, drawn as filled steps: fast for 50,000 values); correct, wrong
    and unlabelled images overlaid when `split_by_correct`. Counts are whole numbers on the y axis; the x axis
    has few ticks in a compact format, so that labels of wide-ranging values never overlap."""
    figure, axes = _figure(3.6, 2.4)
    FigureCanvasAgg(figure)
    values = stats[column].astype("float64").to_numpy()
    finite = np.isfinite(values)
    edges = np.histogram_bin_edges(values[finite], bins=BINS) if finite.any() else np.linspace(0, 1, BINS + 1)
    if split_by_correct:
        correct = stats["correct"].astype("boolean")
        groups = (("correct", "#1f77b4", correct.eq(True)), ("wrong", "#d62728", correct.eq(False)),
                  ("no label", "#7f7f7f", correct.isna()))
        for name, colour, member in groups:
            part = values[member.fillna(False).to_numpy() & finite]
            if len(part):
                counts, _ = np.histogram(part, bins=edges)
                axes.stairs(counts, edges, fill=True, alpha=0.5, color=colour, label=f"{name} ({len(part):,})")
        axes.legend(fontsize=7)
    else:
        axes.stairs(np.histogram(values[finite], bins=edges)[0], edges, fill=True, color="#555555")
    axes.set_title(column, fontsize=9)
    axes.set_ylabel("images", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.xaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    return figure


def mean_curves(stats: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Mean (over images) of each list column, e.g. the model's score as the most relevant regions are removed
    (MoRF) against a random order."""
    figure, axes = _figure(4.2, 2.8)
    for column in columns:
        curves = [np.asarray(c, dtype=np.float64) for c in stats[column] if c is not None and len(c)]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        axes.plot(np.mean([c[:length] for c in curves], axis=0), label=f"{column} ({len(curves)} images)")
    axes.set_xlabel("perturbation step", fontsize=8)
    axes.set_ylabel("mean score", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7)
    _save(figure, path)


def write_plots(stats: pd.DataFrame, list_columns: list[str], folder: Path, split_by_correct: bool
                ) -> list[tuple[str, str]]:
    """(title, file name in `folder`) of every plot written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for column in plotted_columns(stats):
        name = f"hist-{column}.png"
        histogram(stats, column, folder / name, split_by_correct)
        written.append((column, name))
    curves = [c for c in list_columns if c in stats and stats[c].notna().any()]
    if curves:
        mean_curves(stats, curves, folder / "curves.png")
        written.append(("mean curves: " + ", ".join(curves), "curves.png"))
    return written
