"""`python -m pipeline prototypes RUN`: PCX's prototypes (Dreyer et al. 2024) over a finished run explained with
concepts: per class, a Gaussian mixture over the images' normalised concept-relevance vectors at one layer
(prototype_mixture.py), the classes in parallel as Ray tasks; per image its prototype, log-likelihood, outlier rank
and the concepts it uses more or less than its prototype; per prototype its weight, closest images and mean concept
profile; results in RUN/prototypes/ (names in RunLayout), written as a set. It reads what the run wrote and never
runs the model.

Images are grouped by the class their concept relevance explains (the statistics' `target`): a vector is the
relevance *for* that class, so vectors explaining different classes are not comparable (with the default target,
`predicted`, it is the predicted class, as in PCX)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from ..errors import PipelineError
from ..layout import PROTOTYPE_FILE, PROTOTYPE_IMAGES, PROTOTYPE_SUMMARY, PROTOTYPE_TABLE, TEMPORARY, RunLayout
from ..output_set import check_replaceable, replaced_as_set
from ..ray_session import run_per_class
from ..run_manifest import Manifest, class_table, read_manifest
from ..run_reader import concept_relevance, concepts_record, open_run_folder, read_stats
from .prototype_mixture import ClassMixture, MixtureParams, fit_class
from .prototype_schema import PROTOTYPE_IMAGE_SCHEMA, PROTOTYPE_SCHEMA

BLOCK = 8192  # images whose deviations are ranked at a time (bounded memory for a large class)
NORMALISATION = "CRP's: each image's concept relevance / its sum of |R| over the layer's channels (+1e-10)"


class PrototypesError(PipelineError, ValueError):
    """The run or the options cannot give prototypes; the message names the culprit."""


@dataclass(frozen=True)
class PrototypeOptions:
    layer: str | None = None  # default: the run's maps layer (concepts.maps_layer), else its first concept layer
    classes: tuple[int, ...] | None = None  # only these (default: every class with enough images)
    params: MixtureParams = field(default_factory=MixtureParams)
    closest: int = 8  # closest images listed per prototype
    deviations: int = 3  # over- and under-used concepts listed per image
    top: int = 8  # concepts of a prototype's mean profile listed

    def check(self) -> None:
        try:
            self.params.check()
        except ValueError as error:
            raise PrototypesError(str(error)) from None
        for name, value in (("--closest", self.closest), ("--deviations", self.deviations), ("--top", self.top)):
            if value < 1:
                raise PrototypesError(f"{name} must be >= 1, got {value}")

    def record(self) -> dict:
        record = asdict(self)
        record["classes"] = list(self.classes) if self.classes is not None else None
        return record


@dataclass
class ClassPrototypes:
    """One class's results as a task returns them (row i: the class's i-th image in dataset order)."""

    cls: int
    mixture: ClassMixture
    over: tuple[np.ndarray, np.ndarray]  # (N, m) channels, deviations; -1 / NaN where fewer than m deviate
    under: tuple[np.ndarray, np.ndarray]
    closest: list[np.ndarray]  # per prototype: row indices, closest first
    top: list[np.ndarray]  # per prototype: channels, largest mean share first


@dataclass
class PrototypeInputs:
    """What the analysis reads of a run: the layer, every image's class and normalised vector, the classes' names."""

    root: Path
    manifest: Manifest
    layer: str
    image_ids: np.ndarray  # (N,) object, dataset order
    classes: np.ndarray  # (N,) int64, the statistics' `target`
    vectors: np.ndarray  # (N, C) float32
    class_names: list[str]
    complete: bool


def extreme_deviations(deviations: np.ndarray, m: int) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                  tuple[np.ndarray, np.ndarray]]:
    """Each row's m largest positive deviations (channels, values; largest first) and m most negative ones (most
    negative first); -1 / NaN fill where fewer deviate in that direction."""
    m = min(m, deviations.shape[1])

    def largest(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = np.argpartition(-values, m - 1, axis=1)[:, :m]
        picked = np.take_along_axis(values, part, axis=1)
        order = np.lexsort((part, -picked), axis=1)  # largest first, ties by channel
        channels = np.take_along_axis(part, order, axis=1).astype(np.int64)
        chosen = np.take_along_axis(picked, order, axis=1)
        keep = chosen > 0
        return np.where(keep, channels, -1), np.where(keep, chosen, np.nan).astype(np.float32)

    over = largest(deviations)
    channels, values = largest(-deviations)
    return over, (channels, -values)


def analyse_class(cls: int, vectors: np.ndarray, options: PrototypeOptions, threads: int) -> ClassPrototypes:
    """Everything for one class (run inside a Ray task): the mixture, each image's deviating concepts, each
    prototype's closest images and top concepts."""
    mixture = fit_class(vectors, options.params, threads)
    pieces = [extreme_deviations(mixture.deviations(vectors[start:start + BLOCK], slice(start, start + BLOCK)),
                                 options.deviations) for start in range(0, len(vectors), BLOCK)]
    over = (np.concatenate([p[0][0] for p in pieces]), np.concatenate([p[0][1] for p in pieces]))
    under = (np.concatenate([p[1][0] for p in pieces]), np.concatenate([p[1][1] for p in pieces]))
    closest, top = [], []
    for k in range(mixture.components):
        members = np.flatnonzero(mixture.prototype == k)
        order = np.lexsort((members, -mixture.component_log_density[members]))  # densest first, ties by order
        closest.append(members[order][:options.closest])
        top.append(np.argsort(-mixture.means[k], kind="stable")[:options.top].astype(np.int64))
    return ClassPrototypes(cls, mixture, over, under, closest, top)


