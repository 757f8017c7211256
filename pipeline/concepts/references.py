"""Reference images of concepts (CRP's reference samples): for a channel of a layer, its most relevant images (the
run's RelMax table, overall or for one class), each cropped to the receptive field of its most relevant neuron,
beside the concept's conditional heat map on that crop.

The conditional map is a full backward pass from the output: the start relevance of the image's explained class,
masked at the layer to the one channel (`LRPModel.concept_maps(x, target, [{layer: [c]}])`), so that its sign and
extent are the relevance the concept contributes to the class. zennit-crp 0.6.0 starts its reference maps at the
layer instead (the activation or one neuron as start relevance, the class unknown): its open issue #11
("reference heatmaps could be inverted or missing parts") is that defect; tests/test_concept_references.py shows
where the two differ.

The model is the run's, rebuilt from its manifest (model, weights, composite, top-k) in float32 or float64 on the
CPU; the images go through the run's own preprocessing (the weights' resize and centre crop at the run's size).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lrp_module import LRPModel
from lrp_module.receptive_field import Box, input_box
from lrp_module.zoo import build_model

from ..errors import PipelineError
from ..preprocess import DecodeError, Preprocessing, decode, geometry, preprocess
from ..reading import read_bytes
from ..run_manifest import Manifest
from .run_concepts import RunConcepts

DEFAULT_CHANNELS = 8  # channels rendered when none are named: the most relevant ones
DEFAULT_REFERENCES = 8  # reference images per channel
BATCH = 16  # conditional maps per backward pass


class ConceptsError(PipelineError, ValueError):
    """Reference images cannot be made; the message names the culprit (layer, channel, class, run)."""




@dataclass(frozen=True)
class ReferenceImage:
    """One reference: where it ranks, the image, its crop box, the cropped picture (None: unreadable now) and
    the conditional map on the crop."""

    layer: str
    channel: int
    klass: int | None  # the RelMax table's class; None: over all images
    rank: int
    image_id: str
    value: float  # the RelMax value (summed, normalised concept relevance)
    target: int  # the class whose relevance the map shows (the image's explained class in the run)
    box: Box  # (top, left, bottom, right) in input pixels, half-open (lrp_module.receptive_field)
    image: np.ndarray | None  # (h, w, 3) uint8, the model's crop before normalisation, cut to `box`
    heatmap: np.ndarray | None  # (h, w), the conditional map cut to `box` (the model's float32 or float64)
    problem: str | None = None


# ------------------------------------------------------------------------------------------------ the model
def run_lrp(manifest: Manifest, dtype: torch.dtype = torch.float32) -> LRPModel:
    """The run's LRP model, rebuilt on the CPU from what its manifest records: model, weights (ImageNet's, the demo's,
    a file (checked against its recorded hash) or the seeded random ones), composite and top-k."""
    config, weights = manifest.config, manifest.weights
    if not config.model or not config.composite:
        raise ConceptsError(f"{manifest.path}: the run records no model or composite; cannot rebuild its model")
    kind = weights.kind
    if kind in ("imagenet", "demo"):
        choice = kind
    elif kind == "file" and weights.source:
        choice = weights.source
    elif kind == "random":
        choice = "random"
    else:
        raise ConceptsError(f"{manifest.path}: unknown weights record {kind!r}; cannot rebuild the run's model")
    seed = _seed(weights.source) if kind == "random" else 0
    classes = manifest.classes.count if manifest.classes else None
    model, info = build_model(config.model, choice, num_classes=classes, seed=seed, warn=False)
    if weights.sha256 and info.sha256 and weights.sha256 != info.sha256:
        raise ConceptsError(f"{choice}: the weights differ from the run's (sha256 {info.sha256[:12]}…, the run "
                            f"used {weights.sha256[:12]}…)")
    return LRPModel(model.to(dtype), config.composite, top_k=config.top_k or 0.0)


def _seed(source: str | None) -> int:
    found = re.fullmatch(r"seed=(\d+)", source or "")
    return int(found.group(1)) if found else 0


# ------------------------------------------------------------------------------------------------ the images
def load_image(path: str, member: str | None, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(3, size, size) normalised float32 input as the run's workers made it, and the same crop as (size, size, 3)
    uint8 before normalisation (what the map's pixels line up with). Raises DecodeError."""
    preprocessing = Preprocessing.for_size(size)  # the workers' recipe (pipeline/worker.py)
    image = decode(read_bytes(path, member))
    x, _ = preprocess(image, (), preprocessing)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    for transform in geometry(preprocessing):  # as pipeline/report/tiles.display_crop
        pixels = transform(pixels)
    return x, pixels.permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ the maps
