"""`python -m pipeline spray RUN`: SpRAy per class over a finished run, the classes in parallel as Ray tasks (locally,
or on the cluster RAY_ADDRESS names), results in RUN/spray/. Each task streams its class's maps from the shards; the
driver holds only the statistics columns and the per-class results."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import SPRAY_FILE, TEMPORARY, RunLayout
from ..output_set import check_replaceable, replaced_as_set
from ..ray_session import run_per_class
from . import outputs
from .analyse import ClassAnalysis, SprayParams, analyse_class
from .features import VARIANTS, cluster_mean_maps, read_class_features
from .graph import REDUCED_DIMS
from .inputs import BY, RunIndex, SprayRunError, open_run_index
from .virelay import PROJECT_FILE, write_project


@dataclass(frozen=True)
class SprayOptions:
    by: str = "pred"  # the class an image is analysed under: `pred` (predicted) or `label`
    variant: str = "absspectral"
    grid: int = 32
    min_images: int = 20
    params: SprayParams = field(default_factory=SprayParams)
    classes: tuple[int, ...] | None = None  # only these (default: every class with enough images)
    virelay: bool = True  # write the ViRelAy project beside clusters.parquet
    virelay_images: bool = True  # its dataset.h5: a copy of every analysed image's crop (N x size^2 x 3 bytes)
    out: str | None = None  # default RUN/spray

    def check(self) -> None:
        if self.by not in BY:
            raise SprayRunError(f"--by must be one of {', '.join(BY)}, got {self.by!r}")
        if self.variant not in VARIANTS:
            raise SprayRunError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.grid < 1:
            raise SprayRunError(f"--grid must be >= 1, got {self.grid}")
        if self.min_images < 4:
            raise SprayRunError(f"--min-images must be >= 4 (the spectral analysis needs a few images), got "
                                f"{self.min_images}")
        try:
            self.params.check()
        except ValueError as error:
            raise SprayRunError(str(error)) from None
        if self.params.large_class < REDUCED_DIMS:  # a larger class's neighbours are searched among that many PCs
            raise SprayRunError(f"--large-class must be >= {REDUCED_DIMS} (larger classes are searched among "
                                f"{REDUCED_DIMS} principal components), got {self.params.large_class}")

    def check_against(self, index: RunIndex, jobs: dict[int, pd.DataFrame]) -> None:
        """The options that depend on the run: the grid fits the maps, every analysed class has at least
        --neighbours + 2 images (else its kNN graph would silently be a complete graph)."""
        if self.grid > index.size:
            raise SprayRunError(f"--grid {self.grid} is larger than the run's {index.size}x{index.size} maps")
        smallest = min(jobs, key=lambda c: (len(jobs[c]), c))
        if len(jobs[smallest]) < self.params.neighbours + 2:
            raise SprayRunError(f"--neighbours {self.params.neighbours} needs classes of at least "
                                f"{self.params.neighbours + 2} images (else the kNN graph is complete); class "
                                f"{smallest} ({index.class_names[smallest]}) has {len(jobs[smallest])}: lower "
                                "--neighbours or raise --min-images")

    def record(self) -> dict:
        """The options as recorded in summary.json."""
        record = asdict(replace(self, out=str(self.out) if self.out else None))
        record["classes"] = list(self.classes) if self.classes is not None else None
        return record


@dataclass
class ClassResult:
    """One class's analysis as a task returns it."""

    cls: int
    rows: pd.DataFrame  # image_id, index (dataset order), ... in the order of the analysis
    analysis: ClassAnalysis
    means: dict[int, np.ndarray]  # k -> (k, H, W) mean maps (k_chosen and 2)
    normalisation: dict[str, int]
    seconds: dict[str, float]


