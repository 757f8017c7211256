"""The report's "Strategies" section, present when the run has a SpRAy analysis (RUN/spray/, `make spray`): the
classes ranked by eigengap (how distinct their clusters of maps are), and for the first ones their Laplacian
eigenvalues, the t-SNE picture coloured by cluster, and per cluster its mean heat map and its most typical images.
Classes with a small, tight cluster are listed as Clever-Hans candidates in the summary."""
from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.ticker import MaxNLocator
from PIL import Image

from ..layout import RunLayout
from ..spray.outputs import CLUSTERS_FILE, SUMMARY_FILE, read_means
from . import html
from .heatmap import heatmap_image
from .plots import _figure, _save
from .run_data import ReportError, RunData, read_maps
from .tiles import render_rows

CLASSES_SHOWN = 6  # classes with pictures; the table lists every analysed class
TILES_PER_CLUSTER = 3
EIGENVALUES_SHOWN = 16
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass
class Strategies:
    """What the report shows of RUN/spray/: the summary and the clusters table."""

    folder: Path
    summary: dict
    clusters: pd.DataFrame

    @property
    def candidates(self) -> list[dict]:
        return [c for c in self.summary["classes"] if c["candidate"]]


def load(run_root: Path) -> Strategies | None:
    """RUN/spray/'s summary and clusters, None when the run has no SpRAy analysis."""
    folder = RunLayout(run_root).spray
    summary_file, clusters_file = folder / SUMMARY_FILE, folder / CLUSTERS_FILE
    if not (summary_file.is_file() and clusters_file.is_file()):
        return None
    try:
        summary = json.loads(summary_file.read_text())
        clusters = pq.read_table(clusters_file, columns=["image_id", "class", "cluster", "x", "y", "outlier"]
                                 ).to_pandas()
    except (json.JSONDecodeError, OSError, KeyError, ValueError) as error:
        raise ReportError(f"{folder}: unreadable SpRAy results ({error}); rerun `make spray`") from None
    return Strategies(folder, summary, clusters)


def summary_rows(strategies: Strategies) -> list[tuple[str, str]]:
    """Lines for the report's summary table."""
    candidates = strategies.candidates
    text = ", ".join(f"{c['name']} ({c['class']}): a tight cluster of {_small_cluster(c)}" for c in candidates)
    options = strategies.summary.get("options", {})
    return [("strategies (SpRAy)", f"{len(strategies.summary['classes'])} classes analysed by "
             f"{options.get('by', 'pred')}, {options.get('variant', '?')} maps; see Strategies"),
            ("Clever-Hans candidates", text or "none (no class has a small, tight cluster of maps)")]


def _small_cluster(entry: dict) -> str:
    small = min(entry["clusters"], key=lambda c: (c["tightness"] if c["tightness"] is not None else 9, c["share"]))
    return f"{small['images']} images ({small['share']:.0%} of the class, tightness {small['tightness']:.2f})"


def _eigenvalue_plot(entry: dict, path: Path) -> None:
    figure, axes = _figure(3.2, 2.4)
    values = np.asarray(entry["eigenvalues"][:EIGENVALUES_SHOWN])
    positions = np.arange(1, len(values) + 1)
    axes.plot(positions, values, "o-", color="#555555", markersize=3)
    k = entry["k_chosen"]
    axes.axvspan(k, k + 1, color="#d62728", alpha=0.15)  # the chosen gap: between eigenvalues k and k + 1
    axes.annotate(f"gap {entry['eigengap']:.3f}: k = {k}", (k + 1, values[min(k, len(values) - 1)]),
                  fontsize=7, xytext=(4, -12), textcoords="offset points")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("eigenvalue number", fontsize=8)
    axes.set_ylabel("eigenvalue of L", fontsize=8)
    axes.set_title(f"{entry['name']}: Laplacian spectrum", fontsize=9)
    axes.tick_params(labelsize=7)
    _save(figure, path)


def _embedding_plot(entry: dict, rows: pd.DataFrame, path: Path) -> None:
    figure, axes = _figure(3.2, 2.8)
    for cluster in range(entry["k_chosen"]):
        members = rows[rows["cluster"] == cluster]
        axes.scatter(members["x"], members["y"], s=8, color=COLOURS[cluster % len(COLOURS)],
                     label=f"{cluster} ({len(members)})", linewidths=0)
    axes.legend(fontsize=6, markerscale=1.5, title="cluster", title_fontsize=6)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"{entry['name']}: t-SNE of the spectral embedding", fontsize=9)
    _save(figure, path)


def _mean_heatmap(mean: np.ndarray, path: Path, cmap: str) -> None:
    image = heatmap_image(mean, cmap)
    side = max(64, mean.shape[0])
    image.resize((side, side), Image.Resampling.NEAREST).save(path, compress_level=1)


def _typical(rows: pd.DataFrame, cluster: int, n: int) -> pd.DataFrame:
    """The cluster's n members with the lowest outlier scores (its most typical images), ties by image id."""
    members = rows[rows["cluster"] == cluster]
    return members.sort_values(["outlier", "image_id"], kind="stable").head(n)


