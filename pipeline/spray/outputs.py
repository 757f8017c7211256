"""RUN/spray/'s own files: clusters.parquet (one row per analysed image, joinable with stats/ on image_id),
summary.json (per class: eigenvalues, eigengap, k, cluster sizes, Clever-Hans candidates; skipped classes; settings)
and cluster_means.h5 (each cluster's mean map). Every file is written under a temporary name and renamed."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrp_module.files import atomic

from ..h5_writing import h5_atomic
from ..layout import SPRAY_CLUSTERS as CLUSTERS_FILE
from ..layout import SPRAY_MEANS as MEANS_FILE
from ..layout import SPRAY_SUMMARY as SUMMARY_FILE
from .inputs import RunIndex

# A class is a Clever-Hans candidate when, under its chosen k, one cluster is small and tight: at most this share of
# the class's images, with members whose neighbours are much closer than the class's typical neighbour distance.
CANDIDATE_MAX_SHARE = 0.5
CANDIDATE_MAX_TIGHTNESS = 0.75  # median outlier score of the cluster's members (1 = the class's typical image)
EIGENVALUE_TIE = 1e-6  # λk and λk+1 closer than this (relative to the largest): the k-th eigenvector is not determined


def _field(name: str, kind: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, kind, nullable=False, metadata={"doc": doc})


def clusters_schema(k_max: int) -> pa.Schema:
    """The columns of clusters.parquet: image_id, class, k_chosen, cluster, cluster_k2 .. cluster_k{k_max}, x, y,
    outlier."""
    return pa.schema([
        _field("image_id", pa.string(), "image id, as in stats/ (join on it)"),
        _field("class", pa.int64(),
               "the class the image was analysed under (predicted class, or label with --by label)"),
        _field("k_chosen", pa.int64(), "the eigengap's number of clusters for that class"),
        _field("cluster", pa.int64(), "the image's k-means cluster under k_chosen (0 = the largest)"),
        *[_field(f"cluster_k{k}", pa.int64(), f"its k-means cluster for k = {k} (-1: the class has too few images "
                 "for this k)") for k in range(2, k_max + 1)],
        _field("x", pa.float32(), "2-D t-SNE of the spectral embedding, first coordinate"),
        _field("y", pa.float32(), "2-D t-SNE of the spectral embedding, second coordinate"),
        _field("outlier", pa.float32(), "mean distance to its k nearest neighbours over the class's median (higher "
               "= more unusual)"),
    ])


def clusters_table(results: dict, k_max: int) -> pa.Table:
    """All analysed images, class by class in increasing class order, in dataset order within a class."""
    columns: dict[str, list] = {name: [] for name in clusters_schema(k_max).names}
    for cls, result in results.items():
        a = result.analysis
        n = len(result.rows)
        columns["image_id"].append(result.rows["image_id"].to_numpy(dtype=object))
        columns["class"].append(np.full(n, cls, np.int64))
        columns["k_chosen"].append(np.full(n, a.k_chosen, np.int64))
        columns["cluster"].append(a.kmeans[a.k_chosen])
        for k in range(2, k_max + 1):
            columns[f"cluster_k{k}"].append(a.kmeans.get(k, np.full(n, -1, np.int64)))
        columns["x"].append(a.embedding[:, 0])
        columns["y"].append(a.embedding[:, 1])
        columns["outlier"].append(a.outlier)
    schema = clusters_schema(k_max)
    arrays = [pa.array(np.concatenate(columns[f.name]) if columns[f.name] else [], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def cluster_facts(result) -> list[dict]:
    """Per cluster of the chosen k: size, share of the class, tightness (median outlier score of its members)."""
    a = result.analysis
    labels = a.kmeans[a.k_chosen]
    facts = []
    for cluster in range(a.k_chosen):
        members = labels == cluster
        facts.append({"cluster": cluster, "images": int(members.sum()), "share": round(float(members.mean()), 4),
                      "tightness": round(float(np.median(a.outlier[members])), 4) if members.any() else None})
    return facts


def is_candidate(clusters: list[dict]) -> bool:
    """A small, tight cluster: at most CANDIDATE_MAX_SHARE of the class, tightness at most CANDIDATE_MAX_TIGHTNESS."""
    return any(c["images"] >= 2 and c["share"] <= CANDIDATE_MAX_SHARE and c["tightness"] is not None
               and c["tightness"] <= CANDIDATE_MAX_TIGHTNESS for c in clusters)


def k_not_meaningful(analysis, images: int, k_max: int) -> dict[str, str]:
    """k -> why the class's clustering into k says nothing (a class too small for its k_max): not computed (too
    few images), tied eigenvalues λk = λk+1 (the first k eigenvectors, hence the clustering, are a tie-break of the
    solver; e.g. a class with fewer images than --neighbours + 2 is a complete graph), or fewer than 2 images per
    cluster on average."""
    values = np.asarray(analysis.eigenvalues, dtype=np.float64)
    tie = EIGENVALUE_TIE * max(1.0, float(np.abs(values).max())) if len(values) else 0.0
    notes = {}
    for k in range(2, k_max + 1):
        if k not in analysis.kmeans:
            notes[str(k)] = f"not computed: {images} images"
        elif k < len(values) and values[k] - values[k - 1] <= tie:
            notes[str(k)] = f"tied eigenvalues λ{k} = λ{k + 1}: a tie-broken clustering"
        elif k > images // 2:
            notes[str(k)] = f"fewer than 2 images per cluster ({images} images)"
    return notes


def class_summaries(index: RunIndex, results: dict, k_max: int) -> list[dict]:
    """One entry per analysed class, ranked by eigengap (most distinct strategies first)."""
    entries = []
    for cls, result in results.items():
        a = result.analysis
        clusters = cluster_facts(result)
        entries.append({
            "class": cls, "name": index.class_names[cls], "wnid": index.wnids[cls], "images": len(result.rows),
            "k_chosen": a.k_chosen, "eigengap": round(a.eigengap, 6),
            "eigenvalues": [round(float(v), 6) for v in a.eigenvalues], "clusters": clusters,
            "candidate": is_candidate(clusters), "normalisation": result.normalisation, "seconds": result.seconds,
            "k_not_meaningful": k_not_meaningful(a, len(result.rows), k_max),
        })
    entries.sort(key=lambda e: (-e["eigengap"], e["class"]))
    for rank, entry in enumerate(entries, 1):
        entry["rank"] = rank
    return entries


def write_means(out: Path, index: RunIndex, results: dict) -> None:
    """cluster_means.h5: group `<class>` with `k<k>` (k, H, W) float32 mean maps, attribute `images` per cluster."""
    with h5_atomic(out / MEANS_FILE) as handle:
        for cls, result in results.items():
            group = handle.create_group(str(cls))
            group.attrs["name"] = index.class_names[cls]
            for k, means in result.means.items():
                data = group.create_dataset(f"k{k}", data=means, compression="gzip")
                data.attrs["images"] = np.bincount(result.analysis.kmeans[k], minlength=k)


def read_means(spray_dir: Path, cls: int, k: int) -> np.ndarray | None:
    """The (k, H, W) mean maps of one class's clustering, None when not stored."""
    path = Path(spray_dir) / MEANS_FILE
    if not path.is_file():
        return None
    with h5py.File(path, "r") as handle:
        key = f"{cls}/k{k}"
        return handle[key][()] if key in handle else None


def write_summary(out: Path, summary: dict) -> None:
    with atomic(out / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")


def write_all(out: Path, index: RunIndex, results: dict, skipped: list[dict], options, seconds: float,
              final: Path | None = None) -> dict:
    """clusters.parquet, cluster_means.h5 and summary.json into `out` (`final`: where the set will be, as the
    summary records it); returns the summary."""
    k_max = options.params.k_max
    table = clusters_table(results, k_max)
    with atomic(out / CLUSTERS_FILE) as tmp:
        pq.write_table(table, tmp)
    write_means(out, index, results)
    classes = class_summaries(index, results, k_max)
    summary = {
        "run": str(index.root), "out": str(final or out), "complete": index.complete,
        "options": options.record(), "images": int(table.num_rows),
        "classes": classes, "candidates": [c["class"] for c in classes if c["candidate"]], "skipped": skipped,
        "seconds": round(seconds, 2),
    }
    write_summary(out, summary)
    return summary