def analyse_one(root: str, cls: int, rows: pd.DataFrame, options: SprayOptions, threads: int) -> ClassResult:
    """Everything for one class: read its vectors, analyse, mean maps per cluster (run inside a Ray task)."""
    started = time.perf_counter()
    vectors, normalisation = read_class_features(root, rows, options.grid, options.variant)
    read_s = time.perf_counter() - started
    analysis = analyse_class(vectors, options.params, threads)
    del vectors
    begun = time.perf_counter()
    wanted = {k: analysis.kmeans[k] for k in sorted({analysis.k_chosen, 2})}
    means = cluster_mean_maps(root, rows, wanted)
    seconds = {"read": round(read_s, 3), **analysis.seconds, "means": round(time.perf_counter() - begun, 3)}
    return ClassResult(cls, rows[["image_id", "index"]].reset_index(drop=True), analysis, means, normalisation,
                       seconds)


def plan(index: RunIndex, options: SprayOptions) -> tuple[dict[int, pd.DataFrame], list[dict]]:
    """class -> its rows (enough images), and the skipped classes with their reasons."""
    classes = index.classes_by(options.by)
    jobs, skipped = {}, []
    wanted = set(options.classes) if options.classes is not None else None
    for cls, rows in index.table.groupby(classes, sort=True):
        cls = int(cls)
        if wanted is not None and cls not in wanted:
            continue
        if cls < 0:
            skipped.append({"class": cls, "name": None, "images": len(rows), "reason": "no label"})
        elif len(rows) < options.min_images:
            skipped.append({"class": cls, "name": index.class_names[cls], "images": len(rows),
                            "reason": f"fewer than {options.min_images} images"})
        else:
            jobs[cls] = rows
    if wanted is not None:
        missing = sorted(wanted - set(classes.unique()))
        skipped += [{"class": c, "name": index.class_names[c] if 0 <= c < len(index.class_names) else None,
                     "images": 0, "reason": "no images"} for c in missing]
    return jobs, skipped


def _run_tasks(root: Path, jobs: dict[int, pd.DataFrame], options: SprayOptions, progress: bool
               ) -> dict[int, ClassResult]:
    return run_per_class(analyse_one, jobs, lambda cls: (str(root), cls, jobs[cls], options), SprayRunError,
                         "spray", progress)


def spray(run_dir: str | Path, options: SprayOptions = SprayOptions(), progress: bool = True) -> dict:
    """Analyse the run; returns the summary (also RUN/spray/summary.json). Raises SprayRunError (OutputError for
    an output folder holding other files) before any work when the run or the options cannot work. The outputs are
    written as a set into a temporary folder and swapped in: a failed run leaves the previous analysis whole."""
    options.check()
    started = time.time()
    index = open_run_index(run_dir)
    jobs, skipped = plan(index, options)
    if not jobs:
        raise SprayRunError(f"{index.root}: no class has {options.min_images} or more images to analyse "
                            f"(by {options.by}; --min-images lowers the bar)")
    options.check_against(index, jobs)
    out = Path(options.out) if options.out else RunLayout(index.root).spray
    check_replaceable(out, own_files, "SpRAy")  # before any work; checked again when swapped in
    results = _run_tasks(index.root, jobs, options, progress)
    results = {cls: results[cls] for cls in sorted(results)}
    with replaced_as_set(out, own_files, "SpRAy") as folder:  # the whole set, or the previous one left whole
        summary = outputs.write_all(folder, index, results, skipped, options, time.time() - started, out)
        if options.virelay:
            summary["virelay"] = write_project(folder, index, results, options)
            summary["virelay"]["open_with"] = f"virelay {out / PROJECT_FILE}"
            outputs.write_summary(folder, summary)
    return summary


def own_files(folder: Path) -> set[str]:
    """SpRAy's files in `folder` (RunLayout's SPRAY_FILE names, and temporary files): all a new analysis replaces."""
    return {p.name for p in folder.iterdir() if (SPRAY_FILE.match(p.name) or TEMPORARY.match(p.name))
            and (p.is_file() or p.is_symlink())}