def _class_block(run: RunData, strategies: Strategies, entry: dict, images: Path, prefix: str, cmap: str) -> str:
    cls = entry["class"]
    slug = f"spray-{cls}"
    rows = strategies.clusters[strategies.clusters["class"] == cls]
    _eigenvalue_plot(entry, images / f"{slug}-eigenvalues.png")
    _embedding_plot(entry, rows, images / f"{slug}-tsne.png")
    means = read_means(strategies.folder, cls, entry["k_chosen"])
    shown = pd.concat([_typical(rows, c, TILES_PER_CLUSTER) for c in range(entry["k_chosen"])])
    stats = run.stats.set_index("image_id").loc[shown["image_id"]].reset_index()
    files = render_rows(stats, read_maps(run.root, stats), images, cmap)
    parts = [f'<h3 id="{slug}">{entry["rank"]}. {escape(entry["name"])} (class {cls}): eigengap '
             f'{entry["eigengap"]:.3f}, k = {entry["k_chosen"]}, {entry["images"]:,} images'
             + (' <span class="wrong">Clever-Hans candidate</span>' if entry["candidate"] else "") + "</h3>",
             html.plots([("eigenvalues", f"{prefix}{slug}-eigenvalues.png"), ("t-SNE", f"{prefix}{slug}-tsne.png")])]
    notes = entry.get("k_not_meaningful") or {}
    if notes:
        chosen = " — including the chosen k" if str(entry["k_chosen"]) in notes else ""
        parts.append(f'<p class="note wrong">Not meaningful for this class{chosen}: '
                     + escape("; ".join(f"k = {k}: {why}" for k, why in notes.items())) + "</p>")
    for facts in entry["clusters"]:
        c = facts["cluster"]
        mean_html = ""
        if means is not None:
            name = f"{slug}-mean-{c}.png"
            _mean_heatmap(means[c], images / name, cmap)
            mean_html = (f'<figure><img src="{escape(prefix + name)}" alt="{escape(entry["name"])} cluster {c}: mean '
                         f'heat map" width="128" height="128"><figcaption>mean map</figcaption></figure>')
        tiles = []
        for row in _typical(rows, c, TILES_PER_CLUSTER).itertuples(index=False):
            tiles.append(files[row.image_id].tile(row.image_id, prefix, [f"outlier score {row.outlier:.2f}"]))
        tight = f", tightness {facts['tightness']:.2f}" if facts["tightness"] is not None else ""
        parts.append(f'<p class="note">cluster {c}: {facts["images"]:,} images ({facts["share"]:.0%}){tight}; '
                     "mean map and its most typical members</p>")
        parts.append('<div class="gallery">' + mean_html + "".join(html.tile(t) for t in tiles) + "</div>")
    return "".join(parts)


def section(run: RunData, strategies: Strategies, images: Path, prefix: str, cmap: str) -> str:
    """The Strategies section's HTML (pictures written into `images`, linked as prefix + name)."""
    classes = strategies.summary["classes"]
    options = strategies.summary.get("options", {})
    table = html.table(
        ["rank", "class", "images", "eigengap", "k", "cluster sizes", "Clever-Hans candidate", "k not meaningful"],
        [[str(c["rank"]), f"{c['name']} ({c['class']})", f"{c['images']:,}", f"{c['eigengap']:.3f}",
          str(c["k_chosen"]), " / ".join(str(x["images"]) for x in c["clusters"]), "yes" if c["candidate"] else "",
          ", ".join(c.get("k_not_meaningful") or {})] for c in classes])
    skipped = strategies.summary.get("skipped", [])
    listed = ", ".join(f"{s.get('name') or s['class']} ({s['images']}: {s['reason']})" for s in skipped[:30])
    more = f" and {len(skipped) - 30} more" if len(skipped) > 30 else ""
    skipped_html = f'<p class="note">Skipped: {escape(listed + more)}</p>' if skipped else ""
    blocks = [_class_block(run, strategies, entry, images, prefix, cmap) for entry in classes[:CLASSES_SHOWN]]
    note = (f"Spectral relevance analysis (SpRAy) of each class's maps (by {options.get('by', 'pred')}, "
            f"{options.get('variant', '?')} normalisation, {options.get('grid', '?')}x{options.get('grid', '?')} "
            "grid): classes ranked by the eigengap of their kNN graph's Laplacian — the larger, the more distinct "
            "the groups of maps, i.e. the strategies. A candidate has a small, tight cluster (at most half the class, "
            "neighbours much closer than usual): many images explained the same unusual way, e.g. by a watermark. "
            f"Pictures for the first {min(CLASSES_SHOWN, len(classes))}; all results in RUN/spray/ (also a ViRelAy "
            "project).")
    return html.section("strategies", "Strategies (SpRAy)", table + skipped_html + "".join(blocks), note)