# ---------------------------------------------------------------------------------------------- reading, planning
def choose_layer(record, layer: str | None) -> str:
    names = [item.name for item in record.layers]
    if layer is None:
        return record.maps_layer or names[0]
    if layer not in names:
        raise PrototypesError(f"unknown concept layer {layer!r}: the run has concept data for {', '.join(names)}")
    return layer


def read_inputs(run_dir: str | Path, layer: str | None) -> PrototypeInputs:
    """The run's normalised concept-relevance vectors at the layer and each image's class; PrototypesError when the
    run has no concept data, the layer is unknown or no image was explained."""
    layout = open_run_folder(run_dir, PrototypesError)
    record = concepts_record(layout, PrototypesError)
    chosen = choose_layer(record, layer)
    manifest = read_manifest(layout)
    ids, vectors = concept_relevance(layout, chosen, normalised=True, error=PrototypesError)
    stats = read_stats(layout, PrototypesError, ["image_id", "target"]).to_pandas()
    target = pd.Series(stats["target"].to_numpy(np.int64), index=pd.Index(stats["image_id"]))
    known = pd.Index(ids).isin(target.index)  # a shard whose statistics are not written yet: left out
    if not known.any():
        raise PrototypesError(f"{layout.root}: the run explained no image with concept data at {chosen}")
    image_ids = np.asarray(ids, dtype=object)[known]
    classes = target.loc[image_ids].to_numpy(np.int64)
    complete = layout.manifest.is_file() and layout.success.is_file()
    names, _ = class_table(manifest, int(classes.max()) + 1)
    return PrototypeInputs(layout.root, manifest, chosen, image_ids, classes, vectors[known], names, complete)


def plan(inputs: PrototypeInputs, options: PrototypeOptions) -> tuple[dict[int, np.ndarray], list[dict]]:
    """class -> its rows (dataset order), and the classes skipped for too few images (with their reason). A class
    asked for by --classes that the model lacks, that no image was explained for, or that is too small is an error."""
    smallest = options.params.smallest_class()
    counts = pd.Series(inputs.classes).value_counts()
    if options.classes is not None:
        for cls in options.classes:
            if not 0 <= cls < len(inputs.class_names):
                raise PrototypesError(f"unknown class {cls}: the model has {len(inputs.class_names)} classes "
                                      f"(0 .. {len(inputs.class_names) - 1})")
            if cls not in counts.index:
                raise PrototypesError(f"class {cls} ({inputs.class_names[cls]}): no image of the run was explained "
                                      "for it")
            if counts[cls] < smallest:
                raise PrototypesError(f"class {cls} ({inputs.class_names[cls]}) has {counts[cls]} images; a mixture "
                                      f"needs at least {smallest}")
    wanted = sorted(options.classes) if options.classes is not None else sorted(int(c) for c in counts.index)
    jobs, skipped = {}, []
    for cls in wanted:
        rows = np.flatnonzero(inputs.classes == cls)
        if len(rows) < smallest:
            skipped.append({"class": cls, "name": inputs.class_names[cls], "images": len(rows),
                            "reason": f"fewer than {smallest} images"})
        else:
            jobs[cls] = rows
    if not jobs:
        raise PrototypesError(f"{inputs.root}: no class has {smallest} or more images explained (the fewest a "
                              "mixture is fitted to)")
    return jobs, skipped


# ---------------------------------------------------------------------------------------------- running
def _run_tasks(inputs: PrototypeInputs, jobs: dict[int, np.ndarray], options: PrototypeOptions, progress: bool
               ) -> dict[int, ClassPrototypes]:
    return run_per_class(analyse_class, jobs, lambda cls: (cls, inputs.vectors[jobs[cls]], options), PrototypesError,
                         "prototypes", progress)


