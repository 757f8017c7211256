"""The report's "Prototypes" section, present when the run has PCX prototypes (RUN/prototypes/, `make prototypes`):
per class, its prototypes (mixture weight, mean concept profile as a bar chart, closest images as tiles) and its
outliers (the images least likely under the class's mixture) with the concepts they use more or less than their
prototype."""
from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ..layout import PROTOTYPE_IMAGES, PROTOTYPE_SUMMARY, PROTOTYPE_TABLE, RunLayout
from . import html
from .plots import _figure, _save
from .run_data import ReportError, RunData, read_maps
from .tiles import render_rows

CLASSES_SHOWN = 8  # classes with pictures (the most images first); the table lists every analysed class
CLOSEST_SHOWN = 4
OUTLIERS_SHOWN = 4
PROFILE_CONCEPTS = 8


@dataclass
class Prototypes:
    """What the report shows of RUN/prototypes/: the summary and both tables."""

    folder: Path
    summary: dict
    images: pd.DataFrame
    prototypes: pd.DataFrame


def load(run_root: Path) -> Prototypes | None:
    """RUN/prototypes/'s summary and tables, None when the run has none."""
    folder = RunLayout(run_root).prototypes
    files = [folder / name for name in (PROTOTYPE_SUMMARY, PROTOTYPE_IMAGES, PROTOTYPE_TABLE)]
    if not all(path.is_file() for path in files):
        return None
    try:
        summary = json.loads(files[0].read_text())
        images = pq.read_table(files[1], columns=["image_id", "class", "prototype", "log_likelihood", "outlier_rank",
                                                  "over_concepts", "over_deviations", "under_concepts",
                                                  "under_deviations"]).to_pandas()
        table = pq.read_table(files[2], columns=["class", "prototype", "weight", "images", "closest", "top_concepts",
                                                 "top_shares"]).to_pandas()
    except (json.JSONDecodeError, OSError, KeyError, ValueError) as error:
        raise ReportError(f"{folder}: unreadable prototypes ({error}); rerun `make prototypes`") from None
    return Prototypes(folder, summary, images, table)


def summary_rows(found: Prototypes) -> list[tuple[str, str]]:
    classes = found.summary["classes"]
    counts = ", ".join(f"{c['name']} {c['components']}" for c in classes[:10]) + (" ..." if len(classes) > 10 else "")
    return [("prototypes (PCX)", f"{len(classes)} classes at {found.summary['layer']}: {counts}; see Prototypes")]


def _profile_plot(row, layer: str, path: Path) -> None:
    figure, axes = _figure(3.2, 2.4)
    figure.subplots_adjust(bottom=0.2)  # room for the axis label under the channel numbers
    concepts = list(row.top_concepts[:PROFILE_CONCEPTS])
    shares = list(row.top_shares[:PROFILE_CONCEPTS])
    axes.bar(range(len(concepts)), shares, color="#1f77b4")
    axes.set_xticks(range(len(concepts)), [str(c) for c in concepts], fontsize=7)
    axes.tick_params(labelsize=7)
    axes.set_xlabel(f"concept (channel of {layer})", fontsize=8)
    axes.set_ylabel("mean share of relevance", fontsize=8)
    axes.set_title(f"prototype {row.prototype}: mean concept profile", fontsize=9)
    _save(figure, path)


def _concepts(channels, deviations) -> str:
    return ", ".join(f"{int(c)} ({float(v):+.3f})" for c, v in zip(channels, deviations)) or "none"


