"""`python -m pipeline correct RUN --layer L --marked ids.csv [--clean ids.csv] [--gate detected|always] [--out DIR]`:
R-ClArC / P-ClArC (Bareeva et al. 2024; Anders et al. 2022; Pahde et al. 2023) on a finished run's model. The marked
images carry an artifact; the clean ones do not (default: every other image of the run). At the layer, the pattern
CAV (lrp_module/projection.py `pattern_cav`: covariance of each channel's spatially averaged activation with the
marked/clean label, unit length) is the artifact's direction v and the clean images' mean activation (over images
and positions) the reference z; the corrected model computes h - v v^T (h - z) at every position of the layer (a 1x1
convolution inserted after it, LRP-epsilon). `--gate detected` (the default, R-ClArC) does so only in the images
whose artifact score (the largest v^T h over the positions) exceeds the threshold that best separates the marked
from the clean images used (Youden's J); `--gate always` (P-ClArC) in every image. Why detected is the default:
P-ClArC shifts every image along v, and v also carries part of the class's own features (on vgg-shapes-hans it cost
6.7 points of clean accuracy, R-ClArC 0.3; docs/audit.md#correction). It is written to OUT as weights, verified
LRP artifacts and a classifier (export/correction.py), with `correction.json` (the direction, the reference, the
gate, the before/after figures on the images used), copied into the run folder as RUN/corrections/<OUT's name>.json
for the report's before/after table.

The run's images are re-read and the model re-run forward here: the one place the audit does so, to build and check
the corrected export. At most `max_images` marked and clean images each are used (a seeded sample beyond that).
Every input is checked before anything is written; OUT must not exist or be empty.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from export.correction import export_corrected
from lrp_module.files import atomic
from lrp_module.projection import (
    ProjectionError,
    artifact_scores,
    detection_threshold,
    find_site,
    pattern_cav,
    project_out,
    site_activations,
)

from ..errors import PipelineError, lower_layer_errors
from ..run_manifest import read_manifest
from ..run_reader import map_size, open_run_folder, read_stats
from ..sanity.run import load_inputs, rebuild

RECORD_FILE = "correction.json"
ID_COLUMN = "image_id"
FLAG_COLUMNS = ("marked", "tag")  # an optional 0/1 column: only its rows with 1 are taken (shapes-hans' hans.csv)
POOLING = "mean over the layer's spatial positions"
GATES = ("detected", "always")  # R-ClArC: only images with the artifact detected; P-ClArC: every image
COLUMNS = ("image_id", "path", "label", "shard", "row")


class CorrectionError(PipelineError, ValueError):
    """The correction cannot run with these inputs; the message names the culprit."""


@dataclass(frozen=True)
class CorrectionOptions:
    layer: str
    marked: str
    clean: str | None = None
    out: str | None = None
    composite: str | None = None  # default: the run's
    max_images: int = 1000
    seed: int = 0
    gate: str = "detected"  # one of GATES


def default_out(run: str | Path, layer: str) -> Path:
    """artifacts/<run folder name>-pclarc-<layer>: a model, not a file of the run."""
    return Path("artifacts") / f"{Path(run).resolve().name}-pclarc-{layer}"


def read_ids(path: str | Path, what: str) -> list[str]:
    """The image ids of a CSV with an `image_id` column (and, if it has a 0/1 `marked` or `tag` column, only the
    rows with 1), in file order, each once."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CorrectionError(f"{what} {path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IsADirectoryError) as error:
        raise CorrectionError(f"{what} {path}: not a readable CSV ({type(error).__name__})") from None
    if ID_COLUMN not in table.columns:
        raise CorrectionError(f"{what} {path}: no {ID_COLUMN!r} column (columns: {', '.join(table.columns)})")
    flag = next((c for c in FLAG_COLUMNS if c in table.columns), None)
    if flag is not None:
        values = set(table[flag])
        if not values <= {"0", "1"}:
            other = sorted(values - {"0", "1"})[:3]
            raise CorrectionError(f"{what} {path}: column {flag!r} must hold 0 or 1, found {other}")
        table = table[table[flag] == "1"]
    ids = list(dict.fromkeys(i.strip() for i in table[ID_COLUMN] if i.strip()))
    if not ids:
        raise CorrectionError(f"{what} {path}: no image ids")
    return ids