# ---------------------------------------------------------------------------------------------- tables
def _lists(channels: np.ndarray, values: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
    keep = channels >= 0
    return ([row[k].tolist() for row, k in zip(channels, keep)], [row[k].tolist() for row, k in zip(values, keep)])


def image_table(inputs: PrototypeInputs, jobs: dict[int, np.ndarray], results: dict[int, ClassPrototypes]
                ) -> pa.Table:
    """images.parquet: every analysed image, class by class in increasing class order, dataset order within."""
    columns: dict[str, list] = {name: [] for name in PROTOTYPE_IMAGE_SCHEMA.names}
    for cls, result in results.items():
        rows, m = jobs[cls], result.mixture
        order = np.lexsort((np.arange(len(rows)), m.log_likelihood))  # lowest first, ties by dataset order
        rank = np.empty(len(rows), np.int64)
        rank[order] = np.arange(len(rows))
        over_c, over_v = _lists(*result.over)
        under_c, under_v = _lists(*result.under)
        columns["image_id"] += inputs.image_ids[rows].tolist()
        columns["layer"] += [inputs.layer] * len(rows)
        columns["class"] += [cls] * len(rows)
        columns["prototype"] += m.prototype.tolist()
        columns["probability"] += m.probability.tolist()
        columns["log_likelihood"] += m.log_likelihood.tolist()
        columns["outlier_rank"] += rank.tolist()
        columns["over_concepts"] += over_c
        columns["over_deviations"] += over_v
        columns["under_concepts"] += under_c
        columns["under_deviations"] += under_v
    return pa.Table.from_pydict(columns, schema=PROTOTYPE_IMAGE_SCHEMA)


def prototype_table(inputs: PrototypeInputs, jobs: dict[int, np.ndarray], results: dict[int, ClassPrototypes]
                    ) -> pa.Table:
    """prototypes.parquet: one row per class and prototype."""
    rows: list[dict] = []
    for cls, result in results.items():
        m = result.mixture
        ids = inputs.image_ids[jobs[cls]]
        for k in range(m.components):
            closest = result.closest[k]
            rows.append({"layer": inputs.layer, "class": cls, "prototype": k, "components": m.components,
                         "weight": float(m.weights[k]), "images": int((m.prototype == k).sum()),
                         "closest": [str(i) for i in ids[closest]],
                         "closest_log_density": m.component_log_density[closest].astype(np.float32).tolist(),
                         "top_concepts": result.top[k].tolist(),
                         "top_shares": m.means[k][result.top[k]].astype(np.float32).tolist(),
                         "mean": m.means[k].astype(np.float32).tolist()})
    return pa.Table.from_pylist(rows, schema=PROTOTYPE_SCHEMA)


def class_summaries(inputs: PrototypeInputs, jobs: dict[int, np.ndarray], results: dict[int, ClassPrototypes]
                    ) -> list[dict]:
    entries = []
    for cls, result in results.items():
        m = result.mixture
        entries.append({
            "class": cls, "name": inputs.class_names[cls], "images": len(jobs[cls]), "components": m.components,
            "bic": {str(k): round(v, 3) for k, v in m.bic.items()}, "dims": m.dims,
            "explained_variance": round(m.explained_variance, 6), "residual_variance": m.residual_variance,
            "weights": [round(float(w), 6) for w in m.weights], "converged": m.converged, "seconds": m.seconds})
    return entries


def own_files(folder: Path) -> set[str]:
    """The prototypes' files in `folder` (RunLayout's names, and temporary files): all a new analysis replaces."""
    return {p.name for p in folder.iterdir() if (PROTOTYPE_FILE.match(p.name) or TEMPORARY.match(p.name))
            and (p.is_file() or p.is_symlink())}


def write_all(folder: Path, inputs: PrototypeInputs, jobs: dict[int, np.ndarray], results: dict[int, ClassPrototypes],
              skipped: list[dict], options: PrototypeOptions, seconds: float, final: Path) -> dict:
    """images.parquet, prototypes.parquet and summary.json into `folder`; returns the summary."""
    images = image_table(inputs, jobs, results)
    with atomic(folder / PROTOTYPE_IMAGES) as tmp:
        pq.write_table(images, tmp)
    with atomic(folder / PROTOTYPE_TABLE) as tmp:
        pq.write_table(prototype_table(inputs, jobs, results), tmp)
    summary = {
        "run": str(inputs.root), "out": str(final), "complete": inputs.complete, "layer": inputs.layer,
        "channels": int(inputs.vectors.shape[1]), "normalisation": NORMALISATION,
        "grouped_by": "target (the class each image's concept relevance explains)",
        "options": options.record(), "images": int(images.num_rows),
        "classes": class_summaries(inputs, jobs, results), "skipped": skipped, "seconds": round(seconds, 2)}
    with atomic(folder / PROTOTYPE_SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prototypes(run_dir: str | Path, options: PrototypeOptions = PrototypeOptions(), progress: bool = True) -> dict:
    """Fit the run's prototypes; returns the summary (also RUN/prototypes/summary.json). Raises PrototypesError
    (OutputError for an output folder holding other files) before any work when the run or the options cannot work;
    the outputs are written as a set, so a failed analysis leaves the previous one whole."""
    options.check()
    started = time.time()
    inputs = read_inputs(run_dir, options.layer)
    jobs, skipped = plan(inputs, options)
    out = RunLayout(inputs.root).prototypes
    check_replaceable(out, own_files, "prototypes")  # before any work; checked again when swapped in
    results = _run_tasks(inputs, jobs, options, progress)
    with replaced_as_set(out, own_files, "prototypes") as folder:
        summary = write_all(folder, inputs, jobs, results, skipped, replace(options, layer=inputs.layer),
                            time.time() - started, out)
    return summary
