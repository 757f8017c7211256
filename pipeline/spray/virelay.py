"""The run as a ViRelAy project (https://github.com/virelay/virelay), written in the layout ViRelAy 0.6.1's
`virelay/model.py` reads (which differs from its written format description). This module writes plain HDF5, YAML
and JSON; it never imports ViRelAy (AGPL).

RUN/spray/
  project.yaml     the project: label map, dataset, attributions, analyses (paths relative to this folder)
  label-map.json   [{index, word_net_id, name}] for every class of the model
  attribution.h5   `attribution` (N, H, W, 1): a VIEW (HDF5 virtual dataset) of the run's relevance/shard-*.h5, in
                   dataset order (the same rows as RUN/relevance.h5), so no map is copied; `label` and `prediction`
                   are small COPIES from stats/
  dataset.h5       `data` (N, H, W, 3) uint8: a COPY of each image's crop as the model saw it (resize + centre crop,
                   before normalisation), so that the maps line up pixel for pixel (black with --no-virelay-images:
                   ViRelAy cannot open a project without a dataset); `label` as above
  analysis.h5      one group per analysed class, named by its wnid: `index` (rows of the attribution/dataset files),
                   `embedding/spectral` (eigenvectors; attribute `eigenvalue`), `embedding/tsne`, `cluster/kmeans-NN`,
                   `cluster/agglomerative-NN` and `cluster/kmeans-eigengap` (the class's chosen k)
Labels are uint16 class indices when every image has a label, else n-hot bool rows (all False = no label): ViRelAy
accepts only those two forms. `prediction` holds the predicted and the explained class's softmax probabilities and
zero elsewhere (the run keeps no full score vector).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

from lrp_module.files import atomic

from ..h5_writing import h5_atomic
from ..layout import SPRAY_ANALYSIS as ANALYSIS_FILE
from ..layout import SPRAY_ATTRIBUTION as ATTRIBUTION_FILE
from ..layout import SPRAY_DATASET as DATASET_FILE
from ..layout import SPRAY_LABEL_MAP as LABEL_MAP_FILE
from ..layout import SPRAY_PROJECT as PROJECT_FILE
from .inputs import RunIndex


def labels_array(table: pd.DataFrame, classes: int) -> np.ndarray:
    """uint16 (N,) when every image is labelled, else bool (N, classes) n-hot (an unlabelled row all False)."""
    label = table["label"]
    if label.notna().all() and (label >= 0).all():
        return label.astype(np.uint16).to_numpy()
    hot = np.zeros((len(table), classes), dtype=bool)
    known = label.notna() & (label.fillna(-1) >= 0)
    hot[np.flatnonzero(known.to_numpy()), label[known].astype(int).to_numpy()] = True
    return hot


def prediction_array(table: pd.DataFrame, classes: int) -> np.ndarray:
    """(N, classes) float32: the predicted class's and the explained class's probabilities, zero elsewhere."""
    scores = np.zeros((len(table), classes), dtype=np.float32)
    rows = np.arange(len(table))
    scores[rows, table["target"].astype(int).to_numpy()] = table["target_probability"].to_numpy(np.float32)
    scores[rows, table["pred"].astype(int).to_numpy()] = table["pred_probability"].to_numpy(np.float32)
    return scores


def write_label_map(path: Path, index: RunIndex) -> None:
    entries = [{"index": i, "word_net_id": w, "name": n}
               for i, (w, n) in enumerate(zip(index.wnids, index.class_names))]
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=1) + "\n")


def write_attributions(path: Path, index: RunIndex) -> None:
    """attribution.h5: the shards' maps as one virtual (N, H, W, 1) dataset (source paths relative to this file,
    so the run folder can move), plus label and prediction copies."""
    table, size = index.table, index.size
    shards = table.groupby("shard", sort=True).size()
    dtype = None
    for shard in shards.index:
        with h5py.File(index.root / shard, "r") as handle:
            dtype = handle["relevance"].dtype
            break
    layout = h5py.VirtualLayout(shape=(len(table), size, size, 1), dtype=dtype)
    start = 0
    for shard, count in shards.items():
        source = h5py.VirtualSource(os.path.relpath(index.root / shard, path.parent), "relevance",
                                    shape=(int(count), size, size))
        layout[start:start + count, :, :, 0] = source[:count]
        start += int(count)
    classes = len(index.class_names)
    with h5_atomic(path) as handle:
        handle.create_virtual_dataset("attribution", layout, fillvalue=np.nan)
        handle.create_dataset("label", data=labels_array(table, classes))
        handle.create_dataset("prediction", data=prediction_array(table, classes), compression="gzip")
        handle.attrs["source"] = ("view of the run's relevance/shard-*.h5 (HDF5 virtual dataset, paths relative to "
                                  "this file): a copy without the run's shards reads as fill values (NaN)")


def _crop(path: str, size: int, member: str | None = None) -> np.ndarray | None:
    from ..preprocess import DecodeError
    from ..report.tiles import display_crop, preprocessing_for  # torch-based: imported only when images are wanted

    try:
        crop = display_crop(path, preprocessing_for(size), member)
    except DecodeError:
        return None
    return crop if crop.shape[:2] == (size, size) else None


def write_dataset(path: Path, index: RunIndex, decode: bool = True, chunk: int = 256, threads: int = 8) -> int:
    """dataset.h5: every image's crop (decoded again, in threads, `chunk` at a time); images that cannot be read
    any more stay black, and without `decode` all do (ViRelAy needs a dataset to open a project; black chunks
    compress to almost nothing). Returns how many could not be read."""
    table, size = index.table, index.size
    missing = 0
    with h5_atomic(path) as handle, ThreadPoolExecutor(max_workers=threads) as pool:
        data = handle.create_dataset("data", shape=(len(table), size, size, 3), dtype=np.uint8,
                                     chunks=(1, size, size, 3), compression="gzip", compression_opts=4)
        names = table["member"] if "member" in table else [None] * len(table)  # tar members (runs since then)
        members = [name if isinstance(name, str) else None for name in names]
        paths = list(zip(table["path"], members)) if decode else []
        for start in range(0, len(paths), chunk):
            crops = list(pool.map(lambda p: _crop(p[0], size, p[1]), paths[start:start + chunk]))
            block = np.zeros((len(crops), size, size, 3), dtype=np.uint8)
            for i, crop in enumerate(crops):
                if crop is None:
                    missing += 1
                else:
                    block[i] = crop
            data[start:start + len(crops)] = block
        handle.create_dataset("label", data=labels_array(table, len(index.class_names)))
        handle.attrs["source"] = ("copy: each image's crop as the model saw it (before normalisation)" if decode
                                  else "no images (spray --no-virelay-images): all black")
    return missing


def write_analysis(path: Path, index: RunIndex, results: dict, variant: str) -> None:
    """analysis.h5 in ViRelAy's layout: a group per class (its wnid) with index, embedding/*, cluster/*."""
    with h5_atomic(path) as handle:
        handle.attrs["variant"] = variant
        for cls, result in results.items():
            a = result.analysis
            group = handle.create_group(index.wnids[cls])
            group.attrs["class"] = cls
            group.attrs["name"] = index.class_names[cls]
            group.create_dataset("index", data=result.rows["index"].to_numpy(np.uint32))
            embedding = group.create_group("embedding")
            spectral = embedding.create_dataset("spectral", data=a.eigenvectors.astype(np.float32))
            spectral.attrs["eigenvalue"] = a.eigenvalues.astype(np.float32)
            tsne = embedding.create_dataset("tsne", data=a.embedding.astype(np.float32))
            tsne.attrs["embedding"] = "spectral"
            tsne.attrs["index"] = np.arange(a.eigenvectors.shape[1], dtype=np.uint32)
            clusters = group.create_group("cluster")
            named = [("kmeans-eigengap", a.k_chosen, a.kmeans[a.k_chosen])]
            named += [(f"kmeans-{k:02d}", k, labels) for k, labels in sorted(a.kmeans.items())]
            named += [(f"agglomerative-{k:02d}", k, labels) for k, labels in sorted(a.agglomerative.items())]
            for name, k, labels in named:
                data = clusters.create_dataset(name, data=labels.astype(np.uint32))
                data.attrs["embedding"] = "spectral"
                data.attrs["k"] = k
                data.attrs["index"] = np.arange(k, dtype=np.uint32)  # the eigenvectors it was computed on


