"""`python -m pipeline sanity RUN`: MPRT and eMPRT over a seeded sample of a finished run's images. It reads the
run's statistics (which images, which class each map explains), its manifest (model, weights, composite, top-k,
crop size), rebuilds the model eagerly, decodes the sample as the workers did, and writes RUN/sanity.parquet
(RunLayout.sanity). Every setting is checked, and the sample's size against the run, before any model is built."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from lrp_module.files import atomic
from lrp_module.zoo import build_model

from ..errors import PipelineError
from ..preprocess import Preprocessing, decode_oriented, preprocess
from ..reading import read_bytes
from ..run_manifest import Manifest, read_manifest
from ..run_reader import map_size, open_run_folder, read_stats
from .mprt import SanityParams, Timing, mprt, total_steps
from .randomise import randomisable
from .schema import SANITY_SCHEMA

COLUMNS = ("image_id", "path", "target", "shard", "row")
DEVICES = ("auto", "cpu", "cuda")


class SanityError(PipelineError, ValueError):
    """The sanity check cannot run on this run or with these settings; the message names the culprit."""


@dataclass(frozen=True)
class SanityOptions:
    """How many images (`images`, at least 1, at most the run's), drawn with `sample_seed`; the test's params;
    where the LRP passes run; the output file (default RUN/sanity.parquet)."""

    images: int
    sample_seed: int = 0
    params: SanityParams = field(default_factory=SanityParams)
    device: str = "auto"
    out: str | None = None

    def problem(self) -> str | None:
        if self.images < 1:
            return f"--images must be at least 1, got {self.images}"
        if self.device not in DEVICES:
            return f"unknown device {self.device!r} (known: {', '.join(DEVICES)})"
        if self.device == "cuda" and not torch.cuda.is_available():
            return "--device cuda: no CUDA device available"
        return self.params.problem()


def weights_choice(manifest: Manifest) -> tuple[str, int]:
    """The weights argument of build_model (and the random seed) that rebuilds the run's model, from the
    manifest's weights record."""
    weights = manifest.weights
    if weights.kind in ("imagenet", "demo"):
        return weights.kind, 0
    if weights.kind == "file" and weights.source:
        return weights.source, 0
    if weights.kind == "random":
        source = weights.source or "seed=0"
        try:
            return "random", int(source.removeprefix("seed="))
        except ValueError:
            raise SanityError(f"{manifest.path}: weights source {source!r} is not seed=N") from None
    raise SanityError(f"{manifest.path}: the run's weights are not recorded (kind {weights.kind!r}); "
                      "finish the run (explain) first")


def rebuild(manifest: Manifest) -> torch.nn.Module:
    """The run's model with its weights (their hash checked against the manifest's where it records one)."""
    model_name = manifest.config.model
    if not model_name or not manifest.config.composite:
        raise SanityError(f"{manifest.path}: no model or composite recorded; finish the run (explain) first")
    weights, seed = weights_choice(manifest)
    classes = manifest.artifact.class_count if manifest.artifact else None
    model, info = build_model(model_name, weights, num_classes=classes, seed=seed, warn=False)
    recorded = manifest.weights.sha256
    if recorded and info.sha256 and recorded != info.sha256:
        raise SanityError(f"{weights}: its sha256 {info.sha256[:12]}... is not the run's {recorded[:12]}...")
    return model


def sample(table: pd.DataFrame, images: int, seed: int) -> pd.DataFrame:
    """`images` rows drawn without replacement with `seed`, in the run's order (shard, row)."""
    chosen = np.random.default_rng(seed).choice(len(table), size=images, replace=False)
    return table.iloc[np.sort(chosen)].reset_index(drop=True)


def load_inputs(rows: pd.DataFrame, size: int) -> torch.Tensor:
    """(N, 3, size, size): the sample decoded and preprocessed as the workers did (CPU path)."""
    preprocessing = Preprocessing.for_size(size)
    members = rows["member"] if "member" in rows else [None] * len(rows)
    tensors = []
    for path, member in zip(rows["path"], members):
        try:
            image, _, _ = decode_oriented(read_bytes(path, member if isinstance(member, str) else None))
        except Exception as error:  # the image was explained by the run: gone or changed since
            raise SanityError(f"{path}: cannot read the image again ({error})") from None
        tensors.append(preprocess(image, (), preprocessing)[0])
    return torch.stack(tensors)


def sanity(root: str | Path, options: SanityOptions, progress: bool = True) -> dict:
    """Run the test and write its table; a summary (per mode and step: the layer and the mean of each measure)."""
    problem = options.problem()
    if problem:
        raise SanityError(problem)
    started = time.perf_counter()
    layout = open_run_folder(root, SanityError)
    table = read_stats(layout, SanityError, COLUMNS, optional=("member",)).to_pandas()
    if options.images > len(table):
        raise SanityError(f"--images {options.images}: the run {layout.root} explained only {len(table)} images")
    manifest = read_manifest(layout)
    size = map_size(layout, manifest, SanityError)
    if options.params.intersection_k > size * size:
        raise SanityError(f"--intersection-k {options.params.intersection_k} exceeds the map's {size * size} pixels")
    model = rebuild(manifest)
    rows = sample(table.sort_values(["shard", "row"], kind="stable"), options.images, options.sample_seed)
    x = load_inputs(rows, size)
    targets = torch.tensor(rows["target"].to_numpy().astype(np.int64))
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available() else
                          options.device if options.device != "auto" else "cpu")
    timing = Timing()
    total = total_steps(model, options.params.modes, len(x), options.params.batch_size)
    with tqdm(total=total, disable=not progress, desc="randomised models x batches", unit="model") as bar:
        result = mprt(model, manifest.config.composite, manifest.config.top_k or 0.0, x, targets, options.params,
                      device, progress=bar.update, timing=timing)
    result = result.assign(image_id=rows["image_id"].to_numpy()[result["index"]],
                           shard=rows["shard"].to_numpy()[result["index"]],
                           row=rows["row"].to_numpy()[result["index"]].astype(np.int64))
    out = Path(options.out) if options.out else layout.sanity
    out.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(result[SANITY_SCHEMA.names], schema=SANITY_SCHEMA, preserve_index=False)
    with atomic(out) as tmp:
        pq.write_table(arrow, tmp)
    return {"out": str(out), "images": options.images, "layers": len(randomisable(model)), "device": str(device),
            "seconds": time.perf_counter() - started, "lrp_seconds": timing.lrp, "passes": timing.passes,
            "summary": summary(result)}


def summary(result: pd.DataFrame) -> pd.DataFrame:
    """Per mode and step: the layer and each measure's mean over the images (the cascade plot's points)."""
    measures = ["spearman_abs", "spearman", "ssim", "top_k_intersection", "emprt"]
    return (result.groupby(["mode", "step", "layer"], sort=False)[measures].mean().reset_index()
            .sort_values(["mode", "step"], kind="stable").reset_index(drop=True))
