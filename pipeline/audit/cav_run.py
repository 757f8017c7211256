"""`python -m pipeline cav RUN`: an artifact concept over a finished run. Reads the run's concept-relevance vectors
at a layer (never the model), fits the pattern and the classifier CAV of the marked images, ranks every image by
both, rates every channel as a retriever of the marked set, measures retrieval against a truth where one is given
and R_bias where masks are given; then writes RUN/cav/NAME-*. Every input is checked, and everything computed,
before the first file is written."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import PipelineError
from ..layout import CAV_NAME, RunLayout
from ..run_manifest import read_manifest
from ..run_reader import (
    concept_maps,
    concept_relevance,
    concepts_record,
    map_pieces,
    map_size,
    open_run_folder,
    read_stats,
)
from . import cav_outputs
from .cav import KINDS, fit_cavs, ranks
from .marked import marked_from_csv, marked_from_prototype, truth_from_csv
from .masks import map_masks, positive_share, read_masks
from .retrieval import auroc_ap, column_aurocs, column_ranks

STATS_COLUMNS = ("image_id", "shard", "row", "target", "pred", "path")
PIECE = 256  # maps read per piece for R_bias
BEST_LISTED = 5  # channels listed in the summary


class CavRunError(PipelineError, ValueError):
    """The run or the request cannot be audited; the message names the culprit."""


@dataclass(frozen=True)
class CavOptions:
    """What to fit and measure (docs/audit.md)."""

    layer: str
    marked: str | None = None  # CSV with an image_id column
    prototype: str | None = None  # CLASS:K of RUN/prototypes/images.parquet
    truth: str | None = None  # CSV: image_id and a 0/1 column
    masks: str | None = None  # .npz as the dataset's masks.npz
    name: str = "artifact"
    channel: int | None = None  # the channel whose conditional maps get R_bias (default: the best by auroc_marked)
    normalised: bool = True  # CRP's shares (each vector / its sum of |R|); False: the stored relevance
    seed: int = 0


def _run_images(layout: RunLayout, ids: list[str]) -> pd.DataFrame:
    """The statistics rows of the concept vectors' images, in their order."""
    stats = read_stats(layout, CavRunError, STATS_COLUMNS, optional=("member",)).to_pandas()
    if "member" not in stats:
        stats["member"] = None
    stats = stats.drop_duplicates("image_id").set_index("image_id")
    missing = pd.Index(ids).difference(stats.index)
    if len(missing):
        raise CavRunError(f"{layout.root}: {len(missing)} image(s) with concept relevance have no statistics row "
                          f"({', '.join(missing[:3])}): an unfinished or damaged run")
    return stats.loc[ids].reset_index()


def _check(options: CavOptions) -> None:
    if not CAV_NAME.match(options.name):
        raise CavRunError(f"--name must be letters, digits, '_', '.', '-' (not first), got {options.name!r}")
    if (options.marked is None) == (options.prototype is None):
        raise CavRunError("give the marked images: --marked ids.csv or --prototype CLASS:K (one of them)")