def _class_block(run: RunData, found: Prototypes, entry: dict, images: Path, prefix: str, cmap: str) -> str:
    cls = entry["class"]
    slug = f"prototypes-{cls}"
    rows = found.prototypes[found.prototypes["class"] == cls].sort_values("prototype")
    members_of = found.images[found.images["class"] == cls]
    outliers = members_of.sort_values("outlier_rank").head(OUTLIERS_SHOWN)
    shown_ids = [i for row in rows.itertuples() for i in list(row.closest)[:CLOSEST_SHOWN]]
    shown_ids += [i for i in outliers["image_id"] if i not in shown_ids]
    stats = run.stats.set_index("image_id").loc[list(dict.fromkeys(shown_ids))].reset_index()
    files = render_rows(stats, read_maps(run.root, stats), images, cmap)

    def tile(image_id: str, caption: list[str]) -> str:
        return html.tile(files[image_id].tile(image_id, prefix, caption))

    parts = [f'<h3 id="{slug}">{escape(entry["name"])} (class {cls}): {entry["images"]:,} images, '
             f'{entry["components"]} prototype(s)</h3>']
    likelihood = members_of.set_index("image_id")["log_likelihood"]
    for row in rows.itertuples(index=False):
        name = f"{slug}-profile-{row.prototype}.png"
        _profile_plot(row, found.summary["layer"], images / name)
        profile = (f'<figure><img class="grid" src="{escape(prefix + name)}" alt="prototype {row.prototype}: mean '
                   f'concept profile"><figcaption>top concepts: '
                   + escape(", ".join(f"{c} ({s:.0%})" for c, s in zip(row.top_concepts[:4], row.top_shares[:4])))
                   + "</figcaption></figure>")
        tiles = "".join(tile(i, [f"log-likelihood {likelihood[i]:.1f}"]) for i in list(row.closest)[:CLOSEST_SHOWN])
        parts.append(f'<p class="note">prototype {row.prototype}: weight {row.weight:.0%}, {row.images:,} images; '
                     "its mean concept profile and its closest images</p>")
        parts.append(f'<div class="gallery">{profile}{tiles}</div>')
    parts.append('<p class="note">outliers: the images least likely under the class\'s mixture, with the concepts '
                 "they use more (+) and less (−) than their prototype (share of relevance minus the prototype's)</p>")
    parts.append('<div class="gallery">' + "".join(
        tile(r.image_id, [f"outlier {r.outlier_rank + 1}, prototype {r.prototype}",
                          f"log-likelihood {r.log_likelihood:.1f}",
                          f"more: {_concepts(r.over_concepts, r.over_deviations)}",
                          f"less: {_concepts(r.under_concepts, r.under_deviations)}"])
        for r in outliers.itertuples(index=False)) + "</div>")
    return "".join(parts)


def section(run: RunData, found: Prototypes, images: Path, prefix: str, cmap: str) -> str:
    """The Prototypes section's HTML (pictures written into `images`, linked as prefix + name)."""
    summary = found.summary
    classes = summary["classes"]
    table = html.table(["class", "images", "prototypes", "weights", "BIC by number of prototypes"],
                       [[f"{c['name']} ({c['class']})", f"{c['images']:,}", str(c["components"]),
                         " / ".join(f"{w:.0%}" for w in c["weights"]),
                         ", ".join(f"{k}: {v:.0f}" for k, v in c["bic"].items())] for c in classes])
    skipped = summary.get("skipped", [])
    skipped_html = ('<p class="note">Skipped: ' + escape(", ".join(f"{s['name']} ({s['images']}: {s['reason']})"
                                                                   for s in skipped[:30])) + "</p>") if skipped else ""
    shown = sorted(classes, key=lambda c: (-c["images"], c["class"]))[:CLASSES_SHOWN]
    blocks = [_class_block(run, found, entry, images, prefix, cmap) for entry in shown]
    options = summary.get("options", {}).get("params", {})
    note = (f"Prototypical concept-based explanations (PCX, Dreyer et al. 2024) at {summary['layer']}: per class (the "
            "class each map explains), a Gaussian mixture over the images' concept-relevance vectors (each "
            "concept's share of the image's relevance at the layer), its number of components — the prototypes, "
            f"the class's sub-strategies — chosen by BIC (at most {options.get('max_components', '?')}). A small "
            "prototype whose closest images share something the class does not need (a watermark, a tag) is a "
            "Clever-Hans candidate. Pictures for the "
            f"{len(shown)} class(es) with the most images; all results in RUN/prototypes/.")
    return html.section("prototypes", "Prototypes (PCX)", table + skipped_html + "".join(blocks), note)

