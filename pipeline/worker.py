"""Explain one shard: decode in background threads, run the traced LRP module, compute statistics, write the
shard's HDF5 maps, Parquet statistics and failures. A plain class: the driver wraps it as a Ray actor.

With `settings.strict` a shard stops at its first failed image and writes nothing (the shard stays undone).
A write error (disk full, ...) is not an image failure: the shard writes nothing under a final name and its
result carries `write_error` for the driver to stop the run. Settings and results are the typed contracts of
pipeline/contracts.py."""
from __future__ import annotations

import dataclasses
import os
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lrp_module.files import OutputError
from lrp_module.oracle import numeric_settings

from . import stats as statistics
from .concepts.outputs import ConceptArrays
from .concepts.per_image import ConceptImage, shard_arrays, split_batch
from .concepts.per_image import statistics as concept_statistics
from .contracts import ProbeImages, ShardResult, WorkerSettings
from .datasets.records import ImageRecord
from .faithfulness import flip_statistics
from .faults import inject_fault
from .gpu_decode import DeviceDecoder
from .layout import RunLayout
from .metrics import batch_columns as metric_columns
from .preprocess import DecodeError, Preprocessing, load
from .reading import expect
from .schema import FAILURE_SCHEMA, STATS_SCHEMA, failure_row, map_columns, stats_rows
from .writers import compress_map, write_parquet, write_relevance

NO_LABEL = "no label: --target label explains each image's labelled class, and this image has none"