def write_project_file(path: Path, index: RunIndex, variant: str) -> None:
    config = index.manifest.config
    project = {
        "name": f"{index.root.name} (SpRAy {variant})",
        "model": config.model or "unknown",
        "label_map": LABEL_MAP_FILE,
        "attributions": {
            "attribution_method": f"LRP {config.composite or '?'}",
            "attribution_strategy": "true_label" if config.target == "label" else "predicted_label",
            "sources": [ATTRIBUTION_FILE],
        },
        # no "-" in the method's name: the server maps it to "_"
        "analyses": [{"analysis_method": f"spray_{variant}", "sources": [ANALYSIS_FILE]}],
        "dataset": {"name": config.dataset or index.root.name, "type": "hdf5", "path": DATASET_FILE,
                    "input_width": index.size, "input_height": index.size,
                    "up_sampling_method": "none", "down_sampling_method": "none"},
    }
    with atomic(path) as tmp:
        tmp.write_text(yaml.safe_dump({"project": project}, sort_keys=False))


def write_project(out: Path, index: RunIndex, results: dict, options) -> dict:
    """All ViRelAy files into `out`; returns what was written (for summary.json)."""
    write_label_map(out / LABEL_MAP_FILE, index)
    write_attributions(out / ATTRIBUTION_FILE, index)
    write_analysis(out / ANALYSIS_FILE, index, results, options.variant)
    unreadable = write_dataset(out / DATASET_FILE, index, decode=options.virelay_images)
    write_project_file(out / PROJECT_FILE, index, options.variant)
    return {"project": PROJECT_FILE, "dataset": DATASET_FILE, "images": options.virelay_images,
            "unreadable_images": unreadable if options.virelay_images else None,
            "open_with": f"virelay {out / PROJECT_FILE}"}
