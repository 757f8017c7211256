"""RunLayout: the one place that knows a run folder's file names, which files are the run's own, and how its
temporary files are named and swept. `--overwrite` deletes only the run's own files (never anything a user put
there) and removes a folder only when that leaves it empty."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lrp_module.files import TEMPORARY_PREFIX

SHARD_DIGITS = 5
TEMPORARY = re.compile(rf"^{re.escape(TEMPORARY_PREFIX)}\d+-.+$")  # lrp_module.files.temporary_name()
SHARD_FILE = re.compile(rf"^shard-\d{{{SHARD_DIGITS}}}\.(h5|parquet)$")
# tiles, plots, colour bar (pipeline/report; report.files.safe_name never starts with a dot, so a temporary file,
# found by TEMPORARY, is never an image too)
REPORT_IMAGE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.(png|jpg)$")
REPORT_OWN_FILES = "report-files.json"  # the report folder's list of the files the report wrote (report/build.py)
HEATMAP_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*-(heatmap|image|overlay)\.png$")
# `make concepts`' reference images (pipeline/concepts/references.py): <layer>-c<channel>[-k<class>]-...png
CONCEPT_REFERENCE_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._]*-c\d+(-k\d+)?-(r\d+-image|r\d+-heatmap|grid)\.png$")
# pipeline/spray's outputs in RUN/spray/ (outputs.py: the analysis; virelay.py: the ViRelAy project), named here
# only: the strategies of a run are its own files too
SPRAY_CLUSTERS, SPRAY_SUMMARY, SPRAY_MEANS = "clusters.parquet", "summary.json", "cluster_means.h5"
SPRAY_PROJECT, SPRAY_LABEL_MAP, SPRAY_ATTRIBUTION, SPRAY_DATASET, SPRAY_ANALYSIS = (
    "project.yaml", "label-map.json", "attribution.h5", "dataset.h5", "analysis.h5")
SPRAY_FILES = (SPRAY_CLUSTERS, SPRAY_SUMMARY, SPRAY_MEANS, SPRAY_PROJECT, SPRAY_LABEL_MAP, SPRAY_ATTRIBUTION,
               SPRAY_DATASET, SPRAY_ANALYSIS)
SPRAY_FILE = re.compile(rf"^({'|'.join(re.escape(name) for name in SPRAY_FILES)})$")
# pipeline/audit/prototypes.py's outputs in RUN/prototypes/ (PCX: per image, per prototype, the summary)
PROTOTYPE_IMAGES, PROTOTYPE_TABLE, PROTOTYPE_SUMMARY = "images.parquet", "prototypes.parquet", "summary.json"
PROTOTYPE_FILES = (PROTOTYPE_IMAGES, PROTOTYPE_TABLE, PROTOTYPE_SUMMARY)
PROTOTYPE_FILE = re.compile(rf"^({'|'.join(re.escape(name) for name in PROTOTYPE_FILES)})$")
# relmax.parquet again in zennit-crp's .npy layout (pipeline/concepts/crp_layout.py): RelMax_sum_normed/<layer>_*.npy,
# RelStats_sum_normed/<layer>/<class>_*.npy and RelStats_sum_normed/targets.npy
CRP_FILE = re.compile(r"^([A-Za-z0-9_.-]+_(data|rel|rf)\.npy|targets\.npy)$")
# `make cav`'s outputs in RUN/cav/ (pipeline/audit/cav_outputs.py), per artifact concept NAME (`--name`):
# NAME-images.parquet, NAME-channels.parquet, NAME-vectors.parquet, NAME.json
CAV_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
# `make correct`'s record of each correction made from the run (pipeline/audit/correct.py): <out folder's name>.json
CORRECTION_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.json$")
CAV_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(-(images|channels|vectors)\.parquet|\.json)$")


def shard_name(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}"


class RunLayout:
    """File names of one run folder: shards, virtual dataset, failures, manifest, _SUCCESS, report."""

    RELEVANCE, STATS, FAILURES, REPORT, REPORT_IMAGES, HEATMAPS, SPRAY = (
        "relevance", "stats", "failures", "report", "report/img", "heatmaps", "spray")
    CRP, CRP_RELMAX, CRP_RELSTATS = "crp", "crp/RelMax_sum_normed", "crp/RelStats_sum_normed"
    CONCEPT_REFERENCES = "concept-references"
    CAV = "cav"
    CORRECTIONS = "corrections"
    PROTOTYPES = "prototypes"
    LOCK = "run.lock"
    SHARD_FOLDERS = (RELEVANCE, STATS, FAILURES)
    # every folder a run's parts write to
    WRITTEN_FOLDERS = (*SHARD_FOLDERS, REPORT, REPORT_IMAGES, HEATMAPS, SPRAY, CONCEPT_REFERENCES, CAV, PROTOTYPES,
                      CORRECTIONS)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------------------------------ names
    @property
    def run_file(self) -> Path:
        """The configuration's identity, written when the run starts: what marks a folder as a run."""
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        """The lock of the process using the folder (pipeline/run_lock.py): present only while one is (or a
        killed one left it); the run's own file, never user data, but --overwrite leaves it to its holder."""
        return self.root / self.LOCK

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def success(self) -> Path:
        return self.root / "_SUCCESS"

    @property
    def virtual_dataset(self) -> Path:
        return self.root / "relevance.h5"

    @property
    def precision(self) -> Path:
        """The precision probe (shard 0's first images against float64), written by the driver
        (pipeline/precision_probe.py)."""
        return self.root / "precision.json"

    @property
    def relmax(self) -> Path:
        """Relevance maximisation (CRP's RelMax and RelStats) over the whole run, merged by the driver from every
        shard's concept outputs (pipeline/concepts/tables.py); only in a run with concepts."""
        return self.root / "relmax.parquet"

    def crp_folders(self) -> list[Path]:
        """The folders of the zennit-crp layout: RelMax's, RelStats' and RelStats' per-layer folders (deepest last)."""
        stats = self.root / self.CRP_RELSTATS
        layers = sorted(p for p in stats.iterdir() if p.is_dir() and not p.is_symlink()) \
            if stats.is_dir() and not stats.is_symlink() else []
        return [self.root / self.CRP_RELMAX, stats, *layers]

    @property
    def spray(self) -> Path:
        return self.root / self.SPRAY

    @property
    def prototypes(self) -> Path:
        """`make prototypes`' folder (pipeline/audit/prototypes.py): images.parquet, prototypes.parquet,
        summary.json."""
        return self.root / self.PROTOTYPES

    @property
    def sanity(self) -> Path:
        """The model parameter randomisation test's table (pipeline/sanity: per image, mode and layer)."""
        return self.root / "sanity.parquet"

    @property
    def failures(self) -> Path:
        return self.root / "failures.parquet"

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def heatmaps(self) -> Path:
        return self.root / self.HEATMAPS

    @property
    def concept_references(self) -> Path:
        """`make concepts`' PNGs: each concept's reference crops, conditional maps and grid."""
        return self.root / self.CONCEPT_REFERENCES

    @property
    def cav(self) -> Path:
        """`make cav`'s folder: per artifact concept, its CAVs, the run's images ranked by them, its channels."""
        return self.root / self.CAV

    @property
    def corrections(self) -> Path:
        """`make correct`'s records, one per corrected model made from this run (the model lives in its own folder)."""
        return self.root / self.CORRECTIONS

    def correction_record(self, name: str) -> Path:
        """The record of the correction whose model folder is called `name`: the direction, the reference, the
        before/after figures (the same JSON as the model folder's correction.json)."""
        return self.corrections / f"{name}.json"

    def cav_images(self, name: str) -> Path:
        """Every image of the run with its score and rank on each CAV, marked, truth, R_bias."""
        return self.cav / f"{name}-images.parquet"

    def cav_channels(self, name: str) -> Path:
        """Per channel of the layer: its retrieval AUROC for the marked set (the best single channels)."""
        return self.cav / f"{name}-channels.parquet"

    def cav_vectors(self, name: str) -> Path:
        """The CAVs: layer, unit vector, the clean and the marked images' means."""
        return self.cav / f"{name}-vectors.parquet"

    def cav_summary(self, name: str) -> Path:
        """What was marked, the settings, the retrieval figures."""
        return self.cav / f"{name}.json"

    def relevance_shard(self, index: int) -> Path:
        return self.root / self.RELEVANCE / f"{shard_name(index)}.h5"

    def stats_shard(self, index: int) -> Path:
        return self.root / self.STATS / f"{shard_name(index)}.parquet"

    def failure_shard(self, index: int) -> Path:
        return self.root / self.FAILURES / f"{shard_name(index)}.parquet"

    def relative(self, path: Path) -> str:
        """A run file's name relative to the run folder (as the manifest and the statistics record it)."""
        return path.relative_to(self.root).as_posix()

    def stats_shards(self) -> list[Path]:
        return self._shards(self.STATS)

    def failure_shards(self) -> list[Path]:
        return self._shards(self.FAILURES)

    def _shards(self, folder: str) -> list[Path]:
        """The shard files of one folder, in shard order."""
        return sorted((self.root / folder).glob("shard-*.parquet")) if (self.root / folder).is_dir() else []

    # ------------------------------------------------------------------------------------------ state
    def shard_done(self, index: int) -> bool:
        """A shard is done when its three files exist (statistics are written last)."""
        return all(p.is_file() for p in (self.relevance_shard(index), self.failure_shard(index),
                                         self.stats_shard(index)))

    def is_run(self) -> bool:
        return self.run_file.is_file() or self.manifest.is_file()

    def is_empty_or_missing(self) -> bool:
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    # ------------------------------------------------------------------------------------------ own files
    def own_files(self) -> Iterator[Path]:
        """Every file of this folder that a run (or its report) wrote: the layout's names, nothing else."""
        for path in (self.run_file, self.manifest, self.success, self.virtual_dataset, self.failures, self.precision,
                     self.relmax, self.sanity, self.lock, self.report / "index.html", self.report / REPORT_OWN_FILES):
            if path.is_file() or path.is_symlink():
                yield path
        yield from self.temporary_files()
        for folder, pattern in ((self.RELEVANCE, SHARD_FILE), (self.STATS, SHARD_FILE), (self.FAILURES, SHARD_FILE),
                                (self.REPORT_IMAGES, REPORT_IMAGE), (self.HEATMAPS, HEATMAP_FILE),
                                (self.SPRAY, SPRAY_FILE), (self.CONCEPT_REFERENCES, CONCEPT_REFERENCE_FILE),
                                (self.CAV, CAV_FILE), (self.PROTOTYPES, PROTOTYPE_FILE),
                                (self.CORRECTIONS, CORRECTION_FILE)):
            yield from self._matching(self.root / folder, pattern)
        for folder in self.crp_folders():
            yield from self._matching(folder, CRP_FILE)

    def temporary_files(self) -> Iterator[Path]:
        """Unfinished files a killed run, a dead actor or an interrupted report / SpRAy left (only in the folders
        they write to)."""
        for folder in (self.root, *(self.root / sub for sub in self.WRITTEN_FOLDERS), *self.crp_folders()):
            yield from self._matching(folder, TEMPORARY)

    @staticmethod
    def _matching(folder: Path, pattern: re.Pattern) -> Iterator[Path]:
        if not folder.is_dir() or folder.is_symlink():
            return
        for path in sorted(folder.iterdir()):
            if pattern.match(path.name) and (path.is_file() or path.is_symlink()):
                yield path

    def sweep_temporary(self) -> None:
        for path in list(self.temporary_files()):
            path.unlink(missing_ok=True)

    def remove_own(self) -> None:
        """--overwrite: delete the run's own files (but the lock, which its holder removes), then each of its
        folders that this left empty."""
        for path in list(self.own_files()):
            if path != self.lock:
                path.unlink(missing_ok=True)
        crp = [*reversed(self.crp_folders()), self.root / self.CRP]
        for folder in (*(self.root / sub for sub in (self.REPORT_IMAGES, self.REPORT, self.HEATMAPS, self.SPRAY,
                                                      self.CONCEPT_REFERENCES, self.CAV, self.PROTOTYPES,
                                                      self.CORRECTIONS, *self.SHARD_FOLDERS)), *crp):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()

    def make_folders(self) -> None:
        for sub in self.SHARD_FOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
