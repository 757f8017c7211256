"""The report's "Concepts" section, present when the run has concept data (explained with CONCEPTS=<layer>): per
class, the concepts (channels of the layer) carrying most of its relevance (the mean concept relevance over the
images explained for that class), each with its reference crops (the class's RelMax images at the receptive field of
their most relevant neuron) and its conditional heat map on one of the class's images. The maps come from the run's
model rebuilt on the CPU (pipeline/concepts/references.py): a full backward pass from the class, masked at the
layer to the concept."""
from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..concepts import references as refs
from ..concepts.run_concepts import RunConcepts, has_concepts, open_concepts
from ..errors import PipelineError, lower_layer_error_types
from . import concept_pictures as pictures
from . import html
from .heatmap import heatmap_image, overlay
from .run_data import ReportError, RunData

CLASSES_SHOWN = 8  # the classes with the most images; the table lists every class's top concepts
CONCEPTS_PER_CLASS = 3
REFERENCES_SHOWN = 4
TILE = 96


def load(run_root: Path) -> RunConcepts | None:
    """The run's concept data, None when it has none."""
    if not has_concepts(run_root):
        return None
    return open_concepts(run_root, ReportError)


def top_concepts(concepts: RunConcepts, layer: str, klass: int, k: int = CONCEPTS_PER_CLASS
                 ) -> list[tuple[int, float, float]]:
    """(channel, mean relevance, share) of the class's k concepts with the largest mean relevance over its images;
    share: the mean over the sum of |mean| over all channels."""
    mean = concepts.mean_relevance(layer, klass)
    total = float(np.abs(mean).sum())
    order = np.argsort(-mean, kind="stable")[:k]
    return [(int(c), float(mean[c]), float(mean[c]) / total if total > 0 else 0.0) for c in order]


def shown_classes(stats: pd.DataFrame, n: int = CLASSES_SHOWN) -> list[int]:
    """The n explained classes with the most images (ties: lower index first)."""
    counts = stats["target"].astype("int64").value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [int(c) for c, _ in ordered[:n]]


def _class_example(concepts: RunConcepts, layer: str, klass: int, channel: int) -> pd.Series:
    """The class's image where the concept is most relevant (ties: first image id)."""
    rows = concepts.stats.assign(_value=concepts.relevance(layer)[:, channel])
    rows = rows[rows["target"] == klass]
    return rows.sort_values(["_value", "image_id"], ascending=[False, True], kind="stable").iloc[0]


def _save_grid(found: list[refs.ReferenceImage], path: Path, cmap: str) -> None:
    pictures.grid(found, cmap, TILE).save(path, compress_level=1)


def _examples(concepts: RunConcepts, lrp, layer: str, klass: int, channels: list[int], images: Path, prefix: str,
              cmap: str) -> dict[int, str]:
    """Channel -> its conditional map on one of the class's images (image, map and overlay as one figure), the
    channels' maps computed in one batch."""
    figures, loaded = {}, []
    for channel in channels:
        row = _class_example(concepts, layer, klass, channel)
        member = row["member"] if isinstance(row["member"], str) else None
        try:
            loaded.append((channel, row, *refs.load_image(row["path"], member, concepts.size)))
        except refs.DecodeError as error:
            figures[channel] = (f'<p class="note">{escape(str(row["image_id"]))}: image not available '
                                f"({escape(str(error))})</p>")
    if not loaded:
        return figures
    maps = refs.conditional_maps(lrp, torch.stack([item[2] for item in loaded]), [klass] * len(loaded), layer,
                                 [item[0] for item in loaded], concepts.record.exclude_parallel)
    for (channel, row, _, picture), heat in zip(loaded, maps.float().numpy()):
        stem = f"concept-{pictures.file_stem(layer, channel, klass)}"
        names = [f"{stem}-example-{kind}.png" for kind in ("image", "heatmap", "overlay")]
        Image.fromarray(picture).save(images / names[0], compress_level=1)
        heatmap_image(heat, cmap).save(images / names[1], compress_level=1)
        Image.fromarray(overlay(picture, heat, cmap)).save(images / names[2], compress_level=1)
        tile = html.Tile(str(row["image_id"]), prefix + names[1], prefix + names[0], prefix + names[2],
                         [f"concept {channel}'s map for class {klass}", f"concept relevance {row['_value']:.3g}"])
        figures[channel] = html.tile(tile)
    return figures