def _rows(table: pd.DataFrame, ids: list[str], what: str, run: Path) -> pd.DataFrame:
    """The run's rows of `ids`, in the given order; ids the run does not have are one error naming a few."""
    index = table.set_index("image_id", drop=False)
    missing = [i for i in ids if i not in index.index]
    if missing:
        raise CorrectionError(f"{what}: {len(missing)} id(s) not in the run {run} (e.g. {', '.join(missing[:3])})")
    return index.loc[ids].reset_index(drop=True)


def _sample(rows: pd.DataFrame, most: int, seed: int) -> pd.DataFrame:
    if len(rows) <= most:
        return rows
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=most, replace=False))
    return rows.iloc[chosen].reset_index(drop=True)


def _predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch)])


def _accuracy(predicted: torch.Tensor, labels: np.ndarray) -> float | None:
    known = ~np.isnan(labels)
    if not known.any():
        return None
    return round(float((predicted.numpy()[known] == labels[known]).mean()), 4)


def _along(activations: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> float:
    """Mean |v^T (h - z)| over images and positions: the activations' component along the direction."""
    h = activations.double().permute(0, 2, 3, 1)
    return float(((h - z) @ v).abs().mean())


def correct(run: str | Path, options: CorrectionOptions) -> dict:
    """Fit the direction, build, export and verify the corrected model; the record written as correction.json."""
    started = time.perf_counter()
    if options.max_images < 2:
        raise CorrectionError(f"--max-images must be at least 2, got {options.max_images}")
    if options.gate not in GATES:
        raise CorrectionError(f"--gate must be one of {', '.join(GATES)}, got {options.gate!r}")
    out = Path(options.out) if options.out else default_out(run, options.layer)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CorrectionError(f"{out}: exists and is not an empty folder (choose another --out)")
    layout = open_run_folder(run, CorrectionError)
    table = read_stats(layout, CorrectionError, COLUMNS, optional=("member",)).to_pandas()
    marked_ids = read_ids(options.marked, "--marked")
    marked = _rows(table, marked_ids, "--marked", layout.root)
    if options.clean:
        clean_ids = read_ids(options.clean, "--clean")
        both = sorted(set(clean_ids) & set(marked_ids))
        if both:
            raise CorrectionError(f"--clean: {len(both)} id(s) are marked too (e.g. {', '.join(both[:3])})")
        clean = _rows(table, clean_ids, "--clean", layout.root)
    else:
        clean = table[~table["image_id"].isin(set(marked_ids))].sort_values(["shard", "row"], kind="stable")
        if clean.empty:
            raise CorrectionError(f"every image of the run {layout.root} is marked: no clean images (give --clean)")
    manifest = read_manifest(layout)
    size = map_size(layout, manifest, CorrectionError)
    composite = options.composite or manifest.config.composite
    with lower_layer_errors():
        model = rebuild(manifest)
    try:
        site = find_site(model, options.layer)
    except ProjectionError as error:
        raise CorrectionError(f"--layer: {error}") from None
    marked = _sample(marked, options.max_images, options.seed)
    clean = _sample(clean.reset_index(drop=True), options.max_images, options.seed)
    x_marked, x_clean = load_inputs(marked, size), load_inputs(clean, size)

    acts_marked = site_activations(model, site.module, x_marked)
    acts_clean = site_activations(model, site.module, x_clean)
    pooled = torch.cat([acts_marked, acts_clean]).mean(dim=(2, 3))
    labels = torch.cat([torch.ones(len(acts_marked)), torch.zeros(len(acts_clean))])
    try:
        v = pattern_cav(pooled, labels)
        z = acts_clean.double().mean(dim=(0, 2, 3))
        scores_marked, scores_clean = artifact_scores(acts_marked, v), artifact_scores(acts_clean, v)
        threshold = detection_threshold(scores_marked, scores_clean) if options.gate == "detected" else None
        corrected = project_out(model, options.layer, v, z, threshold)
    except ProjectionError as error:
        raise CorrectionError(f"--layer {options.layer}: {error}") from None
    gate = gate_record(options.gate, threshold, scores_marked, scores_clean)

    figures = before_after(model, corrected, site, v, z, x_marked, x_clean, marked, clean)
    with lower_layer_errors():
        exported = export_corrected(corrected, manifest.config.model, composite, size, out)
    record = {
        "method": METHODS[options.gate],
        "run": str(layout.root), "model": manifest.config.model,
        "weights": {"kind": manifest.weights.kind, "source": manifest.weights.source},
        "composite": composite, "size": size, "layer": options.layer, "after_module": site.module,
        "inserted": site.inserted, "channels": site.channels,
        "cav": {"kind": "pattern (signal) CAV, Pahde et al. 2024: cov(activation, marked) normalised",
                "pooling": POOLING, "direction": [round(float(c), 8) for c in v]},
        "reference": {"what": "the clean images' mean activation over images and positions",
                      "z": [round(float(c), 8) for c in z]},
        "gate": gate,
        "images": {"marked": len(marked), "clean": len(clean), "marked_listed": len(marked_ids),
                   "sample_seed": options.seed, "max_images": options.max_images},
        "before_after": figures, "export": exported,
        "explain": f"make explain MODEL={manifest.config.model} WEIGHTS={out / exported['weights']} "
                   f"COMPOSITE={composite}",
        "seconds": round(time.perf_counter() - started, 1),
    }
    record["out"] = str(out)
    text = json.dumps(record, indent=2)
    with atomic(out / RECORD_FILE) as tmp:
        tmp.write_text(text, encoding="utf-8")
    run_copy = layout.correction_record(out.name)  # for the report's before/after table; the run's own file
    run_copy.parent.mkdir(exist_ok=True)
    with atomic(run_copy) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return record


METHODS = {
    "detected": "R-ClArC (Bareeva et al. 2024): h' = h - v v^T (h - z) at every position of the layer, in the "
                "images whose artifact score exceeds the gate's threshold; other images unchanged",
    "always": "P-ClArC (Anders et al. 2022): h' = h - v v^T (h - z) at every position of the layer, in every image",
}


def gate_record(gate: str, threshold: float | None, marked: torch.Tensor, clean: torch.Tensor) -> dict:
    """correction.json's `gate`: the rule, its threshold and the share of the images used that it projects."""
    if threshold is None:
        return {"kind": "always", "threshold": None, "marked_projected": 1.0, "clean_projected": 1.0}
    return {"kind": gate, "score": "the largest v^T h over the layer's positions",
            "threshold": round(threshold, 8),
            "chosen": "the cut between marked and clean scores with the largest TPR - FPR (Youden's J)",
            "marked_projected": round(float((marked > threshold).double().mean()), 4),
            "clean_projected": round(float((clean > threshold).double().mean()), 4)}


def before_after(model, corrected, site, v, z, x_marked, x_clean, marked: pd.DataFrame, clean: pd.DataFrame) -> dict:
    """On the images used: accuracy (labelled images) and the component along v at the layer, original and
    corrected, and the share of predictions the correction changed."""
    figures: dict[str, dict] = {}
    for key, x, rows in (("marked", x_marked, marked), ("clean", x_clean, clean)):
        labels = rows["label"].to_numpy(dtype=float, na_value=np.nan)
        before, after = _predictions(model, x), _predictions(corrected, x)
        figures[key] = {
            "accuracy_before": _accuracy(before, labels), "accuracy_after": _accuracy(after, labels),
            "predictions_changed": round(float((before != after).float().mean()), 4),
            "along_direction_before": round(_along(site_activations(model, site.module, x), v, z), 6),
            "along_direction_after": round(_along(site_activations(corrected, site.inserted, x), v, z), 6),
        }
    return figures