def conditional_maps(lrp: LRPModel, x: torch.Tensor, targets: Sequence[int], layer: str,
                     channels: Sequence[int], exclude_parallel: bool = True) -> torch.Tensor:
    """(N, H, W): image i's map for class targets[i] with the relevance at `layer` kept only in channel
    channels[i]: a full backward pass from the output (CRP's conditional heat map), computed `BATCH` at a time.
    exclude_parallel: as the run computed its concepts (lrp_module/concepts.py; equal on a VGG)."""
    weight_dtype = next(b for b in lrp.buffers() if b.is_floating_point()).dtype  # the model's float32 / float64
    maps = []
    for start in range(0, x.shape[0], BATCH):
        piece = slice(start, start + BATCH)
        conditions = [[{layer: [int(c)]}] for c in channels[piece]]
        maps.append(lrp.concept_maps(x[piece].to(weight_dtype), torch.as_tensor(list(targets[piece])),
                                     conditions, exclude_parallel=exclude_parallel)[:, 0])
    return torch.cat(maps)


def crop_box(lrp: LRPModel, layer: str, neuron: int, size: int) -> Box:
    """(top, left, bottom, right): the input pixels the neuron at flat position `neuron` of the layer's output reads
    (its receptive field, lrp_module.receptive_field), clipped to the image; the whole image where the neuron is
    unknown (-1), the layer is flat (a dense layer) or the neuron reads only padding."""
    if neuron is None or neuron < 0:
        return 0, 0, size, size
    top, left, bottom, right = (int(v) for v in input_box(lrp, layer, int(neuron), (size, size)))
    return (top, left, bottom, right) if bottom > top and right > left else (0, 0, size, size)


# ------------------------------------------------------------------------------------------------ references
def choose_channels(concepts: RunConcepts, layer: str, channels: Sequence[int] | None, klass: int | None,
                    count: int = DEFAULT_CHANNELS) -> list[int]:
    """The channels asked for (each checked), or the `count` most relevant ones: the largest mean concept relevance
    over the run's images (the class's, with `klass`)."""
    total = concepts.channels(layer)
    if channels:
        for channel in channels:
            if not 0 <= channel < total:
                raise ConceptsError(f"channel {channel} is out of range: {layer} has {total} channels (0-{total - 1})")
        return list(dict.fromkeys(int(c) for c in channels))
    mean = concepts.mean_relevance(layer, klass)
    return [int(c) for c in np.argsort(-mean, kind="stable")[:count]]


def reference_rows(concepts: RunConcepts, layer: str, channel: int, klass: int | None, n: int) -> pd.DataFrame:
    """The RelMax table's first n rows of a channel (its most relevant images), overall or for one class, with each
    image's path, tar member and explained class."""
    table = concepts.relmax
    rows = table[(table["layer"] == layer) & (table["channel"] == channel)]
    rows = rows[rows["class"].isna()] if klass is None else rows[rows["class"] == klass]
    rows = rows.sort_values("rank", kind="stable").head(n)
    located = concepts.stats.drop_duplicates("image_id").set_index("image_id").loc[
        rows["image_id"], ["path", "member", "target"]]
    return rows.assign(path=located["path"].to_numpy(), member=located["member"].to_numpy(),
                       target=located["target"].to_numpy())


def references(concepts: RunConcepts, lrp: LRPModel, layer: str, channels: Sequence[int], klass: int | None = None,
               n: int = DEFAULT_REFERENCES) -> dict[int, list[ReferenceImage]]:
    """Channel -> its reference images (rank order): crops of the most relevant images at the receptive field of
    their most relevant neuron, with the concept's conditional map (full backward pass from the image's class)."""
    size = concepts.size
    wanted = [(c, row) for c in channels
              for row in reference_rows(concepts, layer, c, klass, n).itertuples(index=False)]
    loaded, problems = [], {}
    for i, (_, row) in enumerate(wanted):
        member = row.member if isinstance(row.member, str) else None
        try:
            loaded.append((i, *load_image(row.path, member, size)))
        except DecodeError as error:
            problems[i] = f"image not available ({error})"
    maps = {}
    if loaded:
        x = torch.stack([item[1] for item in loaded])
        computed = conditional_maps(lrp, x, [int(wanted[i][1].target) for i, *_ in loaded], layer,
                                    [wanted[i][0] for i, *_ in loaded], concepts.record.exclude_parallel)
        maps = {i: (picture, computed[j].numpy()) for j, (i, _, picture) in enumerate(loaded)}
    found: dict[int, list[ReferenceImage]] = {c: [] for c in channels}
    for i, (channel, row) in enumerate(wanted):
        top, left, bottom, right = box = crop_box(lrp, layer, int(row.neuron), size)
        picture, heat = maps.get(i, (None, None))
        found[channel].append(ReferenceImage(
            layer, channel, klass, int(row.rank), str(row.image_id), float(row.value), int(row.target), box,
            None if picture is None else picture[top:bottom, left:right],
            None if heat is None else heat[top:bottom, left:right], problems.get(i)))
    return found
