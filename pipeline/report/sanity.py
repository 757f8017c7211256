"""The report's "Sanity check" section, present when the run has a randomisation test (RUN/sanity.parquet,
`make sanity`): the cascade plot of Adebayo et al. (mean similarity of the randomised models' maps to the original
maps, layers randomised from the top down) beside the independent test, and the table of its means per layer.
`python -m pipeline.report.sanity_figure RUN OUT.png [--table]` draws the plot alone (the README's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..layout import RunLayout
from . import html
from .plots import _figure, _save
from .run_data import ReportError

PLOT_FILE = "sanity-cascade.png"
MEASURES = (("spearman_abs", "Spearman |R|", "#1f77b4"), ("ssim", "SSIM", "#2ca02c"),
            ("top_k_intersection", "top-k intersection", "#ff7f0e"))  # plotted; the table has the signed Spearman
MODES = ("cascading", "independent")


def load(root: Path) -> pd.DataFrame | None:
    """The run's randomisation test table, None when it has none; ReportError when unreadable."""
    path = RunLayout(root).sanity
    if not path.is_file():
        return None
    try:
        return pq.read_table(path).to_pandas()
    except Exception as error:  # pyarrow's errors are many; any means the file cannot be shown
        raise ReportError(f"{path}: unreadable ({error})") from None


def means(table: pd.DataFrame) -> pd.DataFrame:
    """Per mode and step: the layer, the images, and the mean and standard deviation of each measure."""
    columns = [m for m, _, _ in MEASURES] + ["spearman", "emprt"]
    grouped = table.groupby(["mode", "step", "layer"], sort=False)
    out = grouped[columns].mean().join(grouped[columns].std().add_suffix("_std")).join(grouped.size().rename("images"))
    return out.reset_index().sort_values(["mode", "step"], kind="stable").reset_index(drop=True)


def cascade_plot(table: pd.DataFrame, path: Path, title: str | None = None) -> None:
    """One panel per mode: each measure's mean over the images (band: one standard deviation) against the layers
    randomised, the original model first, then from the top layer down."""
    summary = means(table)
    modes = [m for m in MODES if m in set(summary["mode"])]
    figure, _ = _figure(4.6 * len(modes), 3.6)
    figure.clear()
    figure.subplots_adjust(left=0.08 if len(modes) > 1 else 0.13, right=0.98, bottom=0.3, top=0.85, wspace=0.12)
    for index, mode in enumerate(modes):
        axes = figure.add_subplot(1, len(modes), index + 1)
        rows = summary[summary["mode"] == mode]
        x = np.arange(len(rows))
        for column, label, colour in MEASURES:
            mean, std = rows[column].to_numpy(), rows[f"{column}_std"].fillna(0).to_numpy()
            axes.plot(x, mean, marker="o", markersize=3, color=colour, label=label)
            axes.fill_between(x, mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
        axes.axhline(0, color="#999999", linewidth=0.6)
        axes.set_xticks(x, rows["layer"], rotation=70, fontsize=6, ha="right")
        axes.set_ylim(-0.25, 1.05)
        axes.tick_params(labelsize=7)
        axes.set_title(f"{mode} randomisation ({int(rows['images'].iloc[0])} images)", fontsize=9)
        if index == 0:
            axes.set_ylabel("similarity to the original maps", fontsize=8)
            axes.legend(fontsize=7, loc="lower left")
    if title:
        figure.suptitle(title, fontsize=10)
    _save(figure, path)


def markdown_table(table: pd.DataFrame) -> str:
    """The means per layer as a Markdown table (docs/sanity.md's figures)."""
    summary = means(table)
    lines = ["| mode | step | layer randomised | Spearman \\|R\\| | SSIM | top-k intersection | eMPRT |",
             "|---|---|---|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        lines.append(f"| {row.mode} | {row.step} | {row.layer} | {row.spearman_abs:.3f} | {row.ssim:.3f} | "
                     f"{row.top_k_intersection:.3f} | {row.emprt:+.3f} |")
    return "\n".join(lines)


def section(table: pd.DataFrame, folder: Path, prefix: str) -> str:
    """The section's HTML; writes the plot into `folder` (linked as `prefix` + its name)."""
    cascade_plot(table, folder / PLOT_FILE)
    summary = means(table)
    rows = [[row.mode, str(row.step), row.layer, f"{row.spearman_abs:.3f}", f"{row.spearman:.3f}", f"{row.ssim:.3f}",
             f"{row.top_k_intersection:.3f}", f"{row.emprt:+.3f}"] for row in summary.itertuples(index=False)]
    body = (html.plots([("cascade plot", prefix + PLOT_FILE)])
            + html.table(["mode", "step", "layer randomised", "Spearman |R|", "Spearman", "SSIM",
                          "top-k intersection", "eMPRT"], rows))
    images = int(summary["images"].max()) if len(summary) else 0
    note = (f"Model parameter randomisation test (Adebayo et al. 2018) on {images} images of the run "
            "(sanity.parquet): the maps of the model with its layers re-initialised, from the top down (cascading) "
            "and one at a time (independent), compared with the original maps. Maps that depend on the model fall "
            "towards 0 as layers are randomised; a curve that stays near 1 means the explanation ignores the "
            "weights. eMPRT: relative change of the map's entropy (higher: the random model's maps are more "
            "disordered). Means over the images.")
    return html.section("sanity", "Sanity check", body, note)