def _class_block(run: RunData, concepts: RunConcepts, lrp, layer: str, klass: int, names: dict[int, str],
                 images: Path, prefix: str, cmap: str) -> str:
    chosen = top_concepts(concepts, layer, klass)
    found = refs.references(concepts, lrp, layer, [c for c, _, _ in chosen], klass, REFERENCES_SHOWN)
    examples = _examples(concepts, lrp, layer, klass, [c for c, _, _ in chosen], images, prefix, cmap)
    title = f"{names.get(klass, str(klass))} (class {klass})"
    count = int((concepts.stats["target"] == klass).sum())
    anchor = f"concepts-{pictures.safe_layer(layer)}-class-{klass}"
    parts = [f'<h4 id="{escape(anchor)}">{escape(title)}: {count:,} images</h4>']
    for channel, mean, share in chosen:
        stem = f"concept-{pictures.file_stem(layer, channel, klass)}"
        references = found[channel]
        grid_html = '<p class="note">No reference image readable.</p>'
        if any(r.image is not None for r in references):
            _save_grid(references, images / f"{stem}-grid.png", cmap)
            grid_html = (f'<figure><img class="grid" src="{escape(prefix + stem)}-grid.png" alt="concept {channel}: '
                         f'reference crops and their conditional maps"><figcaption>references (RelMax for class '
                         f'{klass}): crops above, conditional maps below</figcaption></figure>')
        example = examples[channel]
        parts.append(f'<p class="note">concept {channel} of {escape(layer)}: mean relevance {mean:.3g} '
                     f'({share:.0%} of the class\'s |relevance| at the layer)</p>')
        parts.append(f'<div class="gallery">{example}{grid_html}</div>')
    return "".join(parts)


def _table(concepts: RunConcepts, layer: str, names: dict[int, str]) -> str:
    rows = []
    for klass in sorted(int(c) for c in concepts.stats["target"].unique()):
        top = top_concepts(concepts, layer, klass)
        rows.append([str(klass), names.get(klass, "–"), f"{int((concepts.stats['target'] == klass).sum()):,}",
                     ", ".join(f"{c} ({share:.0%})" for c, _, share in top)])
    return html.table(["class", "name", "images", f"top concepts of {layer} (share of |relevance|)"], rows)


def section(run: RunData, concepts: RunConcepts, images: Path, prefix: str, cmap: str) -> str:
    """The Concepts section's HTML (pictures written into `images`, linked as prefix + name)."""
    names = {int(i): str(n) for i, n in zip(run.stats["pred"], run.stats["pred_name"]) if isinstance(n, str)}
    classes = shown_classes(concepts.stats)
    parts = []
    try:
        lrp, why = refs.run_lrp(concepts.manifest), ""
    except (PipelineError, *lower_layer_error_types()) as error:  # e.g. weights not here: the tables still stand
        lrp, why = None, str(error)
    pictured = concepts.record.maps_layer or next(iter(concepts.layers))  # pictures for one layer: the maps layer
    for layer in concepts.layers:
        parts.append(f"<h3>{escape(layer)}</h3>" + _table(concepts, layer, names))
        if layer != pictured:
            parts.append(f'<p class="note">Pictures for {escape(pictured)} only; `make concepts LAYER={escape(layer)}` '
                         "renders this layer's references.</p>")
        elif lrp is None:
            parts.append(f'<p class="note wrong">No pictures: the run\'s model could not be rebuilt ({escape(why)})'
                         "</p>")
        else:
            parts += [_class_block(run, concepts, lrp, layer, klass, names, images, prefix, cmap)
                      for klass in classes]
    note = (f"Concept Relevance Propagation (CRP): a concept is a channel of a layer; its relevance for a class is "
            f"the mean, over the images explained for that class, of the relevance the channel carries. For the "
            f"run's maps layer ({pictured}) and the "
            f"{len(classes)} class(es) with the most images, the {CONCEPTS_PER_CLASS} concepts carrying most of it: "
            f"their conditional map on the class's image where they matter most (a full backward pass from the "
            f"class, masked at the layer to the concept) and their {REFERENCES_SHOWN} reference images (the class's "
            "RelMax images, cropped to the receptive field of their most relevant neuron). `make concepts` renders "
            "any layer's and channel's references.")
    return html.section("concepts", "Concepts", "".join(parts), note)