def _r_bias(layout: RunLayout, images: pd.DataFrame, masks: dict[str, np.ndarray], channel: int | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(N,) R_bias of the map and (N,) of channel `channel`'s conditional map (None: not computed), NaN where
    there is no mask or no such map."""
    n = len(images)
    r_map, r_concept = np.full(n, np.nan), np.full(n, np.nan)
    at = np.flatnonzero(images["image_id"].isin(list(masks)).to_numpy())
    rows = images.iloc[at][["shard", "row"]].assign(_position=at)
    for positions, maps in map_pieces(layout.root, rows, PIECE, CavRunError):
        stacked = np.stack([masks[images["image_id"].iat[p]] for p in positions])
        if stacked.shape[1:] != maps.shape[1:]:
            raise CavRunError(f"the run's maps are {maps.shape[1]}x{maps.shape[2]}, the masks in map pixels "
                              f"{stacked.shape[1]}x{stacked.shape[2]}")
        r_map[positions] = positive_share(maps, stacked)
    if channel is None:
        return r_map, r_concept
    for start in range(0, len(at), PIECE):
        chunk = at[start:start + PIECE]
        channels, maps = concept_maps(layout, images.iloc[chunk][["shard", "row"]], CavRunError)
        has = channels == channel
        found = np.flatnonzero(has.any(axis=1))
        if not len(found):
            continue
        chosen = maps[found, has[found].argmax(axis=1)]
        stacked = np.stack([masks[images["image_id"].iat[chunk[i]]] for i in found])
        r_concept[chunk[found]] = positive_share(chosen, stacked)
    return r_map, r_concept


def _figure(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


def _mean(values: np.ndarray, where: np.ndarray) -> float | None:
    chosen = values[where & ~np.isnan(values)]
    return round(float(chosen.mean()), 6) if len(chosen) else None


def _retrieval(truth: np.ndarray, marked: np.ndarray, classes: np.ndarray, scores: dict[str, np.ndarray]) -> dict:
    """Per score: AUROC and AP over the images the truth names, over those of them that were not marked (the
    held-out images: what the CAV found by itself), and over the unmarked ones of the marked images' classes
    (`classes`: the artifact apart from the class it comes with)."""
    known = ~np.isnan(truth)
    out = {}
    for name, values in scores.items():
        entry = {}
        for label, where in (("all", known), ("unmarked", known & ~marked),
                             ("unmarked_marked_classes", known & ~marked & classes)):
            auroc, ap = auroc_ap(truth[where] == 1, values[where])
            entry[label] = {"images": int(where.sum()), "positives": int((truth[where] == 1).sum()),
                            "auroc": None if auroc is None else round(auroc, 6),
                            "average_precision": None if ap is None else round(ap, 6)}
        out[name] = entry
    return out


def cav_audit(run: str | Path, options: CavOptions) -> dict:
    """Fit, rank, measure and write (module docstring); returns the summary (also RUN/cav/NAME.json)."""
    started = time.perf_counter()
    _check(options)
    layout = open_run_folder(run, CavRunError)
    record = concepts_record(layout, CavRunError)
    try:
        layer = record.layer(options.layer)
    except KeyError as problem:
        raise CavRunError(f"{layout.root}: {problem.args[0]}") from None
    ids, vectors = concept_relevance(layout, options.layer, options.normalised, CavRunError)
    if not ids:
        raise CavRunError(f"{layout.root}: the run explained no image")
    images = _run_images(layout, ids)
    if options.marked is not None:
        marked = marked_from_csv(options.marked, ids)
    else:
        marked = marked_from_prototype(layout, options.prototype, ids)
    truth, truth_outside = truth_from_csv(options.truth, ids) if options.truth else (np.full(len(ids), np.nan), 0)
    if options.channel is not None and not 0 <= options.channel < layer.channels:
        raise CavRunError(f"--channel {options.channel} is out of range: layer {layer.name} has {layer.channels} "
                          "channels")
    masks = None
    if options.masks:
        size = map_size(layout, read_manifest(layout), CavRunError)
        where = [(image_id, path, None if pd.isna(member) else member) for image_id, path, member
                 in images[["image_id", "path", "member"]].itertuples(index=False, name=None)]
        masks = map_masks(read_masks(options.masks), where, size)
    read_s = time.perf_counter() - started

    cavs = fit_cavs(vectors, marked, layer.name, options.seed)
    scores = {cav.kind: cav.scores(vectors) for cav in cavs}
    fit_s = time.perf_counter() - started - read_s
    ranked = column_ranks(vectors)  # one ranking of every channel, for the marks and (where it names all) the truth
    channel_auroc = column_aurocs(vectors, marked, ranked)
    order = np.lexsort((np.arange(len(channel_auroc)), -np.nan_to_num(channel_auroc, nan=-1.0)))
    channel_rank = np.empty(len(order), np.int64)
    channel_rank[order] = np.arange(1, len(order) + 1)
    best = int(order[0])
    known = ~np.isnan(truth)
    no_truth = np.full(len(order), np.nan)
    truth_auroc = no_truth if not options.truth else (
        column_aurocs(vectors, truth == 1, ranked) if known.all() else column_aurocs(vectors[known], truth[known] == 1))
    # within the marked images' classes: the artifact apart from the class it comes with (tagged vs untagged stars)
    classes = np.isin(images["target"].to_numpy(), np.unique(images["target"].to_numpy()[marked]))
    in_class = known & classes
    class_auroc = no_truth if not options.truth else (
        truth_auroc if in_class.all() else column_aurocs(vectors[in_class], truth[in_class] == 1))
    concept_channel = options.channel if options.channel is not None else best
    maps_here = bool(record.maps) and (record.maps_layer or record.layers[0].name) == layer.name
    r_map = r_concept = np.full(len(ids), np.nan)
    if masks is not None:
        r_map, r_concept = _r_bias(layout, images, masks, concept_channel if maps_here else None)
    measure_s = time.perf_counter() - started - read_s - fit_s

    image_columns = {
        "image_id": ids, "shard": images["shard"], "row": images["row"], "target": images["target"],
        "pred": images["pred"], "marked": marked,
        "truth": [None if np.isnan(t) else bool(t) for t in truth],
        "r_bias": r_map, "r_bias_concept": r_concept,
    }
    for kind in KINDS:
        image_columns[f"score_{kind}"] = scores[kind]
        image_columns[f"rank_{kind}"] = ranks(scores[kind])
    cav_by_kind = {cav.kind: cav for cav in cavs}
    channel_columns = {
        "channel": np.arange(layer.channels), "auroc_marked": channel_auroc, "rank": channel_rank,
        "auroc_truth": truth_auroc, "auroc_truth_marked_classes": class_auroc,
        "marked_mean": cav_by_kind["pattern"].marked_mean, "clean_mean": cav_by_kind["pattern"].clean_mean,
        **{kind: cav_by_kind[kind].vector for kind in KINDS}}
    retrieval = None
    if options.truth:
        retrieval = _retrieval(truth, marked, classes, {**{f"cav_{kind}": scores[kind] for kind in KINDS},
                                               "best_channel": vectors[:, best].astype(np.float64)})
    summary = {
        "run": str(layout.root), "name": options.name, "layer": layer.name, "channels": layer.channels,
        "normalised": options.normalised, "seed": options.seed, "images": len(ids),
        "marked": {"source": options.marked or f"prototype {options.prototype}", "images": int(marked.sum()),
                   "classes": sorted(int(c) for c in np.unique(images["target"].to_numpy()[marked]))},
        "best_channels": [{"channel": int(c), "auroc_marked": round(float(channel_auroc[c]), 6),
                           "auroc_truth": _figure(truth_auroc[c]),
                           "auroc_truth_marked_classes": _figure(class_auroc[c])}
                          for c in order[:BEST_LISTED]],
        "truth": None if not options.truth else {"source": options.truth, "images": int(known.sum()),
                                                 "positives": int((truth == 1).sum()), "ids_not_in_run": truth_outside,
                                                 "retrieval": retrieval},
        "masks": None if masks is None else {
            "source": options.masks, "images": len(masks), "concept_channel": concept_channel,
            "concept_maps": maps_here,
            "r_bias_mean": {"marked": _mean(r_map, marked), "clean": _mean(r_map, ~marked),
                            "truth": _mean(r_map, truth == 1) if options.truth else None},
            "r_bias_concept_mean": {"marked": _mean(r_concept, marked), "clean": _mean(r_concept, ~marked),
                                    "truth": _mean(r_concept, truth == 1) if options.truth else None}},
        "seconds": {"read": round(read_s, 3), "fit_and_rank": round(fit_s, 3), "measure": round(measure_s, 3)},
        "files": [layout.relative(p) for p in (layout.cav_images(options.name), layout.cav_channels(options.name),
                                               layout.cav_vectors(options.name), layout.cav_summary(options.name))],
    }
    tables = (cav_outputs.images_table(image_columns), cav_outputs.channels_table(channel_columns),
              cav_outputs.vectors_table(cavs, options.normalised, int(marked.sum()), int((~marked).sum())))
    write_s = time.perf_counter()
    cav_outputs.write_all(layout, options.name, *tables, summary)
    summary["seconds"]["write"] = round(time.perf_counter() - write_s, 3)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    return summary