class ShardExplainer:
    """Holds the traced module (loaded once) and explains shards."""

    def __init__(self, artifact: str, settings: WorkerSettings) -> None:
        self.settings = settings
        self.device = "cuda" if settings.device == "cuda" and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            tf32 = settings.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        else:
            torch.set_num_threads(max(1, settings.threads))
        self.module = torch.jit.load(artifact, map_location=self.device)
        self.preprocessing = Preprocessing.for_size(settings.size)  # the weights' 256/224 recipe
        self.decoders = ThreadPoolExecutor(max_workers=settings.decode_threads)
        # JPEGs decoded and preprocessed on the GPU where there is one (gpu_decode: false keeps Pillow)
        self.device_decoder = DeviceDecoder(self.preprocessing, self.device, settings.batch_size,
                                            settings.decode_threads, settings.max_image_bytes) \
            if self.device == "cuda" and settings.gpu_decode else None
        self.compressors = ThreadPoolExecutor(max_workers=2, thread_name_prefix="compress")  # while the model runs
        # pixel flipping needs plain forward passes: the traced classifier
        classifier = settings.flipping.classifier if settings.flipping else \
            settings.metrics.classifier if settings.metrics else None
        self.classifier = torch.jit.load(classifier, map_location=self.device) if classifier else None

    def _name(self, index: int) -> str | None:
        names = self.settings.class_names
        return names[index] if 0 <= index < len(names) else None

    def _decode(self, record: ImageRecord):
        """The preprocessed image and boxes, or the exception that becomes this image's failure reason."""
        if record.problem:  # known from the listing (outside the root, missing, unknown label): never opened
            return DecodeError(record.problem)
        if self.settings.target == "label" and record.label is None:  # never the prediction in its place
            return DecodeError(NO_LABEL)
        inject_fault(record.path)  # off unless LRP_FAULT_INJECT=1 (tests and the soak benchmark)
        try:
            return load(record, self.preprocessing, self.settings.max_image_bytes)
        except DecodeError as error:
            return error
        except Exception as error:  # anything else one image can trigger must not stop the shard
            return DecodeError(f"preprocessing failed: {type(error).__name__}: {error}")

    def ready(self) -> bool:
        """Returns once the module is loaded: the driver starts a shard's clock only after this."""
        return True

    def probe(self, record: ImageRecord) -> bool:
        """Decode and explain one image, writing nothing: the driver's way to find the image that kills or hangs
        the worker (an ordinary failure is the shard run's to record)."""
        item = self._decode(record)
        if not isinstance(item, Exception):
            try:
                self._explain_batch([(record, item)], 0)
            except Exception:  # noqa: S110  (explain_shard records it as the image's failure)
                pass
        return True

    def explain_shard(self, index: int, records: list[ImageRecord], out_dir: str,
                      skip: dict[int, str] | None = None) -> ShardResult:
        """Explain and write one shard; `skip` maps positions of images known to kill the worker to the reason
        recorded for them instead."""
        out = Path(out_dir)
        started = time.perf_counter()
        strict = self.settings.strict
        skip = skip or {}
        expect_members(records, self.settings.max_image_bytes)
        # every decode is submitted now and runs in the pool's threads while earlier batches are explained
        decode = lambda at, record: RuntimeError(skip[at]) if at in skip else self._decode(record)  # noqa: E731
        decoded = self.device_decoder.iterate(records, decode, skip) if self.device_decoder else \
            self.decoders.map(decode, range(len(records)), records)
        failures: list[dict] = []
        maps, rows, compressed = [], [], []
        concepts: list[ConceptImage] = []  # the explained images' concept outputs (their maps compressed below)
        concept_maps: list = []
        batch = self.settings.batch_size
        pending: list = []
        # the run's precision probe (pipeline/precision_probe.py): shard 0's first images go back to the driver
        probed = _ProbeCollector(self.settings.probe_images if index == 0 else 0, self.device)
        try:
            for record in records:
                item = next(decoded)
                if isinstance(item, Exception):
                    failures.append(failure_row(record.image_id, record.path, str(item), index, record.member_name))
                else:
                    pending.append((record, item))
                if strict and failures:
                    return self._stopped(index, failures[0], started)
                if len(pending) == batch or (record is records[-1] and pending):
                    try:
                        maps_chunk, rows_chunk, outputs, concepts_chunk = self._explain_batch(pending, len(maps))
                        for map_, row, concept in zip(maps_chunk, rows_chunk, concepts_chunk):
                            empty = _empty_map_reason(row)
                            if empty:  # an all-zero or non-finite map explains nothing: a failure saying why
                                failures.append(failure_row(row["image_id"], row["path"], empty, index,
                                                            row["member"]))
                                continue
                            row["row"] = len(maps)
                            maps.append(map_)
                            compressed.append(self.compressors.submit(compress_map, map_, self.settings.map_dtype,
                                                                      self.settings.compression))
                            rows.append(row)
                            if concept is not None:
                                if concept.maps is not None:  # compressed beside the model, then dropped here
                                    concept_maps.append(self.compressors.submit(
                                        compress_map, concept.maps, self.settings.map_dtype, self.settings.compression))
                                concepts.append(dataclasses.replace(concept, maps=None))
                        probed.add([record for record, _ in pending], *outputs)
                        if strict and failures:
                            return self._stopped(index, failures[0], started)
                    except Exception as error:  # an image that breaks the model: record it, go on
                        failures += [failure_row(r.image_id, r.path, f"explain failed: {error}", index, r.member_name)
                                     for r, _ in pending]
                        if strict:
                            return self._stopped(index, failures[0], started)
                    pending = []
        finally:
            decoded.close()  # a strict stop cancels the decodes not yet started
        size = self.settings.size
        array = np.stack(maps) if maps else np.zeros((0, size, size), np.float32)
        work = self.settings.concepts
        arrays = shard_arrays(concepts, [future.result() for future in concept_maps], work.record, size, size) \
            if work is not None else None
        try:
            self._write(RunLayout(out), index, array, rows, failures, [future.result() for future in compressed],
                        arrays)
        except OutputError as error:  # the run stops; nothing half-written is left under a final name
            return _result(index, started, explained=0, failed=0, write_error=str(error))
        return _result(index, started, explained=len(rows), failed=len(failures),
                       reasons=tuple(f["reason"] for f in failures), probe_images=probed.images())

    def _stopped(self, index: int, failure: dict, started: float) -> ShardResult:
        """--strict: the shard's result at its first failure; nothing of the shard is written."""
        return _result(index, started, explained=0, failed=1, reasons=(failure["reason"],), stopped_at=failure)

    def _write(self, layout: RunLayout, index: int, array: np.ndarray, rows: list[dict],
               failures: list[dict], chunks: list[bytes] | None = None, concepts: ConceptArrays | None = None) -> None:
        columns = map_columns(rows)
        relevance_file = layout.relevance_shard(index)
        write_relevance(relevance_file, array, columns, self.settings.attributes, dtype=self.settings.map_dtype,
                        compression=self.settings.compression, chunks=chunks, concepts=concepts)
        for row in rows:
            row["shard"] = layout.relative(relevance_file)
        write_parquet(failures, FAILURE_SCHEMA, layout.failure_shard(index))
        write_parquet(rows, STATS_SCHEMA, layout.stats_shard(index))  # last: marks the shard done

    def _explain_batch(self, chunk, offset: int):
        x = torch.stack([tensor for _, (tensor, _) in chunk]).to(self.device)
        target = self._targets([record for record, _ in chunk]).to(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(x, target)  # logits, relevance, then any concept outputs (export/concepts.py)
        seconds = (time.perf_counter() - start) / len(chunk)
        logits, relevance = outputs[0].float().cpu(), outputs[1].float().cpu()
        work = self.settings.concepts
        concepts = split_batch(outputs, work.record) if work is not None else [None] * len(chunk)
        predicted = logits.argmax(1)
        used = torch.where(target.cpu() < 0, predicted, target.cpu())
        values = {**statistics.map_statistics(relevance), **statistics.prediction(logits, used)}
        start = statistics.start_relevance(logits, used, self.settings.start)
        values.update(statistics.conservation(values["relevance_sum"], start))
        values.update(statistics.localisation(relevance, [boxes for _, (_, boxes) in chunk]))
        if self.settings.metrics is not None and self.settings.metrics.names:
            values.update(self._metrics(x, used.to(self.device), relevance, logits.shape[1], chunk))
        if self.settings.flipping is not None:
            flipping = self.settings.flipping
            values.update(flip_statistics(self.classifier, x, relevance, used.to(self.device),
                                          [record.image_id for record, _ in chunk], flipping.steps,
                                          flipping.patch, self.settings.batch_size))
        records = [record for record, _ in chunk]
        values.update(statistics.correctness(values["pred"], [record.label for record in records]))
        if work is not None:
            values.update(concept_statistics(concepts, work.record, work.top))
        supplied = {"image_id": [r.image_id for r in records], "path": [r.path for r in records],
                    "member": [r.member_name for r in records],
                    "wnid": [r.wnid for r in records], "label": [r.label for r in records],
                    "label_name": [r.label_name for r in records],
                    "pred_name": [self._name(int(pred)) for pred in values["pred"]],
                    "boxes": [[list(b) for b in boxes] or None for _, (_, boxes) in chunk],
                    "row": range(offset, offset + len(chunk)), "seconds": [seconds] * len(chunk)}
        rows = stats_rows({**values, **supplied}, len(chunk))
        return list(relevance.numpy()), rows, (x, used, relevance), concepts

    def _metrics(self, x: torch.Tensor, used: torch.Tensor, relevance: torch.Tensor, classes: int, chunk
                 ) -> dict[str, torch.Tensor]:
        """The run's evaluation metrics (pipeline/metrics/) for one batch: maps and boxes, the classifier's
        forward passes, a second LRP pass for random logit."""
        def explain(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.module(inputs, targets)[1].float().cpu()

        return metric_columns(self.settings.metrics, relevance, [boxes for _, (_, boxes) in chunk], x, used,
                              classes, [record.image_id for record, _ in chunk], self.classifier, explain,
                              self.settings.batch_size)

    def _targets(self, records: list[ImageRecord]) -> torch.Tensor:
        mode = self.settings.target
        if mode == "label":
            return torch.tensor([-1 if r.label is None else r.label for r in records])
        if isinstance(mode, int) or (isinstance(mode, str) and mode.isdigit()):
            return torch.full((len(records),), int(mode))
        return torch.full((len(records),), -1)


class _ProbeCollector:
    """Shard 0's first `wanted` explained images as the precision probe needs them: inputs, classes, float32 maps."""

    def __init__(self, wanted: int, device: str) -> None:
        self.wanted, self.device = wanted, device
        self.ids: list[str] = []
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, records: list[ImageRecord], x: torch.Tensor, used: torch.Tensor, relevance: torch.Tensor) -> None:
        n = min(self.wanted - len(self.ids), len(records))
        if n > 0:
            self.ids += [record.image_id for record in records[:n]]
            self.parts.append((x[:n].cpu(), used[:n], relevance[:n]))  # shard 0's first batch only

    def images(self) -> ProbeImages | None:
        if not self.ids:
            return None
        x, used, relevance = (torch.cat(part) for part in zip(*self.parts))
        return ProbeImages(tuple(self.ids), x.float().numpy(), tuple(int(t) for t in used), relevance.numpy(),
                           numeric_settings(self.device))


def _empty_map_reason(row: dict) -> str | None:
    """Why a map explains nothing (all zero, or not finite), or None."""
    largest = row.get("max_abs")
    if largest is None or not np.isfinite(largest):
        return f"non-finite relevance map (target {row['target']}, logit {row['target_logit']:.4g})"
    if largest == 0:
        return (f"all-zero relevance map (target {row['target']}, logit {row['target_logit']:.4g}): no relevance "
                "reached the input")
    return None


def expect_members(records: list[ImageRecord], max_bytes: int) -> None:
    """Name the compressed-shard members this run shard reads, so that one forward pass serves them (reading.py)."""
    by_shard: dict[str, list] = {}
    for record in records:
        if record.member is not None and record.member.compression and not record.problem:
            by_shard.setdefault(record.path, []).append(record.member)
    for path, members in by_shard.items():
        expect(path, members, max_bytes)


def _result(index: int, started: float, **outcome) -> ShardResult:
    """A shard's result, with its time, the actor's peak memory and where it ran."""
    return ShardResult(shard=index, seconds=time.perf_counter() - started, peak_rss_mb=_peak_rss_mb(),
                       worker=_where(), **outcome)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _where() -> dict:
    """The node, host and process that explained a shard (recorded in the manifest)."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        node = None
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}
